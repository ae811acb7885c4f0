"""PAMR on synthetic edges and a real photo: boundaries snap to colour edges, ranges hold."""

import cv2
import pytest
import torch
import torch.nn.functional as F
from conftest import voc_image_paths

from ovss_ros.core.methods.dense.pamr import pamr, pamr_affinity, pamr_propagate

HEIGHT, WIDTH = 64, 96


def step_scene(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bright box on a dark background, and noisy 2-class scores whose blob overshoots it.

    The blob bleeds 6 pixels past the box on every side (like a 16-pixel patch straddling an
    edge) and the scores carry strong per-pixel noise; returns (image, scores, true labels).
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    box = (yy >= 16) & (yy < 48) & (xx >= 40) & (xx < 80)
    image = torch.where(box, 0.8, 0.2).expand(1, 3, -1, -1)
    image = image + 0.02 * torch.randn(1, 3, HEIGHT, WIDTH, generator=g)
    blob = ((yy - 32).abs() <= 22) & (xx >= 34) & (xx < 86)
    logits = 2 * torch.stack([~blob, blob]).float()[None]
    logits = logits + 0.6 * torch.randn(1, 2, HEIGHT, WIDTH, generator=g)
    return image, torch.softmax(logits, dim=1), box.long()[None]


def test_boundary_snaps_to_the_image_edge():
    image, scores, truth = step_scene()
    before = (scores.argmax(1) != truth).float().mean().item()
    after = (pamr(image, scores).argmax(1) != truth).float().mean().item()
    assert before > 0.1  # the overshoot and the noise are real errors
    assert after < 0.1 * before and after < 0.01


def test_edge_blocks_propagation_across_it():
    """One class on each side of a step edge stays put even after many iterations."""
    image, _, truth = step_scene()
    scores = F.one_hot(truth, 2).permute(0, 3, 1, 2).float()
    refined = pamr(image, scores, iterations=30)
    assert torch.equal(refined.argmax(1), truth)


def test_constant_image_gives_uniform_affinity():
    image = torch.full((2, 3, 20, 30), 0.5)
    affinity = pamr_affinity(image, (8, 16))
    assert affinity.shape == (2, 16, 20, 30)
    torch.testing.assert_close(affinity, torch.full_like(affinity, 1 / 16))


def test_constant_image_is_the_neighbour_mean():
    """One round at dilation 1 on a flat image is the mean of the 8 replicate-padded neighbours."""
    torch.manual_seed(0)
    scores = torch.rand(2, 4, 12, 17)
    refined = pamr(torch.zeros(2, 3, 12, 17), scores, iterations=1, dilations=(1,))
    window = F.avg_pool2d(F.pad(scores, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    torch.testing.assert_close(refined, (9 * window - scores) / 8)


def test_constant_image_smooths_more_with_each_round():
    torch.manual_seed(0)
    image = torch.ones(1, 3, 48, 48)
    scores = torch.softmax(3 * torch.randn(1, 3, 48, 48), dim=1)
    spreads = [pamr(image, scores, iterations=i).std().item() for i in (0, 1, 3, 10)]
    assert spreads == sorted(spreads, reverse=True) and spreads[-1] < 0.2 * spreads[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_preserved(dtype):
    torch.manual_seed(0)
    scores = torch.rand(2, 5, 33, 41).to(dtype)
    refined = pamr(torch.rand(2, 3, 33, 41, dtype=torch.float64), scores, iterations=2)
    assert refined.shape == scores.shape and refined.dtype == dtype


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="same N, H, W"):
        pamr(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 16, 16))


def test_real_photo_keeps_a_convex_combination():
    """On a VOC photo every refined map stays in its own range and probabilities sum to 1."""
    bgr = cv2.imread(str(voc_image_paths()[0]))
    image = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float()
    torch.manual_seed(0)
    patches = torch.randn(1, 6, image.shape[-2] // 16, image.shape[-1] // 16)
    scores = torch.softmax(
        4 * F.interpolate(patches, size=image.shape[-2:], mode="bilinear"), dim=1
    )
    refined = pamr(image, scores)
    assert torch.isfinite(refined).all()
    low, high = scores.amin(dim=(2, 3)), scores.amax(dim=(2, 3))
    assert (refined.amin(dim=(2, 3)) >= low - 1e-6).all()
    assert (refined.amax(dim=(2, 3)) <= high + 1e-6).all()
    torch.testing.assert_close(refined.sum(1), torch.ones_like(refined[:, 0]))
    assert not torch.equal(refined.argmax(1), scores.argmax(1))  # it did something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image, scores, _ = step_scene()
    on_gpu = pamr(image.cuda(), scores.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), pamr(image, scores), atol=1e-5, rtol=1e-4)


def test_precomputed_affinity_gives_the_same_maps_chunk_by_chunk():
    """The engine computes the image's affinity once and refines a chunk of classes at a time:
    the concatenated chunks equal one call on all classes (bit for bit)."""
    image, scores, _ = step_scene()
    scores = torch.cat([scores, scores.flip(-1), scores.flip(-2)], dim=1)  # 6 maps
    whole = pamr(image, scores)
    affinity = pamr_affinity(image)
    chunks = [pamr_propagate(affinity, scores[:, i : i + 4]) for i in (0, 4)]
    assert torch.equal(torch.cat(chunks, dim=1), whole)


def test_affinity_built_tap_by_tap_equals_the_stacked_formula():
    """Reference from the definition with every tap stacked at once (unfold-style): spread =
    torch.std over all 18 taps per channel, distance = |I_i - I_j| / (eps + 0.1 spread),
    channel mean, softmax over the 16 neighbours; on a real photo (a sharp-edged, flat-region
    image where the spread varies over orders of magnitude)."""
    bgr = cv2.imread(str(voc_image_paths()[1]))
    image = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float()
    image = image[..., :120, :160]
    padded = {d: F.pad(image, (d, d, d, d), mode="replicate") for d in (8, 16)}
    height, width = image.shape[-2:]
    taps = [
        padded[d][..., d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width]
        for d in (8, 16)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    stacked = torch.stack(taps, dim=2)  # (1, 3, 18, H, W)
    spread = stacked.std(dim=2, keepdim=True)
    neighbours = stacked[:, :, [i for i in range(18) if i % 9 != 4]]
    distance = (neighbours - image[:, :, None]).abs() / (1e-8 + 0.1 * spread)
    want = torch.softmax(-distance.mean(dim=1), dim=1)
    torch.testing.assert_close(pamr_affinity(image), want, rtol=1e-5, atol=1e-6)
