"""A ready-to-sample bundle: model + VAE + text encoder + config, from a run, a checkpoint or Wan.

    pipe = Pipeline.from_pretrained("runs/tiny")             # RUN dir: its latest checkpoint
    pipe = Pipeline.from_pretrained("runs/tiny/checkpoints/step_0001000")
    pipe = Pipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", config="configs/wan.yaml")  # raw Wan
    out = pipe.generate(["a red circle moves left"], num_chunks=8, seed=0, top_k=5)
    out.video      # uint8 [B, frames, H, W, 3]; out.timings; out.selection (record_selection=True)

What is loaded (docs/CONTRACTS.md, run-directory contract):
- RUN dir (has checkpoints/): the newest complete `checkpoints/step_XXXXXXX/` (highest step whose
  name is final; temporary names are ignored).
- checkpoint dir (has model_config.json + model.safetensors): `ema.safetensors` when present
  (unless use_ema=False), else `model.safetensors`; the model sizes come from model_config.json.
  The Config comes from the checkpoint's `config.yaml`, else the run's `config.yaml`, else the
  `config` argument; `config` (a path or Config) and `overrides` ("key.path=value") are applied
  on top. The encoders are rebuilt from the config's `encoders` section.
- a raw Wan2.1 checkpoint (original or diffusers layout, models/loading.py): the model sizes come
  from its config.json; everything else from `config` (defaults otherwise). For a diffusers repo
  root with vae/ and text_encoder/, missing encoders.vae_path / text_path default to that root.

Consistency checks (PipelineError, one line): VAE latent channels == model in_channels, text
encoder dim == model text_dim, pixel size divisible by the VAE and latent size by the patch.

Init videos (`prepare_init_video`): frames are resized to cover the config resolution
(data.height x data.width, aspect kept, antialiased bilinear) and centre-cropped; then the frame
count is trimmed to a whole number of chunks IN LATENT SPACE, keeping the END of the video (the
continuation follows its last frame) and dropping the first frames: with the Wan VAE
(F = 1 + 4(f - 1)) n chunks of cf latent frames need exactly 1 + 4(n*cf - 1) pixel frames, with
the pixel-shuffle codec n*cf*temporal_factor. The kept frames are encoded as a clip of their own
(so its first frame is the VAE's causal first frame, as in training).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .attention.backends import resolve_backend
from .checkpoint import latest_checkpoint, step_of
from .attention.routing import RoutingSpec
from .config import Config, ConfigError, config_from_dict, load_config, to_dict
from .encoders import build_text_encoder, build_vae
from .models.loading import (OUR_CONFIG, OUR_WEIGHTS, CheckpointError, config_from_checkpoint, detect_layout,
                             load_state_into, read_state_dict)
from .models.wan import CausalWanModel
from .sampler import SampleResult, SamplingOptions, sample

__all__ = [
    "PipelineError",
    "CheckpointInfo",
    "latest_checkpoint",
    "resolve_checkpoint",
    "parse_dtype",
    "resolve_device",
    "prepare_init_video",
    "Pipeline",
]

EMA_WEIGHTS = "ema.safetensors"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class PipelineError(ValueError):
    """Bad input to the pipeline (path, checkpoint/config mismatch, init video); one-line message."""


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointInfo:
    kind: str  # "run" | "checkpoint" | "wan"
    path: Path  # what the user gave
    model_dir: Path  # folder holding the weights
    config_path: Optional[Path]  # config.yaml to use (None for a raw Wan checkpoint without one)
    weights: Optional[Path]  # our format: the safetensors file to load; None = read_state_dict(model_dir)
    step: Optional[int] = None


def _complete(d: Path) -> bool:
    return (d / OUR_WEIGHTS).is_file() and (d / OUR_CONFIG).is_file()


def resolve_checkpoint(path: Union[str, Path], use_ema: bool = True) -> CheckpointInfo:
    """Classify `path` as a run dir, one of our checkpoint dirs or a raw Wan checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PipelineError(f"checkpoint {p} does not exist; pass a run dir, a checkpoints/step_* dir or a Wan2.1 checkpoint")
    if not p.is_dir():
        raise PipelineError(f"checkpoint {p} is a file; pass its directory (run dir, checkpoints/step_* or a Wan2.1 folder)")
    kind = "checkpoint"
    if not _complete(p) and (p / "checkpoints").is_dir():
        ck = latest_checkpoint(p)
        if ck is None:
            raise PipelineError(f"run {p} has no complete checkpoint under checkpoints/ (step_XXXXXXX written "
                                f"by the trainer); train longer or pass a checkpoint dir")
        run_dir, p, kind = p, ck, "run"
    else:
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    if _complete(p):
        weights = p / EMA_WEIGHTS if use_ema and (p / EMA_WEIGHTS).is_file() else p / OUR_WEIGHTS
        cfg_path = next((c for c in (p / "config.yaml", run_dir / "config.yaml" if run_dir else None)
                         if c is not None and c.is_file()), None)
        return CheckpointInfo(kind, Path(path), p, cfg_path, weights, step_of(p))
    if (p / OUR_CONFIG).is_file() or (p / OUR_WEIGHTS).is_file():
        missing = OUR_WEIGHTS if not (p / OUR_WEIGHTS).is_file() else OUR_CONFIG
        raise PipelineError(f"checkpoint {p} is incomplete: {missing} is missing")
    try:
        detect_layout(p)
    except CheckpointError as e:
        raise PipelineError(str(e)) from None
    cfg_path = p / "config.yaml" if (p / "config.yaml").is_file() else None
    return CheckpointInfo("wan", Path(path), p, cfg_path, None)


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise PipelineError(f"dtype {dtype!r} is unknown; choose one of fp32, bf16, fp16")
    return _DTYPES[dtype]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto' / None -> cuda if available else cpu; a CUDA device that is not there -> PipelineError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PipelineError(f"device {device!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise PipelineError(f"device {device!r}: only cpu, cuda[:N] and mps are supported")
    return dev


# ----------------------------------------------------------------------------- init video


def _frames_to_float(frames) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or float [3, F, H, W] / [F, H, W, 3] in [-1, 1]) -> float [3, F, H, W]."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames.detach().cpu()
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4:
        raise PipelineError(f"init video must be [F, H, W, 3] uint8 or [3, F, H, W] float; got shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise PipelineError(f"uint8 init video must be [F, H, W, 3]; got {list(x.shape)}")
        return x.permute(3, 0, 1, 2).float() / 127.5 - 1.0
    x = x.float()
    if x.shape[0] == 3 and x.shape[-1] != 3:
        return x
    if x.shape[-1] == 3:
        return x.permute(3, 0, 1, 2)
    raise PipelineError(f"float init video must be [3, F, H, W] or [F, H, W, 3]; got {list(x.shape)}")


def _resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, F, h0, w0] -> [3, F, height, width]: scale to cover (aspect kept), centre crop."""
    _, _, h0, w0 = video.shape
    if (h0, w0) == (height, width):
        return video
    s = max(height / h0, width / w0)
    nh, nw = max(height, round(h0 * s)), max(width, round(w0 * s))
    x = F.interpolate(video.permute(1, 0, 2, 3), size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=(nh < h0 or nw < w0))
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top:top + height, left:left + width].permute(1, 0, 2, 3).clamp(-1, 1)


def prepare_init_video(frames, vae, height: int, width: int, chunk_frames: int,
                       max_chunks: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """Frames of a given video -> (video [1, 3, F', height, width] in [-1, 1], info), F' the
    largest frame count that encodes to a whole number of chunks (at most `max_chunks`),
    keeping the LAST F' frames. Raises PipelineError when the video is shorter than one chunk."""
    video = _frames_to_float(frames)
    n_in = video.shape[1]
    tf = vae.temporal_factor
    latent_avail = (1 + (n_in - 1) // tf) if vae.causal_first_frame else n_in // tf
    chunks = latent_avail // chunk_frames if n_in > 0 else 0
    if max_chunks is not None:
        chunks = min(chunks, int(max_chunks))
    if chunks < 1:
        raise PipelineError(f"init video has {n_in} frames; one chunk of {chunk_frames} latent frames needs at "
                            f"least {vae.frames_for_latents(chunk_frames)} frames")
    used = vae.frames_for_latents(chunks * chunk_frames)
    video = _resize_crop(video[:, n_in - used:], height, width)
    info = dict(frames_in=n_in, frames_used=used, frames_dropped_from_start=n_in - used, chunks=chunks,
                latent_frames=chunks * chunk_frames, resized_to=[height, width])
    return video.unsqueeze(0), info


# ----------------------------------------------------------------------------- the pipeline


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
                        attention_backend: Optional[str] = None) -> "Pipeline":
        """Load a run dir / checkpoint dir / raw Wan checkpoint and its encoders (see the module doc).
        Errors about the input raise PipelineError (or ConfigError / CheckpointError /
        EncoderLoadError, all ValueErrors) with one-line messages."""
        dev, dt = resolve_device(device), parse_dtype(dtype)
        info = resolve_checkpoint(path, use_ema=use_ema)
        overrides = list(overrides)
        if attention_backend is not None:
            overrides.append(f"attention.backend={attention_backend}")
        cfg = _load_config(info, config, overrides)
        try:
            model_cfg = config_from_checkpoint(info.model_dir, base=cfg.model)
        except CheckpointError as e:
            raise PipelineError(str(e)) from None
        except (KeyError, ValueError, TypeError) as e:
            raise PipelineError(f"{info.model_dir}: unreadable model config ({type(e).__name__}: {e})") from None
        cfg = dataclasses.replace(cfg, model=model_cfg)
        if info.kind == "wan":
            cfg = _wan_encoder_defaults(cfg, info.model_dir)
        try:
            backend = resolve_backend(cfg.attention.backend, dev)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        # Built without initialising (meta device, then uninitialised memory in the final dtype):
        # every parameter is overwritten by the strict load below.
        with torch.device("meta"):
            model = CausalWanModel(model_cfg).to(dtype=dt)
        model = model.to_empty(device=dev)
        if info.weights is not None:
            from safetensors.torch import load_file

            try:
                state = load_file(str(info.weights))
            except Exception as e:  # truncated / not safetensors
                raise PipelineError(f"cannot read {info.weights}: {str(e).splitlines()[0]}") from None
        else:
            state = read_state_dict(info.model_dir)
        load_state_into(model, state, source=str(info.weights or info.model_dir))
        del state
        model = model.eval().requires_grad_(False)
        try:
            vae = build_vae(cfg.encoders, device=dev, dtype=torch.float32)
            text = build_text_encoder(cfg.encoders, device=dev,
                                      dtype=torch.float32 if dev.type == "cpu" else dt)
        except (ValueError, OSError) as e:  # EncoderLoadError, missing paths, unknown kinds
            raise PipelineError(f"encoders: {str(e).strip().splitlines()[0]}") from None
        source = dict(kind=info.kind, path=str(info.path), model_dir=str(info.model_dir),
                      weights=str(info.weights) if info.weights else str(info.model_dir),
                      ema=bool(info.weights is not None and info.weights.name == EMA_WEIGHTS),
                      step=info.step, config=str(info.config_path) if info.config_path else None,
                      attention_backend=backend)
        pipe = cls(model, vae, text, cfg, dev, dt, source)
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

    # -- pieces -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.text_encoder.encode(prompts).to(self.device)

    def sampling_options(self, *, steps=None, shift=None, cfg_scale=None, context_t=None, routing=None,
                         top_k=None, sink=None, window=None, record_selection=None) -> SamplingOptions:
        """Config sampling settings with overrides. Routing: `routing` (a RoutingSpec, or a mode name
        'dense' | 'topk' | 'window'); `top_k` alone switches to topk; `window`/`sink` alone switch a
        dense config to the sliding-window baseline (topk configs keep topk and get sink/window)."""
        rc = self.config.attention.routing
        spec = routing if isinstance(routing, RoutingSpec) else None
        if spec is None:
            mode = routing if isinstance(routing, str) else None
            if mode is not None and mode not in ("dense", "topk", "window"):
                raise PipelineError(f"routing mode {mode!r} is unknown; choose dense, topk or window")
            if mode is None:
                mode = "topk" if top_k is not None else rc.mode
                if mode == "dense" and (window or sink):
                    mode = "window"
            k = top_k if top_k is not None else rc.top_k
            sk = sink if sink is not None else rc.sink_chunks
            wn = window if window is not None else rc.window_chunks
            try:
                spec = None if mode == "dense" else RoutingSpec(mode, k if mode == "topk" else None, int(sk), int(wn))
            except ValueError as e:
                raise PipelineError(str(e)) from None
        try:
            opts = SamplingOptions.from_config(self.config, self.device, steps=steps, shift=shift,
                                               cfg_scale=cfg_scale, context_t=context_t,
                                               record_selection=record_selection, backend=self.backend)
            return dataclasses.replace(opts, routing=spec)
        except (ValueError, TypeError) as e:
            raise PipelineError(str(e)) from None

    def load_init_video(self, video, max_chunks: Optional[int] = None,
                        resample_fps: bool = True) -> tuple[torch.Tensor, dict]:
        """A path (mp4 etc., read with io.read_mp4) or frames -> (latents [1, C, n*cf, h, w], info).

        A file is first resampled in time to the model's frame rate (config data.fps, by timestamp as
        in training; `resample_fps=False` keeps its own rate). `max_chunks` keeps at most that many
        history chunks (the END of the video); only those frames are converted and encoded, so a long
        clip costs no more memory than `max_chunks` chunks."""
        d = self.config.data
        src_fps = None
        if isinstance(video, (str, Path)):
            from .io import read_mp4

            try:
                frames, src_fps = read_mp4(video, with_fps=True)
            except ValueError as e:
                raise PipelineError(str(e)) from None
            src = str(video)
        else:
            frames, src = video, "<array>"
        is_file = isinstance(video, (str, Path))  # uint8 [F, H, W, 3]; arrays may be channel-first
        n_file = len(frames) if is_file else None
        if is_file and src_fps and resample_fps and abs(src_fps - d.fps) > 1e-3:
            from .data.video import available_frames, frame_indices

            n_out = available_frames(n_file, src_fps, d.fps)
            frames = frames[frame_indices(0, n_out, n_file, src_fps, d.fps)]
        clip_frames = frames
        if is_file and max_chunks is not None:
            keep = self.vae.frames_for_latents(int(max_chunks) * self.chunk_frames)
            clip_frames = frames[max(len(frames) - keep, 0):]
        clip, info = prepare_init_video(clip_frames, self.vae, d.height, d.width, self.chunk_frames, max_chunks)
        if not is_file:
            info["source"] = src
            with torch.no_grad():
                return self.vae.encode(clip.to(self.vae.device)).float(), info
        n_in = len(frames)
        info.update(frames_in=n_in, frames_dropped_from_start=n_in - info["frames_used"], max_chunks=max_chunks,
                    source_frames=n_file, source_fps=src_fps, fps=d.fps if (src_fps and resample_fps) else src_fps)
        with torch.no_grad():
            latents = self.vae.encode(clip.to(self.vae.device)).float()
        info["source"] = src
        return latents, info

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: Union[str, Sequence[str]], num_chunks: int, *, negative_prompt: Optional[str] = None,
                 seed: int = 0, indices: Optional[Sequence[int]] = None, steps: Optional[int] = None,
                 shift: Optional[float] = None, cfg_scale: Optional[float] = None, context_t: Optional[float] = None,
                 routing: Union[RoutingSpec, str, None] = None, top_k: Optional[int] = None,
                 sink: Optional[int] = None, window: Optional[int] = None, record_selection: Optional[bool] = None,
                 init_video=None, init_latents: Optional[torch.Tensor] = None,
                 callback: Optional[Callable] = None, progress: bool = False, decode: bool = True) -> SampleResult:
        """Generate `num_chunks` chunks per prompt (one rollout, batch = len(prompts)).

        Sampling settings default to the config's `diffusion` / `attention.routing` sections.
        init_video: a path or frames to continue (see prepare_init_video); or init_latents
        [1 or B, C, n*cf, h, w] directly. The result's video holds the VAE reconstruction of the
        given history followed by the new frames (`result.history_frames` of them are history).
        `result.init_video` (dict) describes the trimming. Seeds: sample b uses (seed, indices[b]).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PipelineError("no prompts given")
        opts = self.sampling_options(steps=steps, shift=shift, cfg_scale=cfg_scale, context_t=context_t,
                                     routing=routing, top_k=top_k, sink=sink, window=window,
                                     record_selection=record_selection)
        neg_text = self.config.diffusion.negative_prompt if negative_prompt is None else negative_prompt
        t0 = time.perf_counter()
        ctx = self.encode_prompts(prompts)
        neg = self.encode_prompts([neg_text]) if opts.cfg_scale != 1.0 else None
        text_s = time.perf_counter() - t0
        init_info = None
        history = init_latents
        if init_video is not None:
            if init_latents is not None:
                raise PipelineError("pass init_video or init_latents, not both")
            history, init_info = self.load_init_video(init_video)
        result = sample(self.model, ctx, num_chunks, self.latent_hw, neg_context=neg, options=opts, seed=seed,
                        indices=indices, history=None if history is None else history.to(self.device),
                        vae=self.vae, decode=decode, callback=callback, progress=progress)
        result.timings["text_encode_s"] = text_s
        return dataclasses.replace(result, init_video=init_info, prompts=prompts,
                                   negative_prompt=neg_text if opts.cfg_scale != 1.0 else None)

    def describe(self) -> dict:
        """Settings worth saving next to a video."""
        return dict(source=self.source, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                    model=dataclasses.asdict(self.model.cfg), encoders=dataclasses.asdict(self.config.encoders),
                    resolution=[self.config.data.height, self.config.data.width], latent_hw=list(self.latent_hw),
                    chunk_frames=self.chunk_frames)


# ----------------------------------------------------------------------------- helpers


def resolve_config(path: Union[str, Path], *, config: Union[str, Path, Config, None] = None,
                   overrides: Sequence[str] = (), use_ema: bool = True) -> Config:
    """The Config that `Pipeline.from_pretrained` would use (model sizes from the checkpoint),
    without loading any weights or encoders: for up-front checks such as memory estimates."""
    info = resolve_checkpoint(path, use_ema=use_ema)
    cfg = _load_config(info, config, overrides)
    try:
        model_cfg = config_from_checkpoint(info.model_dir, base=cfg.model)
    except CheckpointError as e:
        raise PipelineError(str(e)) from None
    except (KeyError, ValueError, TypeError) as e:
        raise PipelineError(f"{info.model_dir}: unreadable model config ({type(e).__name__}: {e})") from None
    return dataclasses.replace(cfg, model=model_cfg)


def _load_config(info: CheckpointInfo, config, overrides: Sequence[str]) -> Config:
    """The checkpoint's (or run's) config.yaml, then `config` (a Config replaces it; a YAML path is
    merged on top, key by key), then `overrides`."""
    try:
        base: dict = to_dict(load_config(info.config_path)) if info.config_path is not None else {}
        if isinstance(config, Config):
            base = to_dict(config)
        elif config is not None:
            if not Path(config).is_file():
                raise PipelineError(f"config file {config} not found")
            load_config(config)  # validate the file on its own first (clear errors)
            _deep_update(base, _explicit(config))
        if isinstance(base.get("model"), dict) and info.config_path is not None:
            base["model"].pop("preset", None)  # sizes are explicit (and come from the checkpoint anyway)
        return config_from_dict(base, overrides)
    except ConfigError as e:
        raise PipelineError(str(e)) from None


def _explicit(path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _wan_encoder_defaults(cfg: Config, model_dir: Path) -> Config:
    """A diffusers repo root next to transformer/ usually holds vae/ and text_encoder/ too."""
    root = model_dir.parent if model_dir.name == "transformer" else model_dir
    enc = cfg.encoders
    changes = {}
    if enc.vae == "wan" and not enc.vae_path and (root / "vae" / "config.json").is_file():
        changes["vae_path"] = str(root)
    if enc.text == "umt5" and not enc.text_path and (root / "text_encoder" / "config.json").is_file():
        changes["text_path"] = str(root)
    return dataclasses.replace(cfg, encoders=dataclasses.replace(enc, **changes)) if changes else cfg
