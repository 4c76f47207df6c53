"""One KV-cached rollout of a causal Wan model, chunk by chunk (method.md section 7): the low level that
sampler.sample (decode, callbacks, timings) drives, and the tests and benchmarks drive directly.

    ro = Rollout(model, context, latent_hw=(h, w), neg_context=neg, options=opts, seed=0)
    ro.prefill(history_latents)              # optional: continue a given video
    chunk = ro.next_chunk()                  # [B, C, chunk_frames, h, w] fp32, repeat

One chunk: x = noise at t = 1; `steps` Euler steps on Wan's shifted grid
(`diffusion.euler_schedule(steps, shift)`), the queries of the chunk attending the K/V of all
cached chunks plus their own chunk; then the finished chunk is written into the cache by one more
forward pass at `context_t` (default 0: clean; for context_t > 0 the chunk is first re-noised to
that level with the sample's own noise). That cache-writing pass is LAZY: it runs when the next
chunk starts (or on `flush()`), so a rollout of N chunks runs N - 1 of them and the first chunk
is handed out one pass earlier. `prefill` writes given chunks the same way (eagerly); `replay_chunk`
takes a chunk a stopped rollout made instead of denoising it (sample(replay=...)).

Classifier-free guidance: with cfg_scale != 1 the conditional and unconditional branches are the
two halves of ONE batch [cond | uncond] through the model; the KV cache has 2B rows, i.e. separate
conditional and unconditional caches (each half only ever attends to its own rows).
v = v_uncond + cfg_scale * (v_cond - v_uncond). With cfg_scale == 1 the unconditional branch is
skipped entirely (batch B, no negative prompt needed).

Positions (RoPE policy): every latent frame gets its ABSOLUTE index in the video as RoPE frame
position: a chunk written after n cached chunks starts at frame n * chunk_frames, history from an
init video included. The model computes the rotary angles analytically in float64 from these
integers (`models.wan.rope_cos_sin`): there is no table to index past, and positions never wrap
or get re-based, however long the rollout (exact up to 2**53 frames). Beyond the training length
the model sees positions it never saw in training (plain extrapolation, as Wan does); no
interpolation or windowed re-indexing is applied unless asked (options.rope_horizon:
attention/positions.py). Hence the rollout equals the training forward on [history | noisy] at every
chunk (tests/test_sampler.py).

Seeds: sample j of a batch draws all its noise (chunk noise, context re-noising) from its own
CPU generator seeded by `sample_seed(seed, index_j)` (`indices` default 0..B-1). So sample j is
the same whether it is generated alone (`indices=[j]`) or in any batch, and the same on CPU and
GPU up to the model's own arithmetic; noise is drawn in fp32 on the CPU and then moved.

Options: `options.SamplingOptions` (built from a config by `SamplingOptions.from_config`); prompt
switches: `set_context` (keep or re-cache the history). Routing: `SamplingOptions.routing` (a
`RoutingSpec`: dense | topk | window with sink/window), applied in `routing_layers` (None = all);
selections are recorded in the cache-writing pass of each chunk (`cache.SelectionRecorder`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .attention.backends import resolve_backend
from .attention.positions import FarPositions
from .attention.spec import routing_layers_problem, window_reads
from .cache import CachedAttention, KVCache, SelectionRecorder
from .diffusion import add_noise, euler_schedule
from .options import KV_HOST_DTYPES, SamplingOptions
from .seeds import mix_seed

__all__ = ["sample_seed", "SampleNoise", "Rollout"]


# ----------------------------------------------------------------------------- noise


def sample_seed(seed: int, index: int) -> int:
    """RNG seed of sample `index` in a rollout seeded with `seed` (stable across runs, batch
    compositions and devices): seeds.mix_seed(seed, index), < 2**63."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an int >= 0")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"sample index {index!r}: must be an int >= 0")
    return mix_seed(seed, index)


class SampleNoise:
    """Per-sample Gaussian noise: one CPU generator per sample, seeded by (seed, index)."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.seed, self.indices = int(seed), [int(i) for i in indices]
        self.generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in self.indices]

    def __call__(self, shape: Sequence[int], device) -> torch.Tensor:
        """[B, *shape] float32 on `device`; sample b's values depend only on (seed, indices[b])."""
        out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators])
        if torch.device(device).type == "cuda":  # pinned + non_blocking: no wait for the queued passes
            return out.pin_memory().to(device, non_blocking=True)
        return out.to(device)


# ----------------------------------------------------------------------------- rollout


class Rollout:
    """One KV-cached rollout over a batch of B prompts (see the module docstring).

    model: a CausalWanModel (eval mode; its parameters' device/dtype are used).
    context: text embeddings [B, Lt, text_dim] of the prompts.
    neg_context: [B or 1, Lt, text_dim] of the negative prompt; needed when the unconditional branch
        runs (cfg_scale != 1); ignored otherwise.
    latent_hw: latent (h, w) of every chunk.
    options: SamplingOptions.
    seed, indices: noise of sample b comes from sample_seed(seed, indices[b]) (indices default 0..B-1).
    capacity: cache capacity hint in chunks (history + generated); the cache grows by doubling past it.
    uncond: force (True) or forbid (False) the unconditional branch; None = cfg_scale != 1.
    attn_wrapper: optional f(op) -> op wrapping the attention ops (instrumentation, e.g. the benchmark).
    keep_written: keep every cache-writing pass's input for `recache` (latent-sized, on the model device);
        False for a rollout that never re-caches, so that nothing of it grows with its length but the
        cache (sample() keeps them only for a storyboard with switch_cache="recache").
    """

    def __init__(self, model, context: torch.Tensor, *, latent_hw: tuple[int, int],
                 neg_context: Optional[torch.Tensor] = None, options: Optional[SamplingOptions] = None,
                 seed: int = 0, indices: Optional[Sequence[int]] = None, capacity: int = 8,
                 uncond: Optional[bool] = None, attn_wrapper: Optional[Callable] = None,
                 keep_written: bool = True):
        self.model = model
        self.options = options or SamplingOptions()
        cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if context.dim() != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, Lt, {cfg.text_dim}] text embeddings; got {list(context.shape)}")
        self.batch = b = context.shape[0]
        h, w = (int(latent_hw[0]), int(latent_hw[1]))
        _, ph, pw = cfg.patch_size
        if h < ph or w < pw or h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not a positive multiple of the patch {ph}x{pw}")
        self.latent_hw = (h, w)
        self.chunk_frames = cfg.chunk_frames
        self.chunk_shape = (cfg.in_channels, cfg.chunk_frames, h, w)
        problem = routing_layers_problem(self.options.routing_layers, cfg.num_layers)  # else silently not routed
        if problem:
            raise ValueError(f"routing_layers={self.options.routing_layers!r}: {problem}")
        self.use_uncond = (self.options.cfg_scale != 1.0) if uncond is None else bool(uncond)
        if self.use_uncond:
            if neg_context is None:
                raise ValueError("cfg_scale != 1 needs neg_context (the encoded negative prompt; '' is fine)")
            if neg_context.dim() != 3 or neg_context.shape[0] not in (1, b) or neg_context.shape[2] != context.shape[2]:
                raise ValueError(f"neg_context must be [1 or {b}, Lt, {context.shape[2]}]; got {list(neg_context.shape)}")
            if neg_context.shape[1] != context.shape[1]:
                raise ValueError(f"neg_context has {neg_context.shape[1]} text tokens, context {context.shape[1]}; "
                                 "encode both with the same text encoder")
            self._neg_context = neg_context.expand(b, -1, -1)
            ctx = torch.cat([context, self._neg_context], dim=0)
        else:
            self._neg_context = None
            ctx = context
        indices = list(range(b)) if indices is None else [int(i) for i in indices]
        if len(indices) != b:
            raise ValueError(f"{len(indices)} sample indices for a batch of {b}")
        self.noise = SampleNoise(seed, indices)
        self.cache = KVCache.for_model(model, ctx.shape[0], self.latent_hw, self.device, self.dtype,
                                       capacity=max(1, int(capacity)),
                                       resident_chunks=self.options.kv_resident_chunks,
                                       host_dtype=KV_HOST_DTYPES.get(self.options.kv_host_dtype),
                                       keep=window_reads(self.options.routing, self.options.routing_layers, cfg.num_layers))
        with torch.no_grad():
            self.cache.text_kv = model.text_kv(ctx.to(self.device))
        # t grid as host floats: no device reads while sampling.
        self.timesteps: list[float] = euler_schedule(self.options.steps, self.options.shift).tolist()
        self.recorder = SelectionRecorder() if self.options.record_selection else None
        self._sel_rows: dict[int, dict[int, np.ndarray]] = {}
        opt, wrap = self.options, (attn_wrapper or (lambda op: op))
        attn_kw = dict(routing=opt.routing, routing_layers=opt.routing_layers,
                       positions=FarPositions.for_model(model, opt.rope_horizon, opt.rope_far_at))
        backend = resolve_backend(opt.backend or "auto", self.device)  # resolved names resolve to themselves
        self._denoise_op = wrap(CachedAttention(self.cache, backend, **attn_kw))
        self._commit_op = wrap(CachedAttention(self.cache, backend, commit=True, recorder=self.recorder, **attn_kw))
        self._recache_op = wrap(CachedAttention(self.cache, backend, commit=True, **attn_kw))
        self.pending: Optional[torch.Tensor] = None  # finished chunk not yet written into the cache
        # The model input of every cache-writing pass so far ([B, C, cf, h, w] fp32, after the
        # context_t re-noising): what `recache` runs again under a new text. Latent-sized, 1/1440 of
        # the K/V they produce at the 1.3B shape: only kept when a recache may come (keep_written).
        self.keep_written = bool(keep_written)
        self.written: list[torch.Tensor] = []

    # -- cursors (host ints) ----------------------------------------------------------------

    @property
    def cached_chunks(self) -> int:
        """Chunks written into the cache so far."""
        return self.cache.num_chunks

    @property
    def num_chunks(self) -> int:
        """Chunks of the video so far (cached + the pending one)."""
        return self.cache.num_chunks + (self.pending is not None)

    @property
    def frame_offset(self) -> int:
        """RoPE frame position of the next chunk the model sees (absolute, never wrapped)."""
        return self.cache.num_chunks * self.chunk_frames

    # -- the two passes ---------------------------------------------------------------------

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        return torch.cat([x, x], dim=0) if self.use_uncond else x

    def _t(self, t: float) -> torch.Tensor:
        return torch.full((self.cache.batch,), float(t), device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Guided velocity [B, C, cf, h, w] (fp32) of the current chunk x at time t, attending the
        cached history. Writes any pending chunk first. This is the sampler's only model call
        for denoising."""
        self.flush()
        if tuple(x.shape) != (self.batch, *self.chunk_shape):
            raise ValueError(f"chunk latents must be {[self.batch, *self.chunk_shape]}; got {list(x.shape)}")
        v = self.model(self._batched(x), self._t(t), text_kv=self.cache.text_kv, attn=self._denoise_op,
                       frame_offset=self.frame_offset).float()
        if not self.use_uncond:
            return v
        v_cond, v_uncond = v.chunk(2, dim=0)
        return v_uncond + self.options.cfg_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def write_chunk(self, latents: torch.Tensor) -> None:
        """Write a finished chunk [B, C, cf, h, w] into the cache now (pass at context_t) and commit it.
        Writes any pending chunk first."""
        self.flush()
        self._write(latents)

    def _write(self, latents: torch.Tensor) -> None:
        if tuple(latents.shape) != (self.batch, *self.chunk_shape):
            raise ValueError(f"chunk latents must be {[self.batch, *self.chunk_shape]}; got {list(latents.shape)}")
        ct = self.options.context_t
        x = latents.float()
        if ct > 0:
            x = add_noise(x, self.noise(self.chunk_shape, x.device), ct)
        elif self.keep_written:
            x = x.clone()  # kept for recache: must not alias the caller's tensor
        self.model(self._batched(x), self._t(ct), text_kv=self.cache.text_kv, attn=self._commit_op,
                   frame_offset=self.frame_offset)
        self.cache.commit()
        if self.keep_written:
            self.written.append(x)
        if self.recorder is not None:
            self._absorb_selection()

    # -- prompt switching -------------------------------------------------------------------

    @torch.no_grad()
    def set_context(self, context: torch.Tensor, *, recache: bool = False) -> None:
        """Switch the text of the rollout: the chunks generated from now on cross-attend `context`
        [B, Lt, text_dim] (the unconditional half keeps the negative prompt). A pending chunk is
        written into the cache first, under the text it was generated with.

        The cached self-attention K/V of the history depend on the text too (every block's K/V
        are computed from a residual stream that earlier blocks' cross-attention has mixed the
        text into; only block 0's do not). `recache=False` keeps them as written (the history
        stays encoded under the old text); `recache=True` re-runs the cache-writing pass of every
        cached chunk, in order and at its own position, under the new text (LongLive's KV
        re-cache): the cache is then exactly what a rollout that had always used the new text
        would hold for the same history latents. Draws no noise (the re-noised inputs of the
        context_t > 0 passes are reused), so the noise of later chunks is unchanged."""
        cfg = self.model.cfg
        if context.dim() != 3 or context.shape[0] != self.batch or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [{self.batch}, Lt, {cfg.text_dim}] text embeddings; "
                             f"got {list(context.shape)}")
        if self._neg_context is not None and self._neg_context.shape[1] != context.shape[1]:
            raise ValueError(f"context has {context.shape[1]} text tokens, neg_context "
                             f"{self._neg_context.shape[1]}; encode both with the same text encoder")
        self.flush()
        ctx = context if self._neg_context is None else torch.cat([context, self._neg_context], dim=0)
        self.cache.text_kv = self.model.text_kv(ctx.to(self.device))
        if recache:
            self.recache()

    @torch.no_grad()
    def recache(self) -> None:
        """Re-write every cached chunk under the current text (see `set_context`)."""
        if not self.keep_written:
            raise RuntimeError("this rollout keeps no cache-writing inputs to re-cache: build it with keep_written=True")
        self.flush()
        ct = self.options.context_t
        written, self.written = self.written, []
        self.cache.num_chunks = 0  # host cursor: slots are overwritten in order
        for x in written:
            self.model(self._batched(x), self._t(ct), text_kv=self.cache.text_kv, attn=self._recache_op,
                       frame_offset=self.frame_offset)
            self.cache.commit()
            self.written.append(x)

    @torch.no_grad()
    def flush(self) -> None:
        """Write the pending chunk (if any) into the cache."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._write(pending)

    def discard_pending(self) -> None:
        """Drop the pending chunk without writing it into the cache (e.g. to write another chunk in
        its place with `write_chunk`: the one-chunk-ahead error of diagnose.one_step_error)."""
        self.pending = None

    @torch.no_grad()
    def prefill(self, latents: torch.Tensor) -> None:
        """Put given history latents [B or 1, C, n * cf, h, w] into the cache, chunk by chunk."""
        cf = self.chunk_frames
        if latents.dim() != 5 or latents.shape[0] not in (1, self.batch) or \
                tuple(latents.shape[1:2] + latents.shape[3:]) != (self.chunk_shape[0], *self.latent_hw):
            raise ValueError(f"history latents must be [1 or {self.batch}, {self.chunk_shape[0]}, n*{cf}, "
                             f"{self.latent_hw[0]}, {self.latent_hw[1]}]; got {list(latents.shape)}")
        if latents.shape[2] % cf:
            raise ValueError(f"history has {latents.shape[2]} latent frames, not a whole number of "
                             f"{cf}-frame chunks; trim it (Pipeline.prepare_init_video does)")
        self.reserve(latents.shape[2] // cf)
        lat = latents.expand(self.batch, -1, -1, -1, -1)
        for s in range(0, lat.shape[2], cf):
            self.write_chunk(lat[:, :, s:s + cf])

    def reserve(self, chunks: int) -> None:
        """Make room for `chunks` more chunks in the cache (avoids regrowth copies)."""
        self.cache.reserve(int(chunks) + (self.pending is not None))

    @torch.no_grad()
    def replay_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Take `latents` [B, C, cf, h, w] as the next chunk instead of denoising one: the chunk a stopped
        rollout of the same call generated here (sample(replay=...)). Draws that chunk's noise and drops it,
        so the generators stand where generating it leaves them; written into the cache lazily, as
        next_chunk's. Returns the chunk (fp32, model device)."""
        self.flush()
        if tuple(latents.shape) != (self.batch, *self.chunk_shape):
            raise ValueError(f"chunk latents must be {[self.batch, *self.chunk_shape]}; got {list(latents.shape)}")
        self.noise(self.chunk_shape, "cpu")
        self.pending = latents.to(device=self.device, dtype=torch.float32)
        return self.pending

    @torch.no_grad()
    def next_chunk(self, on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Denoise the next chunk from noise: returns its clean latents [B, C, cf, h, w] (fp32,
        model device). It is written into the cache lazily, when the next chunk starts."""
        self.flush()
        x = self.noise(self.chunk_shape, self.device)
        ts = self.timesteps
        for i in range(len(ts) - 1):
            v = self.velocity(x, ts[i])
            x = x + (ts[i + 1] - ts[i]) * self._unclamped(v, ts[i])
            if on_step is not None:
                on_step(i)
        self.pending = x
        return x

    def _unclamped(self, v: torch.Tensor, t: float) -> torch.Tensor:
        """An x0-predicting model's velocity divides by max(t, model.x0_min_t) (a bound for the training
        loss): below x0_min_t an Euler step with it stops short of the prediction (at t_next = 0 it kept
        1 - t / x0_min_t of x - x0). Rescaled to (x - x0) / t, the step lands on x0 + t_next / t (x - x0)."""
        cfg = self.model.cfg
        return v * (cfg.x0_min_t / t) if cfg.prediction == "x0" and t < cfg.x0_min_t else v

    # -- routing statistics -----------------------------------------------------------------

    def _absorb_selection(self) -> None:
        rec = self.recorder
        if not rec.entries:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # recorder copies are non_blocking
        for chunk, layer, sel in rec.entries:
            freq = sel[: self.batch].float().mean(dim=2)  # conditional half -> [B, Hh, N]
            self._sel_rows.setdefault(int(chunk), {})[int(layer)] = freq.numpy()
        rec.entries.clear()

    def selection_frequencies(self) -> np.ndarray:
        """float32 [batch, chunks, layers, heads, max(chunks - 1, 0)]; see the module docstring (NaN = none)."""
        n = self.num_chunks
        cfg = self.model.cfg
        out = np.full((self.batch, n, cfg.num_layers, cfg.num_heads, max(n - 1, 0)), np.nan, dtype=np.float32)
        for c, layers in self._sel_rows.items():
            for l, f in layers.items():
                if c < n:
                    out[:, c, l, :, : f.shape[2]] = f
        return out
