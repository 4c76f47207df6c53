"""The video codec interface (:class:`VideoCodec`) and its streaming decode (:class:`DecodeState`).

Shapes (contract, see docs/CONTRACTS.md)::

    vae.encode(video [B, 3, F, H, W] in [-1, 1]) -> latents [B, C, f, h, w]
    vae.decode(latents [B, C, f, h, w])           -> video [B, 3, F, H, W] in [-1, 1]

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

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from .common import Placed


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


class VideoCodec(Placed):
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
        """video [B, 3, F, H, W] in [-1, 1] -> latents [B, C, f, h, w] (the codec's geometry)."""
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

