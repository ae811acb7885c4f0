"""What postprocess folds the query maps into, a chunk at a time: the running log-sum-exp, the
best class query (first maximum wins, as ``argmax``) and the best background word."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

FOLD_ELEMENTS = 1 << 24  # float32 elements of one row block of a chunk's maps (see ``fold``)


@dataclass
class Reduced:
    """One pass of ``postprocess`` over the query maps, per input pixel (each (H, W))."""

    peak: torch.Tensor  # max over queries of the scaled logits
    total: torch.Tensor  # sum over queries of exp(scaled logit - peak)
    best: torch.Tensor  # best scaled class logit (of the classes allowed to win)
    best_query: torch.Tensor  # its query
    background: torch.Tensor  # best scaled background-word logit (-inf without any)

    def confidence(self) -> torch.Tensor:
        """The best allowed class's softmax probability over all queries, (H, W)."""
        return torch.exp(self.best - self.peak) / self.total

    def background_probability(self) -> torch.Tensor:
        """The best background word's softmax probability over all queries, (H, W)."""
        return torch.exp(self.background - self.peak) / self.total


def take_better(reduced: Reduced, maps: torch.Tensor, queries: torch.Tensor) -> None:
    """Fold the scaled maps (K, H, W) of ``queries`` (ascending, after those already folded)
    into ``reduced.best`` / ``best_query``: the first maximum wins, as ``argmax``. In place
    (a full-size frame's maps are large: no temporaries beyond one mask; ``reduced`` may hold
    views of a block of rows)."""
    if len(queries) == 1:
        value, better = maps[0], maps[0] > reduced.best
        reduced.best_query.masked_fill_(better, int(queries[0]))
    else:
        value, index = maps.max(dim=0)
        better = value > reduced.best
        reduced.best_query.copy_(torch.where(better, queries[index], reduced.best_query))
    torch.maximum(reduced.best, value, out=reduced.best)  # = where(better, value, best)


def add_to_softmax(reduced: Reduced, maps: torch.Tensor, largest: torch.Tensor) -> None:
    """Running log-sum-exp: fold scaled maps (K, H, W) whose max over K is ``largest`` into
    ``reduced.peak`` / ``total`` (total = sum exp(scaled - peak)). Overwrites ``maps``."""
    peak = torch.maximum(reduced.peak, largest)
    reduced.total.mul_(reduced.peak.sub_(peak).exp_())  # rescale to the new peak
    reduced.peak.copy_(peak)
    terms = maps.sub_(peak).exp_()
    reduced.total.add_(terms.sum(dim=0) if len(terms) > 1 else terms[0])


def fold(
    reduced: Reduced, maps: torch.Tensor, queries: torch.Tensor, scale: float, is_class: bool
) -> None:
    """Fold the maps (K, H, W) of ``queries`` (unscaled, at the input size) into ``reduced``:
    ``scale`` times, then the best class query (``take_better``; class queries) or the best
    background word (``is_class`` False), and the running log-sum-exp (``add_to_softmax``).

    The same values as those steps over the whole maps (each pixel's result depends on that
    pixel's values only), taken a block of rows at a time (about ``FOLD_ELEMENTS`` of the maps).
    A chunk of maps is one block by default: cache-sized blocks (2^17 elements) were measured
    slower, not faster, on the shared 2-core CPU (12 MP frame: 2x the time per frame; each
    small step waits for both threads), so the blocks only serve the tests' small bounds."""
    count, height, width = maps.shape
    rows = max(1, FOLD_ELEMENTS // (count * width))
    for top in range(0, height, rows):
        view = Reduced(*(getattr(reduced, f.name)[top : top + rows] for f in fields(Reduced)))
        block = maps[:, top : top + rows].mul_(scale)  # in place: the values of maps * scale
        largest = block.amax(dim=0) if count > 1 else block[0]
        if is_class:
            take_better(view, block, queries)
        else:
            torch.maximum(view.background, largest, out=view.background)
        add_to_softmax(view, block, largest)  # in place: block becomes exp terms
