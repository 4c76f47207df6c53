"""Sample a video with a causal Wan model: `sample` rolls out chunk by chunk (rollout.Rollout: KV cache,
CFG, routing, RoPE positions, per-sample noise) and around it streams the VAE decode, calls back per chunk,
switches prompts, replays the chunks of a stopped call, shows progress and times everything.

    result = sample(model, context, num_chunks, (h, w), neg_context=neg, options=opts, vae=vae)

Routing statistics: with `options.record_selection`, `SampleResult.selection` is a float array [batch,
chunks, layers, heads, history] with, for sample b, chunk c, layer l, head h, history chunk j < c, the
fraction of chunk c's query tokens of sample b (conditional half) that selected j. NaN where nothing
was recorded (j >= c, chunk 0, layers that do not route, or dense routing). Selections are taken in the
cache-writing pass of each chunk, so the last chunk is written too when recording.

The rollout's names (Rollout, SampleNoise, sample_seed) are re-exported here: `resampling_forcing.sampler`
is the sampler's public import path.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .options import SamplingOptions
from .rollout import Rollout, SampleNoise, sample_seed
from .storyboard import SWITCH_CACHE_MODES, split_storyboard
from .timing import peak_memory, reset_peak_memory, sync

__all__ = [
    "sample_seed",
    "SampleNoise",
    "Rollout",
    "ChunkOutput",
    "SampleResult",
    "sample",
    "peak_memory",
    "SamplingOptions",
]


# ----------------------------------------------------------------------------- sample()


@dataclass
class ChunkOutput:
    """What the per-chunk callback receives."""

    index: int  # chunk index in the video (history chunks included)
    generated: int  # 0 .. num_chunks - 1 among the generated chunks
    latents: torch.Tensor  # [B, C, cf, h, w] fp32, model device
    frames: Optional[torch.Tensor]  # [B, 3, m, H, W] float in [-1, 1] on CPU; None without decode
    denoise_s: float
    decode_s: float
    replayed: bool = False  # taken from sample(replay=...), not denoised


@dataclass
class SampleResult:
    latents: Optional[torch.Tensor]  # [B, C, F, h, w] fp32 CPU: history + generated; None with keep_latents=False
    video: Optional[torch.Tensor]  # uint8 [B, frames, H, W, 3] CPU: decoded history + generated; None w/o decode
    history_chunks: int
    history_frames: int  # pixel frames of `video` that reconstruct the given history
    timings: dict
    selection: Optional[np.ndarray] = None  # [batch, chunks, layers, heads, history] (record_selection)
    options: dict = field(default_factory=dict)  # SamplingOptions used, as a dict
    init_video: Optional[dict] = None  # Pipeline.generate: how a given video was trimmed/encoded
    prompts: Optional[list] = None  # Pipeline.generate
    negative_prompt: Optional[Any] = None  # Pipeline.generate (None when CFG is off; a list: one per prompt)
    storyboard: Optional[list] = None  # [{"chunk": g, "prompt": ...}] when the text switched (Pipeline.generate)
    switch_cache: Optional[str] = None  # "keep" | "recache" with a storyboard
    streamed: bool = False  # the decoded video went to sample()'s video_sink, piece by piece (video is None)

    @property
    def num_frames(self) -> int:
        """Pixel frames of the decoded video (history + generated), held or streamed; 0 without decode."""
        if self.video is not None:
            return int(self.video.shape[1])
        return self.history_frames + int(self.timings.get("generated_frames", 0)) if self.streamed else 0


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] float in [-1, 1] -> uint8 [B, F, H, W, 3] (same rounding as mp4.to_uint8_video)."""
    x = torch.nan_to_num(frames.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


@torch.no_grad()
def sample(model, context: Optional[torch.Tensor], num_chunks: int, latent_hw: tuple[int, int], *,
           neg_context: Optional[torch.Tensor] = None, options: Optional[SamplingOptions] = None,
           seed: int = 0, indices: Optional[Sequence[int]] = None, history: Optional[torch.Tensor] = None,
           vae=None, decode: bool = True, callback: Optional[Callable[[ChunkOutput], Any]] = None,
           progress: bool = False, uncond: Optional[bool] = None,
           attn_wrapper: Optional[Callable] = None, storyboard: Optional[Sequence] = None,
           switch_cache: str = "keep", video_sink: Optional[Callable[[torch.Tensor], Any]] = None,
           keep_latents: bool = True, replay=None) -> SampleResult:
    """Roll out `num_chunks` chunks after an optional `history` (latents [B or 1, C, n*cf, h, w]).

    Prompt switching: `storyboard` is a list of (chunk index, context [B, Lt, text_dim]); chunk
    indices count generated chunks (0 = the first one after the history). Before generating chunk
    g the rollout switches to that entry's context (`Rollout.set_context`; `switch_cache` "keep"
    leaves the cached K/V of the history as they were written, "recache" re-writes them under the
    new text). An entry at chunk 0 gives the initial context (then `context` may be None; the
    history is written under it). A one-entry storyboard is the plain call.

    With `vae` and `decode`, every chunk is decoded as soon as it is finished with the VAE's
    streaming decode (history first, so the causal decoder state is right), and `callback`
    receives a ChunkOutput per generated chunk (return False from it to stop early).
    `video_sink` (with decoding): receives every decoded piece, uint8 [B, F, H, W, 3] on the CPU (the
    history's reconstruction first, then each generated chunk's frames), instead of the result holding
    the whole video (`result.video` None, `result.streamed`): host memory flat in the rollout length
    (sample/sample.py streams into its mp4 files this way). `keep_latents=False`: the result holds no
    latents either (`result.latents` None): then nothing on the host grows with the rollout's length.
    `replay`: the first n generated chunks of a stopped call with the same arguments, as latents
    [B, C, n*cf, h, w] or a sequence of n chunks [B, C, cf, h, w] (sampling_resume.ReplayChunks reads each
    from disk when the rollout reaches it): they are not denoised again but taken as they are, with
    everything else a chunk does (its noise drawn, its cache write, its decode, the switches, the
    selections), so the rollout goes on exactly as the stopped one would have (bit for bit where the
    arithmetic is the same). `generated_chunks` counts them; their time is `replay_s` (`replayed_chunks`
    of them), not in the per-chunk lists; first_chunk_latency_s is that of the first chunk denoised.
    Timings (seconds): first_chunk_latency_s (from this call to the first generated chunk's
    frames, incl. cache setup, prefill and decode; `_no_decode_s` without decode), per_chunk_s,
    per_chunk_denoise_s (denoising + writing the previous chunk into the cache), per_chunk_decode_s,
    fps_with_decode / fps_without_decode (generated pixel frames / time), peak memory.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r}: need an int >= 1")
    if switch_cache not in SWITCH_CACHE_MODES:  # (generate() / the CLI also refuse 'recache' without a storyboard)
        raise ValueError(f"switch_cache={switch_cache!r}: choose one of {', '.join(SWITCH_CACHE_MODES)}")
    context, switches = split_storyboard(storyboard, context, num_chunks)
    options = options or SamplingOptions()
    device = next(model.parameters()).device
    cf = model.cfg.chunk_frames
    hist_chunks = 0 if history is None else history.shape[2] // cf
    n_replay = _replay_chunks(replay, num_chunks, cf)
    total = hist_chunks + num_chunks
    if options.kv_resident_chunks is not None and options.kv_resident_chunks > total:
        # room for more chunks than the rollout has is never used: no device ring beyond it (same output)
        options = dataclasses.replace(options, kv_resident_chunks=total)
    reset_peak_memory(device)
    t_start = time.perf_counter()
    ro = Rollout(model, context, latent_hw=latent_hw, neg_context=neg_context, options=options, seed=seed,
                 indices=indices, capacity=total, uncond=uncond, attn_wrapper=attn_wrapper,
                 keep_written=bool(switches) and switch_cache == "recache")
    decoding = decode and vae is not None
    state = vae.init_decode_state() if decoding else None
    pieces_lat: list[torch.Tensor] = []
    pieces_vid: list[torch.Tensor] = []
    emit = video_sink if video_sink is not None else pieces_vid.append
    history_frames = 0
    timings: dict[str, Any] = {}
    if history is not None:
        sync(device)
        t0 = time.perf_counter()
        ro.prefill(history)
        sync(device)
        timings["prefill_s"] = time.perf_counter() - t0
        hist = history.expand(ro.batch, -1, -1, -1, -1).float()
        if keep_latents:
            pieces_lat.append(hist.cpu())
        if decoding:
            t0 = time.perf_counter()
            frames = vae.decode_chunk(hist.to(vae.device), state).cpu()
            timings["history_decode_s"] = time.perf_counter() - t0
            history_frames = frames.shape[2]
    timings["setup_s"] = time.perf_counter() - t_start - timings.get("prefill_s", 0.0) \
        - timings.get("history_decode_s", 0.0)
    if history_frames:  # after the timings: a video_sink's writing is neither setup nor decoding
        emit(_to_uint8(frames))

    per_denoise, per_decode, gen_frames, new_frames, replay_s = [], [], 0, 0, 0.0
    first_no_decode = first_full = None
    bar = _progress(num_chunks, "chunks", progress)
    try:
        for g in range(num_chunks):
            step_bar = _progress(options.steps, f"chunk {g + 1}/{num_chunks} steps", progress and g >= n_replay,
                                 leave=False)
            t0 = time.perf_counter()
            if g in switches:
                ro.set_context(switches[g], recache=switch_cache == "recache")
            if g < n_replay:
                lat = ro.replay_chunk(replay[:, :, g * cf:(g + 1) * cf] if torch.is_tensor(replay) else replay[g])
            else:
                lat = ro.next_chunk(on_step=(lambda _i: step_bar.update(1)) if step_bar is not None else None)
            sync(device)
            t1 = time.perf_counter()
            if step_bar is not None:
                step_bar.close()
            frames = None
            if decoding:
                frames = vae.decode_chunk(lat.to(vae.device), state).cpu()
                gen_frames += frames.shape[2]
            t2 = time.perf_counter()
            if decoding:  # after the timing: a video_sink's writing is not decoding
                emit(_to_uint8(frames))
            if not decoding:  # frames the chunk would decode to (latent frames without a VAE)
                gen_frames += _chunk_frames(vae, ro.num_chunks, cf)
            if keep_latents:
                pieces_lat.append(lat.cpu())
            if g < n_replay:
                replay_s += t2 - t0
            else:
                per_denoise.append(t1 - t0)
                per_decode.append(t2 - t1)
                new_frames += frames.shape[2] if decoding else _chunk_frames(vae, ro.num_chunks, cf)
            if g == n_replay:
                first_no_decode, first_full = t1 - t_start - replay_s, t2 - t_start - replay_s
            if bar is not None:
                bar.update(1)
            if callback is not None:
                ret = callback(ChunkOutput(index=ro.num_chunks - 1, generated=g, latents=lat, frames=frames,
                                           denoise_s=t1 - t0, decode_s=t2 - t1, replayed=g < n_replay))
                if ret is False:
                    break
    finally:
        if bar is not None:
            bar.close()
    if options.record_selection:
        ro.flush()  # the last chunk's selections are taken in its cache-writing pass
    sync(device)
    mem, kind = peak_memory(device)
    denoise_total, decode_total = float(sum(per_denoise)), float(sum(per_decode))
    timings.update(
        first_chunk_latency_s=first_full, first_chunk_latency_no_decode_s=first_no_decode,
        per_chunk_s=[a + b for a, b in zip(per_denoise, per_decode)], per_chunk_denoise_s=per_denoise,
        per_chunk_decode_s=per_decode, total_s=time.perf_counter() - t_start,
        total_denoise_s=denoise_total, total_decode_s=decode_total,
        generated_chunks=len(per_denoise) + min(n_replay, g + 1), generated_frames=gen_frames,
        replayed_chunks=min(n_replay, g + 1), replay_s=replay_s,
        fps_without_decode=new_frames / denoise_total if denoise_total > 0 else None,
        fps_with_decode=(new_frames / (denoise_total + decode_total)) if decoding and denoise_total > 0 else None,
        peak_memory_mib=mem, peak_memory_kind=kind, kv_cache_mib=ro.cache.memory_bytes() / 2**20,
        kv_cache_total_mib=ro.cache.total_bytes() / 2**20, kv_resident_chunks=options.kv_resident_chunks,
        batch=ro.batch, cfg_branches=2 if ro.use_uncond else 1,
    )
    return SampleResult(
        latents=torch.cat(pieces_lat, dim=2) if keep_latents else None,
        video=torch.cat(pieces_vid, dim=1) if decoding and video_sink is None else None,
        history_chunks=hist_chunks, history_frames=history_frames, timings=timings,
        selection=ro.selection_frequencies() if options.record_selection else None,
        options=options.to_dict(), streamed=decoding and video_sink is not None,
    )


def _replay_chunks(replay, num_chunks: int, cf: int) -> int:
    """How many of sample()'s chunks `replay` gives (at most num_chunks); the shape of each chunk is checked
    by Rollout.replay_chunk."""
    if replay is None:
        return 0
    if torch.is_tensor(replay):
        if replay.dim() != 5 or replay.shape[2] % cf:
            raise ValueError(f"replay must be latents [B, C, n*{cf}, h, w] of whole chunks; got {list(replay.shape)}")
        return min(replay.shape[2] // cf, num_chunks)
    if not (hasattr(replay, "__len__") and hasattr(replay, "__getitem__")):
        raise ValueError(f"replay must be latents [B, C, n*{cf}, h, w] or a sequence of chunks; got "
                         f"{type(replay).__name__}")
    return min(len(replay), num_chunks)


def _chunk_frames(vae, chunk_count: int, cf: int) -> int:
    if vae is None:
        return cf
    return vae.frames_for_latents(chunk_count * cf) - vae.frames_for_latents((chunk_count - 1) * cf)


def _progress(total: int, desc: str, enabled: bool, leave: bool = True):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, unit="chunk" if leave else "step", dynamic_ncols=True)

