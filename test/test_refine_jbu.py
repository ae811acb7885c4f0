"""Joint bilateral upsampling: label edges land on guide edges; a flat guide interpolates."""

import pytest
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.dense.jbu import jbu_weights, joint_bilateral_upsample

SIZE, LOW = 64, 8  # 8x8 "patches" of 8x8 pixels


def patch_labels(truth: torch.Tensor) -> torch.Tensor:
    """One-hot low-resolution scores: each patch votes for the class covering most of it."""
    fractions = F.interpolate(
        F.one_hot(truth, 2).permute(0, 3, 1, 2).float(), size=(LOW, LOW), mode="area"
    )
    return F.one_hot(fractions.argmax(1), 2).permute(0, 3, 1, 2).float()


def scene(box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Guide with a bright box (edges off the patch grid) on a dark ground; and its labels."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    top, bottom, left, right = box
    inside = (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)
    guide = torch.where(inside, 0.9, 0.1).expand(1, 3, -1, -1).clone()
    guide[:, 1] *= 0.8  # a colour, not only a grey level
    return guide, inside.long()[None]


def test_step_edge_lands_on_the_image_edge():
    """Vertical edge at x = 26, inside the patch covering 24..31: bilinear misses it by 2.5 px."""
    guide, truth = scene((0, SIZE, 26, SIZE))
    scores = patch_labels(truth)
    jbu = joint_bilateral_upsample(scores, guide).argmax(1)
    bilinear = F.interpolate(scores, size=(SIZE, SIZE), mode="bilinear").argmax(1)
    first_column = (jbu == 1).int().argmax(dim=-1)  # per row, where the class starts
    assert (first_column == 26).all()
    assert torch.equal(jbu, truth)
    assert ((bilinear == 1).int().argmax(dim=-1) != 26).all()


def test_box_edges_land_on_the_image_edges():
    guide, truth = scene((21, 45, 26, 51))
    scores = patch_labels(truth)
    jbu_errors = (joint_bilateral_upsample(scores, guide).argmax(1) != truth).sum().item()
    bilinear = F.interpolate(scores, size=(SIZE, SIZE), mode="bilinear").argmax(1)
    assert jbu_errors == 0
    assert (bilinear != truth).sum().item() > 100


def test_constant_guide_interpolates_smoothly():
    """A flat guide leaves only the spatial Gaussian: constants stay, ramps stay ramps."""
    yy, xx = torch.meshgrid(torch.arange(7.0), torch.arange(9.0), indexing="ij")
    low = torch.stack([torch.full_like(xx, 0.25), xx / 8, torch.sin(xx / 3) + torch.cos(yy / 2)])
    guide = torch.full((1, 3, 56, 72), 0.3)
    up = joint_bilateral_upsample(low[None], guide)[0]
    bilinear = F.interpolate(low[None], size=(56, 72), mode="bilinear")[0]
    torch.testing.assert_close(up[0], torch.full_like(up[0], 0.25))
    assert (up[1, :, 1:] > up[1, :, :-1]).all()  # monotone along the ramp
    interior = (slice(None), slice(16, -16))
    assert (up[1][interior] - bilinear[1][interior]).abs().max() * 8 < 0.05  # in low-res px
    spread = low[2].amax() - low[2].amin()
    assert (up[2] - bilinear[2]).abs().max() < 0.1 * spread


def test_colour_absent_from_the_patches_stays_finite_and_convex():
    """A one-pixel white line vanishes in the patch average; its pixels must not become NaN."""
    torch.manual_seed(0)
    guide = torch.zeros(1, 3, 64, 64)
    guide[..., 30, :] = 1.0
    scores = torch.softmax(torch.randn(1, 4, 8, 8), dim=1)
    up = joint_bilateral_upsample(scores, guide, sigma_range=0.05)
    assert torch.isfinite(up).all()
    assert (up.amin(dim=(2, 3)) >= scores.amin(dim=(2, 3)) - 1e-6).all()
    assert (up.amax(dim=(2, 3)) <= scores.amax(dim=(2, 3)) + 1e-6).all()
    torch.testing.assert_close(up.sum(1), torch.ones_like(up[:, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exact_shape_and_dtype(dtype):
    """Batched, non-integer scale factor (28x37 patches to 100x130 pixels), dtype kept."""
    torch.manual_seed(0)
    scores = torch.rand(2, 5, 28, 37).to(dtype)
    up = joint_bilateral_upsample(scores, torch.rand(2, 3, 100, 130))
    assert up.shape == (2, 5, 100, 130) and up.dtype == dtype


def test_batch_items_are_independent():
    torch.manual_seed(0)
    scores, guide = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 30, 30)
    both = joint_bilateral_upsample(scores, guide)
    torch.testing.assert_close(both[1:], joint_bilateral_upsample(scores[1:], guide[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    guide, truth = scene((21, 45, 26, 51))
    scores = patch_labels(truth)
    on_gpu = joint_bilateral_upsample(scores.cuda(), guide.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), joint_bilateral_upsample(scores, guide))


def test_precomputed_weights_give_the_same_maps_chunk_by_chunk():
    """The engine computes the guide's weights once and upsamples a chunk of classes at a
    time: the concatenated chunks equal one call on all classes (bit for bit)."""
    generator = torch.Generator().manual_seed(0)
    guide = torch.rand(2, 3, 40, 56, generator=generator)
    scores = torch.randn(2, 7, 5, 7, generator=generator)
    whole = joint_bilateral_upsample(scores, guide)
    weights = jbu_weights(guide, (5, 7))
    chunks = [
        joint_bilateral_upsample(scores[:, i : i + 3], guide, weights=weights) for i in (0, 3, 6)
    ]
    assert torch.equal(torch.cat(chunks, dim=1), whole)


def test_weights_of_another_size_are_refused():
    guide = torch.rand(1, 3, 40, 56)
    with pytest.raises(ValueError, match="do not fit"):
        joint_bilateral_upsample(torch.rand(1, 2, 5, 7), guide, weights=jbu_weights(guide, (4, 7)))
    with pytest.raises(ValueError, match="do not fit"):
        joint_bilateral_upsample(
            torch.rand(2, 2, 5, 7), guide.expand(2, -1, -1, -1), weights=jbu_weights(guide, (5, 7))
        )
