"""KV cache of a chunk-by-chunk rollout, and the attention op that reads it.

Per block the cache holds the K/V of every finished chunk in one preallocated buffer
[B, Hh, capacity * T, D] (T = tokens per chunk), the running per-head mean key of each chunk
[B, Hh, capacity, D] (the routing descriptor, fp32), and the text cross-attention K/V computed
once per rollout. Classifier-free guidance keeps its conditional and unconditional caches as
the two halves of the batch. Cursors are host integers: no `.item()` or device sync here (the
one exception: top-k over a host tier, below).

The slot after the last finished chunk is scratch: each denoising step writes the current
chunk's K/V there (so dense attention is one contiguous view, no concatenation) and the
cache-writing pass at `context_t` commits it.

Bounded memory (`TieredKVCache`, `KVCache.for_model(..., resident_chunks=R)`): only the R most
recent finished chunks (plus the scratch slot) stay on the compute device, in a ring; older chunks
move to a second tier (host memory, pinned on CUDA, one tensor per chunk and layer). The mean keys
stay resident, so routing selects without a transfer. Each attention call stages the history chunks
it reads, packed in ascending order, into ONE device buffer shared by all layers (grown to the
largest need so far):
  dense attention: the whole history of the layer (exact attention over it needs every key);
  window routing: sink + window (known on the host);
  top-k routing: the union over batch, heads and queries of the selected chunks. The selection is
    on the device, so its union's mask is read to the host in the routed call's one host sync
    (attention.routed.plan_routed, made before the staging and handed to routed_attention(plan=...)):
    the same one sync a top-k call makes on the all-resident KVCache on the torch and auto paths; with
    an explicit triton backend (no sync all-resident) it is the one sync the host tier costs.
The attention paths see the packed history with the selection packed alike (`routed_attention(...,
packed=(chunks, n))`) and compute the same arithmetic as over the whole history: outputs are
bit-identical (tests/test_kv_offload.py) when a chunk's K/V bytes are a multiple of 64, as at every real
shape (torch's fused CPU kernel rounds by the data's 64-byte alignment: packed odd-sized chunks agree to
fp32 rounding only); on CUDA the torch routed path's row sums use atomic adds, repeatable only under
torch.use_deterministic_algorithms(True).
Window routing on every layer reads only the first `sink` and the last `window` finished chunks, ever
(`window_reads`): its tiered cache (`keep=(sink, window)`) drops a chunk that leaves the ring outside both
instead of offloading it, and keeps the sink chunks on the compute device (no host transfer per call);
only window chunks beyond a ring shorter than the window go to the host. Both tiers are then flat in the
rollout length: an unbounded rollout at fixed memory. A dropped chunk's slot is rewritten by a recache
(which rewrites every chunk in order, reading what the window read the first time).
Optionally the host tier stores K/V in a smaller dtype (`host_dtype`, e.g. bf16 under an fp32 model:
half the host memory, no longer exact). Device memory: R + 1 chunks of every layer + the mean keys
(one key per chunk and layer: the part that still grows, 1/T of the history) + the staging buffer,
i.e. one layer's history for dense attention but only the staged chunks for routed modes: flat in
the rollout length for window routing, and for top-k while its selections stay coherent (the union
can reach every chunk for incoherent per-token picks). Copies are enqueued on the current stream
(non_blocking from/to pinned memory).

Keys are cached at their absolute RoPE positions; `CachedAttention(positions=FarPositions(...))` reads
history beyond a horizon as if at the horizon (attention/positions.py), rotating the keys a call reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention.backends import attention, routing_path
from .attention.ops import routes_layer
from .attention.positions import FarPositions
from .attention.routed import plan_routed, routed_attention
from .attention.selection import index_runs, select_chunks, static_chunks
from .attention.spec import RoutingSpec


class KVCache:
    packs = False  # history(layer, chunks) returns every chunk (views); a packing cache only `chunks`

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
    def for_model(cls, model, batch: int, latent_hw: tuple[int, int], device, dtype, capacity: int = 8,
                  resident_chunks: int | None = None, host_device="cpu", host_dtype=None,
                  keep: tuple[int, int] | None = None):
        """The cache of `model` for chunks of `latent_hw`; `resident_chunks` = R bounds what stays on
        `device` (TieredKVCache, the rest on `host_device`, in `host_dtype`: None = `dtype`; `keep`:
        see TieredKVCache); None keeps everything resident."""
        cfg = model.cfg
        args = (cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, model.chunk_tokens(*latent_hw),
                device, dtype, capacity)
        if resident_chunks is None:
            return cls(*args)
        return TieredKVCache(*args, resident_chunks=resident_chunks, host_device=host_device, host_dtype=host_dtype,
                             keep=keep)

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
        """Make room for `extra_chunks` more finished chunks and the scratch slot after them (doubling,
        amortised O(1))."""
        need = self.num_chunks + extra_chunks
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))

    # -- per layer -------------------------------------------------------------------------

    def history(self, layer: int, chunks: list[int] | None = None):
        """K, V [B, Hh, n*T, D] and mean keys [B, Hh, n, D] of the n finished chunks (views).
        `chunks`: the history chunks the caller will read (None = all); a tiered cache brings in only
        those (the other slices of its views are then stale)."""
        end = self.num_chunks * self.chunk_tokens
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.mean_k[layer][:, :, :self.num_chunks]

    def mean_keys(self, layer: int) -> torch.Tensor:
        """Mean keys [B, Hh, n, D] (fp32) of the n finished chunks: always resident."""
        return self.mean_k[layer][:, :, :self.num_chunks]

    def union_mask(self, sel: torch.Tensor) -> torch.Tensor | None:
        """The chunks to stage for the selection `sel` [B, Hh, Lq, n] (a bounded cache's): None = all of them
        (here every chunk is a view already; nothing computed)."""
        return None

    def put_current(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunks: list[int] | None = None):
        """Write the current chunk's K/V into the scratch slot; return K, V of history + current
        (`chunks` as in `history`)."""
        if k.shape[2] != self.chunk_tokens:
            raise ValueError(f"current chunk has {k.shape[2]} tokens; the cache holds chunks of {self.chunk_tokens}")
        start = self.num_chunks * self.chunk_tokens
        end = start + self.chunk_tokens
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def put_mean(self, layer: int, k: torch.Tensor) -> None:
        """Keep the mean key [B, Hh, D] (fp32) of the current chunk's keys k [B, Hh, T, D] (top-k's descriptor)."""
        self.mean_k[layer][:, :, self.num_chunks] = k.float().mean(dim=2)

    def commit(self) -> None:
        """The scratch slot becomes a finished chunk (after every layer wrote it)."""
        self.num_chunks += 1
        self.reserve(0)  # the next scratch slot only: a grow here at the last chunk would copy the whole cache

    def memory_bytes(self) -> int:
        """Bytes held on the compute device (all of the cache here)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.mean_k)

    def total_bytes(self) -> int:
        """Bytes of the cache over all tiers."""
        return self.memory_bytes()


class TieredKVCache(KVCache):
    """KV cache with at most `resident_chunks` finished chunks on the device (see the module doc).

    Layout: ring `rk/rv[layer]` [B, Hh, (R+1)*T, D] on the device (chunk j >= n - R and the scratch
    chunk n at slot j % (R+1)); `hk/hv[layer][j]` [B, Hh, T, D] on `host_device` for j < n - R;
    `mean_k[layer]` as in KVCache; one staging pair [B, Hh, S*T, D] on the device, S >= the staged
    chunks + 1 (grown on demand). `history(layer, chunks)` packs `chunks`: [B, Hh, len(chunks)*T, D].
    `keep` = (sink, window): only the first `sink` and the last `window` finished chunks are ever read
    (`window_reads`): the second tier holds the sink chunks on the DEVICE and window chunks that left
    the ring on the host; other chunks are dropped (their `hk/hv` entries None).
    `last_staged`: the chunks the latest staging held; `host_reads`: chunk copies from the second tier."""

    packs = True

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, chunk_tokens: int,
                 device, dtype, capacity: int = 8, *, resident_chunks: int, host_device="cpu", host_dtype=None,
                 keep: tuple[int, int] | None = None):
        if isinstance(resident_chunks, bool) or not isinstance(resident_chunks, int) or resident_chunks < 1:
            raise ValueError(f"resident_chunks={resident_chunks!r}: need an int >= 1 (None = all resident)")
        if keep is not None and (len(keep) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                       for x in keep)):
            raise ValueError(f"keep={keep!r}: need (sink, window), two ints >= 0 (None = keep every chunk)")
        self.keep = None if keep is None else (int(keep[0]), int(keep[1]))
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.chunk_tokens = chunk_tokens
        self.device, self.dtype = torch.device(device), dtype
        self.host_device = torch.device(host_device)
        # The host tier may store K/V in a smaller dtype (lossy: rounded once when a chunk leaves the
        # device, converted back by the staging copy); None = the cache dtype (exact).
        self.host_dtype = dtype if host_dtype is None else host_dtype
        self.pin = self.device.type == "cuda" and self.host_device.type == "cpu"
        self.resident = resident_chunks
        self._n = 0
        self._staged = None  # (layer, n, chunks) whose history the staging buffers hold
        self.last_staged: tuple[int, ...] = ()
        self.host_reads = 0
        self.text_kv = None
        ring = (batch, heads, (resident_chunks + 1) * chunk_tokens, head_dim)
        self.rk = [torch.zeros(ring, device=self.device, dtype=dtype) for _ in range(num_layers)]
        self.rv = [torch.zeros(ring, device=self.device, dtype=dtype) for _ in range(num_layers)]
        self.hk: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.hv: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.capacity = 0
        self.mean_k: list[torch.Tensor] = []
        self.stage_k = self.stage_v = None
        self._grow(max(1, capacity))

    # host-side cursors
    @property
    def num_chunks(self) -> int:
        return self._n

    @num_chunks.setter
    def num_chunks(self, n: int) -> None:  # Rollout.recache rewinds to 0 and rewrites in order
        self._n = int(n)
        self._staged = None
        if self.keep is not None:  # the rewrite keeps what it needs anew: no second copy of the window meanwhile
            for tier in self.hk + self.hv:
                tier[self.keep[0]:] = [None] * max(0, len(tier) - self.keep[0])

    @property
    def offloaded(self) -> int:
        """Finished chunks in the host tier (0 .. offloaded-1)."""
        return max(0, self._n - self.resident)

    def _slot(self, j: int) -> slice:
        s = (j % (self.resident + 1)) * self.chunk_tokens
        return slice(s, s + self.chunk_tokens)

    def _grow(self, capacity: int) -> None:
        mshape = (self.batch, self.heads, capacity + 1, self.head_dim)
        new = [torch.zeros(mshape, device=self.device, dtype=torch.float32) for _ in range(self.num_layers)]
        for o, nw in zip(self.mean_k, new):
            nw[:, :, :self._n] = o[:, :, :self._n]
        self.mean_k = new
        self.capacity = capacity

    def _reserve_stage(self, chunks: int) -> None:
        """Staging room for `chunks` chunks: grown to the largest need so far (no doubling: the bytes
        are the point; the contents are transient, so a regrowth is one allocation, no copy)."""
        have = 0 if self.stage_k is None else self.stage_k.shape[2] // self.chunk_tokens
        if chunks <= have:
            return
        shape = (self.batch, self.heads, chunks * self.chunk_tokens, self.head_dim)
        self.stage_k = self.stage_v = None  # transient: no copy, free the old pair first
        self.stage_k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.stage_v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._staged = None

    def union_mask(self, sel: torch.Tensor) -> torch.Tensor | None:
        """The chunks to stage for the selection `sel` [B, Hh, Lq, n]: its union over batch, heads and
        queries, a bool mask [n] on the device (read to the host in the routed plan's one sync:
        attention.routed.plan_routed). None: stage all, while nothing is offloaded."""
        if self.offloaded == 0:
            return None
        return sel.flatten(0, 2).any(dim=0)

    def _stage(self, layer: int, chunks: list[int] | None) -> int:
        """Pack the history chunks `chunks` (None = all) of `layer` into the staging buffer, ascending;
        room for the current chunk after them. Returns how many were staged."""
        n = self._n
        need = tuple(range(n)) if chunks is None else tuple(sorted(chunks))
        key = (layer, n, need)
        if self._staged == key:
            return len(need)
        self._reserve_stage(len(need) + 1)
        T, off, ring = self.chunk_tokens, self.offloaded, self.resident + 1
        p = 0  # packed position of chunk j
        for a, b in index_runs(list(need)):
            j = a
            while j < b:
                if j < off:  # second tier, one chunk each
                    e = j + 1
                    if self.hk[layer][j] is None:  # a host-side guard of the keep rule (no sync)
                        raise RuntimeError(f"history chunk {j} was dropped (keep={self.keep}) but is read at "
                                           f"{n} chunks: the routing reads beyond its sink + window")
                    self.stage_k[:, :, p * T:(p + 1) * T].copy_(self.hk[layer][j], non_blocking=True)
                    self.stage_v[:, :, p * T:(p + 1) * T].copy_(self.hv[layer][j], non_blocking=True)
                    self.host_reads += 1
                else:  # resident: ring slots, contiguous until the wrap
                    s = j % ring
                    e = min(b, j + ring - s)
                    src = slice(s * T, (s + e - j) * T)
                    self.stage_k[:, :, p * T:(p + e - j) * T].copy_(self.rk[layer][:, :, src])
                    self.stage_v[:, :, p * T:(p + e - j) * T].copy_(self.rv[layer][:, :, src])
                p += e - j
                j = e
        self._staged = key
        self.last_staged = need
        return len(need)

    def history(self, layer: int, chunks: list[int] | None = None):
        """K, V [B, Hh, len(chunks)*T, D] of `chunks` (None = all n), packed ascending, and the mean
        keys [B, Hh, n, D] of every chunk."""
        end = self._stage(layer, chunks) * self.chunk_tokens
        return self.stage_k[:, :, :end], self.stage_v[:, :, :end], self.mean_k[layer][:, :, :self._n]

    def put_current(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunks: list[int] | None = None):
        """As KVCache.put_current, over the packed `chunks`: K, V [B, Hh, (len(chunks)+1)*T, D]."""
        if k.shape[2] != self.chunk_tokens:
            raise ValueError(f"current chunk has {k.shape[2]} tokens; the cache holds chunks of {self.chunk_tokens}")
        start = self._stage(layer, chunks) * self.chunk_tokens
        sl = self._slot(self._n)
        self.rk[layer][:, :, sl] = k  # the ring keeps it for the commit
        self.rv[layer][:, :, sl] = v
        end = start + self.chunk_tokens
        self.stage_k[:, :, start:end] = k
        self.stage_v[:, :, start:end] = v
        return self.stage_k[:, :, :end], self.stage_v[:, :, :end]

    def _sink(self) -> int:
        """Chunks 0 .. _sink()-1 of the second tier are kept sink chunks, held on the compute device."""
        return 0 if self.keep is None else self.keep[0]

    def _kept(self, j: int) -> bool:
        """Whether chunk j, leaving the ring at `_n` chunks, is read again (else it is dropped)."""
        return self.keep is None or j < self.keep[0] or j >= self._n - self.keep[1]

    def commit(self) -> None:
        self._n += 1
        self._staged = None
        j = self._n - self.resident - 1  # the chunk that just left the resident window
        if j >= 0:
            sl, kept, on_host = self._slot(j), self._kept(j), j >= self._sink()
            for layer in range(self.num_layers):
                for ring, tier in ((self.rk[layer], self.hk[layer]), (self.rv[layer], self.hv[layer])):
                    while len(tier) <= j:
                        tier.append(None)
                    if not kept:
                        tier[j] = None
                        continue
                    if tier[j] is None:
                        tier[j] = torch.empty((self.batch, self.heads, self.chunk_tokens, self.head_dim),
                                              dtype=self.host_dtype if on_host else self.dtype,
                                              device=self.host_device if on_host else self.device,
                                              pin_memory=self.pin and on_host)
                    tier[j].copy_(ring[:, :, sl], non_blocking=True)
        if self.keep is not None:  # a window chunk that left the ring earlier has now left the window too
            d = self._n - self.keep[1] - 1
            if self.keep[0] <= d < j:
                for tier in self.hk + self.hv:
                    tier[d] = None
        self.reserve(0)

    def _tier_bytes(self, sink: bool) -> int:
        s = self._sink()
        return sum(t.numel() * t.element_size() for tier in self.hk + self.hv for j, t in enumerate(tier)
                   if t is not None and (j < s) == sink)

    def memory_bytes(self) -> int:
        """Bytes on the compute device: ring, mean keys, staging, kept sink chunks."""
        ts = self.rk + self.rv + self.mean_k + [t for t in (self.stage_k, self.stage_v) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts) + self._tier_bytes(True)

    def host_bytes(self) -> int:
        """Bytes of the second tier in host memory."""
        return self._tier_bytes(False)

    def total_bytes(self) -> int:
        return self.memory_bytes() + self.host_bytes()


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
    routing: RoutingSpec | None = None
    routing_layers: list[int] | None = None
    recorder: SelectionRecorder | None = None
    positions: FarPositions | None = None  # far history read at the horizon (None: absolute positions)

    def __post_init__(self) -> None:
        self._path = routing_path(self.backend)  # selection and routed attention take the same path

    def __call__(self, q, k, v, layer: int):
        cache = self.cache
        n = cache.num_chunks
        routes = (self.routing is not None and not self.routing.is_dense and n > 0
                  and routes_layer(self.routing_layers, layer))
        chunks = None
        if routes:
            # Window mode, or a history no longer than what is kept: the chunks are known on the
            # host without scores (no sync); keeping them all is plain dense attention.
            chunks = static_chunks(self.routing, n)
        record = self.recorder is not None and self.commit
        pos, far = self.positions, self.positions is not None and self.positions.far_chunks(n) > 0
        sel = plan = None
        if routes and chunks != list(range(n)):
            staged = chunks
            if chunks is None:  # top-k: select first, over the resident mean keys
                mean_k = cache.mean_keys(layer)
                sel = select_chunks(q, pos.mean_keys(mean_k, n) if far else mean_k, self.routing, backend=self._path)
                used = cache.union_mask(sel)
                if used is not None:  # a bounded cache: the union to stage, read in the routed plan's one sync
                    plan = plan_routed(q, sel, cache.chunk_tokens, k.shape[2], backend=self._path, extra=used)
                    staged = [j for j, u in enumerate(plan.extra) if u]
            hist_k, hist_v, _ = cache.history(layer, staged)
            cache.put_current(layer, k, v, staged)
            packed = (staged, n) if cache.packs and staged is not None else None
            if far and chunks is not None and chunks[0] >= pos.far_chunks(n):
                far = False  # window: none of the chunks it reads is far
            private = False
            if far and packed is None and chunks is not None:
                # window: read its few chunks packed (a private copy), so only they are rotated
                hist_k, hist_v = (_gather(x, chunks, cache.chunk_tokens) for x in (hist_k, hist_v))
                packed, private = (chunks, n), True
            turned = None  # top-k: routed attention reads the far chunks it picked at their positions
            if far and chunks is None:
                turned = pos
            elif far:
                hist_k = pos.keys(hist_k, cache.chunk_tokens, n, packed[0] if packed else None, in_place=private)
            if packed is None:
                sel = _static_sel(q, n, chunks) if sel is None else sel
                sel_a, chunks_a = sel, chunks
            elif sel is None:  # window, packed: every query keeps every staged chunk
                sel_a = torch.ones((*q.shape[:3], len(staged)), dtype=torch.bool, device=q.device)
                chunks_a = list(range(len(staged)))
            else:
                sel_a, chunks_a = _packed_columns(sel, used, len(staged)), None
            out, _ = routed_attention(q, hist_k, hist_v, k, v, sel_a, cache.chunk_tokens, backend=self._path,
                                      chunks=chunks_a, packed=packed, positions=turned, plan=plan)
            if record and sel is None:
                sel = _static_sel(q, n, chunks)
        else:
            keys, values = cache.put_current(layer, k, v, chunks)
            if far:
                keys = pos.keys(keys, cache.chunk_tokens, n, chunks if cache.packs else None)
            if routes and record:
                sel = _static_sel(q, n, chunks)
            out = attention(q, keys, values, None, self.backend)
        if record and sel is not None:
            self.recorder.add(n, layer, sel)
        if self.commit:
            cache.put_mean(layer, k)
        return out


def _gather(x: torch.Tensor, chunks: list[int], chunk_tokens: int) -> torch.Tensor:
    """The chunks `chunks` (ascending) of x [B, Hh, n*T, D], packed: [B, Hh, len(chunks)*T, D]."""
    return torch.cat([x[:, :, a * chunk_tokens:b * chunk_tokens] for a, b in index_runs(chunks)], dim=2)


def _packed_columns(sel: torch.Tensor, used: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` columns of sel [B, Hh, Lq, n] whose union mask `used` [n] is set, ascending:
    [B, Hh, Lq, count]. Found on the device by a stable sort of the mask (an index list from the host would
    be one more transfer)."""
    return sel.index_select(-1, torch.argsort((~used).to(torch.uint8), stable=True)[:count])


def _static_sel(q: torch.Tensor, n: int, chunks: list[int]) -> torch.Tensor:
    """The bool selection [B, Hh, Lq, n] that keeps `chunks` for every query (for the recorder)."""
    sel = torch.zeros(q.shape[0], q.shape[1], q.shape[2], n, dtype=torch.bool, device=q.device)
    for a, b in index_runs(chunks):  # slices: a list index would be copied to the device (a host sync)
        sel[..., a:b] = True
    return sel
