"""FreeCP class purification on planted problems: the mathematics, no pretrained weights.

A 16x16 patch grid holds three planted regions (A, B, and C around them); patch features are the
region's class direction plus noise; the text adds absent classes that resemble present ones
(cos 0.45 / 0.35), or a near-synonym of A (cos 0.95). The affinity is high within regions, decays
with distance, and leaks a little across region borders, like a real attention map.
"""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.freecp.freecp import (
    DATASET_THRESHOLDS,
    ambiguous_groups,
    background_wins,
    box_masks,
    class_activation,
    class_boxes,
    class_probabilities,
    crop_embeddings,
    freecp,
    make_crop_classifier,
    purification_affinity,
    redundancy_keep,
    redundancy_scores,
    refined_maps,
)

GRID = 16
DIM = 32
A_BOX = (2, 2, 9, 8)  # (x0, y0, x1, y1) in patches, end exclusive
B_BOX = (6, 9, 14, 15)


def planted_labels() -> torch.Tensor:
    labels = torch.full((GRID, GRID), 2)  # C everywhere else
    for label, (x0, y0, x1, y1) in enumerate((A_BOX, B_BOX)):
        labels[y0:y1, x0:x1] = label
    return labels


def planted_affinity(labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Attention-like (hw, hw): rows sum to 1, high within a region, some local leakage."""
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    dist2 = torch.cdist(coords, coords).square()
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    noise = torch.rand(GRID * GRID, GRID * GRID, generator=torch.Generator().manual_seed(seed))
    affinity = same * torch.exp(-dist2 / 72) + 0.1 * torch.exp(-dist2 / 8) + 0.02 * noise
    return affinity / affinity.sum(dim=-1, keepdim=True)


def similar(direction: torch.Tensor, other: torch.Tensor, cos: float) -> torch.Tensor:
    """Unit vector with cosine ``cos`` to ``direction`` (both orthonormal inputs)."""
    return cos * direction + math.sqrt(1 - cos**2) * other


def planted(seed: int = 0, noise: float = 0.35, synonym: bool = False):
    """Features (h, w, D), text (K, D), raw affinity (hw, hw), labels (h, w) of the planted image.

    Text rows: A, B, C, then two absent classes (cos 0.45 to A, 0.35 to B); with ``synonym``
    instead A, A' (cos 0.95 to A), B, C.
    """
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))[0].T  # orthonormal rows
    a, b, c, e1, e2 = basis[:5]
    labels = planted_labels()
    directions = torch.stack([a, b, c])
    features = directions[labels] + noise * torch.randn(GRID, GRID, DIM, generator=gen)
    features = F.normalize(features, dim=-1)
    if synonym:
        text = torch.stack([a, similar(a, e1, 0.95), b, c])
    else:
        text = torch.stack([a, b, c, similar(a, e1, 0.45), similar(b, e2, 0.35)])
    return features, text, planted_affinity(labels), labels


def test_class_activation_is_a_globally_normalised_softmax():
    features, text, _, _ = planted()
    cam = class_activation(features, text)
    assert cam.shape == (5, GRID, GRID) and cam.dtype == torch.float32
    assert cam.min().item() == pytest.approx(0.0, abs=1e-6)
    assert cam.max().item() == pytest.approx(1.0, abs=1e-6)
    probs = torch.softmax(100 * torch.einsum("hwd,kd->khw", features, text), dim=0)
    low, high = probs.min(), probs.max()
    torch.testing.assert_close(cam, (probs - low) / (high - low), atol=1e-5, rtol=0)


def test_purification_affinity_is_symmetric_nonnegative_and_nearly_stochastic():
    _, _, affinity, _ = planted()
    transition = purification_affinity(affinity)
    assert transition.shape == affinity.shape and transition.dtype == torch.float32
    assert (transition >= 0).all()
    torch.testing.assert_close(transition, transition.T)
    torch.testing.assert_close(transition.sum(dim=1), torch.ones(GRID * GRID), atol=0.05, rtol=0)
    # batched input gives the same per-item result
    torch.testing.assert_close(
        purification_affinity(affinity[None].repeat(2, 1, 1))[1], transition
    )


def test_class_boxes_finds_two_separated_blobs():
    cam = torch.zeros(2, GRID, GRID)
    cam[0, 1:4, 2:6] = 1.0  # rows 1..3, cols 2..5
    cam[0, 10:15, 9:12] = 0.8
    cam[0, 7, 7] = 0.3  # below 0.4 * max: no box
    # class 1 is all zero: no contour, FreeCP's single degenerate box
    assert class_boxes(cam) == [[(9, 10, 12, 15), (2, 1, 6, 4)], [(0, 0, 0, 0)]]
    masks = box_masks(class_boxes(cam), (GRID, GRID))
    assert masks.shape == (2, GRID, GRID) and masks.dtype == torch.bool
    assert masks[0].sum() == 3 * 4 + 5 * 3 and not masks[1].any()


def test_refined_maps_propagate_only_from_inside_the_boxes():
    cam = torch.zeros(1, GRID, GRID)
    cam[0, 3:6, 3:6] = 1.0
    cam[0, 12, 12] = 0.3  # a cold patch outside the box: it must not propagate
    refined = refined_maps(cam, torch.eye(GRID * GRID))
    expected = torch.zeros(1, GRID, GRID)
    expected[0, 3:6, 3:6] = 1.0
    torch.testing.assert_close(refined, expected)
    features, text, affinity, _ = planted()
    refined = refined_maps(class_activation(features, text), purification_affinity(affinity))
    assert refined.shape == (5, GRID, GRID) and refined.dtype == torch.float32
    assert refined.amin(dim=(1, 2)).abs().max() < 1e-6
    assert (refined.amax(dim=(1, 2)) - 1).abs().max() < 1e-6
    # two hops of the unsquared transition are the squared one (the cheap path freecp takes)
    single = purification_affinity(affinity, square=False)
    cam = class_activation(features, text)
    torch.testing.assert_close(refined_maps(cam, single, hops=2), refined, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_redundancy_drops_the_absent_classes_and_keeps_the_present(seed):
    features, text, affinity, _ = planted(seed)
    cam = class_activation(features, text)
    refined = refined_maps(cam, purification_affinity(affinity))
    probabilities = class_probabilities(features, text)
    scores = redundancy_scores(probabilities, refined)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert (scores >= 0).all() and (scores <= 0.5).all()
    keep = redundancy_keep(probabilities, refined, threshold=0.1)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, True, True, False, False]
    raw = torch.einsum("hwd,kd->khw", features, text).argmax(dim=0)
    assert (raw >= 3).sum() > 5, "the planted absent classes must win some patches raw"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_freecp_recovers_planted_regions_better_than_raw_argmax(seed):
    features, text, affinity, labels = planted(seed)
    raw = torch.einsum("hwd,kd->khw", features, text).argmax(dim=0)
    raw_accuracy = (raw == labels).float().mean().item()
    scores = freecp(features, text, affinity, redundancy_threshold=0.1)
    assert scores.shape == (5, GRID, GRID) and scores.dtype == torch.float32
    assert (scores[3:] == 0).all() and (scores[:3].amax(dim=(1, 2)) == 1).all()
    accuracy = (scores.argmax(dim=0) == labels).float().mean().item()
    margin = 0.04
    assert raw_accuracy < 0.95, "the planted problem is too easy to show anything"
    assert accuracy >= 0.98 and accuracy >= raw_accuracy + margin, (raw_accuracy, accuracy)


def test_background_prompts_join_the_softmax_only_and_background_wins_ties():
    features, text, affinity, _ = planted()
    scores = freecp(features, text[:3], affinity, background_text=text[3:])
    assert scores.shape == (3, GRID, GRID)
    alone = freecp(features, text[:3], affinity)
    assert not torch.equal(scores, alone)  # the prompts changed the softmax and its min-max
    best = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0])
    assert background_wins(best).tolist() == [True, True, True, False, False]  # 0.5: a tie


def test_near_synonyms_form_one_group():
    features, text, affinity, _ = planted(synonym=True)
    assert (text[0] @ text[1]).item() == pytest.approx(0.95, abs=1e-5)
    cam = class_activation(features, text)
    refined = refined_maps(cam, purification_affinity(affinity))
    keep = redundancy_keep(class_probabilities(features, text), refined, 0.1)
    assert keep.all(), "both synonyms claim region A, so both survive redundancy"
    assert ambiguous_groups(refined, keep, 0.7) == [[0, 1]]
    keep[1] = False
    assert ambiguous_groups(refined, keep, 0.7) == []  # dropped classes take no part


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(str(TINY_VIT), "none", "cpu")


@pytest.mark.parametrize("winner", [0, 1])
def test_crop_classifier_keeps_the_synonym_whose_description_matches(tiny_clip, winner):
    features, text, affinity, _ = planted(synonym=True)
    visual = tiny_clip.model.visual
    patch = 16
    image = torch.randn(
        1, 3, patch * GRID, patch * GRID, generator=torch.Generator().manual_seed(3)
    )

    def encoded_crop(box):
        x0, y0, x1, y1 = (patch * v for v in box)
        crop = F.interpolate(image[..., y0:y1, x0:x1], size=(112, 112), mode="bilinear")
        with torch.no_grad():
            return F.normalize(crop_embeddings(visual, crop), dim=-1)[0]

    descriptions = torch.stack([encoded_crop(b) for b in (B_BOX, B_BOX, B_BOX, (0, 0, 16, 2))])
    descriptions[winner] = encoded_crop(A_BOX)  # the crop of A's region is the winner's
    classify = make_crop_classifier(visual, descriptions, image, patch)
    scores = classify([A_BOX, B_BOX], [0, 1, 2])
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    calls = []

    def recording(boxes, candidates):
        calls.append((boxes, candidates))
        return classify(boxes, candidates)

    scores = freecp(features, text, affinity, 0.1, crop_classifier=recording)
    assert calls == [([A_BOX], [0, 1])]  # the group's mean map has one contour: region A
    kept = (scores.amax(dim=(1, 2)) > 0).tolist()
    assert kept == [winner == 0, winner == 1, True, True]


def test_dataset_thresholds_are_in_the_papers_range():
    for redundancy, ambiguity in DATASET_THRESHOLDS.values():
        assert 0.05 <= redundancy <= 0.15 and ambiguity in (0.7, 0.8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_freecp_runs_on_the_gpu_like_on_the_cpu():
    features, text, affinity, _ = planted()
    cpu = freecp(features, text, affinity)
    gpu = freecp(features.cuda(), text.cuda(), affinity.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_dropped_classes_are_zero_and_upsample_cleanly():
    features, text, affinity, labels = planted()
    scores = freecp(features, text, affinity, 0.1)
    assert (scores[3:5] == 0).all()
    large = F.interpolate(scores[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    assert torch.isfinite(large).all() and (large[3:5] == 0).all()
    expected = labels.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert ((large.argmax(dim=0) == expected).float().mean() > 0.95).item()


@pytest.mark.parametrize("rows", [1, 3, None], ids=["1-row", "3-rows", "all"])
def test_ambiguous_groups_in_row_blocks_equal_the_pairwise_formula(monkeypatch, rows):
    """Many kept classes (40 maps: 8 planted groups of near-copies, 16 loners): the grouping
    taken a block of rows at a time equals soft IoU from its definition, pair by pair, and
    scipy's connected components of the graph IoU >= threshold."""
    from scipy.sparse.csgraph import connected_components

    freecp_module = importlib.import_module(
        "ovss_ros.core.methods.freecp.freecp"
    )  # not the function
    generator = torch.Generator().manual_seed(7)
    bases = torch.rand(24, 12, 12, generator=generator)
    maps = torch.cat([bases[:8].repeat_interleave(3, dim=0), bases[8:]])
    maps = (maps + 0.05 * torch.rand(maps.shape, generator=generator)).clamp(0, 1)
    keep = torch.ones(len(maps), dtype=torch.bool)
    keep[[5, 30]] = False  # dropped classes take no part
    if rows is not None:
        monkeypatch.setattr(freecp_module, "PAIRWISE_ELEMENTS", rows * int(keep.sum()) * 144)
    got = ambiguous_groups(maps, keep, 0.7)

    kept = keep.nonzero().flatten().tolist()
    flat = maps.flatten(1).double().numpy()
    adjacency = np.zeros((len(kept), len(kept)), dtype=bool)
    for i, a in enumerate(kept):
        for j, b in enumerate(kept):
            iou = np.minimum(flat[a], flat[b]).sum() / np.maximum(flat[a], flat[b]).sum()
            adjacency[i, j] = iou >= 0.7
    _, component = connected_components(adjacency, directed=False)
    want = [
        sorted(kept[i] for i in np.flatnonzero(component == c))
        for c in np.unique(component)
        if (component == c).sum() > 1
    ]
    assert got == sorted(want)
    assert len(got) == 8 and [3, 4] in got  # the planted triples; 5 was dropped
