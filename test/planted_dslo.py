"""Planted problems for DSLO (no pretrained weights): noisy patch logits over planted regions.

A 16x16 patch grid holds planted class regions; patch "logits" are cosine-like (0.2 + 0.05 for
the true class) plus strong Gaussian noise, so the raw argmax gets only about 60 % right. The
affinity comes in two kinds:

* ``planted_problem``: a synthetic affinity, high within a region and low across, with
  multiplicative noise, optionally times a Gaussian window in the patch distance;
* ``attention_affinity``: what each of ovss_ros's CLIP affinity sources (``naclip``, ``keykey``,
  ``mean``) makes of planted tokens, through the real attention code of ``dense_clip``: queries
  and keys are a region embedding plus Gaussian noise (and a class token), so the attention is
  peaked within regions the way a CLIP attention is within objects, only noisier.

Used by test/test_refine_dslo.py and benchmarks/dslo_alternatives.py.
"""

from __future__ import annotations

import torch

from ovss_ros.core.methods.dense.forward import attention_weights

GRID = 16
TOKEN_NOISE = 0.5  # per-token noise of the planted queries and keys (unit-variance regions)


def planted_truth(layout: str) -> torch.Tensor:
    """(GRID, GRID) labels: ``thirds`` (three large regions) or ``object`` (a 20-patch box)."""
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    truth = torch.zeros(GRID, GRID, dtype=torch.long)
    if layout == "thirds":
        truth[xx >= GRID // 3] = 1
        truth[(xx >= GRID // 3) & (yy >= GRID // 2)] = 2
    else:
        truth[xx >= GRID // 2] = 1
        truth[(yy >= 3) & (yy < 8) & (xx >= 3) & (xx < 7)] = 2
    return truth


def planted_logits(
    truth: torch.Tensor, classes: int, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """(N, classes, GRID, GRID): 0.2 + 0.05 for the true class + noise; classes >= 3 absent."""
    onehot = torch.nn.functional.one_hot(truth, classes).permute(0, 3, 1, 2).float()
    logits = 0.2 + 0.05 * onehot + noise * torch.randn(onehot.shape, generator=generator)
    logits[:, 3:] -= 1.0  # absent classes: far below every present one
    return logits


def planted_problem(
    layout: str = "thirds",
    classes: int = 3,
    noise: float = 0.05,
    affinity_noise: float = 0.6,
    local: bool = False,
    batch: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, classes, 16, 16), affinity (N, 256, 256), truth (N, 16, 16)).

    Classes beyond the planted three exist in the vocabulary but nowhere in the image.
    """
    g = torch.Generator().manual_seed(seed)
    truth = planted_truth(layout).expand(batch, -1, -1)
    logits = planted_logits(truth, classes, noise, g)
    flat = truth.flatten(1)
    same = (flat[:, :, None] == flat[:, None, :]).float()
    affinity = (0.05 + same) * torch.exp(affinity_noise * torch.randn(same.shape, generator=g))
    if local:
        yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        coords = torch.stack([yy.flatten(), xx.flatten()], dim=1).float()
        affinity = affinity * torch.exp(-torch.cdist(coords, coords).square() / (2 * 3.0**2))
    return logits, affinity, truth


def planted_tokens(
    regions: torch.Tensor, truth: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """(N, heads, 1 + n, dim): a class token, then each patch's region embedding (``regions``,
    (heads, R, dim)) times ``strength`` plus noise of standard deviation ``TOKEN_NOISE``."""
    heads, _, dim = regions.shape
    batch, n = truth.shape[0], truth[0].numel()
    tokens = strength * regions[:, truth.flatten(1)].transpose(0, 1)  # (N, heads, n, dim)
    tokens = tokens + TOKEN_NOISE * torch.randn(batch, heads, n, dim, generator=generator)
    cls = torch.randn(batch, heads, 1, dim, generator=generator)
    return torch.cat([cls, tokens], dim=2)


def attention_affinity(
    source: str,
    truth: torch.Tensor,
    strength: float = 0.6,
    heads: int = 4,
    dim: int = 64,
    layers: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """(N, n, n) patch affinity of a CLIP affinity ``source`` on planted tokens.

    As ``dense_clip.dense_forward`` makes it: the patch block of the head-mean attention of
    ``attention_weights`` (``naclip``: keys with NACLIP's Gaussian window; ``keykey``: keys;
    ``mean``: the mean over ``layers`` layers of the vanilla query-key attention).
    """
    g = torch.Generator().manual_seed(seed)
    scale = dim**-0.5
    grid = tuple(truth.shape[-2:])
    count = int(truth.max()) + 1
    if source in ("naclip", "keykey"):
        keys = planted_tokens(torch.randn(heads, count, dim, generator=g), truth, strength, g)
        return attention_weights(keys, keys, scale, source, grid)[:, :, 1:, 1:].mean(1)
    if source != "mean":
        raise ValueError(f"unknown source {source!r}")
    total = 0
    for _ in range(layers):  # each layer its own embedding, shared by its queries and keys
        regions = torch.randn(heads, count, dim, generator=g)
        q = planted_tokens(regions, truth, strength, g)
        k = planted_tokens(regions, truth, strength, g)
        total = total + attention_weights(q, k, scale, "vanilla", grid)[:, :, 1:, 1:].mean(1)
    return total / layers


def accuracy(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of patches whose argmax over classes is the planted label."""
    return (scores.argmax(dim=1) == truth).float().mean().item()
