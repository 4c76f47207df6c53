"""The tiny default latent space: parameter-free, exactly invertible space-to-depth."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .codec import DecodeState, VideoCodec
from .common import DeviceLike, as_device


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
        self.device, self.dtype = as_device(device), dtype

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

