"""Attention ops handed to the model (`CausalWanModel.forward(..., attn=op)`).

An op maps q, k, v [B, Hh, L, D] of block `layer` to [B, Hh, L, D]; the model never knows
which rule it runs under. Training uses `MaskedAttention`; rollouts use `cache.CachedAttention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import attention, training_routing
from .masks import MaskSpec
from .routed_training import routed_training_attention
from .spec import RoutingSpec


def routes_layer(layers: list[int] | None, layer: int) -> bool:
    return layers is None or layer in layers


@dataclass
class MaskedAttention:
    """Self-attention under one layout's mask (dual-stream or block-causal), optionally with
    per-token top-k history routing in the layers that route (training's last stage)."""

    spec: MaskSpec
    backend: str  # resolved (attention.backends.resolve_backend)
    routing: RoutingSpec | None = None  # None or dense = no routing
    routing_layers: list[int] | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        if self.routing is not None and not self.routing.is_dense and routes_layer(self.routing_layers, layer):
            if self.spec.kind != "dual":
                raise ValueError("routed training attention needs the dual [history | noisy] layout")
            attn, select = training_routing(self.backend, q.device)
            return routed_training_attention(q, k, v, self.spec.num_chunks, self.spec.chunk_tokens,
                                             self.routing, backend=attn, select_backend=select)
        return attention(q, k, v, self.spec, self.backend)
