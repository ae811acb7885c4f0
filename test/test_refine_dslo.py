"""DSLO on planted problems (no pretrained weights): it must undo noise the raw argmax cannot.

The problems (test/planted_dslo.py): a 16x16 patch grid of planted class regions, noisy
cosine-like logits (raw argmax about 60 % right), and either a synthetic affinity (high within
a region, low across, multiplicative noise, optionally local) or the affinity each CLIP source
(naclip, keykey, mean) makes of planted tokens through dense_clip's attention code.
"""

import pytest
import torch
from planted_dslo import (
    accuracy,
    attention_affinity,
    planted_logits,
    planted_problem,
    planted_truth,
)

from ovss_ros.core.methods.dslo.dslo import (
    ABSENT_SCORE,
    class_distributions,
    doubly_stochastic,
    dslo_scores,
)


@pytest.mark.parametrize("mode", ["ot", "velocity"])
@pytest.mark.parametrize(
    "layout, local",
    [("thirds", False), ("thirds", True), ("object", False), ("object", True)],
    ids=["thirds-global", "thirds-local", "object-global", "object-local"],
)
def test_recovers_planted_regions_far_better_than_raw_argmax(mode, layout, local):
    logits, affinity, truth = planted_problem(layout, local=local)
    raw = accuracy(logits, truth)
    refined = accuracy(dslo_scores(logits, affinity, mode), truth)
    assert raw < 0.7  # the noise is strong
    assert refined > raw + 0.2, (raw, refined)
    assert refined > 0.85


# Token strength per source: the attention of planted tokens is as peaked as the source makes it
# (naclip, keykey: a token's own key dominates its row; mean: queries and keys differ).
CLIP_SOURCES = {"naclip": 0.5, "keykey": 0.5, "mean": 0.1}


@pytest.mark.parametrize("mode", ["ot", "velocity"])
@pytest.mark.parametrize("layout", ["thirds", "object"])
@pytest.mark.parametrize("source", list(CLIP_SOURCES))
def test_recovers_planted_regions_from_each_clip_affinity(mode, layout, source):
    truth = planted_truth(layout).expand(2, -1, -1)
    logits = planted_logits(truth, 3, 0.05, torch.Generator().manual_seed(0))
    affinity = attention_affinity(source, truth, strength=CLIP_SOURCES[source])
    assert affinity.shape == (2, 256, 256)
    raw = accuracy(logits, truth)
    refined = accuracy(dslo_scores(logits, affinity, mode), truth)
    assert raw < 0.7
    assert refined > raw + 0.2, (raw, refined)


@pytest.mark.parametrize("source", list(CLIP_SOURCES))
def test_ot_does_not_collapse_to_the_raw_argmax_on_peaked_attention(source):
    """Weak planted tokens (strength 0.3): with naclip and keykey a token's own affinity
    dominates its row, and OT must not let every patch keep its own noisy label (the earlier
    score, the mean similarity to where the share goes, did: 0.74 and 0.64, raw 0.63)."""
    truth = planted_truth("thirds").expand(2, -1, -1)
    logits = planted_logits(truth, 3, 0.05, torch.Generator().manual_seed(0))
    affinity = attention_affinity(source, truth, strength=0.3)
    if source != "mean":
        diagonal = affinity.diagonal(dim1=-2, dim2=-1)
        assert (diagonal > 5 * affinity.mean(-1)).all()  # peaked: the case in point
    assert accuracy(dslo_scores(logits, affinity, "ot"), truth) > 0.9


@pytest.mark.parametrize("mode", ["ot", "velocity"])
def test_small_object_keeps_its_patches(mode):
    """Mass balance must not let the big regions swallow the 20-patch object."""
    logits, affinity, truth = planted_problem("object", noise=0.03, affinity_noise=0.3)
    labels = dslo_scores(logits, affinity, mode).argmax(dim=1)
    inside = truth == 2
    assert (labels[inside] == 2).float().mean() > 0.95
    assert (labels[~inside] == 2).float().mean() < 0.02


@pytest.mark.parametrize("mode", ["ot", "velocity"])
def test_absent_class_never_wins(mode):
    logits, affinity, _ = planted_problem(classes=5)
    scores = dslo_scores(logits, affinity, mode)
    assert (scores[:, 3:] == ABSENT_SCORE).all()
    assert (scores[:, :3] > ABSENT_SCORE).all()
    assert (scores.argmax(dim=1) < 3).all()


def test_score_ranges_per_mode():
    """ot: a centred transport price mapped into (0, 1); velocity: a stop time >= 1 plus a
    tie-break below 1."""
    logits, affinity, _ = planted_problem()
    ot = dslo_scores(logits, affinity, "ot")
    velocity = dslo_scores(logits, affinity, "velocity", max_steps=20)
    assert (ot > 0).all() and (ot < 1).all()
    assert (velocity >= 1).all() and (velocity < 22).all()


def test_velocity_is_slow_where_a_class_really_is():
    """Clean logits, block affinity: class c's mass lingers in region c, leaves elsewhere."""
    logits, affinity, truth = planted_problem(noise=0.0, affinity_noise=0.0, batch=1)
    stops = dslo_scores(logits, affinity, "velocity").floor()[0]
    for c in range(3):
        inside = truth[0] == c
        assert stops[c][inside].min() > stops[c][~inside].max()
        assert (stops[c][~inside] == 1).all()


@pytest.mark.parametrize("mode", ["ot", "velocity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype(mode, dtype):
    torch.manual_seed(0)
    logits = (0.2 + 0.05 * torch.randn(2, 4, 5, 7)).to(dtype)
    scores = dslo_scores(logits, torch.rand(2, 35, 35), mode)
    assert scores.shape == (2, 4, 5, 7) and scores.dtype == dtype
    assert torch.isfinite(scores.float()).all()


@pytest.mark.parametrize("mode", ["ot", "velocity"])
def test_deterministic_and_batch_independent(mode):
    logits, affinity, _ = planted_problem(layout="object", local=True)
    logits[1] = logits[1].flip(-1)  # make the two images differ
    first = dslo_scores(logits, affinity, mode)
    assert torch.equal(first, dslo_scores(logits, affinity, mode))
    torch.testing.assert_close(first[1:], dslo_scores(logits[1:], affinity[1:], mode))


def test_bad_arguments_are_refused():
    logits, affinity, _ = planted_problem()
    with pytest.raises(ValueError, match="unknown DSLO mode"):
        dslo_scores(logits, affinity, "kl")
    with pytest.raises(ValueError, match="affinity"):
        dslo_scores(logits, affinity[:, :100, :100])
    with pytest.raises(ValueError, match=">= 1"):
        dslo_scores(logits, affinity, "velocity", max_steps=0)


@pytest.mark.parametrize("kind", ["uniform-random", "attention", "local-window"])
def test_ipf_makes_rows_and_columns_sum_to_one(kind):
    torch.manual_seed(0)
    n = 64
    affinity = torch.rand(2, n, n)
    if kind == "attention":  # softmax rows with logits spread like a ViT's (std 2)
        affinity = torch.softmax(2 * torch.randn(2, n, n), dim=-1)
    elif kind == "local-window":
        coords = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"))
        coords = coords.flatten(1).T.float()
        affinity = affinity * torch.exp(-torch.cdist(coords, coords).square() / 8)
    transition = doubly_stochastic(affinity, rounds=15)
    assert (transition >= 0).all()
    torch.testing.assert_close(transition.sum(-1), torch.ones(2, n), atol=1e-3, rtol=0)
    torch.testing.assert_close(transition.sum(-2), torch.ones(2, n), atol=1e-3, rtol=0)


def test_ipf_survives_an_all_zero_row_and_column():
    """No doubly stochastic scaling exists then; the result must still be finite, not NaN."""
    affinity = torch.rand(1, 16, 16)
    affinity[:, 5] = 0
    affinity[:, :, 9] = 0
    transition = doubly_stochastic(affinity)
    assert torch.isfinite(transition).all()
    torch.testing.assert_close(transition.sum(-2), torch.ones(1, 16))


def test_class_distributions_keep_only_the_winner():
    logits = torch.tensor([[[[0.3, 0.1]], [[0.2, 0.25]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    q, present = class_distributions(logits)
    assert present.tolist() == [[True, True, False]]
    torch.testing.assert_close(q[0, 0], torch.tensor([1.0, 0.0]))  # class 0 wins patch 0 only
    torch.testing.assert_close(q[0, 1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(q.sum(-1), torch.ones(1, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["ot", "velocity"])
def test_cuda_matches_cpu(mode):
    logits, affinity, _ = planted_problem(local=True)
    on_gpu = dslo_scores(logits.cuda(), affinity.cuda(), mode)
    assert on_gpu.device.type == "cuda"
    cpu = dslo_scores(logits, affinity, mode)
    assert (on_gpu.cpu().argmax(1) == cpu.argmax(1)).float().mean() > 0.99
