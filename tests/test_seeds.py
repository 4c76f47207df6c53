"""Derived seeds (seeds.mix_seed): distinct inputs never share a stream, the sampler's noise is unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from resampling_forcing.sampler import sample_seed
from resampling_forcing.seeds import MAX_SEED, mix_seed
from resampling_forcing.training_data import step_seed


@pytest.mark.parametrize("cases", [
    [(0, 1), (1, 0), (2**32, 0), (0, 2**32), (0, 0), (2**64 - 1, 0), (MAX_SEED, 2**64 - 1)],
    [(0, 0, 1), (0, 1, 0), (0, 2**32, 0), (0, 0, 2**32), (0, 0, 0), (0, 0, 1024), (1 << 20, 0, 0), (0, 0, 4095)],
])
def test_mix_seed_separates_what_sums_bit_fields_and_word_splits_alias(cases):
    """Tuples of one arity (what a call site passes): seed + epoch aliased (0, 1) and (1, 0); a plain
    SeedSequence of the ints aliased (2**32, 0) with (0, 1), as its words are [0, 1, 0] = [0, 1]."""
    seeds = [mix_seed(*c) for c in cases]
    assert len(set(seeds)) == len(cases)
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert seeds == [mix_seed(*c) for c in cases]  # a pure function


def test_sample_seed_keeps_the_noise_of_seeds_below_2_to_32():
    """For seed, index < 2**32 the sampler's seed is SeedSequence([seed, index]) as before mix_seed, so
    every video sampled earlier with such a seed is drawn again; beyond, the aliasing is gone."""
    for seed, index in [(0, 0), (1, 5), (2**32 - 1, 2**32 - 1), (20251215, 3)]:
        s = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
        assert sample_seed(seed, index) == (int(s[0]) << 31) ^ int(s[1])
    assert sample_seed(2**32, 0) != sample_seed(0, 1)


def test_step_seed_distinct_where_bit_fields_would_wrap():
    """Ranks 1024 apart and seeds 2**20 apart drew the same numbers under the earlier packed layout."""
    triples = [(0, 0, 0), (0, 0, 1024), (1 << 20, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)]
    assert len({step_seed(*t) for t in triples}) == len(triples)


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.0, "3"])
def test_mix_seed_refuses_what_is_not_an_int_in_range(bad):
    with pytest.raises(ValueError, match="seed component"):
        mix_seed(0, bad)
