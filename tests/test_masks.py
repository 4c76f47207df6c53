"""masks.block_mask: the count-built BlockMask equals create_block_mask's for every MaskSpec layout, gives the
same attention, and never builds an [L, L] mask."""
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_mod
from torch.utils._python_dispatch import TorchDispatchMode

from resampling_forcing.attention import masks
from resampling_forcing.attention.masks import (FLEX_BLOCK, MaskSpec, block_counts, block_mask, block_sparsity,
                                               dense_mask, padded_len)

KINDS = typing.get_args(typing.get_type_hints(MaskSpec)["kind"])  # every layout, new ones included
CHUNK_TOKENS = [8, 37, 130, 200]  # below, across and above FLEX_BLOCK, never aligned with it
NUM_CHUNKS = [1, 2, 3, 5]


def reference(spec: MaskSpec):
    length = padded_len(spec.seq_len)
    return flex_mod.create_block_mask(spec.mask_mod(spec.seq_len), None, None, length, length,
                                      device="cpu", BLOCK_SIZE=FLEX_BLOCK)


def live_tiles(num: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    """Per tile row, the sorted tile columns listed (only the first `num` entries of a row count)."""
    return [sorted(row[:n].tolist()) for n, row in zip(num.flatten().tolist(), idx.flatten(0, -2))]


def implied_mask(bm, spec: MaskSpec) -> torch.Tensor:
    """bool [Lpad, Lpad]: what the flex kernel attends: full tiles all, partial tiles through mask_mod."""
    length = padded_len(spec.seq_len)
    nb = length // FLEX_BLOCK

    def tiles(num, idx):
        dense = torch.zeros(nb, nb, dtype=torch.bool)
        for r, cols in enumerate(live_tiles(num, idx)):
            dense[r, cols] = True
        return dense.repeat_interleave(FLEX_BLOCK, 0).repeat_interleave(FLEX_BLOCK, 1)

    per_token = flex_mod.create_mask(bm.mask_mod, None, None, length, length, device="cpu")[0, 0]
    return tiles(bm.full_kv_num_blocks, bm.full_kv_indices) | (tiles(bm.kv_num_blocks, bm.kv_indices) & per_token)


@pytest.mark.parametrize("t", CHUNK_TOKENS)
@pytest.mark.parametrize("n", NUM_CHUNKS)
@pytest.mark.parametrize("kind", KINDS)
def test_block_mask_equals_create_block_mask(kind, n, t):
    spec = MaskSpec(kind, n, t)
    bm, ref = block_mask.__wrapped__(spec, "cpu"), reference(spec)  # uncached: the build under test
    assert bm.seq_lengths == ref.seq_lengths and bm.BLOCK_SIZE == ref.BLOCK_SIZE
    for side in ("kv", "full_kv", "q", "full_q"):
        num, idx = getattr(bm, f"{side}_num_blocks"), getattr(bm, f"{side}_indices")
        ref_num, ref_idx = getattr(ref, f"{side}_num_blocks"), getattr(ref, f"{side}_indices")
        assert torch.equal(num, ref_num), side
        assert num.dtype == ref_num.dtype and idx.dtype == ref_idx.dtype and idx.shape == ref_idx.shape, side
        assert live_tiles(num, idx) == live_tiles(ref_num, ref_idx), side
    assert torch.equal(bm.to_dense(), ref.to_dense())
    # the kernel's view of the mask is the rule itself on real tokens, and masks every padding token
    implied = implied_mask(bm, spec)
    L = spec.seq_len
    assert torch.equal(implied[:L, :L], dense_mask(spec))
    assert not implied[L:].any() and not implied[:, L:].any()


def test_the_shapes_cover_full_partial_and_empty_tiles():
    """Guards the parametrization above: it must exercise all three tile classes, padding included."""
    full = partial = empty = 0
    for kind in KINDS:
        for n in NUM_CHUNKS:
            for t in CHUNK_TOKENS:
                cnt = block_counts(MaskSpec(kind, n, t))
                full += int((cnt == FLEX_BLOCK**2).sum())
                partial += int(((cnt > 0) & (cnt < FLEX_BLOCK**2)).sum())
                empty += int((cnt == 0).sum())
    assert full and partial and empty


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, t", [(3, 37), (2, 130), (5, 8)])
def test_block_counts_equal_the_token_mask(kind, n, t):
    """Exact per-tile counts, also for tiles smaller and larger than the chunks."""
    spec = MaskSpec(kind, n, t)
    for block in (16, FLEX_BLOCK):
        length = padded_len(spec.seq_len, block)
        nb = length // block
        dense = F.pad(dense_mask(spec), (0, length - spec.seq_len, 0, length - spec.seq_len))
        want = dense.view(nb, block, nb, block).sum(dim=(1, 3)).to(torch.float32)
        assert torch.equal(block_counts(spec, block), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, t", [(3, 37), (2, 200), (4, 130)])
def test_flex_attention_with_block_mask_matches(kind, n, t, one_thread):
    """flex_attention (forward, CPU) with the new mask == with create_block_mask's == SDPA with the dense rule."""
    spec = MaskSpec(kind, n, t)
    L, length = spec.seq_len, padded_len(spec.seq_len)
    q, k, v = (torch.randn(1, 2, L, 8) for _ in range(3))
    qp, kp, vp = (F.pad(x, (0, 0, 0, length - L)) for x in (q, k, v))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is not compiled
        out = flex_mod.flex_attention(qp, kp, vp, block_mask=block_mask(spec, "cpu"))[:, :, :L]
        ref = flex_mod.flex_attention(qp, kp, vp, block_mask=reference(spec))[:, :, :L]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec))
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, t", [(3, 37), (5, 200)])
def test_block_sparsity_counts_the_tiles_create_block_mask_skips(kind, n, t):
    spec = MaskSpec(kind, n, t)
    live = reference(spec).to_dense()
    assert block_sparsity(spec) == 1.0 - int(live.sum()) / live.numel()


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.parametrize("kind", ["dual", "block_causal"])
def test_block_mask_at_1_3b_lengths_never_builds_a_token_mask(kind, monkeypatch):
    """The 1.3B long stage: ~192k tokens (an [L, L] mask would need ~430 GB). Built from O(nb^2) tiles only."""

    def token_level(*args, **kwargs):
        raise AssertionError("block_mask must not evaluate the mask_mod per token pair")

    monkeypatch.setattr(flex_mod, "create_block_mask", token_level)
    monkeypatch.setattr(flex_mod, "create_mask", token_level)
    n = 21 if kind == "dual" else 41  # 41 chunks of 4680 tokens (3 latent frames of 1560) in both layouts
    spec = MaskSpec(kind, n, 4680)
    nb = padded_len(spec.seq_len) // FLEX_BLOCK
    with _LargestTensor() as seen:
        bm = block_mask.__wrapped__(spec, "cpu")
    assert bm.kv_num_blocks.shape == (1, 1, nb)
    # nothing bigger than a tile map (from_kv_blocks' dense form has one spare column): 16k x below [L, L]
    assert seen.numel <= nb * (nb + 1)
    # the first tile row lies in chunk 1 (H_1 / C_1), which attends only itself in both layouts
    live = bm.kv_num_blocks + bm.full_kv_num_blocks
    assert int(live[0, 0, 0]) == -(-spec.chunk_tokens // FLEX_BLOCK)

def test_block_mask_is_cached_per_spec():
    spec = MaskSpec("dual", 3, 37)
    assert block_mask(spec, "cpu") is block_mask(spec, "cpu")
    assert masks.block_mask(MaskSpec("dual", 3, 38), "cpu") is not block_mask(spec, "cpu")
