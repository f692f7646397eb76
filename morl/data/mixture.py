"""The weighted mixture sampler: rows drawn from several datasets by weight, a pure function of a seed."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from morl.data.loading import LoadedDataset
from morl.data.rows import Row


class MixtureSampler:
    """Draws rows from several datasets by weight, deterministically from a seed.

    Each draw picks a dataset with probability proportional to its weight, then takes that dataset's next row
    in a per-epoch shuffled order, so every row is seen once per epoch of its dataset. All randomness is a pure
    function of (seed, counters), so the state is a few integers and a restore continues the exact sequence.
    """

    def __init__(self, datasets: Sequence[LoadedDataset], weights: Sequence[float], seed: int) -> None:
        if not datasets:
            raise ValueError("MixtureSampler needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(weights)} weights for {len(datasets)} datasets")
        for i, w in enumerate(weights):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"weights[{i}] = {w!r}: a dataset weight must be finite and > 0")
        for i, d in enumerate(datasets):
            if not d.rows:
                raise ValueError(f"datasets[{i}] ({d.path}) has no rows to sample")
        self._datasets = list(datasets)
        self._cumulative = np.cumsum(weights) / math.fsum(weights)
        self._seed = seed
        self._draws = 0
        self._positions = [0] * len(datasets)
        self._epochs = [0] * len(datasets)
        self._orders = [self._epoch_order(i) for i in range(len(datasets))]

    def row(self, key: tuple[int, int]) -> Row:
        """The row at (dataset index, row index)."""
        return self._datasets[key[0]].rows[key[1]]

    def where(self, key: tuple[int, int]) -> str:
        """``file:line`` of the row at `key`."""
        return self._datasets[key[0]].where(key[1])

    @property
    def num_rows(self) -> int:
        return sum(len(d.rows) for d in self._datasets)

    def task_counts(self) -> Counter[str]:
        """Rows per task over every dataset of the mixture."""
        return Counter(row.task for d in self._datasets for row in d.rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "draws": self._draws,
            "positions": list(self._positions),
            "epochs": list(self._epochs),
            "sizes": [len(d.rows) for d in self._datasets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved sequence; the datasets must be the same (checked by their sizes)."""
        sizes = [len(d.rows) for d in self._datasets]
        if state["sizes"] != sizes:
            raise ValueError(f"sampler state is for dataset sizes {state['sizes']}, these have {sizes}")
        self._seed = state["seed"]
        self._draws = state["draws"]
        self._positions = list(state["positions"])
        self._epochs = list(state["epochs"])
        self._orders = [self._epoch_order(i) for i in range(len(self._datasets))]

    def next_key(self) -> tuple[int, int]:
        """Draw the next row; returns where it is, (dataset index, row index)."""
        u = np.random.default_rng([self._seed, 0, self._draws]).random()
        i = min(int(np.searchsorted(self._cumulative, u, side="right")), len(self._datasets) - 1)
        self._draws += 1
        if self._positions[i] == len(self._orders[i]):
            self._epochs[i] += 1
            self._positions[i] = 0
            self._orders[i] = self._epoch_order(i)
        key = (i, int(self._orders[i][self._positions[i]]))
        self._positions[i] += 1
        return key

    def _epoch_order(self, i: int) -> np.ndarray:
        return np.random.default_rng([self._seed, 1, i, self._epochs[i]]).permutation(len(self._datasets[i].rows))
