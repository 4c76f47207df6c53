"""History routing for attention (method.md section 6; conventions in docs/CONTRACTS.md): the public
names, one import away. Each role lives in its own module beside this one:

    spec.py            backend names, routing modes, RoutingSpec, routing_spec(config)  (torch-free)
    selection.py       chunk means, scores q . mean(K_j), select_chunks, static_chunks
    routed.py          routed_attention at inference (dispatch: Triton kernel or torch path, per call on
                       the auto path), routed_block_mask
    routed_torch.py    the torch path: planner (dense blocks + MoBA rows), lse merge
    routed_training.py the training sequence [H | Q]: routed masks and routed_training_attention
    reference.py       the plain twins the tests compare against
    backends.py        which path runs (selection and attention alike), and the Triton kernels module

Inference (queries of the current chunk, history in the KV cache):
    mean_k = chunk_means(k_hist, T)                        # cache this per chunk
    sel = select_chunks(q, mean_k, spec)                   # bool [B,Hh,Lq,N]
    out, lse = routed_attention(q, k_hist, v_hist, k_cur, v_cur, sel, T)

Training (sequence [H_1..H_{N-1} | Q_1..Q_N], base mask of CONTRACTS.md, routing over H_j, j < i):
    out = routed_training_attention(q, k, v, N, T, spec, backend="sdpa" | "flex")

Each query token (per head) scores every history chunk j by q . mean(K_j) and attends to a subset of
them (sink U window U top-k of the rest; or sink U window for the sliding-window baseline; or all for
dense) plus, always and fully, its own chunk. The selection is parameter free and carries no gradient.
"""
from .reference import routed_attention_reference, select_chunks_reference
from .routed import last_routed_path, routed_attention, routed_block_mask, routed_work
from .routed_torch import last_plan_summary, merge_by_lse
from .routed_training import RoutedTrainingMask, routed_training_attention, routed_training_mask, training_allowed
from .selection import chunk_means, routing_scores, select_chunks, static_chunks
from .spec import ROUTING_MODES, RoutingSpec, routing_spec

__all__ = [
    "ROUTING_MODES",
    "RoutingSpec",
    "routing_spec",
    "chunk_means",
    "routing_scores",
    "select_chunks_reference",
    "select_chunks",
    "routed_attention_reference",
    "routed_attention",
    "static_chunks",
    "merge_by_lse",
    "last_plan_summary",
    "last_routed_path",
    "routed_work",
    "routed_block_mask",
    "training_allowed",
    "RoutedTrainingMask",
    "routed_training_mask",
    "routed_training_attention",
]
