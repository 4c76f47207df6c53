"""Generation: `Pipeline`, a ready-to-sample bundle of model + VAE + text encoder + config.

    pipe = Pipeline.from_pretrained("runs/tiny")             # RUN dir: its latest checkpoint
    pipe = Pipeline.from_pretrained("runs/tiny/checkpoints/step_0001000")
    pipe = Pipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", config="configs/wan1.3b_stage1_tf.yaml")  # raw Wan
    out = pipe.generate(["a red circle moves left"], num_chunks=8, seed=0, top_k=5)
    out.video      # uint8 [B, frames, H, W, 3]; out.timings; out.selection (record_selection=True)
    opts = pipe.sampling_options(steps=8, top_k=5)                      # built once, reused
    out = pipe.generate("a red ball", 8, options=opts)
    out = pipe.generate(None, 12, storyboard=[(0, "a red ball"), (6, "a blue ball")])  # prompt switch
    out = pipe.generate("a red ball", 4, init_image="first.png")         # image-to-video
    res = pipe("a red ball", num_frames=24, num_inference_steps=12, guidance_scale=2.0)  # diffusers-style
    res.frames; res.save("out.mp4")                                      # mp4 + JSON
    pipe = Pipeline.from_pretrained("org/name")  # a Hub id: its snapshot in the local HF cache (offline)

What is loaded: pipeline.loading. Init videos / images: pipeline.inputs. Outputs: pipeline.output.
Sampling options: options.SamplingOptions.from_config (the config's sampling keys + the call's overrides).

Consistency checks (PipelineError, one line): VAE latent channels == model in_channels, text
encoder dim == model text_dim, pixel size divisible by the VAE and latent size by the patch.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..attention.backends import resolve_backend
from ..attention.spec import RoutingSpec, routing_layers_problem
from ..config import Config
from ..dtypes import dtype_name, host_tier_problem
from ..mp4 import fps_problem
from ..memory import MAX_HISTORY_CHUNKS
from ..models.wan import CausalWanModel
from ..options import SamplingOptions
from ..sampler import SampleResult, sample
from ..storyboard import PipelineError, check_prompts, check_switch_cache, resolve_prompts, storyboard_record
from .inputs import image_clip, video_clip
from .loading import load_pretrained
from .output import PipelineOutput

__all__ = ["Pipeline"]

# generate()'s arguments that are SamplingOptions overrides (an `options=` object replaces them).
def _check_indices(indices, prompts: int) -> None:
    """One sample index per prompt (PipelineError naming indices= otherwise)."""
    if indices is not None and len(indices) != prompts:
        raise PipelineError(f"indices: {len(indices)} sample indices for {prompts} prompts; pass one per prompt")


def _check_call(*, seed, indices, callback, progress, decode, options, negative_prompt, video_sink=None,
                keep_latents=True) -> None:
    """generate()'s arguments of the wrong type or range, before any work: PipelineError naming them."""
    from ..cli import MAX_SEED

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise PipelineError(f"seed={seed!r}: an int in [0, {MAX_SEED}]")
    if indices is not None and (isinstance(indices, (str, bytes)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in indices)):
        raise PipelineError(f"indices={indices!r}: a list of ints >= 0 (one per prompt), or None")
    for name, value in (("progress", progress), ("decode", decode), ("keep_latents", keep_latents)):
        if not isinstance(value, bool):
            raise PipelineError(f"{name} must be True or False, got {value!r}")
    for name, fn in (("callback", callback), ("video_sink", video_sink)):
        if fn is not None and not callable(fn):
            raise PipelineError(f"{name} must be callable, got {type(fn).__name__}")
    if video_sink is not None and not decode:
        raise PipelineError("video_sink receives decoded frames: it needs decode=True")
    if options is not None and not isinstance(options, SamplingOptions):
        raise PipelineError(f"options: a SamplingOptions (pipe.sampling_options(...)), got {type(options).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str) and not (
            isinstance(negative_prompt, (list, tuple)) and all(isinstance(t, str) for t in negative_prompt)):
        raise PipelineError(f"negative_prompt: a string or a list of strings, got {type(negative_prompt).__name__}")


_OPTION_ARGS = ("steps", "shift", "cfg_scale", "context_t", "routing", "top_k", "sink", "window",
                "record_selection", "kv_resident_chunks", "kv_host_dtype", "rope_horizon",
                "rope_far_at")


@dataclass
class Pipeline:
    model: CausalWanModel
    vae: Any
    text_encoder: Any
    config: Config
    device: torch.device
    dtype: torch.dtype
    source: dict = field(default_factory=dict)

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, config: Union[str, Path, Config, None] = None,
                        overrides: Sequence[str] = (), device: Union[str, torch.device, None] = "cpu",
                        dtype: Union[str, torch.dtype] = "fp32", use_ema: bool = True,
                        attention_backend: Optional[str] = None, lora=None, lora_scale=None) -> "Pipeline":
        """Load a run dir / checkpoint dir / raw Wan checkpoint and its encoders (pipeline.loading);
        `lora`: LoRAs merged into them, one or a list (a LoRA run of this toolkit: its lora.safetensors or run /
        checkpoint folder; or another tool's Wan2.1 LoRA .safetensors), `lora_scale` their strength (default 1).
        Errors about the input raise PipelineError (or ConfigError / CheckpointError /
        EncoderLoadError, all ValueErrors) with one-line messages."""
        pipe = cls(*load_pretrained(path, config=config, overrides=overrides, device=device, dtype=dtype,
                                    use_ema=use_ema, attention_backend=attention_backend, lora=lora,
                                    lora_scale=lora_scale))
        pipe._check_consistency()
        return pipe

    def _check_consistency(self) -> None:
        m, d = self.model.cfg, self.config.data
        if self.vae.latent_channels != m.in_channels:
            raise PipelineError(
                f"mismatched checkpoint: the VAE ({self.config.encoders.vae}) has {self.vae.latent_channels} latent "
                f"channels but the model takes {m.in_channels}; fix encoders.* in the config")
        tdim = getattr(self.text_encoder, "dim", None)
        if tdim is not None and tdim != m.text_dim:
            raise PipelineError(
                f"mismatched checkpoint: the text encoder ({self.config.encoders.text}) gives {tdim}-dim "
                f"embeddings but the model takes text_dim={m.text_dim}; fix encoders.text / text_dim")
        s = self.vae.spatial_factor
        _, ph, pw = m.patch_size
        if d.height % s or d.width % s or (d.height // s) % ph or (d.width // s) % pw:
            raise PipelineError(f"data.height x width = {d.height}x{d.width} must be a multiple of "
                                f"VAE factor {s} x patch {ph}x{pw}")

    # -- geometry ---------------------------------------------------------------------------

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.vae.spatial_factor
        return self.config.data.height // s, self.config.data.width // s

    @property
    def chunk_frames(self) -> int:
        return self.model.cfg.chunk_frames

    @property
    def backend(self) -> str:
        return self.source.get("attention_backend") or resolve_backend(self.config.attention.backend, self.device)

    def frames_for_chunks(self, num_chunks: int) -> int:
        return self.vae.frames_for_latents(num_chunks * self.chunk_frames)

    def chunks_for_frames(self, num_frames: int, history_chunks: int = 0) -> int:
        """Generated chunks whose video (after `history_chunks` of history) has exactly `num_frames`
        frames in all; PipelineError naming the nearest valid counts when it does not fit."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise PipelineError(f"num_frames={num_frames!r}: need an int >= 1")
        n = history_chunks + 1
        while self.frames_for_chunks(n) < num_frames:
            n += 1
        if self.frames_for_chunks(n) == num_frames:
            return n - history_chunks
        lo = self.frames_for_chunks(n - 1) if n - 1 > history_chunks else None
        hist = f" after {history_chunks} history chunks" if history_chunks else ""
        near = " or ".join(str(f) for f in (lo, self.frames_for_chunks(n)) if f is not None)
        raise PipelineError(f"num_frames={num_frames} is not a whole number of chunks{hist} (a chunk is "
                            f"{self.chunk_frames} latent frames); use {near}")

    def _geometry(self, height: Optional[int], width: Optional[int]) -> tuple[int, int, tuple[int, int]]:
        """(height, width, latent_hw): the config's resolution unless given; checked against the
        VAE factor and the patch."""
        d = self.config.data
        hh, ww = (d.height if height is None else height), (d.width if width is None else width)
        s = self.vae.spatial_factor
        _, ph, pw = self.model.cfg.patch_size
        for name, v, pp in (("height", hh, ph), ("width", ww, pw)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or v % (s * pp):
                raise PipelineError(f"{name}={v!r}: must be a positive multiple of {s * pp} "
                                    f"(VAE factor {s} x patch {pp})")
        return int(hh), int(ww), (int(hh) // s, int(ww) // s)

    # -- pieces -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.text_encoder.encode(prompts).to(self.device)

    def sampling_options(self, *, routing: Union[RoutingSpec, str, None] = None, top_k: Optional[int] = None,
                         sink: Optional[int] = None, window: Optional[int] = None, **overrides) -> SamplingOptions:
        """The config's sampling settings with this call's overrides (SamplingOptions.from_config;
        None = the config's): steps, shift, cfg_scale, context_t, record_selection,
        kv_resident_chunks, kv_host_dtype, rope_horizon, rope_far_at, and routing: `routing` (a
        RoutingSpec, or a mode name 'dense' | 'topk' | 'window'); `top_k` alone switches to topk;
        `window`/`sink` alone switch a dense config to the sliding-window baseline (topk configs keep
        topk and get sink/window)."""
        try:
            return SamplingOptions.from_config(self.config, self.device, routing=routing, top_k=top_k, sink=sink,
                                               window=window, backend=self.backend, **overrides)
        except (ValueError, TypeError) as e:
            raise PipelineError(str(e)) from None

    def load_init_image(self, image, height: Optional[int] = None,
                        width: Optional[int] = None) -> tuple[torch.Tensor, dict]:
        """A still image (path, or uint8 [H, W, 3] / float [3, H, W] in [-1, 1]) -> (latents
        [1, C, cf, h, w], info): the first chunk's history (pipeline.inputs.image_clip)."""
        hh, ww, _ = self._geometry(height, width)
        clip, info = image_clip(image, self.vae, hh, ww, self.chunk_frames)
        return self._encode(clip), info

    def load_init_video(self, video, max_chunks: Optional[int] = None,
                        resample_fps: bool = True, height: Optional[int] = None,
                        width: Optional[int] = None, what: str = "init video") -> tuple[torch.Tensor, dict]:
        """A path (mp4 etc.) or frames -> (latents [1, C, n*cf, h, w], info): a file is resampled to
        the model's frame rate (config data.fps) unless resample_fps=False; at most `max_chunks`
        chunks from the END of the video are kept (pipeline.inputs.video_clip; its errors name `what`)."""
        hh, ww, _ = self._geometry(height, width)
        clip, info = video_clip(video, self.vae, hh, ww, self.chunk_frames, self.config.data.fps,
                                max_chunks=max_chunks, resample_fps=resample_fps, what=what)
        return self._encode(clip), info

    @torch.no_grad()
    def _encode(self, clip: torch.Tensor) -> torch.Tensor:
        """Pixel clip [1, 3, F, H, W] in [-1, 1] -> latents [1, C, f, h, w] fp32."""
        return self.vae.encode(clip.to(self.vae.device)).float()

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: Union[str, Sequence[str], None] = None, num_chunks: Optional[int] = None, *,
                 negative_prompt: Union[str, Sequence[str], None] = None,
                 seed: int = 0, indices: Optional[Sequence[int]] = None, steps: Optional[int] = None,
                 shift: Optional[float] = None, cfg_scale: Optional[float] = None, context_t: Optional[float] = None,
                 routing: Union[RoutingSpec, str, None] = None, top_k: Optional[int] = None,
                 sink: Optional[int] = None, window: Optional[int] = None, record_selection: Optional[bool] = None,
                 init_video=None, init_latents: Optional[torch.Tensor] = None, init_image=None,
                 storyboard=None, switch_cache: str = "keep", height: Optional[int] = None,
                 width: Optional[int] = None, max_history_chunks: Optional[int] = MAX_HISTORY_CHUNKS,
                 kv_resident_chunks: Optional[int] = None, kv_host_dtype: Optional[str] = None,
                 rope_horizon: Union[int, str, None] = None, rope_far_at: Optional[int] = None,
                 options: Optional[SamplingOptions] = None,
                 callback: Optional[Callable] = None, progress: bool = False, decode: bool = True,
                 video_sink: Optional[Callable] = None, keep_latents: bool = True,
                 replay=None) -> SampleResult:
        """Generate `num_chunks` chunks per prompt (one rollout, batch = len(prompts)).

        Sampling settings default to the config's `diffusion` / `attention.routing` sections, with
        the sampling arguments (steps ... kv_host_dtype) as overrides (`sampling_options`); or pass a
        ready SamplingOptions as `options` (then none of those arguments).
        negative_prompt: one string for all prompts, or a list with one per prompt.
        init_video: a path or frames to continue (see prepare_init_video); init_image: a still image
        (path or array) as the first chunk's history (see load_init_image); or init_latents
        [1 or B, C, n*cf, h, w] directly. The result's video holds the VAE reconstruction of the
        given history followed by the new frames (`result.history_frames` of them are history).
        `result.init_video` (dict) describes the trimming: at most the video's last `max_history_chunks`
        chunks are kept (default memory.MAX_HISTORY_CHUNKS, as the CLI's; None: all). Seeds: sample b
        uses (seed, indices[b]).
        storyboard: prompt switching, a list of (chunk index, prompt) (or anything parse_storyboard
        takes); indices count generated chunks (0 = the first after the history); a prompt is a
        string for every sample or a list with one per sample. `prompts` may then be omitted (the
        entry at chunk 0 is the initial prompt) or give the initial prompts (no entry at 0).
        switch_cache: "keep" (cached history K/V stay as written) or "recache" (re-written under
        the new text), see Rollout.set_context. height/width: default the config's resolution.
        kv_resident_chunks: bounded memory, at most that many finished chunks' K/V on the device, the
        rest in host memory (cache.TieredKVCache; the same output bit for bit). None = all resident.
        kv_host_dtype: "bf16" | "fp16" | "fp32" for the host tier (smaller than the model's: lossy).
        rope_horizon: history chunks more than this many back are read as if `rope_far_at` (default this
        many) chunks back (attention/positions.py; README "Far-history positions"). None = the config's
        attention.rope_horizon (null: absolute positions); "train" = a training clip's chunks - 1.
        rope_far_at: the distance those chunks are read at (None = the config's; null = the horizon).
        video_sink: receives the decoded video piece by piece (uint8 [B, F, H, W, 3], history first) instead
        of the result holding it (sampler.sample; the sampling CLI streams its mp4 files this way);
        keep_latents=False: the result holds no latents either (result.latents None).
        replay: the first n chunks a stopped call with the same arguments generated, latents [B, C, n*cf, h, w]
        or a sequence of chunks [B, C, cf, h, w] (sampling_resume.py keeps them for sample/sample.py --resume):
        taken, not denoised again, so the rollout continues exactly (sampler.sample).
        """
        check_switch_cache(switch_cache, storyboard is not None)
        _check_call(seed=seed, indices=indices, callback=callback, progress=progress, decode=decode, options=options,
                    negative_prompt=negative_prompt, video_sink=video_sink, keep_latents=keep_latents)
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
            raise PipelineError(f"num_chunks={num_chunks!r}: need an int >= 1")
        num_chunks = int(num_chunks)
        prompts, board = resolve_prompts(prompts, storyboard, num_chunks)
        bsz = len(prompts)
        _check_indices(indices, bsz)
        overrides = dict(steps=steps, shift=shift, cfg_scale=cfg_scale, context_t=context_t, routing=routing,
                         top_k=top_k, sink=sink, window=window, record_selection=record_selection,
                         kv_resident_chunks=kv_resident_chunks, kv_host_dtype=kv_host_dtype,
                         rope_horizon=rope_horizon, rope_far_at=rope_far_at)
        if options is None:
            opts = self.sampling_options(**overrides)
        elif any(v is not None for v in overrides.values()):
            given = ", ".join(k for k, v in overrides.items() if v is not None)
            raise PipelineError(f"pass options= or the sampling arguments ({given}), not both")
        else:
            opts = options
        hh, ww, latent_hw = self._geometry(height, width)
        problem = host_tier_problem(opts.kv_host_dtype, dtype_name(self.dtype))
        if problem:
            raise PipelineError(f"kv_host_dtype {problem}")
        problem = routing_layers_problem(opts.routing_layers, self.model.cfg.num_layers)  # options= built elsewhere
        if problem:
            raise PipelineError(f"routing_layers={opts.routing_layers!r}: {problem}")
        given = [n for n, v in (("init_video", init_video), ("init_latents", init_latents),
                                ("init_image", init_image)) if v is not None]
        if len(given) > 1:
            raise PipelineError(f"pass one of init_video, init_image, init_latents (got {', '.join(given)})")
        history, init_info = init_latents, None
        if init_video is not None:  # encoded first: its length is the history the memory check must count
            history, init_info = self.load_init_video(init_video, max_chunks=max_history_chunks, height=hh, width=ww)
        self._check_memory(opts, num_chunks, bsz, history, init_image, hh, ww, streamed=video_sink is not None)
        neg_text = self.config.diffusion.negative_prompt if negative_prompt is None else negative_prompt
        if not isinstance(neg_text, str):
            neg_text = list(neg_text)
            if len(neg_text) != bsz or any(not isinstance(t, str) for t in neg_text):
                raise PipelineError(f"negative_prompt: a string or a list of {bsz} strings (one per prompt)")
        t0 = time.perf_counter()
        ctx = self.encode_prompts(prompts)
        neg = None
        if opts.cfg_scale != 1.0:
            neg = self.encode_prompts([neg_text] if isinstance(neg_text, str) else neg_text)
        switches = None
        if board is not None:
            switches = [(c, self.encode_prompts([p] * bsz if isinstance(p, str) else p))
                        for c, p in board if c > 0]
        text_s = time.perf_counter() - t0
        if init_image is not None:
            history, init_info = self.load_init_image(init_image, height=hh, width=ww)
        result = sample(self.model, ctx, num_chunks, latent_hw, neg_context=neg, options=opts, seed=seed,
                        indices=indices, history=None if history is None else history.to(self.device),
                        vae=self.vae, decode=decode, callback=callback, progress=progress,
                        storyboard=switches or None, switch_cache=switch_cache, video_sink=video_sink,
                        keep_latents=keep_latents, replay=replay)
        result.timings["text_encode_s"] = text_s
        story = storyboard_record(prompts, board)
        return dataclasses.replace(result, init_video=init_info, prompts=prompts,
                                   negative_prompt=neg_text if opts.cfg_scale != 1.0 else None,
                                   storyboard=story, switch_cache=switch_cache if story is not None else None)

    def _check_memory(self, opts, num_chunks, batch, init_latents, init_image, height, width,
                      streamed: bool = False) -> None:
        """Refuse, before any work, a rollout whose memory lower bound exceeds what is free (as the CLI)."""
        from ..memory import check_fits, rollout_need

        history = 1 if init_image is not None else (
            int(init_latents.shape[2]) // self.chunk_frames if isinstance(init_latents, torch.Tensor) else 0)
        cfg = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, height=height, width=width))
        need = rollout_need(cfg, opts, num_chunks, batch, torch.finfo(self.dtype).bits // 8, history, streamed=streamed)
        msg = check_fits(need, self.device, f"a rollout of {num_chunks} chunks at {height}x{width} (batch {batch})",
                         "lower num_chunks / the batch / the resolution, or bound the cache with kv_resident_chunks")
        if msg:
            raise PipelineError(msg)

    def __call__(self, prompt: Union[str, Sequence[str], None] = None, num_frames: Optional[int] = None, *,
                 height: Optional[int] = None, width: Optional[int] = None,
                 negative_prompt: Union[str, Sequence[str], None] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 generator: Union[torch.Generator, int, None] = None, top_k: Optional[int] = None,
                 callback_on_chunk_end: Optional[Callable] = None, fps: Optional[float] = None,
                 **kwargs) -> PipelineOutput:
        """diffusers-style call: `pipe(prompt, num_frames=..., height=..., width=..., negative_prompt=...,
        num_inference_steps=..., guidance_scale=..., generator=..., top_k=..., callback_on_chunk_end=...)`.

        num_frames counts VIDEO frames of the whole output (a given init image/video's history
        included: an init video is trimmed and encoded first); it must be a whole number of chunks (PipelineError names the nearest valid
        counts); None = one chunk. generator: a torch.Generator (the rollout seed is drawn from
        it, so a generator seeded alike gives the same video) or an int seed; None = seed 0.
        callback_on_chunk_end(pipe, chunk_index, chunk) is called after every generated chunk
        (a sampler.ChunkOutput with latents and decoded frames); returning False stops early.
        Other keyword arguments go to `generate` (storyboard, init_image, init_video, routing, ...),
        which is the one implementation under both; the sampling options are built once, here. Returns a PipelineOutput (.frames, .save(path)).
        """
        if "num_chunks" in kwargs:
            raise PipelineError("pass num_frames (video frames) to pipe(...); num_chunks is generate()'s argument")
        for name, alias in (("steps", "num_inference_steps"), ("cfg_scale", "guidance_scale"),
                            ("callback", "callback_on_chunk_end")):
            if name in kwargs:
                raise PipelineError(f"pipe(...) takes {alias}= (diffusers' name), not {name}= (generate()'s)")
        if fps is not None and fps_problem(fps):
            raise PipelineError(f"fps {fps_problem(fps)}; None = the config's data.fps")
        if callback_on_chunk_end is not None and not callable(callback_on_chunk_end):
            raise PipelineError(f"callback_on_chunk_end must be callable, got {type(callback_on_chunk_end).__name__}")
        if not (generator is None or isinstance(generator, torch.Generator)
                or (isinstance(generator, (int, np.integer)) and not isinstance(generator, bool))):
            raise PipelineError(f"generator: a torch.Generator or an int seed, got {type(generator).__name__} {generator!r}")
        if generator is not None and "seed" in kwargs:
            raise PipelineError("pass generator= (diffusers' name) or seed=, not both")
        if isinstance(generator, torch.Generator):
            # drawn where the generator lives (diffusers' idiom passes a CUDA one)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        elif generator is None:
            seed = int(kwargs.pop("seed", 0))
        else:
            seed = int(generator)
        if kwargs.get("options") is None:
            kwargs["options"] = self.sampling_options(
                steps=num_inference_steps, cfg_scale=guidance_scale, top_k=top_k,
                **{k: kwargs.pop(k) for k in _OPTION_ARGS if k in kwargs})
        elif num_inference_steps is not None or guidance_scale is not None or top_k is not None:
            raise PipelineError("pass options= or num_inference_steps / guidance_scale / top_k, not both")
        hist_chunks, video_info = 0, None
        if kwargs.get("init_video") is not None:  # encoded first (its length sets the history's frames),
            # so what generate() would refuse is checked before that work
            check_prompts(prompt)
            if prompt is not None:  # (a storyboard's prompt count is known only once it is resolved)
                _check_indices(kwargs.get("indices"), 1 if isinstance(prompt, str) else len(prompt))
            _check_call(seed=seed, indices=kwargs.get("indices"), callback=None, progress=kwargs.get("progress", False),
                        decode=kwargs.get("decode", True), options=kwargs.get("options"), negative_prompt=negative_prompt)
            if kwargs.get("init_latents") is not None or kwargs.get("init_image") is not None:
                raise PipelineError("pass one of init_video, init_image, init_latents")
            kwargs["init_latents"], video_info = self.load_init_video(
                kwargs.pop("init_video"), max_chunks=kwargs.pop("max_history_chunks", MAX_HISTORY_CHUNKS), height=height,
                width=width)
        if kwargs.get("init_image") is not None:
            hist_chunks = 1
        elif kwargs.get("init_latents") is not None:
            hist_chunks = kwargs["init_latents"].shape[2] // self.chunk_frames
        n = 1 if num_frames is None else self.chunks_for_frames(num_frames, hist_chunks)
        callback = None
        if callback_on_chunk_end is not None:
            callback = lambda c: callback_on_chunk_end(self, c.generated, c)  # noqa: E731
        res = self.generate(prompt, n, negative_prompt=negative_prompt, seed=seed, height=height, width=width,
                            callback=callback, **kwargs)
        if video_info is not None:
            res = dataclasses.replace(res, init_video=video_info)
        return PipelineOutput(frames=res.video, result=res, fps=self.config.data.fps if fps is None else fps,
                              seed=seed, indices=list(kwargs.get("indices") or range(len(res.prompts))),
                              pipeline=self.describe(height, width))

    def describe(self, height: Optional[int] = None, width: Optional[int] = None) -> dict:
        """Settings worth saving next to a video generated at `height` x `width` (None: the config's)."""
        hh, ww, latent_hw = self._geometry(height, width)
        return dict(source=self.source, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                    model=dataclasses.asdict(self.model.cfg), encoders=dataclasses.asdict(self.config.encoders),
                    resolution=[hh, ww], latent_hw=list(latent_hw), chunk_frames=self.chunk_frames)
