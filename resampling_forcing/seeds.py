"""Derived seeds: one rule for every seed the toolkit computes from others (torch-free).

A derived seed is numpy's SeedSequence hash of a fixed-arity tuple of ints in [0, 2**64), each written
as two 32-bit words (all low words, then all high words). Packed bit fields or sums alias (seed + epoch:
seed 1 at epoch 0 is seed 0 at epoch 1; rank r and r + 1024 share a 10-bit field), and so does a plain
SeedSequence of the ints: it splits a large int into words and pads short inputs with zero words, so
(2**32, 0) -> words [0, 1, 0], hashed as [0, 1] = (0, 1). Fixed-width words make distinct tuples of one
arity distinct inputs; a pair of ints below 2**32 gives [a, b, 0, 0], which SeedSequence hashes as
[a, b]: sampler.sample_seed keeps the noise every earlier release drew for such seeds.
"""
from __future__ import annotations

MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed and numpy's SeedSequence take without overflow
_WORD = (1 << 32) - 1


def mix_seed(*values: int) -> int:
    """One seed in [0, 2**63) from ints in [0, 2**64): a pure function of the tuple. Tuples of one arity
    (each call site passes a fixed number of values) never alias; across arities zero padding does
    ((0,) and (0, 0) hash alike), which no caller mixes. ValueError for a value out of range."""
    import numpy as np

    ints = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 1 << 64:
            raise ValueError(f"seed component {v!r}: must be an int in [0, 2**64)")
        ints.append(int(v))
    words = [v & _WORD for v in ints] + [v >> 32 for v in ints]
    s = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(s[0]) << 31) ^ int(s[1])
