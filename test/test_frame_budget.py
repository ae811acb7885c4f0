"""The per-frame budget (issue 18, item 3): its formulas against what the code allocates, the
row-chunked maps against the whole ones, and the limits the budget derives.

The largest tensor an operation allocates is measured with a TorchDispatchMode that sees every
op's outputs (views excluded: they allocate nothing), so a formula is compared with the real
allocation of the real model classes (open_clip, diffusers, transformers) at tiny sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ovss_ros.core import frame_budget
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.frame_budget import (
    FRAME_BUDGET_BYTES,
    FrameBudgetError,
    affinity_bytes,
    check_crop_batch,
    check_sd_size,
    check_vlm_image_size,
    max_crop_batch,
    sd_map_bytes,
    sd_max_size,
    vlm_attention_bytes,
    vlm_max_image_size,
)
from ovss_ros.core.methods.dense.forward import dense_forward
from ovss_ros.core.segmenter import EngineConfig, Segmenter

SMALL_CHUNK = 1 << 20  # 1 MiB: every chunked map of these tests spans many chunks


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (bytes) and which op it was."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                size = tensor.numel() * tensor.element_size()
                if size > self.largest:
                    self.largest, self.where = size, (str(func), tuple(tensor.shape))
        return out


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(frame_budget, "CHUNK_BYTES", SMALL_CHUNK)


# --- the limits the budget derives ------------------------------------------------------------


def test_the_static_limits_are_the_largest_values_within_the_budget():
    assert FRAME_BUDGET_BYTES == 1 << 30
    assert sd_max_size() == 1448
    check_sd_size(1448)
    assert sd_map_bytes(1448) <= FRAME_BUDGET_BYTES < sd_map_bytes(1449)
    with pytest.raises(FrameBudgetError, match="dslo.sd.size 1449 needs a 1.07 GB VAE activation"):
        check_sd_size(1449)
    check_sd_size(2048, itemsize=2)  # fp16 halves it
    assert vlm_max_image_size() == 1008  # BLIP ITM large: ViT-L/16, 16 heads
    check_vlm_image_size(1008)
    with pytest.raises(
        FrameBudgetError, match="pnp.image_size 1024 needs a 1.07 GB attention map"
    ):
        check_vlm_image_size(1024)
    assert vlm_attention_bytes(1008) <= FRAME_BUDGET_BYTES < vlm_attention_bytes(1024)
    assert max_crop_batch() == 443  # ViT-B/16 at 224 px: 197 tokens x 3072
    check_crop_batch(443)
    with pytest.raises(FrameBudgetError, match="twostream.crop_batch 444"):
        check_crop_batch(444)


def test_the_issues_sizes_are_refused_with_their_cost():
    """Issue 18: dslo.sd.size 2048 and 4096, pnp.image_size 1024 and 4096 were accepted."""
    for size, cost in ((2048, "2.15 GB"), (4096, "8.59 GB")):
        with pytest.raises(
            FrameBudgetError, match=f"dslo.sd.size {size} needs a {cost} .* at most 1448"
        ):
            EngineConfig.from_flat({"dslo.sd.size": size}).validate()
    for size, cost in ((1024, "1.07 GB"), (4096, "274.9 GB")):
        with pytest.raises(ValueError, match=f"pnp.image_size {size} needs a {cost} attention"):
            EngineConfig.from_flat({"pnp.image_size": size}).validate()
    with pytest.raises(ValueError, match="twostream.crop_batch 1024 needs a 2.48 GB"):
        EngineConfig.from_flat({"twostream.crop_batch": 1024}).validate()
    with pytest.raises(FrameBudgetError, match="patch affinity needs a 17.2 GB map"):
        EngineConfig(refinement="dslo", short_side=4096, max_long_side=4096).validate()
    EngineConfig(refinement="dslo", short_side=2048, max_long_side=2048).validate()  # 1.07 GB


# --- formulas against the allocations ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_segmenter():
    def build(**settings) -> Segmenter:
        torch.manual_seed(0)
        base = {
            "model": str(TINY_VIT),
            "pretrained": "none",
            "device": "cpu",
            "templates": "single",
        }
        config = EngineConfig.from_flat(base | settings)
        segmenter = Segmenter(config)
        segmenter.set_classes(["cat", "dog"])
        return segmenter

    return build


@pytest.mark.parametrize(
    ("refinement", "affinity"), [("dslo", "naclip"), ("dslo", "mean"), ("freecp", "naclip")]
)
def test_dense_largest_map_is_the_affinity_formula(
    tiny_clip_segmenter, small_chunks, refinement, affinity
):
    """A 512 x 512 whole image (32 x 32 patches): the largest allocation of the forward and the
    refinement is the affinity, exactly ``affinity_bytes``; the last block's attention (2 heads
    x 1025^2, twice the affinity) is never formed whole."""
    segmenter = tiny_clip_segmenter(
        short_side=512, refinement=refinement, **{"dslo.affinity": affinity}
    )
    pixels = segmenter.method.preprocess(np.zeros((512, 512, 3), np.uint8))
    measured = LargestTensor()
    with torch.no_grad(), measured:
        segmenter.method.head(segmenter.method.encode(pixels))
    assert measured.largest == affinity_bytes(1, 32 * 32), measured.where
    assert measured.largest < 2 * 1025 * 1025 * 4


def test_dense_attention_without_affinity_is_never_whole(tiny_clip_segmenter, small_chunks):
    segmenter = tiny_clip_segmenter(short_side=512)
    pixels = segmenter.method.preprocess(np.zeros((512, 512, 3), np.uint8))
    measured = LargestTensor()
    with torch.no_grad(), measured:
        segmenter.method.head(segmenter.method.encode(pixels))
    assert measured.largest <= max(SMALL_CHUNK, pixels.numel() * 4), measured.where


@pytest.mark.parametrize("mode", ["naclip", "sclip", "clearclip", "vanilla", "sclip_freecp"])
@pytest.mark.parametrize("affinity", [None, "naclip", "keykey", "mean"])
def test_chunked_attention_equals_the_whole_map(monkeypatch, mode, affinity):
    torch.manual_seed(0)
    visual = load_clip(str(TINY_VIT), "none", "cpu").model.visual
    pixels = torch.randn(2, 3, 160, 224)  # 10 x 14 patches, two windows
    with torch.no_grad():
        whole = dense_forward(visual, pixels, mode, affinity)
        monkeypatch.setattr(frame_budget, "CHUNK_BYTES", 2 * 2 * 141 * 4 * 7)  # 7 rows a chunk
        chunked = dense_forward(visual, pixels, mode, affinity)
    torch.testing.assert_close(chunked.features, whole.features, rtol=0, atol=1e-5)
    if affinity is not None:
        torch.testing.assert_close(chunked.affinity, whole.affinity, rtol=0, atol=1e-6)


def test_windows_are_encoded_in_chunks_with_the_same_result(tiny_clip_segmenter, monkeypatch):
    segmenter = tiny_clip_segmenter(
        short_side=256, refinement="dslo", **{"dense.crop": 64, "dense.stride": 32}
    )
    rgb = (np.random.default_rng(0).random((256, 320, 3)) * 255).astype(np.uint8)
    whole = segmenter.segment(rgb)
    monkeypatch.setattr(frame_budget, "CHUNK_BYTES", 17 * 1024 * 4 * 3)  # 3 windows a chunk
    chunked = segmenter.segment(rgb)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_allclose(chunked.confidence, whole.confidence, atol=1e-5)


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory) -> Path:
    from tiny_diffusion import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.mark.parametrize("size", [256, 512])
def test_sd_largest_map_is_the_vae_activation_formula(sd_pipeline, small_chunks, size):
    """The SD affinity's largest allocation is the VAE's first activation (``sd_map_bytes``
    with the VAE's channels; its downsampling pads one row and column), not the UNet's
    self-attention map, which the issue measured at 17 GB for dslo.sd.size 2048."""
    from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention

    sd2 = Sd2Attention.load(str(sd_pipeline), device="cpu", size=size)
    formula = sd_map_bytes(size, sd2.vae.config.block_out_channels[0], 4)
    measured = LargestTensor()
    with torch.no_grad(), measured:
        sd2.affinity(torch.rand(2, 3, size, size), (8, 8))
    assert formula <= measured.largest <= formula * ((size + 1) / size) ** 2, measured.where
    assert measured.largest < (size // 8) ** 4 * 4  # the whole attention map of the top layer


@pytest.mark.parametrize("layers", ["m2n2", "up"])
def test_sd_affinity_in_row_chunks_equals_the_resampled_whole_maps(
    sd_pipeline, small_chunks, layers
):
    from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention, resample_affinity

    sd2 = Sd2Attention.load(str(sd_pipeline), device="cpu", size=256, layers=layers)
    pixels = torch.rand(2, 3, 96, 160)
    for grid in ((6, 10), (7, 9), (20, 30)):
        chunked = sd2.affinity(pixels, grid)
        collected = sd2.self_attention(pixels)
        whole = sum(resample_affinity(x.attention, x.grid, grid) for x in collected)
        torch.testing.assert_close(chunked, whole / len(collected), rtol=0, atol=1e-6)


def test_pnp_largest_map_is_the_vision_attention_formula(tmp_path):
    """PnP-OVSS at a 256 px VLM input (tiny BLIP: patch 8, 2 heads): the largest allocation is
    one vision attention map, ``vlm_attention_bytes``; the vision tower keeps no graph."""
    from tiny_blip import PATCH, save_tiny_blip

    from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings
    from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm

    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    vlm = load_vlm("blip_itm", str(save_tiny_blip(tmp_path)), "cpu")
    heads = vlm.model.config.vision_config.num_attention_heads
    settings = PnpSettings(
        image_size=256, layer=2, head=3, dropout_rounds=1, presence="all", refine="none"
    )
    pipeline = PnpOvss(clip, vlm, settings, templates="single")
    pipeline.set_classes(["cat", "dog"])
    measured = LargestTensor()
    with measured:
        pipeline.segment(np.zeros((48, 64, 3), np.uint8))
    assert measured.largest == vlm_attention_bytes(256, PATCH, heads), measured.where
