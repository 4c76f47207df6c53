"""A ready-to-sample bundle: model + VAE + text encoder + config, from a run, a checkpoint or Wan.

    pipe = Pipeline.from_pretrained("runs/tiny")             # RUN dir: its latest checkpoint
    pipe = Pipeline.from_pretrained("runs/tiny/checkpoints/step_0001000")
    pipe = Pipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", config="configs/wan.yaml")  # raw Wan
    out = pipe.generate(["a red circle moves left"], num_chunks=8, seed=0, top_k=5)
    out.video      # uint8 [B, frames, H, W, 3]; out.timings; out.selection (record_selection=True)
    out = pipe.generate(None, 12, storyboard=[(0, "a red ball"), (6, "a blue ball")])  # prompt switch
    out = pipe.generate("a red ball", 4, init_image="first.png")         # image-to-video
    res = pipe("a red ball", num_frames=24, num_inference_steps=12, guidance_scale=2.0)  # diffusers-style
    res.frames; res.save("out.mp4")                                      # mp4 + JSON
    pipe = Pipeline.from_pretrained("org/name")  # a Hub id: its snapshot in the local HF cache (offline)

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
from .sampler import SWITCH_CACHE_MODES, SampleResult, SamplingOptions, sample
from .storyboard import PipelineError, check_storyboard, parse_storyboard, video_paths

__all__ = [
    "PipelineError",
    "CheckpointInfo",
    "latest_checkpoint",
    "resolve_checkpoint",
    "resolve_hub_id",
    "parse_dtype",
    "resolve_device",
    "prepare_init_video",
    "read_image",
    "parse_storyboard",
    "video_paths",
    "save_video",
    "PipelineOutput",
    "Pipeline",
]

EMA_WEIGHTS = "ema.safetensors"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}




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


def _looks_like_hub_id(path: Union[str, Path]) -> bool:
    import re

    return isinstance(path, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None \
        and not path.startswith((".", "/")) and ".." not in path


def resolve_hub_id(repo_id: str) -> Path:
    """A Hugging Face Hub id ("org/name") -> its snapshot folder in the local Hugging Face cache
    (HF_HUB_CACHE), offline: nothing is downloaded. PipelineError when it is not cached."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - a transformers/diffusers dependency
        raise PipelineError(f"{repo_id}: no such local path (and huggingface_hub is not installed)") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, invalid ids, ...
        raise PipelineError(f"checkpoint {repo_id}: not a local path and not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}); download it first (`hf download {repo_id}`) or pass a "
                            f"folder ({type(e).__name__})") from None


def resolve_checkpoint(path: Union[str, Path], use_ema: bool = True) -> CheckpointInfo:
    """Classify `path` as a run dir, one of our checkpoint dirs or a raw Wan checkpoint. A path that
    does not exist but looks like a Hub id ("org/name") resolves through the local Hugging Face
    cache (offline)."""
    p = Path(path).expanduser()
    if not p.exists() and _looks_like_hub_id(path):
        p = resolve_hub_id(str(path))
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


def read_image(path: Union[str, Path], what: str = "init image") -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB. PipelineError (one line) for a missing file, a file
    that is not an image, or a truncated/corrupt one."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{what} {p}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise PipelineError(f"{what} {p}: not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PipelineError(f"{what} {p}: corrupt or truncated image ({type(e).__name__}: {first})") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PipelineError(f"{what} {p}: empty image")
    return arr


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def save_video(path: Union[str, Path], video, meta: dict, fps: float, selection: Optional[np.ndarray] = None) -> None:
    """Write an mp4 (uint8 [F, H, W, 3]) with its JSON sidecar (same name, .json) and optionally the
    routing selections (.selection.npy) as one atomic group, the mp4 last: an mp4 on disk always
    has its JSON. The writer of sample/sample.py and PipelineOutput.save."""
    import json

    from .io import atomic_group, write_mp4

    path = Path(path)
    group = [path.with_suffix(".json"), path]
    meta = dict(meta)
    if selection is not None:
        meta["selection"] = path.with_suffix(".selection.npy").name
        group.insert(0, path.with_suffix(".selection.npy"))
    video = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    with atomic_group(group) as tmps:
        if selection is not None:
            with open(tmps[0], "wb") as f:
                np.save(f, selection)
        tmps[-2].write_text(json.dumps(_jsonable(meta), indent=2) + "\n", encoding="utf-8")
        write_mp4(tmps[-1], video, fps=fps, atomic=False)


@dataclass
class PipelineOutput:
    """What `Pipeline.__call__` returns: `frames` uint8 [B, F, H, W, 3] (decoded history + new
    frames), the underlying SampleResult, and `save(path)` (mp4 + JSON per prompt)."""

    frames: torch.Tensor
    result: SampleResult
    fps: float
    seed: int
    indices: list
    pipeline: dict

    @property
    def latents(self) -> torch.Tensor:
        return self.result.latents

    def metadata(self, b: int = 0, path: Union[str, Path, None] = None) -> dict:
        """The JSON sidecar of sample b (what sample/sample.py writes)."""
        res = self.result
        neg = res.negative_prompt[b] if isinstance(res.negative_prompt, list) else res.negative_prompt
        board = res.storyboard
        if board is not None:
            board = [dict(chunk=e["chunk"], prompt=e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][b])
                     for e in board]
        return dict(
            prompt=res.prompts[b] if res.prompts else None, negative_prompt=neg, seed=self.seed,
            sample_index=self.indices[b], noise_seed_rule="sampler.sample_seed(seed, sample_index)",
            video=Path(path).name if path is not None else None,
            frames=int(self.frames.shape[1]) if self.frames is not None else 0, fps=self.fps,
            history_frames=res.history_frames, history_chunks=res.history_chunks,
            num_chunks=int(res.timings.get("generated_chunks", 0)),
            storyboard=board, switch_cache=res.switch_cache if board is not None else None,
            init_video=res.init_video, sampling=res.options, pipeline=self.pipeline, timings=dict(res.timings),
        )

    def save(self, path: Union[str, Path], extra: Optional[dict] = None) -> list[Path]:
        """Write sample b to path (one prompt) or to path_000_<prompt>.mp4, ... (several; a
        directory: DIR/000_<prompt>.mp4); each with its JSON. Returns the mp4 paths."""
        prompts = self.result.prompts or [f"sample_{i}" for i in range(self.frames.shape[0])]
        paths = video_paths(path, prompts)
        for b, p in enumerate(paths):
            self.save_one(b, p, extra)
        return paths

    def save_one(self, b: int, path: Union[str, Path], extra: Optional[dict] = None) -> dict:
        if self.frames is None:
            raise PipelineError("nothing to save: the rollout was not decoded (decode=False)")
        meta = self.metadata(b, path)
        meta.update(extra or {})
        save_video(path, self.frames[b], meta, self.fps, self.result.selection)
        return meta


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

    def sampling_options(self, *, steps=None, shift=None, cfg_scale=None, context_t=None, routing=None,
                         top_k=None, sink=None, window=None, record_selection=None,
                         kv_resident_chunks=None, kv_host_dtype=None) -> SamplingOptions:
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
                                               record_selection=record_selection, backend=self.backend,
                                               kv_resident_chunks=kv_resident_chunks, kv_host_dtype=kv_host_dtype)
            return dataclasses.replace(opts, routing=spec)
        except (ValueError, TypeError) as e:
            raise PipelineError(str(e)) from None

    def load_init_image(self, image, height: Optional[int] = None,
                        width: Optional[int] = None) -> tuple[torch.Tensor, dict]:
        """A still image (path, or uint8 [H, W, 3] / float [3, H, W] in [-1, 1]) -> (latents
        [1, C, cf, h, w], info): the first chunk's history. The image is repeated to the pixel
        frames of one chunk (frames_for_latents(cf): cf x temporal factor for the pixel-shuffle
        codec; 1 + 4 (cf - 1) for the Wan VAE, whose first latent frame is then the causal
        encoding of the image alone) and goes through prepare_init_video (same resize/crop)."""
        hh, ww, _ = self._geometry(height, width)
        if isinstance(image, (str, Path)):
            arr, src = read_image(image), str(image)
            frame = torch.from_numpy(arr.copy())
        else:
            frame, src = (image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))), "<array>"
            if frame.dim() != 3 or 3 not in (frame.shape[0], frame.shape[-1]):
                raise PipelineError(f"init image must be [H, W, 3] uint8 or [3, H, W] float; got {list(frame.shape)}")
        n = self.frames_for_chunks(1)
        if frame.dtype == torch.uint8:
            frames = frame.unsqueeze(0).expand(n, -1, -1, -1)
        else:
            frame = frame.float()
            frames = (frame.unsqueeze(1) if frame.shape[0] == 3 and frame.shape[-1] != 3
                      else frame.permute(2, 0, 1).unsqueeze(1)).expand(-1, n, -1, -1)
        clip, info = prepare_init_video(frames, self.vae, hh, ww, self.chunk_frames, max_chunks=1)
        h0, w0 = (frame.shape[0], frame.shape[1]) if frame.dtype == torch.uint8 or frame.shape[-1] == 3 \
            else (frame.shape[1], frame.shape[2])
        info = dict(source=src, kind="image", image_size=[int(h0), int(w0)], frames_repeated=n, chunks=1,
                    latent_frames=self.chunk_frames, resized_to=[hh, ww])
        with torch.no_grad():
            return self.vae.encode(clip.to(self.vae.device)).float(), info

    def load_init_video(self, video, max_chunks: Optional[int] = None,
                        resample_fps: bool = True, height: Optional[int] = None,
                        width: Optional[int] = None) -> tuple[torch.Tensor, dict]:
        """A path (mp4 etc., read with io.read_mp4) or frames -> (latents [1, C, n*cf, h, w], info).

        A file is first resampled in time to the model's frame rate (config data.fps, by timestamp as
        in training; `resample_fps=False` keeps its own rate). `max_chunks` keeps at most that many
        history chunks (the END of the video); only those frames are converted and encoded, so a long
        clip costs no more memory than `max_chunks` chunks."""
        d = self.config.data
        hh, ww, _ = self._geometry(height, width)
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
        clip, info = prepare_init_video(clip_frames, self.vae, hh, ww, self.chunk_frames, max_chunks)
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

    def generate(self, prompts: Union[str, Sequence[str], None] = None, num_chunks: Optional[int] = None, *,
                 negative_prompt: Union[str, Sequence[str], None] = None,
                 seed: int = 0, indices: Optional[Sequence[int]] = None, steps: Optional[int] = None,
                 shift: Optional[float] = None, cfg_scale: Optional[float] = None, context_t: Optional[float] = None,
                 routing: Union[RoutingSpec, str, None] = None, top_k: Optional[int] = None,
                 sink: Optional[int] = None, window: Optional[int] = None, record_selection: Optional[bool] = None,
                 init_video=None, init_latents: Optional[torch.Tensor] = None, init_image=None,
                 storyboard=None, switch_cache: str = "keep", height: Optional[int] = None,
                 width: Optional[int] = None, max_history_chunks: Optional[int] = None,
                 kv_resident_chunks: Optional[int] = None, kv_host_dtype: Optional[str] = None,
                 callback: Optional[Callable] = None, progress: bool = False, decode: bool = True) -> SampleResult:
        """Generate `num_chunks` chunks per prompt (one rollout, batch = len(prompts)).

        Sampling settings default to the config's `diffusion` / `attention.routing` sections.
        negative_prompt: one string for all prompts, or a list with one per prompt.
        init_video: a path or frames to continue (see prepare_init_video); init_image: a still image
        (path or array) as the first chunk's history (see load_init_image); or init_latents
        [1 or B, C, n*cf, h, w] directly. The result's video holds the VAE reconstruction of the
        given history followed by the new frames (`result.history_frames` of them are history).
        `result.init_video` (dict) describes the trimming. Seeds: sample b uses (seed, indices[b]).
        storyboard: prompt switching, a list of (chunk index, prompt) (or anything parse_storyboard
        takes); indices count generated chunks (0 = the first after the history); a prompt is a
        string for every sample or a list with one per sample. `prompts` may then be omitted (the
        entry at chunk 0 is the initial prompt) or give the initial prompts (no entry at 0).
        switch_cache: "keep" (cached history K/V stay as written) or "recache" (re-written under
        the new text), see Rollout.set_context. height/width: default the config's resolution.
        kv_resident_chunks: bounded memory, at most that many finished chunks' K/V on the device, the
        rest in host memory (cache.TieredKVCache; the same output bit for bit). None = all resident.
        kv_host_dtype: "bf16" | "fp16" | "fp32" for the host tier (smaller than the model's: lossy).
        """
        if switch_cache not in SWITCH_CACHE_MODES:
            raise PipelineError(f"switch_cache={switch_cache!r}: choose one of {', '.join(SWITCH_CACHE_MODES)}")
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
            raise PipelineError(f"num_chunks={num_chunks!r}: need an int >= 1")
        num_chunks = int(num_chunks)
        board = parse_storyboard(storyboard) if storyboard is not None else None
        if board is not None:
            try:
                check_storyboard(board, num_chunks)
            except ValueError as e:
                raise PipelineError(str(e)) from None
        if prompts is None:
            if board is None or board[0][0] != 0:
                raise PipelineError("no prompts given (pass prompts, or a storyboard with an entry at chunk 0)")
            first = board[0][1]
            prompts = [first] if isinstance(first, str) else list(first)
        else:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if board is not None and board[0][0] == 0:
                raise PipelineError("the storyboard has an entry at chunk 0 and prompts were given too; give one of them")
        if not prompts:
            raise PipelineError("no prompts given")
        bsz = len(prompts)
        if board is not None:
            board = [(c, p if isinstance(p, str) else list(p)) for c, p in board]
            for c, p in board:
                if isinstance(p, list) and len(p) != bsz:
                    raise PipelineError(f"storyboard chunk {c}: {len(p)} prompts for a batch of {bsz}")
        opts = self.sampling_options(steps=steps, shift=shift, cfg_scale=cfg_scale, context_t=context_t,
                                     routing=routing, top_k=top_k, sink=sink, window=window,
                                     record_selection=record_selection, kv_resident_chunks=kv_resident_chunks,
                                     kv_host_dtype=kv_host_dtype)
        hh, ww, latent_hw = self._geometry(height, width)
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
        init_info = None
        history = init_latents
        given = [n for n, v in (("init_video", init_video), ("init_latents", init_latents),
                                ("init_image", init_image)) if v is not None]
        if len(given) > 1:
            raise PipelineError(f"pass one of init_video, init_image, init_latents (got {', '.join(given)})")
        if init_video is not None:
            history, init_info = self.load_init_video(init_video, max_chunks=max_history_chunks, height=hh, width=ww)
        elif init_image is not None:
            history, init_info = self.load_init_image(init_image, height=hh, width=ww)
        result = sample(self.model, ctx, num_chunks, latent_hw, neg_context=neg, options=opts, seed=seed,
                        indices=indices, history=None if history is None else history.to(self.device),
                        vae=self.vae, decode=decode, callback=callback, progress=progress,
                        storyboard=switches or None, switch_cache=switch_cache)
        result.timings["text_encode_s"] = text_s
        story = None
        if board is not None:
            story = ([] if board[0][0] == 0 else [dict(chunk=0, prompt=prompts[0] if bsz == 1 else prompts)]) + \
                [dict(chunk=c, prompt=p) for c, p in board]
        return dataclasses.replace(result, init_video=init_info, prompts=prompts,
                                   negative_prompt=neg_text if opts.cfg_scale != 1.0 else None,
                                   storyboard=story, switch_cache=switch_cache if story is not None else None)

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
        which is the one implementation under both. Returns a PipelineOutput (.frames, .save(path)).
        """
        if "num_chunks" in kwargs:
            raise PipelineError("pass num_frames (video frames) to pipe(...); num_chunks is generate()'s argument")
        if isinstance(generator, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        elif generator is None:
            seed = int(kwargs.pop("seed", 0))
        else:
            seed = int(generator)
        hist_chunks, video_info = 0, None
        if kwargs.get("init_video") is not None:  # encoded first: its length sets the history's frames
            if kwargs.get("init_latents") is not None or kwargs.get("init_image") is not None:
                raise PipelineError("pass one of init_video, init_image, init_latents")
            kwargs["init_latents"], video_info = self.load_init_video(
                kwargs.pop("init_video"), max_chunks=kwargs.pop("max_history_chunks", None), height=height, width=width)
        if kwargs.get("init_image") is not None:
            hist_chunks = 1
        elif kwargs.get("init_latents") is not None:
            hist_chunks = kwargs["init_latents"].shape[2] // self.chunk_frames
        n = 1 if num_frames is None else self.chunks_for_frames(num_frames, hist_chunks)
        callback = None
        if callback_on_chunk_end is not None:
            callback = lambda c: callback_on_chunk_end(self, c.generated, c)  # noqa: E731
        res = self.generate(prompt, n, negative_prompt=negative_prompt, seed=seed, steps=num_inference_steps,
                            cfg_scale=guidance_scale, top_k=top_k, height=height, width=width, callback=callback,
                            **kwargs)
        if video_info is not None:
            res = dataclasses.replace(res, init_video=video_info)
        return PipelineOutput(frames=res.video, result=res, fps=self.config.data.fps if fps is None else fps,
                              seed=seed, indices=list(kwargs.get("indices") or range(len(res.prompts))),
                              pipeline=self.describe())

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
