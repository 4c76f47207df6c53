"""Selections a trained model makes, replayed at a large shape (issue 12: time the patterns trained
models make, not only the random ones of random weights).

    recorded = record_selections("assets/ablation/ar_0.6", chunks=40, top_k=5)
    with replaying(recorded, target_grid=(3, 15, 26), heads=12):
        sample(big_model, ...)            # routing mode topk with the same k

Recording: the checkpoint's own rollout of ``chunks`` chunks (its config's sampler, a caption of its
world) under top-k routing; every routed cache-writing pass stores its per-token selection of the
conditional sample, bool [heads, tokens, history] per (chunk, layer). Replay: the large model's
``select_chunks`` still runs (its cost is part of the time) but its result is replaced by the recorded
one of the same chunk, layer ``l % recorded layers``, head ``h % recorded heads``, and for each large
token the recorded token at the same relative (frame, row, column) position in the chunk, so spatial
and temporal coherence carry over. The large rollout must run the same number of chunks and k.
"""
from __future__ import annotations

import contextlib

import torch

import resampling_forcing.cache as cache_mod

CAPTION = "a red circle, a green square and a blue circle bouncing"


def token_grid(model, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(frames, rows, columns) of one chunk's tokens."""
    return model.cfg.chunk_grid(*latent_hw)


@torch.no_grad()
def record_selections(checkpoint: str, chunks: int, top_k: int, steps: int | None = None, seed: int = 0) -> dict:
    """{"sel": {(chunk, layer): bool [heads, tokens, chunk]}, "grid", "heads", "layers", "coherence"}."""
    from resampling_forcing.attention.routing import RoutingSpec
    from resampling_forcing.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
    sel: dict = {}
    orig = cache_mod.SelectionRecorder.add

    def add(self, chunk, layer, s):
        sel[(int(chunk), int(layer))] = s[0].detach().cpu().clone()  # conditional half, first sample
        orig(self, chunk, layer, s)

    cache_mod.SelectionRecorder.add = add
    try:
        pipe.generate(CAPTION, chunks, seed=seed, steps=steps, routing=RoutingSpec("topk", top_k=top_k),
                      record_selection=True, decode=False)
    finally:
        cache_mod.SelectionRecorder.add = orig
    return dict(sel=sel, grid=token_grid(pipe.model, pipe.latent_hw), heads=pipe.model.cfg.num_heads,
                layers=pipe.model.cfg.num_layers, coherence=coherence(sel))


def coherence(sel: dict) -> float:
    """Mean over (chunk, layer, head) of the fraction of tokens whose selection equals the head's most
    common one (1 = every token of a head picks the same chunks; the `coh` of bench/routed_attention.py)."""
    vals = []
    for s in sel.values():
        for h in range(s.shape[0]):
            rows = s[h].to(torch.uint8)
            _, counts = torch.unique(rows, dim=0, return_counts=True)
            vals.append(float(counts.max()) / rows.shape[0])
    return sum(vals) / max(len(vals), 1)


def _token_map(src: tuple[int, int, int], dst: tuple[int, int, int]) -> torch.Tensor:
    """[dst tokens] -> index of the source token at the same relative (frame, row, column)."""
    idx = [torch.arange(d) * s // d for s, d in zip(src, dst)]
    f, y, x = torch.meshgrid(*idx, indexing="ij")
    return ((f * src[1] + y) * src[2] + x).flatten()


@contextlib.contextmanager
def replaying(recorded: dict, target_grid: tuple[int, int, int], heads: int):
    """Within the block, the cache's top-k selection returns the recorded selections (see the module doc).
    Yields a wrapper for `sample(..., attn_wrapper=...)` that tells the replay which layer is running;
    compose it with another wrapper as `lambda op: other(wrap(op))`."""
    tok = _token_map(recorded["grid"], target_grid)
    head_idx = torch.arange(heads) % recorded["heads"]
    state = {"layer": 0}
    built: dict = {}
    real_select = cache_mod.select_chunks

    def select(q, mean_k, spec, backend="auto"):
        real = real_select(q, mean_k, spec, backend=backend)  # its cost stays in the timing
        key = (mean_k.shape[2], state["layer"] % recorded["layers"])
        if key not in recorded["sel"]:
            raise KeyError(f"no recorded selection for history {key[0]}, layer {key[1]}: record as many chunks")
        if key not in built:
            built[key] = recorded["sel"][key][head_idx][:, tok].to(real.device)
        return built[key].expand_as(real).contiguous()

    def wrap(op):
        def run(q, k, v, layer):
            state["layer"] = layer
            return op(q, k, v, layer)

        return run

    cache_mod.select_chunks = select
    try:
        yield wrap
    finally:
        cache_mod.select_chunks = real_select
