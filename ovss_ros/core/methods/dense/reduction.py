"""What postprocess folds the query maps into, a chunk at a time: the running log-sum-exp, the
best class query (first maximum wins, as ``argmax``) and the best background word."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reduced:
    """One pass of ``postprocess`` over the query maps, per input pixel (each (H, W))."""

    peak: torch.Tensor  # max over queries of the scaled logits
    total: torch.Tensor  # sum over queries of exp(scaled logit - peak)
    best: torch.Tensor  # best scaled class logit (of the classes allowed to win)
    best_query: torch.Tensor  # its query
    background: torch.Tensor  # best scaled background-word logit (-inf without any)

    def background_probability(self) -> torch.Tensor:
        return torch.exp(self.background - self.peak) / self.total


def take_better(reduced: Reduced, maps: torch.Tensor, queries: torch.Tensor) -> None:
    """Fold the scaled maps (K, H, W) of ``queries`` (ascending, after those already folded)
    into ``reduced.best`` / ``best_query``: the first maximum wins, as ``argmax``. In place
    (a full-size frame's maps are large: no temporaries beyond one mask)."""
    if len(queries) == 1:
        value, better = maps[0], maps[0] > reduced.best
        reduced.best_query.masked_fill_(better, int(queries[0]))
    else:
        value, index = maps.max(dim=0)
        better = value > reduced.best
        reduced.best_query = torch.where(better, queries[index], reduced.best_query)
    torch.maximum(reduced.best, value, out=reduced.best)  # = where(better, value, best)


def add_to_softmax(reduced: Reduced, maps: torch.Tensor, largest: torch.Tensor) -> None:
    """Running log-sum-exp: fold scaled maps (K, H, W) whose max over K is ``largest`` into
    ``reduced.peak`` / ``total`` (total = sum exp(scaled - peak)). Overwrites ``maps``."""
    peak = torch.maximum(reduced.peak, largest)
    reduced.total.mul_(reduced.peak.sub_(peak).exp_())  # rescale to the new peak
    reduced.peak = peak
    terms = maps.sub_(peak).exp_()
    reduced.total.add_(terms.sum(dim=0) if len(terms) > 1 else terms[0])
