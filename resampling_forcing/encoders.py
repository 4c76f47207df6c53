"""Video latent spaces (VAEs) and text encoders, real and tiny.

Two latent spaces share one interface (:class:`VideoCodec`):

* :class:`WanVAE` -- the Wan2.1 causal 3D VAE (``diffusers.AutoencoderKLWan``) loaded from a LOCAL
  directory, 4x temporal / 8x spatial compression, 16 latent channels, latents normalized with the
  VAE config's ``latents_mean`` / ``latents_std`` exactly as diffusers' ``WanPipeline`` does.
* :class:`PixelShuffleVAE` -- a parameter-free, exactly invertible space-to-depth "latent space" for
  the tiny CPU default (32x32 synthetic video -> 48 x 8 x 8 latents with ``factor=4``).

Two text encoders share one interface (``encode(list[str]) -> [B, text_len, text_dim]``):

* :class:`UMT5TextEncoder` -- umT5 encoder + tokenizer from ``transformers`` loaded from a LOCAL
  directory, numerically identical to ``WanPipeline._get_t5_prompt_embeds`` (zero-padded past each
  prompt's real token length).
* :class:`HashTextEncoder` -- deterministic, parameter-free word vectors (stable crc32 hash) plus a
  sinusoidal position code; the empty prompt encodes to all zeros.

Shapes (contract, see docs/CONTRACTS.md)::

    vae.encode(video [B, 3, F, H, W] in [-1, 1]) -> latents [B, C, f, h, w]
    vae.decode(latents [B, C, f, h, w])           -> video [B, 3, F, H, W] in [-1, 1]
    text.encode(list[str])                        -> [B, text_len, text_dim]

Streaming decode
----------------
A rollout produces latents chunk by chunk (3 latent frames per chunk in the paper). Decoding each
finished chunk while the rollout continues needs the VAE decoder's causal state to survive between
calls. The Wan decoder is a stack of causal 3D convolutions; diffusers already decodes one latent
frame at a time and keeps, per causal conv, the last 2 input frames in a list (the "feature cache").
:meth:`WanVAE.decode_chunk` calls the same public submodules (``post_quant_conv``, ``decoder``)
with a feature cache that WE own, stored in a :class:`DecodeState`; so decoding chunk by chunk is
not an approximation: it runs exactly the operations of ``AutoencoderKLWan.decode`` on the whole
latent video (tested to fp32 round-off). Usage::

    state = vae.init_decode_state()
    for chunk in rollout:                      # chunk: [B, C, 3, h, w]
        frames = vae.decode_chunk(chunk, state)  # first call: 1 + 4*2 = 9 frames, then 12 each
    # or: for frames in vae.decode_iter(latents, chunk_latent_frames=3): ...

Memory held between calls: 2 frames of each causal conv's input at its resolution (a few hundred
MB at 480x832 in fp32), never the whole video. A state belongs to one batch (same B, h, w) and one
codec; start a new state for a new video.
"""
from __future__ import annotations

import html
import inspect
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EncoderLoadError",
    "DecodeState",
    "VideoCodec",
    "WanVAE",
    "PixelShuffleVAE",
    "UMT5TextEncoder",
    "HashTextEncoder",
    "VAE_KINDS",
    "TEXT_KINDS",
    "build_vae",
    "build_text_encoder",
    "prompt_clean",
]

VAE_KINDS = ("wan", "pixel_shuffle")
TEXT_KINDS = ("umt5", "hash")

DeviceLike = Union[str, torch.device, None]


class EncoderLoadError(ValueError):
    """A local encoder directory is missing or does not have the expected layout (one-line message)."""


def _as_device(device: DeviceLike) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


# ============================================================================ video codecs


@dataclass
class DecodeState:
    """Carried state of a streaming decode (one video batch, one codec).

    Fields:
        latent_frames_done: latent frames decoded so far.
        frames_done: pixel frames emitted so far.
        cache: codec-specific causal cache (WanVAE: the decoder's per-conv feature cache list).
        batch_size, latent_hw: fixed by the first chunk; later chunks must match.
    """

    latent_frames_done: int = 0
    frames_done: int = 0
    cache: Any = None
    batch_size: Optional[int] = None
    latent_hw: Optional[tuple[int, int]] = None
    owner: Optional[int] = field(default=None, repr=False)


class VideoCodec:
    """Common interface of the latent spaces. Subclasses set the attributes below and implement
    :meth:`encode` and :meth:`_decode_frames`.

    Attributes:
        latent_channels (int): C of the latents.
        temporal_factor (int): pixel frames per latent frame (after the first, if causal).
        spatial_factor (int): pixels per latent pixel along H and W.
        causal_first_frame (bool): True when latent frame 0 covers ONE pixel frame and every later
            latent frame covers ``temporal_factor`` frames (Wan: F = 1 + 4 (f - 1)); False when every
            latent frame covers ``temporal_factor`` frames (F = temporal_factor * f).
    """

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    causal_first_frame: bool

    # ------------------------------------------------------------------ frame arithmetic
    def frames_for_latents(self, f: int) -> int:
        """Pixel frames produced by decoding ``f`` latent frames (0 -> 0)."""
        if f < 0:
            raise ValueError(f"latent frame count must be >= 0, got {f}")
        if f == 0:
            return 0
        return 1 + self.temporal_factor * (f - 1) if self.causal_first_frame else self.temporal_factor * f

    def latents_for_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames; ValueError if not an exact fit."""
        tf = self.temporal_factor
        if self.causal_first_frame:
            if num_frames < 1 or (num_frames - 1) % tf:
                lo = max(1, 1 + tf * ((num_frames - 1) // tf))
                raise ValueError(
                    f"{type(self).__name__}: {num_frames} frames is not 1 + {tf}k; "
                    f"use {lo} or {lo + tf} frames")
            return 1 + (num_frames - 1) // tf
        if num_frames < 1 or num_frames % tf:
            raise ValueError(
                f"{type(self).__name__}: {num_frames} frames is not a multiple of temporal_factor={tf}")
        return num_frames // tf

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) of the latents of a [3, num_frames, height, width] video."""
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"{type(self).__name__}: H={height}, W={width} must be multiples of {s}")
        return (self.latent_channels, self.latents_for_frames(num_frames), height // s, width // s)

    # ------------------------------------------------------------------ checks
    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}.encode: expected video [B, 3, F, H, W], got {tuple(video.shape)}")
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])

    def _check_latents(self, latents: torch.Tensor, where: str) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.{where}: expected latents [B, {self.latent_channels}, f, h, w], "
                f"got {tuple(latents.shape)}")

    # ------------------------------------------------------------------ decode API
    def encode(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_decode_state(self) -> DecodeState:
        """A fresh state for :meth:`decode_chunk` (one per video batch)."""
        return DecodeState(owner=id(self))

    def decode_chunk(self, latents_chunk: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Decode the NEXT ``n`` latent frames of a video, carrying ``state`` (updated in place).

        Args:
            latents_chunk: [B, C, n, h, w], the latent frames that follow those already decoded
                with this state (n >= 0).
            state: from :meth:`init_decode_state`, then passed back unchanged on every call.
        Returns:
            video [B, 3, m, H, W] in [-1, 1], m = frames_for_latents(done + n) - frames_for_latents(done)
            (Wan: 1 + 4 (n - 1) on the first call, 4 n afterwards). Concatenating the outputs over
            all calls equals :meth:`decode` of the concatenated latents.
        """
        self._check_latents(latents_chunk, "decode_chunk")
        b, _, n, h, w = latents_chunk.shape
        if state.owner is not None and state.owner != id(self):
            raise ValueError("decode_chunk: this DecodeState was created by another codec")
        if state.batch_size is None:
            state.batch_size, state.latent_hw = b, (h, w)
        elif (b, (h, w)) != (state.batch_size, state.latent_hw):
            raise ValueError(
                f"decode_chunk: chunk batch/size {(b, h, w)} differs from the stream's "
                f"{(state.batch_size, *state.latent_hw)}; start a new state for a new video")
        if n == 0:
            s = self.spatial_factor
            return latents_chunk.new_zeros(b, 3, 0, h * s, w * s)
        out = self._decode_frames(latents_chunk, state)
        state.latent_frames_done += n
        state.frames_done += out.shape[2]
        return out

    def _decode_frames(self, latents_chunk: torch.Tensor, state: DecodeState) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def decode_iter(self, latents: torch.Tensor, chunk_latent_frames: int = 3,
                    state: Optional[DecodeState] = None) -> Iterator[torch.Tensor]:
        """Yield the decoded video chunk by chunk: [B, 3, m_i, H, W] per ``chunk_latent_frames``
        latent frames (the last chunk may be shorter). Exact: ``torch.cat(list(...), 2) == decode``.
        Only one chunk's activations (plus the small causal cache) are alive at a time; move each
        yielded chunk off the device yourself if you keep it. Pass ``state`` to continue a stream."""
        if chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames must be >= 1, got {chunk_latent_frames}")
        self._check_latents(latents, "decode_iter")
        state = state if state is not None else self.init_decode_state()
        for s in range(0, latents.shape[2], chunk_latent_frames):
            yield self.decode_chunk(latents[:, :, s:s + chunk_latent_frames], state)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, f, h, w] -> video [B, 3, frames_for_latents(f), H, W] in [-1, 1]."""
        self._check_latents(latents, "decode")
        return self.decode_chunk(latents, self.init_decode_state())


# ---------------------------------------------------------------------------- Wan VAE

_WAN_LAYOUT = ("expected a diffusers repo root with vae/config.json + vae/diffusion_pytorch_model"
               ".safetensors (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or that vae/ folder itself")


def _resolve_wan_vae_dir(path: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """-> (directory to load, subfolder or None). Raises EncoderLoadError (one line)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EncoderLoadError(f"WanVAE: directory '{p}' not found; {_WAN_LAYOUT}")
    if (p / "vae" / "config.json").is_file():
        root, sub, cfg_file = p, "vae", p / "vae" / "config.json"
    elif (p / "config.json").is_file():
        root, sub, cfg_file = p, None, p / "config.json"
    else:
        raise EncoderLoadError(f"WanVAE: no config.json in '{p}' or '{p / 'vae'}'; {_WAN_LAYOUT}")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise EncoderLoadError(f"WanVAE: cannot read '{cfg_file}' ({e}); {_WAN_LAYOUT}") from None
    if cls_name not in (None, "AutoencoderKLWan"):
        raise EncoderLoadError(
            f"WanVAE: '{cfg_file}' describes a {cls_name}, not an AutoencoderKLWan; {_WAN_LAYOUT}")
    return root, sub


class WanVAE(VideoCodec):
    """Wan2.1 causal video VAE (``diffusers.AutoencoderKLWan``) with Wan latent normalization.

    Args:
        path: a diffusers repo root with a ``vae/`` subfolder, or the vae folder itself. Loaded with
            ``local_files_only=True``; a missing or malformed directory raises
            :class:`EncoderLoadError` naming the path and the expected layout.
        device, dtype: where to run (fp32 recommended; the Wan pipelines decode in fp32).

    Latents: ``(posterior_mean - latents_mean) / latents_std`` (config values, per channel), the
    normalization of diffusers' Wan pipelines; :meth:`decode` inverts it before decoding.

    Properties: ``latent_channels`` (z_dim, 16 for Wan2.1), ``temporal_factor`` (4),
    ``spatial_factor`` (8); F = 1 + 4 (f - 1) pixel frames for f latent frames.
    The diffusers model is ``self.model`` (eval mode, no grad). Spatial tiling of the diffusers
    model is not used by the streaming decode path.
    """

    causal_first_frame = True

    def __init__(self, path: Union[str, Path], device: DeviceLike = "cpu",
                 dtype: torch.dtype = torch.float32):
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
            raise ImportError("WanVAE needs diffusers>=0.33 (AutoencoderKLWan)") from e
        root, sub = _resolve_wan_vae_dir(path)
        try:
            kwargs = {"subfolder": sub} if sub else {}
            model = AutoencoderKLWan.from_pretrained(str(root), local_files_only=True,
                                                     torch_dtype=dtype, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised as one line, cause kept
            where = root / sub if sub else root
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderLoadError(f"WanVAE: failed to load '{where}' ({msg}); {_WAN_LAYOUT}") from e
        self._setup(model, device, dtype)
        self.path = str(path)

    @classmethod
    def from_model(cls, model, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "WanVAE":
        """Wrap an already built ``AutoencoderKLWan`` (e.g. for tests or a custom loader)."""
        self = cls.__new__(cls)
        p = next(model.parameters())
        self._setup(model, device if device is not None else p.device, dtype or p.dtype)
        self.path = None
        return self

    def _setup(self, model, device: DeviceLike, dtype: torch.dtype) -> None:
        cfg = model.config
        z_dim = int(cfg.z_dim)
        mean, std = list(cfg.latents_mean), list(cfg.latents_std)
        if len(mean) != z_dim or len(std) != z_dim:
            raise EncoderLoadError(
                f"WanVAE: config latents_mean/latents_std have {len(mean)}/{len(std)} entries, "
                f"z_dim is {z_dim}")
        model.requires_grad_(False).eval()
        self.model = model
        self.device, self.dtype = _as_device(device), dtype
        self._mean_cpu = torch.tensor(mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self._std_cpu = torch.tensor(std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self.latent_channels = z_dim
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.patch_size = getattr(cfg, "patch_size", None)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * (self.patch_size or 1)
        self._n_cache = sum(type(m).__name__ == "WanCausalConv3d" for m in model.decoder.modules())
        self._n_cache = self._n_cache or sum(1 for _ in model.decoder.modules())
        self._first_chunk_kw = "first_chunk" in inspect.signature(model.decoder.forward).parameters
        self.to(device, dtype)

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "WanVAE":
        """Move the VAE (in place); returns self."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(self.device)
        if next(self.model.parameters()).dtype != self.dtype:
            self.model.to(dtype=self.dtype)
        self._mean = self._mean_cpu.to(self.device)
        self._std = self._std_cpu.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 1 + 4k -> normalized latents [B, 16, 1 + k, H/8, W/8].

        ``sample=False`` (default) takes the posterior mean (deterministic); ``sample=True`` draws
        from the posterior with ``generator``. Returned in ``self.dtype`` on ``self.device``.
        """
        self._check_video(video)
        dist = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        z = (z.float() - self._mean) / self._std
        return z.to(self.dtype)

    @torch.no_grad()
    def _decode_frames(self, latents_chunk: torch.Tensor, state: DecodeState) -> torch.Tensor:
        if state.cache is None:
            state.cache = [None] * self._n_cache
        z = latents_chunk.to(self.device, torch.float32) * self._std + self._mean
        x = self.model.post_quant_conv(z.to(self.dtype))  # 1x1x1 conv: frame-local, exact per chunk
        outs = []
        for i in range(x.shape[2]):
            # exactly AutoencoderKLWan._decode: one latent frame per call, fresh conv index,
            # first_chunk=True only for the video's first latent frame.
            kw = {"first_chunk": state.latent_frames_done + i == 0} if self._first_chunk_kw else {}
            outs.append(self.model.decoder(x[:, :, i:i + 1], feat_cache=state.cache, feat_idx=[0], **kw))
        out = torch.cat(outs, 2)
        if self.patch_size is not None and self.patch_size > 1:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=self.patch_size)
        return out.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------- pixel shuffle


class PixelShuffleVAE(VideoCodec):
    """Parameter-free, exactly invertible space-to-depth "latent space" for tiny CPU models.

    encode: [B, 3, F, H, W] -> [B, 3 * tf * s * s, F / tf, H / s, W / s] (s = ``factor``,
    tf = ``temporal_factor``): per frame ``pixel_unshuffle`` by s, then tf consecutive frames folded
    into channels (channel = dt * 3 s^2 + c). Latents = ``(x - shift) * scale``; the defaults
    (shift 0, scale 1) keep pixel values in [-1, 1], which is already O(1); pass e.g.
    ``scale = 1 / data_std`` for unit-variance latents. decode inverts it and clamps to [-1, 1]
    (``clamp=False`` to keep it bit-exact for out-of-range inputs).
    No causal first frame: F = tf * f. With tf = 1 streaming decode is trivially exact.
    """

    causal_first_frame = False

    def __init__(self, factor: int = 4, temporal_factor: int = 1, scale: float = 1.0,
                 shift: float = 0.0, clamp: bool = True, device: DeviceLike = "cpu",
                 dtype: torch.dtype = torch.float32):
        if factor < 1 or temporal_factor < 1:
            raise ValueError(f"PixelShuffleVAE: factor={factor}, temporal_factor={temporal_factor} must be >= 1")
        if scale == 0:
            raise ValueError("PixelShuffleVAE: scale must be non-zero")
        self.spatial_factor = int(factor)
        self.temporal_factor = int(temporal_factor)
        self.latent_channels = 3 * self.temporal_factor * self.spatial_factor ** 2
        self.scale, self.shift, self.clamp = float(scale), float(shift), bool(clamp)
        self.device, self.dtype = _as_device(device), dtype

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "PixelShuffleVAE":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] -> latents [B, 3 tf s^2, F / tf, H / s, W / s] (self.dtype/device)."""
        self._check_video(video)
        b, c, f, h, w = video.shape
        s, tf = self.spatial_factor, self.temporal_factor
        x = video.to(self.device, self.dtype).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = F.pixel_unshuffle(x, s) if s > 1 else x                       # [B*F, 3 s^2, h', w']
        cs, hs, ws = x.shape[1:]
        x = x.reshape(b, f // tf, tf, cs, hs, ws).reshape(b, f // tf, tf * cs, hs, ws)
        x = x.permute(0, 2, 1, 3, 4).contiguous()                          # [B, C, f, h', w']
        return (x - self.shift) * self.scale

    def _decode_frames(self, latents_chunk: torch.Tensor, state: DecodeState) -> torch.Tensor:
        z = latents_chunk.to(self.device, self.dtype) / self.scale + self.shift
        b, c, f, h, w = z.shape
        s, tf = self.spatial_factor, self.temporal_factor
        x = z.permute(0, 2, 1, 3, 4).reshape(b, f, tf, c // tf, h, w).reshape(b * f * tf, c // tf, h, w)
        x = F.pixel_shuffle(x, s) if s > 1 else x                          # [B*F, 3, H, W]
        x = x.reshape(b, f * tf, 3, h * s, w * s).permute(0, 2, 1, 3, 4).contiguous()
        return x.clamp(-1.0, 1.0) if self.clamp else x


# ============================================================================ text encoders


def _basic_clean(text: str) -> str:
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return text.strip()


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (if installed), double HTML unescape, collapse spaces."""
    return re.sub(r"\s+", " ", _basic_clean(text)).strip()


def _as_prompts(prompts: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"text encoder: prompts must be strings, got {type(p).__name__}")
    return prompts


_UMT5_LAYOUT = ("expected a diffusers repo root with text_encoder/config.json (+ weights) and "
                "tokenizer/ (tokenizer.json or spiece.model), or pass text_encoder_path= and "
                "tokenizer_path=")


def _has_tokenizer(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in
                              ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def _resolve_umt5_dirs(path, text_encoder_path, tokenizer_path) -> tuple[Path, Path]:
    root = Path(path).expanduser() if path is not None else None
    if root is not None and not root.is_dir():
        raise EncoderLoadError(f"UMT5TextEncoder: directory '{root}' not found; {_UMT5_LAYOUT}")
    te = Path(text_encoder_path).expanduser() if text_encoder_path is not None else None
    tk = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    if te is None:
        if root is None:
            raise EncoderLoadError(f"UMT5TextEncoder: no path given; {_UMT5_LAYOUT}")
        te = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    if tk is None:
        if root is None:
            raise EncoderLoadError(f"UMT5TextEncoder: no tokenizer path given; {_UMT5_LAYOUT}")
        tk = root / "tokenizer" if _has_tokenizer(root / "tokenizer") else root
    if not (te / "config.json").is_file():
        raise EncoderLoadError(f"UMT5TextEncoder: no text encoder config.json in '{te}'; {_UMT5_LAYOUT}")
    if not _has_tokenizer(tk):
        raise EncoderLoadError(f"UMT5TextEncoder: no tokenizer files in '{tk}'; {_UMT5_LAYOUT}")
    return te, tk


def _transformers_dtype_kw(dtype: torch.dtype) -> dict:
    import transformers
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - odd dev version strings
        major, minor = 5, 0
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class UMT5TextEncoder:
    """umT5 text encoder (``transformers.UMT5EncoderModel`` + ``AutoTokenizer``), Wan style.

    Args:
        path: a diffusers repo root with ``text_encoder/`` and ``tokenizer/`` subfolders (or one
            folder holding both). ``text_encoder_path`` / ``tokenizer_path`` override either.
            Everything loads with ``local_files_only=True``.
        text_len: max tokens (Wan: 512). Longer prompts are truncated.
        device, dtype: where to run (bf16 is what Wan uses on GPU; fp32 default for CPU).

    ``encode(prompts) -> [B, text_len, text_dim]``, identical to diffusers'
    ``WanPipeline._get_t5_prompt_embeds``: clean the prompt, tokenize (pad to ``text_len``,
    truncate, special tokens on), run the encoder with the attention mask, keep the first
    ``seq_len`` positions of each prompt (its real token count incl. EOS) and zero the rest.
    ``text_dim`` = the model's d_model (4096 for umT5-xxl).
    """

    def __init__(self, path: Union[str, Path, None] = None, text_len: int = 512,
                 device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32, *,
                 text_encoder_path: Union[str, Path, None] = None,
                 tokenizer_path: Union[str, Path, None] = None, clean: bool = True):
        from transformers import AutoTokenizer, UMT5EncoderModel

        if text_len < 1:
            raise ValueError(f"UMT5TextEncoder: text_len must be >= 1, got {text_len}")
        te, tk = _resolve_umt5_dirs(path, text_encoder_path, tokenizer_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tk), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderLoadError(f"UMT5TextEncoder: failed to load tokenizer '{tk}' ({msg}); {_UMT5_LAYOUT}") from e
        try:
            self.model = UMT5EncoderModel.from_pretrained(str(te), local_files_only=True,
                                                          **_transformers_dtype_kw(dtype))
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderLoadError(f"UMT5TextEncoder: failed to load text encoder '{te}' ({msg}); {_UMT5_LAYOUT}") from e
        self.model.requires_grad_(False).eval()
        self.text_len = int(text_len)
        self.clean = clean
        self.text_dim = int(self.model.config.d_model)
        self.device, self.dtype = _as_device(device), dtype
        self.to(self.device, dtype)

    @property
    def dim(self) -> int:
        return self.text_dim

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "UMT5TextEncoder":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """list of B prompts -> [B, text_len, text_dim] (self.dtype, self.device), zero-padded."""
        prompts = _as_prompts(prompts)
        if self.clean:
            prompts = [prompt_clean(p) for p in prompts]
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        seq_lens = mask.gt(0).sum(dim=1).long()
        out = self.model(ids, mask).last_hidden_state.to(self.dtype)
        keep = torch.arange(out.shape[1], device=out.device)[None, :] < seq_lens[:, None]
        return torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


class HashTextEncoder:
    """Deterministic, parameter-free text features for the tiny default (no downloads).

    ``encode(prompts) -> [B, text_len, dim]``: each prompt is lowercased and split into words
    (``\\w+``, punctuation dropped); word i (i < text_len) becomes ``w(word) + pos_scale * p(i)``:

    * ``w(word)`` ~ N(0, I_dim), drawn from ``numpy.random.RandomState(crc32(f"{seed}:{word}"))``
      (stable across processes, platforms and versions; NOT Python's salted ``hash()``).
    * ``p(i)``: the sinusoidal position code (sin/cos pairs, base 10000), so word order -- e.g. which
      colour goes with which shape -- is recoverable by attention.
    * with ``ngram = n > 1``, also ``+ w("word_i word_i+1")`` ... up to the n-gram starting at word i
      (where the caption has those words): a little context, as a real text encoder's outputs have.
      The colour token of "green square" then names the object, so a tiny DiT need not bind
      adjacent words itself to compose unseen pairs of objects.

    Positions past the caption's word count are zero; captions longer than ``text_len`` are
    truncated. The empty prompt (or one with no words) encodes to all zeros: the unconditional /
    negative prompt.
    """

    def __init__(self, text_len: int = 16, dim: int = 32, seed: int = 0, pos_scale: float = 1.0,
                 ngram: int = 1, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32):
        if text_len < 1 or dim < 1 or ngram < 1:
            raise ValueError(f"HashTextEncoder: text_len={text_len}, dim={dim}, ngram={ngram} must be >= 1")
        self.text_len, self.text_dim, self.seed, self.ngram = int(text_len), int(dim), int(seed), int(ngram)
        self.pos_scale = float(pos_scale)
        self.device, self.dtype = _as_device(device), dtype
        self._vectors: dict[str, torch.Tensor] = {}
        self._pos = self._sinusoid(self.text_len, self.text_dim)

    @property
    def dim(self) -> int:
        return self.text_dim

    @staticmethod
    def _sinusoid(n: int, dim: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange((dim + 1) // 2, dtype=torch.float64)[None, :]
        ang = pos / (10000.0 ** (2 * i / dim))
        pe = torch.zeros(n, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(ang)[:, : pe[:, 0::2].shape[1]]
        pe[:, 1::2] = torch.cos(ang)[:, : pe[:, 1::2].shape[1]]
        return pe.float()

    @staticmethod
    def words(prompt: str) -> list[str]:
        """Lowercased word list used for one prompt."""
        return re.findall(r"\w+", prompt.lower())

    def word_vector(self, word: str) -> torch.Tensor:
        """The fixed [dim] float32 vector of ``word`` (cached)."""
        v = self._vectors.get(word)
        if v is None:
            key = zlib.crc32(f"{self.seed}:{word}".encode("utf-8")) & 0xFFFFFFFF
            v = torch.from_numpy(np.random.RandomState(key).standard_normal(self.text_dim).astype(np.float32))
            self._vectors[word] = v
        return v

    def _token(self, words: list[str], i: int) -> torch.Tensor:
        """[dim] features of word i: its vector plus those of the n-grams (n <= ngram) starting at it."""
        v = self.word_vector(words[i])
        for n in range(2, min(self.ngram, len(words) - i) + 1):
            v = v + self.word_vector(" ".join(words[i:i + n]))
        return v

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "HashTextEncoder":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """list of B prompts -> [B, text_len, dim] (self.dtype, self.device)."""
        prompts = _as_prompts(prompts)
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for b, p in enumerate(prompts):
            ws = self.words(p)[: self.text_len]
            if ws:
                out[b, : len(ws)] = torch.stack([self._token(ws, i) for i in range(len(ws))]) \
                    + self.pos_scale * self._pos[: len(ws)]
        return out.to(self.device, self.dtype)


# ============================================================================ factories


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _has(cfg: Any, key: str) -> bool:
    if cfg is None:
        return False
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def build_vae(cfg: Any = None, *, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32,
              **overrides: Any) -> VideoCodec:
    """Build a latent space from a spec.

    ``cfg`` may be: a kind string; a mapping / object with ``kind`` (+ ``path`` for wan, ``factor``,
    ``temporal_factor``, ``scale``, ``shift`` for pixel_shuffle); or the project's
    ``EncoderConfig`` (``vae``, ``vae_path``, ``vae_factor``). Keyword ``overrides`` win.
    kinds: "wan" (:class:`WanVAE`, needs a path), "pixel_shuffle" (:class:`PixelShuffleVAE`).
    Unknown kind -> ValueError naming the accepted values.
    """
    if isinstance(cfg, str):
        cfg = {"kind": cfg}
    enc_style = not _has(cfg, "kind") and _has(cfg, "vae")
    spec = {
        "kind": _get(cfg, "vae") if enc_style else _get(cfg, "kind"),
        "path": _get(cfg, "vae_path") if enc_style else _get(cfg, "path"),
        "factor": _get(cfg, "vae_factor") if enc_style else _get(cfg, "factor", _get(cfg, "vae_factor")),
        "temporal_factor": _get(cfg, "temporal_factor", 1),
        "scale": _get(cfg, "scale", 1.0),
        "shift": _get(cfg, "shift", 0.0),
    }
    spec.update(overrides)
    kind = spec["kind"]
    if kind == "wan":
        if not spec["path"]:
            raise ValueError("build_vae: kind 'wan' needs a path (encoders.vae_path) to a local Wan "
                             "diffusers repo or its vae/ folder")
        return WanVAE(spec["path"], device=device, dtype=dtype)
    if kind == "pixel_shuffle":
        return PixelShuffleVAE(factor=int(spec["factor"] or 4), temporal_factor=int(spec["temporal_factor"] or 1),
                               scale=spec["scale"], shift=spec["shift"], device=device, dtype=dtype)
    raise ValueError(f"build_vae: unknown vae kind {kind!r}; accepted: {', '.join(map(repr, VAE_KINDS))}")


def build_text_encoder(cfg: Any = None, *, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32,
                       **overrides: Any):
    """Build a text encoder from a spec.

    ``cfg`` may be: a kind string; a mapping / object with ``kind`` (+ ``path``, ``text_len``,
    ``dim`` / ``text_dim``, ``seed``, ``text_encoder_path``, ``tokenizer_path``); or the project's
    ``EncoderConfig`` (``text``, ``text_path``, ``text_len``, ``text_dim``). Keyword overrides win.
    kinds: "umt5" (:class:`UMT5TextEncoder`, needs a path) and "hash" (:class:`HashTextEncoder`;
    ``text_dim`` is used only here, umT5 reports its own). Unknown kind -> ValueError.
    """
    if isinstance(cfg, str):
        cfg = {"kind": cfg}
    enc_style = not _has(cfg, "kind") and _has(cfg, "text")
    spec = {
        "kind": _get(cfg, "text") if enc_style else _get(cfg, "kind"),
        "path": _get(cfg, "text_path") if enc_style else _get(cfg, "path"),
        "text_len": _get(cfg, "text_len"),
        "dim": _get(cfg, "dim", _get(cfg, "text_dim")),
        "seed": _get(cfg, "seed", 0),
        "ngram": _get(cfg, "ngram", _get(cfg, "text_ngram", 1)),
        "text_encoder_path": _get(cfg, "text_encoder_path"),
        "tokenizer_path": _get(cfg, "tokenizer_path"),
    }
    spec.update(overrides)
    kind = spec["kind"]
    if kind == "umt5":
        if not (spec["path"] or spec["text_encoder_path"]):
            raise ValueError("build_text_encoder: kind 'umt5' needs a path (encoders.text_path) to a local "
                             "Wan diffusers repo with text_encoder/ and tokenizer/")
        return UMT5TextEncoder(spec["path"], text_len=int(spec["text_len"] or 512), device=device, dtype=dtype,
                               text_encoder_path=spec["text_encoder_path"], tokenizer_path=spec["tokenizer_path"])
    if kind == "hash":
        return HashTextEncoder(text_len=int(spec["text_len"] or 16), dim=int(spec["dim"] or 32),
                               seed=int(spec["seed"] or 0), ngram=int(spec["ngram"] or 1), device=device,
                               dtype=dtype)
    raise ValueError(
        f"build_text_encoder: unknown text encoder kind {kind!r}; accepted: {', '.join(map(repr, TEXT_KINDS))}")
