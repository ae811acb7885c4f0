"""The search space of PnP-OVSS's label-free tuning (``ovss-tune``); torch-free.

The procedure itself (the release's reward and its random annealing) is ``release_tuning``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

TUNED = ("layer", "head", "threshold")  # the release's layer, head and min_att


@dataclass
class SearchSpace:
    """The values the search may pick; layer and head are 1-based."""

    layers: Sequence[int]
    heads: Sequence[int]
    thresholds: Sequence[float]

    def grid(self) -> dict[str, Sequence[object]]:
        """Setting name -> its values, in ``TUNED`` order."""
        return dict(zip(TUNED, (self.layers, self.heads, self.thresholds), strict=True))

    def candidates(self) -> list[dict[str, object]]:
        """Every combination, as settings."""
        grid = itertools.product(self.layers, self.heads, self.thresholds)
        return [dict(zip(TUNED, values, strict=True)) for values in grid]
