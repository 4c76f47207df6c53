"""History routing in training: the training sequence [H_1..H_{N-1} | Q_1..Q_N] (L = (2N-1)*T tokens, the
dual layout of masks.py) under the CONTRACTS.md mask, with per-token routing over the history stream
(H_j, j < own chunk).

    out = routed_training_attention(q, k, v, N, T, spec, backend="sdpa" | "flex")

The selection is `selection.select_chunks` with `allowed = training_allowed(N, T)`; the mask is exact per
token, as a dense bool mask (SDPA) or a FlexAttention BlockMask whose mask_mod reads the selection.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .backends import flex_fn
from .masks import FLEX_BLOCK, block_mask_from_counts, dual_history_chunks
from .selection import check_4d, chunk_means, select_chunks
from .spec import RoutingSpec


def training_allowed(num_chunks: int, chunk_tokens: int, device=None) -> torch.Tensor:
    """bool [(2N-1)*T, N-1]: history chunks each training token may be routed to (H_i, Q_i -> H_j, j < i).

    Its own chunk is attended separately (always) and is not part of this set.
    """
    N, T = num_chunks, chunk_tokens
    NhT = dual_history_chunks(N) * T
    r = torch.arange(NhT + N * T, device=device)
    own = torch.where(r < NhT, r, r - NhT) // T
    return torch.arange(dual_history_chunks(N), device=device)[None, :] < own[:, None]


def _make_training_mask_mod(sel: torch.Tensor, num_chunks: int, chunk_tokens: int) -> Callable:
    T, Nh = chunk_tokens, dual_history_chunks(num_chunks)
    NhT = Nh * T
    L = NhT + num_chunks * T

    def mask_mod(b, h, q_idx, kv_idx):
        own = (q_idx // T) == (kv_idx // T)  # same stream and same chunk (segments of T tokens)
        if Nh == 0:  # one chunk: no history
            return own
        kv_chunk = (kv_idx // T).clamp(max=Nh - 1)  # only read when kv_idx < NhT
        routed = (kv_idx < NhT) & sel[b, h, q_idx.clamp(max=L - 1), kv_chunk]
        return own | routed

    return mask_mod


@dataclass
class RoutedTrainingMask:
    """Routing of a training sequence [H_1..H_{N-1} | Q_1..Q_N] (L = (2N-1)*T tokens).

    sel: bool [B, Hh, L, N-1]: token (per head) attends history chunk H_j (only j < own chunk index).
    The own chunk (same stream) is always attended. Everything else is masked (CONTRACTS.md rule).
    """

    sel: torch.Tensor
    num_chunks: int
    chunk_tokens: int

    @property
    def history_chunks(self) -> int:
        return dual_history_chunks(self.num_chunks)

    @property
    def seq_len(self) -> int:
        return (self.history_chunks + self.num_chunks) * self.chunk_tokens

    def dense(self) -> torch.Tensor:
        """bool [B, Hh, L, L] mask for scaled_dot_product_attention (True = may attend)."""
        Nh, T, L = self.history_chunks, self.chunk_tokens, self.seq_len
        seg = torch.arange(L, device=self.sel.device) // T
        own = seg[:, None] == seg[None, :]
        routed = self.sel.repeat_interleave(T, dim=-1)  # [B,Hh,L,Nh*T]
        routed = F.pad(routed, (0, L - Nh * T))
        return routed | own

    def mask_mod(self) -> Callable:
        """FlexAttention mask_mod reading `sel` (exact per token)."""
        return _make_training_mask_mod(self.sel, self.num_chunks, self.chunk_tokens)

    def block_mask(self, block_size: int = FLEX_BLOCK):
        """FlexAttention BlockMask, built from `sel` at block granularity (never materialises L x L).

        Block (qb, kb) is FULL when every (query, key) pair in it may attend, PARTIAL (mask_mod applied)
        when some may, absent otherwise; same classification as `create_block_mask(self.mask_mod())`.
        """
        Nh, T, L = self.history_chunks, self.chunk_tokens, self.seq_len
        S = Nh + self.num_chunks  # segments of T tokens: H_0..H_{Nh-1}, Q_0..Q_{N-1}
        B, Hh = self.sel.shape[:2]
        dev = self.sel.device
        nb = -(-L // block_size)
        pad = nb * block_size - L
        tok = torch.arange(nb * block_size, device=dev)
        seg = (tok // T).clamp(max=S - 1)
        # overlap[blk, s] = number of tokens of block blk in segment s
        onehot = F.one_hot(seg, S).to(torch.float32) * (tok < L).to(torch.float32)[:, None]
        overlap = onehot.view(nb, block_size, S).sum(dim=1)  # [nb, S], integers <= block_size
        own_cnt = overlap @ overlap.T  # [nb, nb] own-chunk pairs
        sel_cnt = F.pad(self.sel.to(torch.float32), (0, 0, 0, pad)).view(B, Hh, nb, block_size, Nh).sum(dim=3)
        routed_cnt = sel_cnt @ overlap[:, :Nh].T  # [B,Hh,nb,nb] routed pairs (disjoint from own)
        cnt = own_cnt + routed_cnt  # exact: integers < 2^24
        return block_mask_from_counts(cnt, block_size, self.mask_mod(), (L, L))


def routed_training_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    num_chunks: int,
    chunk_tokens: int,
    spec: RoutingSpec,
    *,
    backend: str = "auto",
) -> RoutedTrainingMask:
    """Per-token routing over history chunks for a training sequence [H_1..H_{N-1} | Q_1..Q_N].

    q, k: [B, Hh, (2N-1)*T, D]. Scores use mean keys of the history stream H_j; candidates for a token of
    chunk i (either stream) are H_j with j < i; sink/window are relative to that set. No gradient.
    """
    check_4d("routed_training_mask", "q", q)
    check_4d("routed_training_mask", "k", k)
    if not isinstance(spec, RoutingSpec):
        raise TypeError(f"routed_training_mask: spec must be a RoutingSpec, got {type(spec).__name__}")
    N, T = num_chunks, chunk_tokens
    if isinstance(N, bool) or not isinstance(N, int) or N < 1 or isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"routed_training_mask: num_chunks and chunk_tokens must be positive ints, got {N!r}, {T!r}")
    B, Hh, L, _ = q.shape
    Nh = dual_history_chunks(N)
    if L != (Nh + N) * T or k.shape[2] != L:
        raise ValueError(
            f"routed_training_mask: q/k must have (2*num_chunks-1)*chunk_tokens = {(Nh + N) * T} tokens "
            f"([H_1..H_{{N-1}} | Q_1..Q_N]), got {L} and {k.shape[2]}"
        )
    allowed = training_allowed(N, T, q.device)
    if spec.is_dense or Nh == 0:
        sel = allowed.expand(B, Hh, L, Nh).contiguous()
    else:
        with torch.no_grad():
            mean_k = chunk_means(k.detach()[:, :, : Nh * T], T)
            sel = select_chunks(q.detach(), mean_k, spec, allowed=allowed, backend=backend)
    return RoutedTrainingMask(sel, N, T)


def routed_training_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_chunks: int,
    chunk_tokens: int,
    spec: RoutingSpec,
    backend: str = "sdpa",
    scale: float | None = None,
    *,
    select_backend: str = "auto",
    block_size: int = FLEX_BLOCK,
) -> torch.Tensor:
    """Training attention over [H_1..H_{N-1} | Q_1..Q_N] with the CONTRACTS.md mask and history routing.

    backend "sdpa": scaled_dot_product_attention with a dense bool [B,Hh,L,L] mask (CPU, small L; has
    backward everywhere). backend "flex": FlexAttention with a BlockMask whose mask_mod reads the
    selection (exact per token; compiled on CUDA; on CPU forward only - no flex backward there).
    select_backend: the routing path of the selection (attention.backends.training_routing).
    Gradients flow to q, k, v through attention, never through the selection.
    """
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"routed_training_attention: backend must be 'sdpa' or 'flex', got {backend!r}")
    check_4d("routed_training_attention", "v", v)
    rm = routed_training_mask(q, k, num_chunks, chunk_tokens, spec, backend=select_backend)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rm.dense(), scale=scale)
    flex = flex_fn(q.device)
    block_mask = rm.block_mask(block_size)
    if q.device.type == "cuda":
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # eager flex on CPU is expected here (tests, small sizes)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex(q, k, v, block_mask=block_mask, scale=scale)
