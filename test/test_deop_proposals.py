"""Class-agnostic proposals: coverage of the training-free sources, merging, the learned head's
Hungarian matching (against brute force) and set loss."""

import itertools

import numpy as np
import pytest
import torch
from planted_shapes import single_thread  # noqa: F401

from ovss_ros.core.methods.deop.proposals import (
    ProposalHead,
    cluster_proposals,
    hungarian_match,
    learned_proposals,
    merge_to_count,
    pairwise_dice_cost,
    pairwise_focal_cost,
    proposal_losses,
    superpixel_proposals,
    superpixel_segments,
)


@pytest.mark.parametrize("count", [1, 25, 100])
def test_superpixels_cover_the_image_once(voc_rgb, count):
    grid = (84, 124)
    proposals = superpixel_proposals(voc_rgb[:2], grid, count)
    assert proposals.masks.shape[2:] == grid
    coverage = (proposals.masks * proposals.valid[:, :, None, None]).sum(dim=1)
    assert torch.equal(coverage, torch.ones_like(coverage))  # a partition: every cell once
    assert int(proposals.count.max()) <= count
    assert int(proposals.count.min()) >= int(0.9 * count)  # SLIC is re-run when it falls short
    padded = ~proposals.valid
    assert proposals.masks[padded].sum() == 0


def test_superpixels_follow_a_planted_edge():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, 30:] = (250, 30, 30)
    segments = superpixel_segments(rgb, 6)
    for segment in np.unique(segments):  # no segment straddles the colour edge
        columns = np.nonzero(segments == segment)[1]
        assert columns.max() < 30 or columns.min() >= 30


def test_merge_to_count_merges_smallest_into_longest_border():
    segments = np.array(
        [
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 2, 1, 1, 1],
            [3, 3, 3, 3, 3, 3],
        ]
    )
    # segment 2 (one cell) borders 0 twice (left, up) and 1 once, 3 once: it joins 0
    merged = merge_to_count(segments, 3)
    expected = np.array(
        [
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [2, 2, 2, 2, 2, 2],
        ]
    )
    assert np.array_equal(merged, expected)
    assert len(np.unique(merge_to_count(segments, 1))) == 1


def test_clusters_partition_the_grid_and_find_planted_groups():
    tokens = torch.zeros(1, 6, 8, 16)
    tokens[..., :4, 0] = 1.0  # left half points one way, right half another
    tokens[..., 4:, 1] = 1.0
    proposals = cluster_proposals(tokens, 2, cells=2, position_weight=0.0)
    masks = proposals.masks[0]
    assert masks.shape == (2, 12, 16)
    assert torch.equal(masks.sum(dim=0), torch.ones(12, 16))
    left = masks[:, :, :8].mean(dim=(1, 2))
    assert sorted(left.tolist()) == [0.0, 1.0]  # one cluster is exactly the left half
    many = cluster_proposals(torch.randn(2, 3, 3, 8), 100, cells=1)
    assert int(many.count.max()) <= 9  # never more clusters than patches


def test_hungarian_matching_planted_case_and_brute_force():
    targets = torch.zeros(2, 16)
    targets[0, :8] = 1  # left half
    targets[1, 8:12] = 1  # a quarter
    logits = torch.full((3, 16), -6.0)
    logits[2, :8] = 6  # prediction 2 is target 0
    logits[0, 8:12] = 6  # prediction 0 is target 1
    logits[1, 12:] = 6  # prediction 1 matches nothing
    objects = torch.zeros(3, 2)
    rows, cols = hungarian_match(logits, objects, targets)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 2: 0}
    # the same minimum as a brute-force search over all assignments, on random inputs
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 20, generator=generator) * 3
    objects = torch.randn(5, 2, generator=generator)
    targets = (torch.rand(3, 20, generator=generator) > 0.5).float()
    cost = (
        -objects.softmax(-1)[:, :1]
        + 20 * pairwise_focal_cost(logits, targets)
        + pairwise_dice_cost(logits, targets)
    )
    rows, cols = hungarian_match(logits, objects, targets)
    best = min(
        sum(cost[p, t] for t, p in enumerate(perm)) for perm in itertools.permutations(range(5), 3)
    )
    assert float(cost[rows, cols].sum()) == pytest.approx(float(best), rel=1e-6)


def test_proposal_loss_prefers_the_right_masks_and_the_head_learns():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1
    labels[0, 0, 0] = 255  # ignored pixels belong to no target
    good = torch.full((1, 2, 8, 8), -8.0)
    good[0, 0][labels[0] == 0] = 8
    good[0, 1][labels[0] == 1] = 8
    objects = torch.tensor([[[4.0, -4.0], [4.0, -4.0]]])
    right = proposal_losses(good, objects, labels)
    wrong = proposal_losses(-good, objects, labels)
    assert right["mask"] + right["dice"] < 0.05 < wrong["mask"] + wrong["dice"]
    torch.manual_seed(0)
    head = ProposalHead(width=16, queries=4, dim=16, layers=1, heads=4, cells=2)
    tokens = torch.randn(1, 4, 4, 16)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    totals = []
    for _ in range(40):
        masks, object_logits = head(tokens)
        loss = sum(proposal_losses(masks, object_logits, labels).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        totals.append(float(loss.detach()))
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5])


def test_learned_proposals_take_the_most_object_like_and_equal_ones_in_query_order():
    """The head's ``count`` highest objectness; equal objectness (a saturated head) goes to the
    lower query on every device (topk leaves that order open)."""
    torch.manual_seed(0)
    head = ProposalHead(width=16, queries=6, dim=16, layers=1, heads=4, cells=2).eval()
    tokens = torch.randn(1, 4, 4, 16)
    proposals, objectness = learned_proposals(head, tokens, 3)
    with torch.no_grad():
        masks, object_logits = head(tokens)
    every = object_logits.softmax(dim=-1)[0, :, 0]
    assert torch.equal(objectness[0], every.sort(descending=True).values[:3])
    with torch.no_grad():
        head.objectness.weight.zero_()
        head.objectness.bias.copy_(torch.tensor([30.0, -30.0]))  # every query: objectness 1.0
    proposals, objectness = learned_proposals(head, tokens, 4)
    assert (objectness == 1).all()
    with torch.no_grad():
        masks, _ = head(tokens)
    torch.testing.assert_close(proposals.masks, masks[:, :4].sigmoid())
