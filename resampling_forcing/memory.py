"""Up-front memory estimates: refuse a run that cannot fit before loading or generating anything.

The numbers are LOWER BOUNDS of what a training step or a rollout must hold at once (weights,
the clip batch, the latents, the per-block activations that even gradient checkpointing keeps,
the KV cache of every chunk, the decoded video). A lower bound above the memory that is free
means the run cannot work, so the caller refuses with the estimate in the message; a bound below
it does not promise success (attention work buffers, allocator slack and encoders come on top).

    need = train_memory(cfg)                      # {"device": bytes, "host": bytes, "parts": {...}}
    msg = check_fits(need, device)                # None, or one line naming the estimate and the fix
"""
from __future__ import annotations

import math
import os
from typing import Optional

from .config import WAN_VAES, Config

# The most chunks of an init video kept as history by default (the CLI's --max-history-chunks and
# Pipeline.generate's max_history_chunks): bounds the cache a long video would fill.
MAX_HISTORY_CHUNKS = 16

GiB = float(1 << 30)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / (1 << 20):.0f} MiB"


# ----------------------------------------------------------------------------- geometry


def codec_geometry(cfg: Config) -> dict:
    """Latent geometry of cfg.encoders without building the encoders (pixel_shuffle / Wan VAE)."""
    e = cfg.encoders
    if e.vae == "pixel_shuffle":
        s = e.vae_factor
        return dict(channels=3 * s * s, spatial=s, temporal=1, causal=False)
    return {k: WAN_VAES[e.vae][k] for k in ("channels", "spatial", "temporal", "causal")}


def latent_frames(geo: dict, num_frames: int) -> int:
    if geo["causal"]:
        return 1 + max(num_frames - 1, 0) // geo["temporal"]
    return max(num_frames // geo["temporal"], 1)


def pixel_frames(geo: dict, latent: int) -> int:
    return 1 + geo["temporal"] * (latent - 1) if geo["causal"] else geo["temporal"] * latent


def chunks_for_seconds(cfg: Config, seconds: float, history: bool, fps: Optional[float] = None) -> int:
    """Generated chunks that make at least `seconds` of video played at `fps` (default data.fps; after a
    given history when `history`): the video's first chunk brings pixel_frames(cf) frames, every later one
    cf x temporal."""
    geo, cf = codec_geometry(cfg), cfg.model.chunk_frames
    want = math.ceil(seconds * (cfg.data.fps if fps is None else fps) - 1e-9)
    first = 0 if history else pixel_frames(geo, cf)
    per = pixel_frames(geo, 2 * cf) - pixel_frames(geo, cf)
    return 1 + max(0, math.ceil((want - (first or per)) / per))


def model_params(cfg: Config) -> int:
    m = cfg.model
    pt, ph, pw = m.patch_size
    block = 8 * m.dim * m.dim + 2 * m.dim * m.ffn_dim + 12 * m.dim
    return (m.num_layers * block + m.in_channels * pt * ph * pw * m.dim + m.text_dim * m.dim + m.dim * m.dim
            + m.freq_dim * m.dim + 7 * m.dim * m.dim + m.dim * m.out_channels * pt * ph * pw)


def tokens_per_chunk(cfg: Config, h: int, w: int) -> int:
    return cfg.model.chunk_tokens(h, w)


# ----------------------------------------------------------------------------- estimates


def trained_params(cfg: Config) -> int:
    """Numbers the optimizer trains: every weight, or a LoRA run's adapters (lora.adapter_count)."""
    if not cfg.train.lora.rank:
        return model_params(cfg)
    from .lora import adapter_count  # lazy: torch (config validation imports this module torch-free)

    return adapter_count(cfg.model, cfg.train.lora)


def train_memory(cfg: Config, world: int = 1) -> dict:
    """Lower bound of one training step per process: {"device", "host", "parts"} in bytes. The weights,
    gradients and AdamW's two moments (fp32) are divided over `world` processes as ZeRO-3 shards them
    (DDP and ZeRO-1/2 hold more of them per process)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    geo = codec_geometry(cfg)
    b = t.batch_size
    f = latent_frames(geo, d.num_frames)
    h, w = d.height // geo["spatial"], d.width // geo["spatial"]
    chunks = max(f // m.chunk_frames, 1)
    from .attention.masks import MaskSpec  # lazy: config validation imports this module (torch-free there)

    tokens = MaskSpec("dual", chunks, tokens_per_chunk(cfg, h, w)).seq_len  # [H_1..H_{N-1} | Q_1..Q_N]
    act_bytes = 2 if t.mixed_precision != "no" else 4
    parts = {
        # fp32, or a LoRA run's frozen base held in the mixed-precision dtype (lora.HOLD_DTYPES)
        "weights": model_params(cfg) * (2 if t.lora.rank and t.mixed_precision != "no" else 4) // max(world, 1),
        "gradients and optimizer": trained_params(cfg) * (4 + 8) // max(world, 1),  # fp32 grads, exp_avg, exp_avg_sq
        "latents": 4 * b * geo["channels"] * f * h * w * 4,  # clean, noisy, noise, history
        "activations": b * tokens * m.dim * act_bytes * m.num_layers,  # one block input per layer
    }
    host = {}
    if d.source != "latents":
        host["clip batch"] = b * 3 * d.num_frames * d.height * d.width * 4  # float32 pixels
    return _total(parts, host)


def sample_memory(cfg: Config, num_chunks: int, batch: int = 1, dtype_bytes: int = 4,
                  history_chunks: int = 0, cfg_scale: float = 1.0, kv_resident_chunks: int | None = None,
                  kv_host_bytes: int | None = None, kv_staged_chunks: int | None = None,
                  far_positions: bool = False, kv_keep: tuple[int, int] | None = None,
                  streamed: bool = False) -> dict:
    """Lower bound of one rollout of `batch` videos: KV cache of every chunk (twice with CFG: the
    conditional and unconditional caches are the two halves of the cache's batch), latents, the live
    tensors of one block over one chunk (x, q, k, v, attention output, FFN hidden; twice with CFG),
    the decoded video. With `kv_resident_chunks` = R (cache.TieredKVCache) the device holds R + 1
    chunks of every layer plus ONE layer's staged history and the current chunk; the rest of the
    cache is host memory (`kv_host_bytes` per element there; None = dtype_bytes).
    `kv_staged_chunks`: the history chunks staged at once: None = all (dense attention); routed modes
    stage fewer: window sink + window, top-k the union of the selections, at least
    `RoutingSpec.max_selected()` (flat in the rollout length while selections are coherent).
    `far_positions` (a rope_horizon): each call reads a rotated copy of one layer's read keys.
    `kv_keep` = (sink, window) with R (window routing on every block, attention.spec.window_reads): the
    sink chunks stay on the device, only window chunks beyond the ring go to the host, the rest is
    dropped: the cache is flat in the rollout length.
    `streamed`: the decoded video goes to files as it comes (sample/sample.py): one chunk's frames held."""
    d, m = cfg.data, cfg.model
    geo = codec_geometry(cfg)
    h, w = d.height // geo["spatial"], d.width // geo["spatial"]
    n = num_chunks + history_chunks
    t = tokens_per_chunk(cfg, h, w)
    frames = pixel_frames(geo, n * m.chunk_frames)
    staged = n if kv_staged_chunks is None else min(n, kv_staged_chunks)
    branches = 2 if cfg_scale != 1.0 else 1  # CFG: the cache (and what is read from it) holds both
    off = 0 if kv_resident_chunks is None else max(0, n - kv_resident_chunks)  # chunks past the ring
    sink_kept = 0 if kv_keep is None else min(off, kv_keep[0])
    host_chunks = off if kv_keep is None else max(0, off - max(kv_keep[0], n - kv_keep[1]))
    kv_chunks = (m.num_layers * n if kv_resident_chunks is None  # chunks of K and V on the device
                 else m.num_layers * (min(n, kv_resident_chunks + 1) + sink_kept) + staged + 1)  # ring + one layer's staging
    parts = {
        "weights": model_params(cfg) * dtype_bytes,
        "kv cache": 2 * kv_chunks * t * m.dim * dtype_bytes * batch * branches,
        "latents": 2 * batch * geo["channels"] * n * m.chunk_frames * h * w * 4,
        "block work": branches * batch * t * (5 * m.dim + m.ffn_dim) * dtype_bytes,
    }
    if far_positions:  # attention/positions.py rotates a copy of the keys a call reads (one layer)
        parts["far-position keys"] = staged * t * m.dim * dtype_bytes * batch * branches
    if streamed:  # the largest piece: the history's reconstruction, or a chunk's frames
        frames = max(pixel_frames(geo, history_chunks * m.chunk_frames) if history_chunks else 0,
                     geo["temporal"] * m.chunk_frames)
    host = {"video": batch * frames * d.height * d.width * 3}  # uint8 frames held
    if kv_resident_chunks is not None:
        host["kv cache (host tier)"] = (m.num_layers * 2 * host_chunks * t * m.dim * batch
                                        * branches * (dtype_bytes if kv_host_bytes is None else kv_host_bytes))
    return _total(parts, host)


def sample_flops(cfg: Config, num_chunks: int, batch: int, steps: int, cfg_scale: float,
                 history_chunks: int = 0) -> float:
    """Rough multiply-adds x 2 of a rollout (the big matmuls and the attention over the cache)."""
    d, m = cfg.data, cfg.model
    geo = codec_geometry(cfg)
    t = tokens_per_chunk(cfg, d.height // geo["spatial"], d.width // geo["spatial"])
    passes = steps * (2 if cfg_scale != 1.0 else 1) + 1  # denoising steps + the cache-writing pass
    per_token_block = 2 * (8 * m.dim * m.dim + 2 * m.dim * m.ffn_dim)
    n = float(num_chunks)
    ctx_sum = t * (n * (history_chunks + 1) + n * (n - 1) / 2)  # keys attended, summed over the chunks
    return batch * passes * m.num_layers * t * (n * per_token_block + 4 * m.dim * ctx_sum)


def _total(parts: dict, host: dict) -> dict:
    return {"device": sum(parts.values()), "host": sum(host.values()), "parts": {**parts, **host}}


# ----------------------------------------------------------------------------- what is free


def available_host_bytes() -> Optional[int]:
    """Free RAM for this process: MemAvailable, capped by a cgroup (v2/v1) memory limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = open(limit_file).read().strip()
            if raw == "max":
                continue
            limit, usage = int(raw), int(open(usage_file).read().strip())
            if limit < (1 << 60):
                avail = min(avail, max(limit - usage, 0))
        except (OSError, ValueError):
            continue
    return avail


def available_device_bytes(device) -> Optional[int]:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    if device.type == "cpu":
        return None  # counted with the host
    return None


def rollout_need(cfg: Config, opts, num_chunks: int, batch: int, dtype_bytes: int, history_chunks: int = 0,
                 streamed: bool = False) -> dict:
    """sample_memory for a rollout with SamplingOptions `opts` (the CLI's, `streamed`, and the Pipeline's one estimate):
    a bounded cache stages at least the chunks a routed query may attend (top-k: the union of its picks,
    at least RoutingSpec.max_selected()); dense attention, or any layer left dense, the whole history."""
    from .attention.spec import every_block_routes, window_reads
    from .dtypes import DTYPE_BYTES

    routed = (opts.routing is not None and not opts.routing.is_dense
              and every_block_routes(opts.routing_layers, cfg.model.num_layers))
    return sample_memory(cfg, num_chunks, batch, dtype_bytes, history_chunks, opts.cfg_scale, opts.kv_resident_chunks,
                         DTYPE_BYTES.get(opts.kv_host_dtype),
                         kv_staged_chunks=opts.routing.max_selected() if routed else None,
                         far_positions=opts.rope_horizon is not None,
                         kv_keep=window_reads(opts.routing, opts.routing_layers, cfg.model.num_layers),
                         streamed=streamed)


def check_fits(need: dict, device, what: str, fix: str) -> Optional[str]:
    """One line when the lower bound `need` exceeds the free memory, else None."""
    import torch

    device = torch.device(device)
    host_need = need["host"] + (need["device"] if device.type == "cpu" else 0)
    biggest = max(need["parts"].items(), key=lambda kv: kv[1])
    host_free = available_host_bytes()
    if host_free is not None and host_need > host_free:
        return (f"{what} needs at least {gib(host_need)} of RAM (estimate; largest part: {biggest[0]} "
                f"{gib(biggest[1])}) but {gib(host_free)} is available; {fix}")
    if device.type == "cuda":
        dev_free = available_device_bytes(device)
        if dev_free is not None and need["device"] > dev_free:
            return (f"{what} needs at least {gib(need['device'])} of GPU memory (estimate; largest part: "
                    f"{biggest[0]} {gib(biggest[1])}) but {gib(dev_free)} is free on {device}; {fix}")
    return None
