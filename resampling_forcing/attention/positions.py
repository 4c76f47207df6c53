"""Far-history positions: read history chunks beyond a horizon as if they were D chunks back.

A rollout's keys are cached at their absolute RoPE positions, so a chunk t chunks back is read at a
relative frame distance that grows without bound, while training only showed distances within one
clip. bench/rope_period.py measured the consequence: with a sink far behind a window, object fidelity
swings with the rotary phase of the sink's distance. `FarPositions(horizon=H, far_at=D)` makes that
distance a setting, for any routing: a history chunk more than H chunks back is read as if it were D
chunks back (default D = H, the oldest near chunk's position; StreamingLLM would put its sinks just
before the window, D = H + 1): its keys are rotated on the frame axis; rows and columns keep their
angles; near chunks are untouched; far chunks share one position.
What it does to quality is measured, not assumed (docs/results.md#far-history-positions): on the
ablation's model D = H = a trained distance makes the model ignore the sink, D = 12 keeps it in use.

Rotations compose: the cached key of chunk c (rotated to its absolute position) times
exp(i * s_c * omega), s_c = (n - D - c) chunks in frames, is the key at the remapped position. The cache
keeps absolute keys (nothing accumulates over a rollout); every call rotates a copy of what it reads.
Mean keys (top-k's descriptors) rotate the same way, so selection scores what attention reads.
A score only needs the product: q . (R(s) k) = (R(-s) q) . k, so routed attention's torch path turns the
few queries that read a far chunk back instead of copying and turning every far key (`column_shifts`,
`turn_`; attention.routed_torch).
Host integers only: the shifts come from the rollout's cursor, no device reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import index_runs
from .spec import check_rope_horizon


@dataclass(frozen=True)
class FarPositions:
    """horizon: chunks (>= 1) beyond which history is far; freqs: angle per patched frame of the frame
    axis's rotary pairs [F/2], the first pairs of a head (float64: models.wan.rope_frame_freqs; on the keys'
    device, as for_model makes it: elsewhere every call copies it);
    chunk_frames: patched frames per chunk; far_at: the distance (chunks) far history is read at, None =
    the horizon."""

    horizon: int
    freqs: torch.Tensor
    chunk_frames: int
    far_at: int | None = None

    def __post_init__(self) -> None:
        if self.horizon is None:
            raise ValueError("FarPositions needs a horizon (FarPositions.for_model(model, None) is None)")
        check_rope_horizon(self.horizon, self.far_at)

    @property
    def at(self) -> int:
        return self.horizon if self.far_at is None else self.far_at

    @classmethod
    def for_model(cls, model, horizon: int | None, far_at: int | None = None) -> "FarPositions | None":
        """The positions of `model`'s rollouts (None when `horizon` is None: absolute positions)."""
        if horizon is None:
            check_rope_horizon(horizon, far_at)
            return None
        from ..models.wan import rope_frame_freqs

        cfg = model.cfg
        device = next(model.parameters()).device  # made once where the keys live: no copy per call
        return cls(horizon, rope_frame_freqs(cfg.head_dim, cfg.rope_theta, device),
                   cfg.chunk_frames // cfg.patch_size[0], far_at)

    def far_chunks(self, n: int) -> int:
        """How many history chunks (0 .. n-1, the current chunk is n) lie beyond the horizon."""
        return max(0, n - self.horizon)

    def turn_(self, x: torch.Tensor, shifts: torch.Tensor) -> None:
        """Rotate x [..., D] in place on the frame axis (its first F dims, about a third of a Wan head) by
        `shifts` chunks (float64 on x's device, broadcast against x.shape[:-1]; 0 leaves a row as it is), in
        fp32 (fp64 for fp64 x). A negative shift turns a query back: (R(-s) q) . k = q . (R(s) k)."""
        f = 2 * self.freqs.shape[0]
        angles = (shifts.to(x.device) * self.chunk_frames)[..., None] * self.freqs.to(x.device)  # [..., F/2]
        wide = x.dtype == torch.float64
        rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex128 if wide else torch.complex64)
        xc = torch.view_as_complex(x[..., :f].to(torch.float64 if wide else torch.float32).unflatten(-1, (-1, 2))
                                   .contiguous())
        x[..., :f] = torch.view_as_real(xc * rot).flatten(-2)

    def _rotate_(self, x: torch.Tensor, first_shift: int) -> None:
        """Rotate x [B, Hh, m, T, D] in place: m consecutive chunks, the first shifted by `first_shift`
        chunks, the next by one less, ..."""
        m = x.shape[2]
        shifts = torch.arange(first_shift, first_shift - m, -1, dtype=torch.float64, device=x.device)
        self.turn_(x, shifts.view(m, *([1] * (x.dim() - 4))))

    def column_shifts(self, n: int, ids: list[int] | None = None, columns: int | None = None) -> list[int] | None:
        """The shift (chunks) each history column is read at: column j holds chunk ids[j] (None: j, of
        `columns`) of an n-chunk history; 0 for near chunks; None when no column is far."""
        cut = self.far_chunks(n)
        listed = list(range(columns)) if ids is None else list(ids)
        shifts = [n - self.at - c if c < cut else 0 for c in listed]
        return shifts if any(c < cut for c in listed) else None

    def keys(self, k: torch.Tensor, chunk_tokens: int, n: int, chunks: list[int] | None = None,
             in_place: bool = False) -> torch.Tensor:
        """k [B, Hh, L, D]: the keys of history chunks `chunks` (ascending; None = 0 .. m-1) packed in
        that order, maybe followed by the current chunk's; returns k with the far ones rotated (k itself
        when there are none: no copy). `in_place`: k is the caller's private copy, rotate it there."""
        cut = self.far_chunks(n)
        listed = list(range(k.shape[2] // chunk_tokens)) if chunks is None else chunks
        far = [c for c in listed if c < cut]  # a prefix: `listed` is ascending
        if not far:
            return k
        out, p = (k if in_place else k.clone()), 0
        for a, b in index_runs(far):
            self._rotate_(out[:, :, p * chunk_tokens:(p + b - a) * chunk_tokens].unflatten(2, (b - a, chunk_tokens)),
                          n - self.at - a)
            p += b - a
        return out

    def mean_keys(self, mean_k: torch.Tensor, n: int) -> torch.Tensor:
        """Mean keys [B, Hh, n, D] of chunks 0 .. n-1 with the far ones rotated (rotation is linear: the
        mean of the rotated keys)."""
        cut = self.far_chunks(n)
        if cut == 0:
            return mean_k
        out = mean_k.clone()
        self._rotate_(out[:, :, :cut], n - self.at)
        return out
