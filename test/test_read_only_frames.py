"""Every method segments a read-only frame (``np.asarray`` of a PIL image, a ROS message's
buffer) exactly as a writable copy of it, and leaves it as it was.

The released PnP-OVSS copies its input before the dense CRF (``dense_crf`` raised "buffer source
array is read-only" on one); this is the kind for every ``Segmenter`` method and refinement,
with the tiny random CLIP and BLIP and a DeOP checkpoint of the tiny CLIP.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths
from PIL import Image
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.config import METHODS
from ovss_ros.core.methods.deop.checkpoint import save_checkpoint
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.pnp_ovss.settings import crf_available

CLASSES = ["person", "dog", "tv"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    modules = DeopModules.create(int(clip.model.visual.output_dim), decoder={"heads": 4})
    return {
        "pnp.vlm_pretrained": str(save_tiny_blip(folder / "blip")),
        "deop.checkpoint": str(save_checkpoint(folder / "deop.pt", modules, clip, {})),
    }


@pytest.fixture(scope="module")
def frame():
    rgb = np.asarray(Image.open(voc_image_paths()[0]).convert("RGB"))[:96, :128]
    assert not rgb.flags.writeable  # as PIL gives it
    return rgb


CASES = [{"method": m} for m in METHODS] + [
    {"method": "naclip", "refinement": "dslo"},
    {"method": "sclip", "refinement": "freecp"},
    {"method": "pnp_ovss", "pnp.refine": "pamr"},
]
if crf_available():
    CASES.append({"method": "pnp_ovss", "pnp.refine": "crf"})


@pytest.mark.parametrize("case", CASES, ids=lambda case: "+".join(map(str, case.values())))
def test_a_read_only_frame_segments_as_a_writable_copy(assets, frame, case):
    flat = {
        "model": str(TINY_VIT), "pretrained": "none", "device": "cpu", "short_side": 64,
        "templates": "single", "pnp.image_size": IMAGE_SIZE, "pnp.layer": 2, "pnp.head": 3,
        "pnp.dropout_patches": 2, "pnp.dropout_rounds": 2, "deop.proposals": 12,
        "deop.proposal_source": "clusters", **case,
    }  # fmt: skip
    if case["method"] == "deop":
        flat["deop.checkpoint"] = assets["deop.checkpoint"]
    if case["method"] == "pnp_ovss":
        flat["pnp.vlm_pretrained"] = assets["pnp.vlm_pretrained"]
    torch.manual_seed(0)
    segmenter = Segmenter(EngineConfig.from_flat(flat))
    segmenter.set_classes(CLASSES)
    before = frame.copy()
    with warnings.catch_warnings():  # torch warns once per process that it may not write there
        warnings.filterwarnings("ignore", message=".*not writable.*")
        from_read_only = segmenter.segment(frame)
    np.testing.assert_array_equal(frame, before)  # torch may write where numpy may not
    from_copy = segmenter.segment(before)
    np.testing.assert_array_equal(from_read_only.labels, from_copy.labels)
    np.testing.assert_allclose(from_read_only.confidence, from_copy.confidence, atol=1e-6)
    assert not frame.flags.writeable  # not made writable behind the caller's back
