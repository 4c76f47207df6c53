"""The trainer's data bookkeeping: which micro-batch comes next and the randomness it gets.

The data position p counts micro-batches of one process from the start of the run (saved in every
checkpoint as `data_position`); the batch at p is a pure function of (seed, p, rank, world)
(data/loader.py), and so is the generator of its randomness (timesteps, noise, t_s, text dropout):
`step_seed(seed, p, rank)`. A resumed run therefore sees the same batches and draws the same numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

from .seeds import mix_seed


def step_seed(seed: int, position: int, rank: int) -> int:
    """Seed of the randomness of one micro-batch: a pure function of (run seed, data position, rank),
    all ints >= 0 (seeds.mix_seed: distinct triples, independent streams)."""
    return mix_seed(seed, position, rank)


class DataCursor:
    """The data position of a trainer over its data (data/loader.TrainData)."""

    def __init__(self, data, seed: int, rank: int, device: torch.device, agree: Callable[[float, str], float]):
        """`agree(flag, "min")`: the minimum of a flag over processes (a collective on every process)."""
        self.data, self.seed, self.rank, self.device, self.agree = data, seed, rank, device, agree
        self.position = 0

    def generator(self, position: int) -> torch.Generator:
        """The generator of the micro-batch at `position` on this process."""
        return torch.Generator(device=self.device).manual_seed(step_seed(self.seed, position, self.rank))

    def next(self) -> tuple[int, dict, torch.Generator]:
        """The next micro-batch every process can use -> (its position, the batch, its generator).
        A position where some process has only unusable videos is skipped on all of them (positions are
        not filled in); DataError after more than 4 epochs of such positions in a row."""
        empty = 0
        while True:
            pos = self.position
            batch = self.data.batch(pos)
            self.position += 1
            if self.agree(0.0 if batch is None else 1.0, "min") >= 1:
                return pos, batch, self.generator(pos)
            empty += 1  # only bad videos here (on some rank)
            if empty > 4 * self.data.per_epoch:
                from .data.loader import DataError

                raise DataError(f"no usable micro-batch in {empty} positions: too few usable videos "
                                f"({self.data.summary()})")

    def batch_at(self, position: int) -> tuple[dict, torch.Generator]:
        """The batch at the first usable position >= `position` of this process and its generator
        (no collective: the trainer's finiteness probe of a checkpoint)."""
        pos, batch = self.data.first_batch(position)
        return batch, self.generator(pos)

    @property
    def epoch(self) -> int:
        return self.data.epoch_of(self.position)
