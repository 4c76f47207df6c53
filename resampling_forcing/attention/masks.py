"""The attention rules of training, written once as FlexAttention `mask_mod`s.

Two layouts (method.md section 3, docs/CONTRACTS.md):
- "dual":  [H_1..H_{N-1} | Q_1..Q_N], chunks of T tokens (L = (2N - 1) T).
           Q_i->Q_j iff j == i; Q_i->H_j iff j < i; H_i->H_j iff j <= i; H_i->Q_j never.
           H_N is left out: no noisy chunk attends it (Q_i sees H_j only for j < i), so the noisy
           half's output is exactly that of the full [H_1..H_N | Q_1..Q_N] (method.md section 3).
- "block_causal": [C_1..C_N] (L = N T), C_i->C_j iff j <= i (what the KV cache holds).
- "full": no mask.

The same mask_mod feeds the FlexAttention BlockMask (GPU; forward only on CPU) and the dense
boolean mask that SDPA needs on CPU, so the two backends cannot disagree about the rule.
Both are cached by shape: building a BlockMask costs tens of milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import torch

# FlexAttention works on tiles of this many tokens; sequences are padded up to a multiple.
FLEX_BLOCK = 128


def dual_history_chunks(num_chunks: int) -> int:
    """History chunks of the dual layout for `num_chunks` noisy chunks: H_1..H_{N-1} (H_N is never attended)."""
    return max(num_chunks - 1, 0)


@dataclass(frozen=True)
class MaskSpec:
    """A token layout: `kind` with `num_chunks` chunks of `chunk_tokens` tokens (dual: `num_chunks` noisy
    chunks after `history_chunks` history chunks)."""

    kind: Literal["full", "dual", "block_causal"]
    num_chunks: int
    chunk_tokens: int

    @property
    def history_chunks(self) -> int:
        return dual_history_chunks(self.num_chunks) if self.kind == "dual" else 0

    @property
    def seq_len(self) -> int:
        return (self.history_chunks + self.num_chunks) * self.chunk_tokens

    def mask_mod(self, seq_len: int | None = None) -> Callable:
        """mask_mod(b, h, q_idx, kv_idx) -> bool; indices >= seq_len (padding) are masked."""
        return _mask_mod(self.kind, self.num_chunks, self.chunk_tokens, seq_len or self.seq_len)


def _mask_mod(kind: str, n: int, t: int, seq_len: int) -> Callable:
    nt = dual_history_chunks(n) * t  # dual: history tokens before the noisy stream

    def full(b, h, q, kv):
        return (q < seq_len) & (kv < seq_len)

    def block_causal(b, h, q, kv):
        return (kv // t <= q // t) & (q < seq_len) & (kv < seq_len)

    def dual(b, h, q, kv):
        q_hist, k_hist = q < nt, kv < nt
        qc = torch.where(q_hist, q, q - nt) // t
        kc = torch.where(k_hist, kv, kv - nt) // t
        hist_rows = q_hist & k_hist & (kc <= qc)
        noisy_rows = ~q_hist & ((k_hist & (kc < qc)) | (~k_hist & (kc == qc)))
        return (hist_rows | noisy_rows) & (q < seq_len) & (kv < seq_len)

    return {"full": full, "block_causal": block_causal, "dual": dual}[kind]


@lru_cache(maxsize=32)
def dense_mask(spec: MaskSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [L, L] mask (True = attend) evaluated from the same mask_mod."""
    idx = torch.arange(spec.seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return spec.mask_mod()(zero, zero, idx[:, None], idx[None, :])


def padded_len(seq_len: int, block: int = FLEX_BLOCK) -> int:
    return -(-seq_len // block) * block


@lru_cache(maxsize=32)
def block_mask(spec: MaskSpec, device: torch.device | str = "cpu"):
    """FlexAttention BlockMask over the sequence padded to Lpad = padded_len(L), a multiple of FLEX_BLOCK.

    Built from per-tile counts (`block_counts`, [nb, nb] with nb = Lpad / FLEX_BLOCK), never from an
    [Lpad, Lpad] mask: `create_block_mask` evaluates the mask_mod on every token pair (~12 L^2 bytes,
    tens of GB at the 1.3B training lengths). Same tiles, full/partial split and mask_mod (padding
    tokens masked) as `create_block_mask(spec.mask_mod(L), None, None, Lpad, Lpad, BLOCK_SIZE=FLEX_BLOCK)`.
    """
    length = padded_len(spec.seq_len)
    cnt = block_counts(spec, FLEX_BLOCK, device)
    return block_mask_from_counts(cnt[None, None], FLEX_BLOCK, spec.mask_mod(spec.seq_len), (length, length))


def block_counts(spec: MaskSpec, block: int = FLEX_BLOCK, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [nb, nb], nb = padded_len(L, block) / block: allowed (query, key) pairs of each block x block tile.

    Every layout is S = history_chunks + num_chunks segments of chunk_tokens tokens, and its mask_mod is
    constant on each (query segment, key segment) pair, so one evaluation per segment pair gives the rule
    `allowed` [S, S], and cnt = overlap @ allowed @ overlap^T with overlap[b, s] = tokens of tile b in
    segment s. Padding tokens (>= L) lie in no segment and count for nothing, as the mask_mod masks them.
    float32 because integer matmul is CPU-only; still exact: the factors are integers <= block (exact even
    in TF32's 11-bit significand) and every sum an integer <= block^2 < 2^24.
    """
    t = spec.chunk_tokens
    segments = spec.history_chunks + spec.num_chunks
    starts = torch.arange(segments, device=device) * t
    zero = torch.zeros((), dtype=torch.long, device=device)
    allowed = spec.mask_mod(spec.seq_len)(zero, zero, starts[:, None], starts[None, :])  # [S, S]
    lo = torch.arange(padded_len(spec.seq_len, block) // block, device=device)[:, None] * block  # [nb, 1] tile starts
    overlap = (torch.minimum(lo + block, starts + t) - torch.maximum(lo, starts)).clamp(min=0)  # [nb, S]
    overlap = overlap.to(torch.float32)
    return overlap @ allowed.to(torch.float32) @ overlap.T


def block_sparsity(spec: MaskSpec) -> float:
    """Fraction of FLEX_BLOCK x FLEX_BLOCK tiles that FlexAttention can skip entirely (those of block_mask)."""
    live = block_counts(spec) > 0
    return 1.0 - int(live.sum()) / live.numel()


def block_mask_from_counts(cnt: torch.Tensor, block_size: int, mask_mod: Callable, seq_lengths: tuple[int, int]):
    """FlexAttention BlockMask from cnt [..., nq, nk] = the number of (query, key) pairs of each tile that may
    attend: a tile is FULL when all block_size^2 may, PARTIAL (mask_mod applied) when some may, absent
    otherwise; the classification `create_block_mask(mask_mod, ...)` makes, without its [Lq, Lk] pass."""
    from torch.nn.attention.flex_attention import BlockMask

    full = cnt == float(block_size * block_size)
    partial = (cnt > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=seq_lengths)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool tile map [..., nq, nk] -> (num [..., nq], idx [..., nq, nk]) int32, live tiles first, ascending."""
    blocks = blocks.to(torch.int32)
    num = blocks.sum(dim=-1).to(torch.int32).contiguous()
    idx = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx
