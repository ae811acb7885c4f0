"""FreeCP's official conventions, each against values computed from the official formula.

Boxes (``scoremap2bbox``), the ambiguity step (votes over every contour of the group's mean map),
the redundancy score on the raw softmax, the crop classifier (112 px, "+0.1" positional grid,
class token), and the whole window on a planted image where both purification steps act,
compared with ``freecp_reference.official_window`` (the official code's steps, written out).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from freecp_reference import official_boxes, official_labels, official_window

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.freecp.freecp import (
    box_masks,
    class_activation,
    class_probabilities,
    freecp,
    make_crop_classifier,
    purification_affinity,
    redundancy_scores,
    refined_maps,
    resolve_ambiguity,
    scoremap_boxes,
)

GRID = 16
DIM = 32
# planted regions (x0, y0, x1, y1), end exclusive: A twice (two separate blobs), B; C elsewhere
A1, A2, B = (1, 1, 6, 6), (9, 1, 14, 6), (2, 9, 13, 14)


# ---------------------------------------------------------------- boxes (scoremap2bbox)


def test_boxes_quantise_to_uint8_before_the_threshold():
    """0.4 of a max of 1.0 is 102 of 255 after quantisation; a value of 0.403 is above 0.4 but
    truncates to 102, which is not above 102: it is outside the box."""
    scoremap = torch.zeros(8, 8)
    scoremap[2:4, 2:4] = 1.0
    scoremap[2:4, 4] = 0.403  # > 0.4 as a float, 102 as uint8 (int(0.403 * 255) = 102)
    scoremap[2:4, 1] = 0.405  # 103 as uint8: inside
    assert int(0.403 * 255) == 102 and int(0.405 * 255) == 103 == int(0.4 * 255) + 1
    assert scoremap_boxes(scoremap) == [(1, 2, 4, 4)]
    float_mask = (scoremap > 0.4 * scoremap.max()).numpy().astype(np.uint8)
    x, y, w, h = __import__("cv2").boundingRect(float_mask)
    assert (x, y, x + w, y + h) == (1, 2, 5, 4), "a float threshold would include column 4"


def test_box_end_is_clipped_to_size_minus_one_and_used_as_an_exclusive_end():
    scoremap = torch.zeros(8, 10)
    scoremap[5:8, 6:10] = 1.0  # touches the bottom and right edges
    assert scoremap_boxes(scoremap) == [(6, 5, 9, 7)]  # ends 10 -> 9, 8 -> 7
    mask = box_masks([scoremap_boxes(scoremap)], (8, 10))[0]
    assert mask.sum() == 2 * 3 and not mask[7].any() and not mask[:, 9].any()
    edge = torch.zeros(8, 10)
    edge[:, 9] = 1.0  # a contour on the last column only: a degenerate box
    assert scoremap_boxes(edge) == [(9, 0, 9, 7)]
    assert not box_masks([scoremap_boxes(edge)], (8, 10)).any()


def test_boxes_of_every_contour_holes_included_and_none_without_contours():
    scoremap = torch.zeros(9, 9)
    scoremap[1:6, 1:6] = 1.0
    scoremap[3, 3] = 0.0  # a hole: RETR_TREE reports it as a contour of its own
    scoremap[7, 6:8] = 0.9  # a fragment
    boxes = scoremap_boxes(scoremap)
    assert sorted(boxes) == [(1, 1, 6, 6), (2, 2, 5, 5), (6, 7, 8, 8)]
    assert scoremap_boxes(torch.zeros(6, 6)) == [(0, 0, 0, 0)]
    assert scoremap_boxes(torch.full((6, 6), 0.001)) == [(0, 0, 0, 0)]  # quantises to 0


@pytest.mark.parametrize("seed", range(6))
def test_boxes_equal_the_official_function_on_random_maps(seed):
    generator = torch.Generator().manual_seed(seed)
    scoremap = F.interpolate(torch.rand(1, 1, 5, 6, generator=generator), size=(18, 23))[0, 0]
    scoremap = (scoremap - scoremap.min()) / (scoremap.max() - scoremap.min())
    assert sorted(scoremap_boxes(scoremap)) == sorted(official_boxes(scoremap.numpy()))


# ---------------------------------------------------------------- ambiguity (votes)


def recording(scorer):
    calls = []

    def classify(boxes, candidates):
        calls.append((list(boxes), list(candidates)))
        return torch.stack([torch.as_tensor(scorer(box, candidates)).float() for box in boxes])

    return classify, calls


def two_blob_maps(second_blob=(9, 3, 13, 7)) -> torch.Tensor:
    """Refined maps (4, 16, 16): classes 1 and 2 share two blobs; 0 and 3 elsewhere."""
    maps = torch.zeros(4, GRID, GRID)
    for x0, y0, x1, y1 in [(1, 2, 5, 6), second_blob]:
        maps[1:3, y0:y1, x0:x1] = 1.0
    maps[0, 10:14, 10:14] = 1.0
    maps[3, 10:14, 1:4] = 1.0
    return maps


def test_each_contour_of_the_mean_map_votes_and_the_winners_are_united():
    maps = two_blob_maps()
    keep = torch.ones(4, dtype=torch.bool)

    def left_is_1_right_is_2(box, candidates):
        return [1.0, 0.0] if box[0] < GRID // 2 else [0.0, 1.0]

    classify, calls = recording(left_is_1_right_is_2)
    result = resolve_ambiguity([[1, 2]], maps, classify, keep)
    expected_boxes = official_boxes(maps[[1, 2]].mean(0).numpy())
    assert calls == [(expected_boxes, [1, 2])] and len(expected_boxes) == 2
    assert result.tolist() == [True, True, True, True]  # each class won one vote

    classify, calls = recording(lambda box, candidates: [0.2, 0.9])
    result = resolve_ambiguity([[1, 2]], maps, classify, keep)
    assert result.tolist() == [True, False, True, True] and keep.all()  # input untouched


def test_a_degenerate_box_keeps_the_whole_group():
    maps = two_blob_maps(second_blob=(9, 12, 13, 16))  # on the last row: y1 clipped to 15
    maps[1:3, 12:16, 9:13] = 1.0
    maps[1:3, 15, 9:13] = 1.0
    boxes = official_boxes(maps[[1, 2]].mean(0).numpy())
    assert any(b[1] == b[3] or b[0] == b[2] for b in boxes) or (9, 12, 13, 15) in boxes
    edge = torch.zeros(4, GRID, GRID)
    edge[1:3, 2:6, 1:5] = 1.0
    edge[1:3, :, 15] = 1.0  # a contour along the last column only: degenerate box
    boxes = official_boxes(edge[[1, 2]].mean(0).numpy())
    assert any(b[0] == b[2] for b in boxes), boxes
    classify, calls = recording(lambda box, candidates: [1.0, 0.0])
    result = resolve_ambiguity([[1, 2]], edge, classify, torch.ones(4, dtype=torch.bool))
    assert result.all()  # the official loop adds the whole group for an empty box


# ---------------------------------------------------------------- redundancy on the raw softmax


def test_redundancy_scores_the_raw_softmax_not_the_normalised_cam():
    """A frame where CLIP is unsure (features nearly orthogonal to every text: the softmax
    peaks at about 0.5): the min-max normalised CAM scores every class higher than the
    official raw-P score, and at the default 0.15 would keep three more classes."""
    features, text, affinity, _ = planted(seed=0)
    orthogonal = torch.linalg.qr(torch.cat([text.T, torch.randn(DIM, 1)], dim=1))[0][:, -1]
    features = F.normalize(0.02 * features + orthogonal, dim=-1)
    probabilities = class_probabilities(features, text)
    assert probabilities.max() < 0.6
    cam = class_activation(features, text)
    refined = refined_maps(cam, purification_affinity(affinity))
    got = redundancy_scores(probabilities, refined)
    p = torch.softmax(100 * torch.einsum("hwd,kd->khw", features.double(), text.double()), 0)
    want = (p * refined).sum((1, 2)) / (p.sum((1, 2)) + refined.sum((1, 2)) + 1e-8)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    on_cam = redundancy_scores(cam, refined)
    assert (on_cam > got + 0.01).all()
    scores = freecp(features, text, affinity, redundancy_threshold=0.15)
    kept = [c for c in range(6) if scores[c].amax() > 0]
    assert kept == official_window(features, text, affinity, 0.15, 0.7)[1] == [2, 3]
    assert (on_cam > 0.15).sum() == 5


# ---------------------------------------------------------------- crop classifier


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def dino_positions(positional: torch.Tensor, native: int, grid: int) -> torch.Tensor:
    """FreeCP's ``interpolate_pos_encoding`` for a square grid: scale_factor (g + 0.1) / n."""
    patch = positional[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / math.sqrt(native * native)
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    assert patch.shape[-2:] == (grid, grid)
    return torch.cat([positional[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def test_crop_classifier_is_the_class_token_at_112_px_with_the_dino_grid(tiny_clip):
    """Crops of the box's pixels resized to 112 x 112 (bilinear), embedded by open_clip's own
    forward with the positional grid set to FreeCP's "+0.1" interpolation to 7 x 7."""
    model = tiny_clip.model
    visual = model.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    image = torch.randn(1, 3, 6 * patch, 8 * patch, generator=torch.Generator().manual_seed(3))
    descriptions = F.normalize(torch.randn(5, model.text_projection.shape[1]), dim=-1)
    boxes = [(1, 1, 4, 5), (0, 2, 8, 6), (5, 0, 6, 1)]
    got = make_crop_classifier(visual, descriptions, image, patch)(boxes, [4, 0, 2])

    native = visual.grid_size[0]
    original = visual.positional_embedding.data.clone()
    crops = torch.cat(
        [
            F.interpolate(
                image[:, :, y0 * patch : y1 * patch, x0 * patch : x1 * patch],
                size=(112, 112),
                mode="bilinear",
            )
            for x0, y0, x1, y1 in boxes
        ]
    )
    try:
        visual.positional_embedding.data = dino_positions(original, native, 112 // patch)
        with torch.no_grad():
            embeddings = F.normalize(model.encode_image(crops), dim=-1)
    finally:
        visual.positional_embedding.data = original
    want = embeddings @ descriptions[[4, 0, 2]].T
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    native_size = F.interpolate(crops, size=visual.image_size, mode="bilinear")
    with torch.no_grad():
        at_native = (
            F.normalize(model.encode_image(native_size), dim=-1) @ descriptions[[4, 0, 2]].T
        )
    assert (at_native - got).abs().max() > 1e-3  # 112 px is not the native input


# ---------------------------------------------------------------- planted windows, end to end


def planted_affinity(labels: torch.Tensor) -> torch.Tensor:
    """Attention-like (hw, hw): rows sum to 1, high within a region, some local leakage."""
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    dist2 = torch.cdist(coords, coords).square()
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    noise = torch.rand(GRID * GRID, GRID * GRID, generator=torch.Generator().manual_seed(1))
    affinity = same * torch.exp(-dist2 / 72) + 0.1 * torch.exp(-dist2 / 8) + 0.02 * noise
    return affinity / affinity.sum(dim=-1, keepdim=True)


def planted(seed: int = 0, noise: float = 0.35):
    """Features (h, w, D), text (6, D), affinity (hw, hw), regions (h, w).

    Regions: 0 = A1, 1 = A2 (both with A's features), 2 = B, 3 = C (the rest). Text: A,
    A' (cos 0.95 to A: a near-synonym), B, C, and two absent classes (cos 0.45 to A, 0.35
    to B)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))[0].T
    a, b, c, e1, e2, e3 = basis[:6]
    regions = torch.full((GRID, GRID), 3)
    for index, (x0, y0, x1, y1) in enumerate((A1, A2, B)):
        regions[y0:y1, x0:x1] = index
    directions = torch.stack([a, a, b, c])
    features = F.normalize(
        directions[regions] + noise * torch.randn(GRID, GRID, DIM, generator=gen), dim=-1
    )

    def similar(direction, other, cos):
        return cos * direction + math.sqrt(1 - cos**2) * other

    text = torch.stack([a, similar(a, e1, 0.95), b, c, similar(a, e2, 0.45), similar(b, e3, 0.35)])
    return features, text, planted_affinity(regions), regions


def oracle(regions: torch.Tensor, truth: dict[int, int]):
    """A crop classifier that knows the planted truth: a candidate's score is the share of the
    box's patches whose region ``truth`` maps to it."""

    def classify(boxes, candidates):
        rows = []
        for x0, y0, x1, y1 in boxes:
            inside = regions[y0:y1, x0:x1].flatten().tolist()
            rows.append([sum(truth.get(r) == c for r in inside) / len(inside) for c in candidates])
        return torch.tensor(rows)

    return classify


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("truth", "kept"),
    [
        ({0: 0, 1: 1, 2: 2, 3: 3}, [0, 1, 2, 3]),  # A1 is A, A2 is A': each wins a vote
        ({0: 0, 1: 0, 2: 2, 3: 3}, [0, 2, 3]),  # both blobs are A: A' loses every vote
    ],
    ids=["split-votes", "one-winner"],
)
def test_planted_frame_where_both_purifications_act(seed, truth, kept):
    """The absent classes (4, 5) are dropped by redundancy, the synonyms A / A' form a group
    whose mean map has one contour per blob, each blob's crop votes, and the labels equal the
    official rules computed step by step (``official_window``, ``official_labels``)."""
    features, text, affinity, regions = planted(seed)
    threshold, ambiguity = 0.15, 0.5  # soft IoU of A and A' is 0.6-0.8 on these seeds
    votes = []
    classify = oracle(regions, truth)

    def counting(boxes, candidates):
        votes.append((list(boxes), list(candidates)))
        return classify(boxes, candidates)

    scores = freecp(features, text, affinity, threshold, ambiguity, crop_classifier=counting)
    want, want_kept = official_window(features, text, affinity, threshold, ambiguity, classify)
    assert want_kept == kept, "the planted case must act as designed on the official side"
    assert len(votes) == 1 and votes[0][1] == [0, 1] and len(votes[0][0]) >= 2
    assert [c for c in range(6) if scores[c].amax() > 0] == kept
    torch.testing.assert_close(scores, want, atol=1e-4, rtol=0)
    assert torch.equal(official_labels(scores, False), official_labels(want, False))
    background = official_labels(scores, True)
    assert torch.equal(background, official_labels(want, True))
    raw = torch.einsum("hwd,kd->khw", features, text).argmax(0)
    assert (raw >= 4).any(), "the absent classes must win some patches before purification"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresholds", [(0.05, 0.7), (0.15, 0.8), (0.1, 0.5)])
def test_windows_equal_the_official_steps(seed, thresholds):
    """Random scenes (no planted structure) with background prompts in the softmax."""
    gen = torch.Generator().manual_seed(100 + seed)
    features = F.normalize(
        F.interpolate(torch.randn(1, DIM, 4, 5, generator=gen), size=(12, 15), mode="bilinear")[
            0
        ].permute(1, 2, 0)
        + 0.3 * torch.randn(12, 15, DIM, generator=gen),
        dim=-1,
    )
    text = F.normalize(torch.randn(7, DIM, generator=gen), dim=-1)
    text[1] = F.normalize(text[0] + 0.2 * text[1], dim=-1)  # a near-synonym
    background = F.normalize(torch.randn(2, DIM, generator=gen), dim=-1)
    attention = torch.softmax(4 * torch.randn(180, 180, generator=gen), dim=-1)
    scorer = torch.randn(1000, 7, generator=gen)

    def classify(boxes, candidates):  # any deterministic function of the box
        return torch.stack(
            [
                scorer[(x0 * 31 + y0 * 7 + x1 * 3 + y1) % 1000, candidates]
                for x0, y0, x1, y1 in boxes
            ]
        )

    got = freecp(features, text, attention, *thresholds, classify, background_text=background)
    want, kept = official_window(features, text, attention, *thresholds, classify, background)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [c for c in range(7) if got[c].amax() > 0] == kept


def test_nothing_survives_gives_all_zero_scores():
    features, text, affinity, _ = planted()
    scores = freecp(features, text, affinity, redundancy_threshold=0.5)  # scores are <= 0.5
    assert scores.shape == (6, GRID, GRID) and (scores == 0).all()
    assert official_window(features, text, affinity, 0.5, 0.7)[1] == []
    assert (official_labels(scores, True) == 0).all()  # background wins everywhere
