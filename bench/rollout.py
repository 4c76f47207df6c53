#!/usr/bin/env python
"""Rollout benchmark: per-chunk latency vs chunk index for dense vs routed vs sliding-window
attention, attention time per chunk, peak memory, frames per second with and without VAE decode.

Random weights (no checkpoint needed): preset `tiny` (pixel-shuffle "VAE") and `wan-100m`
(~120M parameters at Wan's shapes; decoded by a randomly initialised Wan2.1 VAE architecture,
diffusers' AutoencoderKLWan, so decode times are representative of the real VAE at that size).

    python bench/rollout.py --out bench.json       # defaults: tiny 16x16 + wan-100m 8x8, 16 chunks, ~1-2 min
    python bench/rollout.py --presets tiny --latent 32x32 --chunks 24 --threads 1 --modes dense,window5,topk5
    python bench/rollout.py --presets wan-100m --latent 8x8 --chunks 40 --modes dense,topk5 --vae none

Modes: dense, topkK (top-K history chunks per query token, e.g. topk1, topk5; optional --sink),
windowW (sliding window of the last W chunks, e.g. window5; plain `window` = --window), replayK:
top-K with the selections a trained model made (--replay CHECKPOINT records them from its own rollout
of --chunks chunks and bench/replay.py maps them onto this shape; random weights otherwise pick at
random, which is not the pattern trained models make).
Attention time is measured by wrapping the attention op (host timer; CUDA is synchronised around
each call, which slows the rollout a little). Chunk n (1-based) includes writing chunk n-1 into
the cache (the sampler writes lazily). Peak memory: VmHWM of this process reset before each mode
(Linux CPU) or torch.cuda.max_memory_allocated. VAE decode does not depend on the attention
mode: it is timed once per model by streaming-decoding the first --decode-chunks chunks of a
rollout (all of them for pixel-shuffle; 1 for the Wan VAE, which takes seconds per chunk on a
CPU), and "fps with decode" = frames / (rollout time + decode seconds per frame * frames).
Warm-up, untimed: on CUDA one full rollout per distinct mode (the Triton kernels' JIT compiles stay out
of the timed runs), elsewhere one 2-chunk dense rollout. Prints markdown tables; --out writes JSON.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (OneLineParser, doc_summary, DTYPE_NAMES, BadInput, check_checkpoint, check_out, choice_list,  # noqa: E402
                          device_name, finite_float, nonneg_int, positive_int, run_main, setup_device)
from resampling_forcing.attention.backends import resolve_backend  # noqa: E402
from resampling_forcing.attention.routing import RoutingSpec  # noqa: E402
from resampling_forcing.attention.spec import BACKENDS  # noqa: E402
from resampling_forcing.config import MODEL_PRESETS, ModelConfig, resolve_model  # noqa: E402
from resampling_forcing.encoders import PixelShuffleVAE, WanVAE  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.models.wan import CausalWanModel, count_parameters  # noqa: E402
from resampling_forcing.sampler import SamplingOptions, sample  # noqa: E402
from resampling_forcing.timing import Stopwatch, peak_rss_mib, reset_peak_memory, reset_peak_rss  # noqa: E402


PROG = "bench/rollout.py"
MODES_HELP = "dense, topkK, windowW, sinkS+windowW, replayK (with --replay)"


def _count(text: str, mode: str) -> int:
    if not text.isdigit():
        raise BadInput(f"--modes {mode}: {text!r} is not a whole number; use {MODES_HELP}, e.g. topk5")
    return int(text)


def parse_mode(name: str, args) -> RoutingSpec | None:
    """A --modes entry -> its routing (None = dense); BadInput naming the flag for anything else."""
    try:
        if name == "dense":
            return None
        if name.startswith("replay"):  # top-k whose selections are replayed (bench/replay.py)
            k = _count(name[6:], name) if name[6:] else args.top_k
            return RoutingSpec("topk", top_k=k, sink_chunks=0, window_chunks=0)
        if name.startswith("topk"):
            k = _count(name[4:], name) if name[4:] else args.top_k
            return RoutingSpec("topk", top_k=k, sink_chunks=args.sink, window_chunks=0)
        if name.startswith("sink") and "+window" in name:  # e.g. sink1+window4: the sliding window with sink chunks
            sk, w = name[4:].split("+window", 1)
            return RoutingSpec("window", sink_chunks=_count(sk, name), window_chunks=_count(w, name))
        if name.startswith("window"):
            w = _count(name[6:], name) if name[6:] else args.window
            return RoutingSpec("window", sink_chunks=args.sink if args.window_sink else 0, window_chunks=w)
    except ValueError as e:  # RoutingSpec's rules (top_k >= 1, a window of >= 1 chunk)
        raise BadInput(f"--modes {name}: {e}") from None
    raise BadInput(f"--modes: unknown mode {name!r}; use {MODES_HELP}")


def parse_latent(text: str | None, presets: list[str]) -> dict[str, tuple[int, int]]:
    """--latent (None, "HxW" for every preset, or "preset=HxW,...") -> {preset: (h, w)} for `presets`,
    each a whole number of the preset's patches. BadInput naming the flag."""
    defaults = {"tiny": "16x16", "wan-100m": "8x8"}
    per_preset: dict[str, str] = {}
    if text is not None and "=" in text:
        for kv in text.split(","):
            name, eq, hw = kv.partition("=")
            if not eq or name.strip() not in MODEL_PRESETS:
                raise BadInput(f"--latent {text}: {kv!r} is not PRESET=HxW with a preset of "
                               f"{', '.join(MODEL_PRESETS)}; e.g. tiny=32x32,wan-100m=8x8 or one HxW for all")
            per_preset[name.strip()] = hw.strip()
    out = {}
    for preset in presets:
        lat = per_preset.get(preset) or (text if text and "=" not in text else defaults.get(preset, "8x8"))
        parts = lat.lower().split("x")
        if len(parts) != 2 or not all(v.strip().isdigit() and int(v) > 0 for v in parts):
            raise BadInput(f"--latent {text}: {lat!r} is not HxW with two positive whole numbers, e.g. 32x32")
        h, w = (int(v) for v in parts)
        _, ph, pw = MODEL_PRESETS[preset]["patch_size"]
        if h % ph or w % pw:
            raise BadInput(f"--latent {lat} for {preset}: height and width must be multiples of its patch {ph}x{pw}")
        out[preset] = (h, w)
    return out


def check_args(args) -> None:
    """Everything a run needs, before any model is built (BadInput naming the flag)."""
    presets = args.presets.split(",")
    args.latents = parse_latent(args.latent, presets)
    args.specs = {name: parse_mode(name, args) for name in args.modes.split(",")}
    try:
        SamplingOptions(steps=args.steps, shift=args.shift, cfg_scale=args.cfg)
    except ValueError as e:
        flag = {"steps": "--steps", "shift": "--shift", "cfg_scale": "--cfg"}.get(str(e).split(" ")[0], "--steps")
        raise BadInput(f"{flag}: {e}") from None
    if any(name.startswith("replay") for name in args.specs):
        if not args.replay:
            raise BadInput("--modes replayK needs --replay CHECKPOINT (e.g. assets/ablation/ar_0.6)")
    if args.replay is not None:
        check_checkpoint("--replay", args.replay)
    if args.vae == "pixel_shuffle":
        for preset in presets:
            c = MODEL_PRESETS[preset]["in_channels"]
            f = int((c // 3) ** 0.5)
            if c != 3 * f * f:
                raise BadInput(f"--vae pixel_shuffle: {preset} has {c} latent channels, not 3 x a square; "
                               "use --vae auto, wan or none")
    check_out("--out", args.out)


def build_vae(preset_cfg: ModelConfig, args, device):
    """The bench's VAE: --vae, or for auto the preset's own kind (Wan2.2's for a wan2.2 preset; the pixel
    shuffle where the channels are 3 x a square, the tiny presets'; else Wan2.1's), random weights."""
    c = preset_cfg.in_channels
    kind = args.vae
    if kind == "auto":
        kind = ("wan2.2" if (preset_cfg.preset or "").startswith("wan2.2") else
                "pixel_shuffle" if c % 3 == 0 and int((c // 3) ** 0.5) ** 2 == c // 3 else "wan")
    if kind == "none":
        return None
    if kind == "pixel_shuffle":
        return PixelShuffleVAE(factor=int((c // 3) ** 0.5), device=device)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    kw = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, latents_mean=[0.0] * c,
              latents_std=[1.0] * c) if kind == "wan2.2" else {}  # Wan2.2's: residual, 2x2 patchify
    model = AutoencoderKLWan(base_dim=args.vae_base_dim, z_dim=c, **kw).eval()
    return WanVAE.from_model(model, device=device, dtype=torch.float32)


class AttnTimer:
    """Wraps an attention op and adds its wall time to `self.seconds`."""

    def __init__(self, device):
        self.seconds = 0.0
        self.device = device

    def wrap(self, op):
        def timed(q, k, v, layer):
            with Stopwatch(self.device) as sw:
                out = op(q, k, v, layer)
            self.seconds += sw.seconds
            return out

        return timed


def run_mode(model, ctx, spec, args, device, name: str = "") -> tuple[dict, torch.Tensor]:
    """One rollout without decoding; returns (measurements, latents)."""
    if name.startswith("replay"):
        from bench.replay import record_selections, replaying, token_grid

        key = (args.replay, spec.top_k)
        if key not in args.recorded:
            args.recorded[key] = record_selections(args.replay, args.chunks, spec.top_k)
        rec = args.recorded[key]
        with replaying(rec, token_grid(model, args.latent_hw), model.cfg.num_heads) as layer_wrap:
            out = _run(model, ctx, spec, args, device, layer_wrap)
        out[0]["replayed"] = dict(checkpoint=args.replay, coherence=round(rec["coherence"], 3),
                                  recorded_grid=list(rec["grid"]), recorded_heads=rec["heads"])
        return out
    return _run(model, ctx, spec, args, device, None)


def _run(model, ctx, spec, args, device, layer_wrap) -> tuple[dict, torch.Tensor]:
    timer = AttnTimer(device)
    per_attn: list[float] = []

    def on_chunk(c):
        per_attn.append(timer.seconds)
        timer.seconds = 0.0

    opts = SamplingOptions(steps=args.steps, shift=args.shift, cfg_scale=args.cfg, routing=spec,
                           backend=args.backend)
    neg = torch.zeros_like(ctx) if args.cfg != 1.0 else None
    reset_peak_memory(device)
    rss_ok = reset_peak_rss()
    wrap = timer.wrap if layer_wrap is None else (lambda op: timer.wrap(layer_wrap(op)))
    res = sample(model, ctx, args.chunks, args.latent_hw, neg_context=neg, options=opts, seed=0,
                 callback=on_chunk, attn_wrapper=wrap)
    t = res.timings
    peak = t["peak_memory_mib"] if torch.device(device).type == "cuda" else (peak_rss_mib() if rss_ok else None)
    return dict(per_chunk_s=t["per_chunk_denoise_s"], per_chunk_attn_s=per_attn, total_s=t["total_denoise_s"],
                total_attn_s=sum(per_attn), latent_frames=args.chunks * args.chunk_frames,
                first_chunk_latency_s=t["first_chunk_latency_no_decode_s"], peak_memory_mib=peak,
                peak_memory_kind="cuda_max_allocated" if torch.device(device).type == "cuda"
                else "process VmHWM (reset per mode)", kv_cache_mib=t["kv_cache_mib"]), res.latents


def warmup_modes(mode_names: list[str], specs: dict, device) -> list[str]:
    """The modes rolled out untimed, at full length, before any timed run: on CUDA each distinct one.
    The Triton kernels JIT-compile per routing mode and per specialisation of their integer arguments
    (== 1, divisible by 16), which changes as the history grows, so a short warm-up would leave compiles
    inside the first timed run of each mode. replayK counts apart from topkK (same spec): its coherent
    picks can run the kernel where random picks run the torch path. Elsewhere: none (nothing compiles;
    the 2-chunk dense warm-up only, so CPU runs do not take twice as long)."""
    if torch.device(device).type != "cuda":
        return []
    seen, names = [], []
    for name in mode_names:
        key = (name.startswith("replay"), specs[name])
        if key not in seen:  # RoutingSpec is a plain (unhashable) dataclass: compare with ==
            seen.append(key)
            names.append(name)
    return names


def time_decode(vae, latents: torch.Tensor, chunk_frames: int, max_chunks: int) -> dict:
    """Streaming decode of the first `max_chunks` chunks: seconds per pixel frame (decode cost does
    not depend on the attention mode, so it is measured once per model)."""
    state = vae.init_decode_state()
    frames, secs = 0, 0.0
    n = min(max_chunks, latents.shape[2] // chunk_frames)
    for i in range(n):
        with Stopwatch(vae.device) as sw:
            out = vae.decode_chunk(latents[:, :, i * chunk_frames:(i + 1) * chunk_frames].to(vae.device), state)
        secs += sw.seconds
        frames += out.shape[2]
    return dict(decoded_chunks=n, decoded_frames=frames, decode_s=secs, decode_s_per_frame=secs / max(frames, 1))


def add_fps(r: dict, vae, dec: dict | None) -> None:
    frames = vae.frames_for_latents(r["latent_frames"]) if vae is not None else r["latent_frames"]
    r["generated_frames"] = frames
    r["fps_without_decode"] = frames / r["total_s"]
    r["fps_with_decode"] = frames / (r["total_s"] + dec["decode_s_per_frame"] * frames) if dec else None


def _at(xs, n):  # 1-based chunk n, clamped to the rollout
    return xs[min(n, len(xs)) - 1]


def _fmt(x, p=3):
    return "-" if x is None else f"{x:.{p}f}"


def summary_rows(preset, modes: dict, args) -> list[str]:
    early, late = args.early_chunk, min(args.late_chunk, args.chunks)
    dense = modes.get("dense")
    rows = []
    for name, r in modes.items():
        a6, a40 = _at(r["per_chunk_attn_s"], early), _at(r["per_chunk_attn_s"], late)
        l6, l40 = _at(r["per_chunk_s"], early), _at(r["per_chunk_s"], late)
        speed = dense["total_s"] / r["total_s"] if dense else None
        rows.append(f"| {preset} | {name} | {_fmt(l6)} | {_fmt(l40)} | {_fmt(a6, 4)} | {_fmt(a40, 4)} | "
                    f"{_fmt(a40 / a6 if a6 else None, 2)} | {_fmt(r['total_s'], 2)} | {_fmt(r['total_attn_s'], 2)} | "
                    f"{_fmt(speed, 2)} | {_fmt(r['fps_without_decode'], 2)} | {_fmt(r['fps_with_decode'], 2)} | "
                    f"{_fmt(r['peak_memory_mib'], 0)} | {_fmt(r['kv_cache_mib'], 1)} |")
    return rows


def latency_rows(preset, modes: dict, points) -> list[str]:
    rows = []
    for name, r in modes.items():
        cells = " | ".join(f"{_at(r['per_chunk_s'], p):.3f} / {_at(r['per_chunk_attn_s'], p):.4f}" for p in points)
        rows.append(f"| {preset} | {name} | {cells} |")
    return rows


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    p.add_argument("--presets", type=choice_list(MODEL_PRESETS), default="tiny,wan-100m",
                   help="comma list of model presets (config.MODEL_PRESETS)")
    p.add_argument("--modes", default="dense,topk1,topk5,window5", help=f"comma list: {MODES_HELP}")
    p.add_argument("--chunks", type=positive_int, default=16,
                   help="chunks per rollout (the routing target is stated at 40)")
    p.add_argument("--steps", type=positive_int, default=1, help="Euler steps per chunk (paper: 32)")
    p.add_argument("--shift", type=finite_float, default=5.0)
    p.add_argument("--cfg", type=finite_float, default=1.0,
                   help="guidance scale (1: one branch; != 1 doubles the batch)")
    p.add_argument("--latent", default=None, help="latent HxW per preset, e.g. 32x32 or tiny=32x32,wan-100m=8x8")
    p.add_argument("--chunk-frames", type=positive_int, default=3, help="latent frames per chunk (paper: 3)")
    p.add_argument("--top-k", type=positive_int, default=5, help="k for a bare `topk` mode")
    p.add_argument("--window", type=positive_int, default=5, help="W for a bare `window` mode")
    p.add_argument("--sink", type=nonneg_int, default=0, help="sink chunks kept by topk modes")
    p.add_argument("--window-sink", action="store_true", help="window modes keep --sink chunks too")
    p.add_argument("--vae", default="auto", choices=["auto", "pixel_shuffle", "wan", "wan2.2", "none"],
                   help="auto: Wan2.2's for a wan2.2-* preset, pixel_shuffle when the channels fit (the tiny presets), "
                   "else Wan2.1's (random weights)")
    p.add_argument("--vae-base-dim", type=positive_int, default=96, help="random Wan VAE width (real: 96)")
    p.add_argument("--decode-chunks", type=nonneg_int, default=None,
                   help="chunks decoded to time the VAE (default: all for pixel_shuffle, 1 for the Wan VAE)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="override the preset's depth (e.g. 2 blocks at 1.3B width)")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=nonneg_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--early-chunk", type=positive_int, default=6)
    p.add_argument("--late-chunk", type=positive_int, default=40)
    p.add_argument("--train-chunks", type=nonneg_int, default=None,
                   help="training length in chunks, for the 'N x training length' label (default chunks/4)")
    p.add_argument("--replay", default=None, help="checkpoint whose recorded top-k selections the replayK modes use")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    check_args(args)
    args.recorded = {}
    device, dtype = setup_device(args)
    try:
        args.backend = resolve_backend(args.attention_backend, device)
    except ValueError as e:
        raise BadInput(f"--attention-backend: {e}") from None
    presets = args.presets.split(",")
    mode_names = args.modes.split(",")
    results = dict(command=" ".join([sys.executable.split("/")[-1], "bench/rollout.py"] + (argv or sys.argv[1:])),
                   machine=dict(platform=platform.platform(), processor=platform.processor(),
                                torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                                dtype=args.dtype, backend=args.backend),
                   settings=dict(chunks=args.chunks, steps=args.steps, cfg=args.cfg, chunk_frames=args.chunk_frames,
                                 sink=args.sink, warmup=warmup_modes(mode_names, args.specs, device)
                                 or "dense, 2 chunks"),
                   presets={})
    summary, latency = [], []
    points = sorted({1, min(args.early_chunk, args.chunks), args.chunks // 4 or 1, args.chunks // 2 or 1, args.chunks})
    for preset in presets:
        h, w = args.latent_hw = args.latents[preset]
        cfg = resolve_model(ModelConfig(preset=preset, chunk_frames=args.chunk_frames))
        if args.layers is not None:  # real width, reduced depth: attention's share per block is unchanged
            cfg = dataclasses.replace(cfg, num_layers=args.layers)
        torch.manual_seed(0)
        model = CausalWanModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
        vae = build_vae(cfg, args, device)
        n_decode = args.decode_chunks or (args.chunks if isinstance(vae, PixelShuffleVAE) else 1)
        ctx = torch.randn(1, 16, cfg.text_dim, generator=torch.Generator().manual_seed(0)).to(device)
        tokens = model.chunk_tokens(h, w)
        # warm-up (allocator, kernels), not recorded: on CUDA a full rollout per distinct mode (warmup_modes)
        t0 = time.perf_counter()
        warm = warmup_modes(mode_names, args.specs, device)
        for name in warm:
            run_mode(model, ctx, args.specs[name], args, device, name)
        if not warm:
            sample(model, ctx, 2, (h, w), options=SamplingOptions(steps=1, cfg_scale=1.0, backend=args.backend))
        print(f"[{preset}] warm-up ({', '.join(warm) or 'dense, 2 chunks'}): {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
        modes, decode = {}, None
        for name in mode_names:
            t0 = time.perf_counter()
            modes[name], latents = run_mode(model, ctx, args.specs[name], args, device, name)
            if decode is None and vae is not None:
                decode = time_decode(vae, latents, args.chunk_frames, n_decode)
            add_fps(modes[name], vae, decode)
            print(f"[{preset}] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        results["presets"][preset] = dict(
            params_m=count_parameters(model) / 1e6, latent_hw=[h, w], tokens_per_chunk=tokens,
            vae=type(vae).__name__ if vae is not None else None, decode=decode, modes=modes)
        summary += summary_rows(f"{preset} ({count_parameters(model) / 1e6:.0f}M, {tokens} tok/chunk)", modes, args)
        latency += latency_rows(preset, modes, points)
        del model, vae

    early, late = args.early_chunk, min(args.late_chunk, args.chunks)
    train = args.train_chunks or max(1, args.chunks // 4)
    lines = [
        f"Rollout of {args.chunks} chunks ({args.chunks / train:.1f}x a training length of {train} chunks), "
        f"{args.steps} Euler step(s)/chunk, cfg {args.cfg}, batch 1, {args.dtype}, {device} "
        f"({torch.get_num_threads()} threads), attention backend {args.backend}.",
        "",
        f"| model | mode | latency chunk {early} (s) | latency chunk {late} (s) | attn chunk {early} (s) | "
        f"attn chunk {late} (s) | attn ratio {late}/{early} | rollout total (s) | attn total (s) | speedup vs dense | "
        "fps w/o decode | fps with decode | peak mem (MiB) | KV cache (MiB) |",
        "|" + "---|" * 14,
        *summary,
        "",
        "Per-chunk latency / attention time (s) at chunk n:",
        "",
        "| model | mode | " + " | ".join(f"chunk {p}" for p in points) + " |",
        "|" + "---|" * (2 + len(points)),
        *latency,
    ]
    table = "\n".join(lines)
    print(table)
    results["markdown"] = table
    if args.out:
        atomic_write_json(args.out, results)
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
