"""KV cache of a chunk-by-chunk rollout, and the attention op that reads it.

Per block the cache holds the K/V of every finished chunk in one preallocated buffer
[B, Hh, capacity * T, D] (T = tokens per chunk), the running per-head mean key of each chunk
[B, Hh, capacity, D] (the routing descriptor, fp32), and the text cross-attention K/V computed
once per rollout. Classifier-free guidance keeps its conditional and unconditional caches as
the two halves of the batch. Cursors are host integers: no `.item()` or device sync here.

The slot after the last finished chunk is scratch: each denoising step writes the current
chunk's K/V there (so dense attention is one contiguous view, no concatenation) and the
cache-writing pass at `context_t` commits it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention.backends import attention
from .attention.ops import routes_layer


class KVCache:
    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, chunk_tokens: int,
                 device, dtype, capacity: int = 8):
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.chunk_tokens = chunk_tokens
        self.device, self.dtype = torch.device(device), dtype
        self.num_chunks = 0  # finished (committed) chunks
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mean_k: list[torch.Tensor] = []
        self.text_kv: list | None = None
        self._grow(max(1, capacity))

    @classmethod
    def for_model(cls, model, batch: int, latent_hw: tuple[int, int], device, dtype, capacity: int = 8):
        cfg = model.cfg
        return cls(cfg.num_layers, batch, cfg.num_heads, cfg.dim // cfg.num_heads,
                   model.chunk_tokens(*latent_hw), device, dtype, capacity)

    def _grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` chunks plus the scratch slot (host-side decision)."""
        shape = (self.batch, self.heads, (capacity + 1) * self.chunk_tokens, self.head_dim)
        mshape = (self.batch, self.heads, capacity + 1, self.head_dim)
        used, used_m = self.num_chunks * self.chunk_tokens, self.num_chunks
        for name, shp, dt, n_used in (("k", shape, self.dtype, used), ("v", shape, self.dtype, used),
                                      ("mean_k", mshape, torch.float32, used_m)):
            old = getattr(self, name)
            new = [torch.zeros(shp, device=self.device, dtype=dt) for _ in range(self.num_layers)]
            for o, n in zip(old, new):
                n[:, :, :n_used] = o[:, :, :n_used]
            setattr(self, name, new)
        self.capacity = capacity

    def reserve(self, extra_chunks: int = 1) -> None:
        """Make room for `extra_chunks` more finished chunks (doubling, amortised O(1))."""
        need = self.num_chunks + extra_chunks
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))

    # -- per layer -------------------------------------------------------------------------

    def history(self, layer: int):
        """K, V [B, Hh, n*T, D] and mean keys [B, Hh, n, D] of the n finished chunks (views)."""
        end = self.num_chunks * self.chunk_tokens
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.mean_k[layer][:, :, :self.num_chunks]

    def put_current(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the current chunk's K/V into the scratch slot; return K, V of history + current."""
        if k.shape[2] != self.chunk_tokens:
            raise ValueError(f"current chunk has {k.shape[2]} tokens; the cache holds chunks of {self.chunk_tokens}")
        start = self.num_chunks * self.chunk_tokens
        end = start + self.chunk_tokens
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def put_mean(self, layer: int, k: torch.Tensor) -> None:
        self.mean_k[layer][:, :, self.num_chunks] = k.float().mean(dim=2)

    def commit(self) -> None:
        """The scratch slot becomes a finished chunk (after every layer wrote it)."""
        self.num_chunks += 1
        self.reserve(1)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.mean_k)


@dataclass
class SelectionRecorder:
    """Collects routing selections for plots: entries (chunk index, layer, sel [B, Hh, Lq, N])."""

    entries: list = field(default_factory=list)

    def add(self, chunk: int, layer: int, sel: torch.Tensor) -> None:
        self.entries.append((chunk, layer, sel.detach().to("cpu", non_blocking=True)))


@dataclass
class CachedAttention:
    """Queries of the current chunk attend to all cached history (dense) or to routed history
    chunks plus their own chunk. `commit=True` is the cache-writing pass: it also stores the
    chunk's mean keys (the caller then calls `cache.commit()`)."""

    cache: KVCache
    backend: str
    commit: bool = False
    routing: object | None = None  # routing.RoutingSpec
    routing_layers: list[int] | None = None
    recorder: SelectionRecorder | None = None

    def _routing_backend(self, q) -> str:
        # Our Triton kernel on CUDA (unless sdpa was asked for); the torch path elsewhere.
        if self.backend == "triton":
            return "triton"
        return "auto" if q.is_cuda and self.backend != "sdpa" else "torch"

    def __call__(self, q, k, v, layer: int):
        cache = self.cache
        n = cache.num_chunks
        routes = (self.routing is not None and not self.routing.is_dense and n > 0
                  and routes_layer(self.routing_layers, layer))
        chunks = None
        if routes:
            from .attention.routing import routed_attention, select_chunks, static_chunks

            # Window mode, or a history no longer than what is kept: the chunks are known on the
            # host without scores (no sync); keeping them all is plain dense attention.
            chunks = static_chunks(self.routing, n)
        if routes and chunks != list(range(n)):
            hist_k, hist_v, mean_k = cache.history(layer)
            cache.put_current(layer, k, v)
            sel = select_chunks(q, mean_k, self.routing) if chunks is None else _static_sel(q, n, chunks)
            out, _ = routed_attention(q, hist_k, hist_v, k, v, sel, cache.chunk_tokens,
                                      backend=self._routing_backend(q), chunks=chunks)
        else:
            keys, values = cache.put_current(layer, k, v)
            sel = _static_sel(q, n, chunks) if routes else None
            out = attention(q, keys, values, None, self.backend)
        if self.recorder is not None and self.commit and sel is not None:
            self.recorder.add(n, layer, sel)
        if self.commit:
            cache.put_mean(layer, k)
        return out


def _static_sel(q: torch.Tensor, n: int, chunks: list[int]) -> torch.Tensor:
    """The bool selection [B, Hh, Lq, n] that keeps `chunks` for every query (for the recorder)."""
    sel = torch.zeros(q.shape[0], q.shape[1], q.shape[2], n, dtype=torch.bool, device=q.device)
    sel[..., chunks] = True
    return sel
