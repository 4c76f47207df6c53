"""The Wan causal 3D VAEs (``diffusers.AutoencoderKLWan``) as a :class:`VideoCodec`.

Loaded from a LOCAL directory; Wan2.1's: 4x temporal / 8x spatial compression, 16 latent channels; Wan2.2's
(residual, 2x2 patchify): 4x / 16x, 48 channels (config `encoders.vae: wan2.2`). Latents
normalized with the VAE config's ``latents_mean`` / ``latents_std`` exactly as diffusers'
``WanPipeline`` does. Streaming decode (``decode_chunk``) drives the decoder with a feature cache
we own (see :mod:`.codec`), exactly the operations of ``AutoencoderKLWan.decode``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional, Union

import torch

from .codec import DecodeState, VideoCodec
from .common import DeviceLike, EncoderLoadError, as_device, load_or_raise

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

    Properties: ``latent_channels`` (z_dim: 16 for Wan2.1, 48 for Wan2.2), ``temporal_factor`` (4),
    ``spatial_factor`` (8; 16 for Wan2.2); F = 1 + 4 (f - 1) pixel frames for f latent frames.
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
        kwargs = {"subfolder": sub} if sub else {}
        model = load_or_raise(
            lambda: AutoencoderKLWan.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype, **kwargs),
            f"WanVAE: failed to load '{root / sub if sub else root}'", _WAN_LAYOUT)
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
        self.device, self.dtype = as_device(device), dtype
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

    def _place(self) -> None:
        self.model.to(self.device)
        if next(self.model.parameters()).dtype != self.dtype:
            self.model.to(dtype=self.dtype)
        self._mean = self._mean_cpu.to(self.device)
        self._std = self._std_cpu.to(self.device)

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

