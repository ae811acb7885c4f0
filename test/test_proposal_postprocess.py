"""DeOP / two-stream outputs at the input size in bounded memory, equal to the all-at-once form.

``ProposalSegmenter.postprocess`` upsamples the per-label scores a chunk of labels at a time and
``TwoStream.crops`` one proposal mask at a time; the references below upsample everything at
once, as the code did before (MaskFormer semantic inference, then argmax over classes,
background where the background label wins, unlabeled below the threshold).
"""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.deop import SuperpixelClip, SuperpixelClipConfig
from ovss_ros.core.methods.deop.twostream import MASK_THRESHOLD, TwoStream, TwoStreamConfig

proposal_segmentation = importlib.import_module("ovss_ros.core.methods.deop.proposal_segmentation")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def reference(scores, classes, size, threshold, unlabeled):
    """All labels upsampled at once: (labels, confidence) as numpy arrays."""
    up = F.interpolate(scores[None].float(), size=size, mode="bilinear")[0]
    confidence, labels = up[:classes].max(dim=0)
    rejected = (up[classes] > confidence) | (confidence < threshold)
    return labels.masked_fill(rejected, unlabeled).numpy(), confidence.numpy()


CASES = {
    "3 classes + background words": (["person", "cat; kitty", "sky"], ("tree",), 0.0),
    "threshold": (["person", "cat; kitty", "sky"], (), 0.4),
    "300 classes (uint16)": ([f"thing {i}" for i in range(300)], ("wall",), 0.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("labels_per_chunk", [1, 7, None], ids=["1", "7", "all"])
def test_postprocess_in_chunks_equals_upsampling_all_at_once(
    clip, voc_rgb, monkeypatch, case, labels_per_chunk
):
    classes, background_words, threshold = case
    deop = SuperpixelClip(
        clip,
        SuperpixelClipConfig(
            short_side=96,
            templates="single",
            proposals=8,
            background_words=background_words,
            score_threshold=threshold,
        ),
    )
    deop.set_classes(classes)
    rgb = voc_rgb[1]
    size = rgb.shape[:2]
    with torch.inference_mode():
        scores = deop.scores(deop.prepare([rgb]))[0]
        unlabeled = 255 if len(classes) < 255 else 65535
        want_labels, want_confidence = reference(scores, len(classes), size, threshold, unlabeled)
        if labels_per_chunk is not None:
            elements = labels_per_chunk * size[0] * size[1]
            monkeypatch.setattr(proposal_segmentation, "POSTPROCESS_ELEMENTS", elements)
        got = deop.postprocess(scores, size)
    np.testing.assert_array_equal(got.labels, want_labels)
    # Interpolating fewer channels at once may take another vectorised kernel: 1 ulp apart.
    np.testing.assert_allclose(got.confidence, want_confidence, rtol=1e-6, atol=1e-7)
    assert got.labels.dtype == (np.uint8 if len(classes) < 255 else np.uint16)
    assert len(np.unique(got.labels)) > 1  # not a trivial map


def test_twostream_crops_one_mask_at_a_time_equal_all_masks_at_once(clip, voc_rgb):
    two = TwoStream(clip, TwoStreamConfig(short_side=96, templates="single", proposals=6))
    two.set_classes(["person", "cat", "sky"])
    rgb = voc_rgb[0]
    with torch.inference_mode():
        frames = two.prepare([rgb])
        masks, valid = frames.proposals.masks[0], frames.proposals.valid[0].clone()
        valid[1] = False  # an invalid proposal is skipped
        crops, slots = two.crops(rgb, masks, valid)
        # the former code: every mask upsampled to the image at once
        binary = F.interpolate(masks[None].float(), size=rgb.shape[:2], mode="bilinear")[0]
        binary = binary > MASK_THRESHOLD
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        want, want_slots = [], []
        for k in range(len(masks)):
            if not bool(valid[k]) or not bool(binary[k].any()):
                continue
            rows = binary[k].any(dim=1).nonzero()
            cols = binary[k].any(dim=0).nonzero()
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            keep = binary[k][box].float()
            crop = image[:, box[0], box[1]] * keep + (1 - keep) * two._mean[0]
            crop = F.interpolate(crop[None], size=(64, 64), mode="bicubic", align_corners=False)
            want.append((crop - two._mean) / two._std)
            want_slots.append(k)
    assert slots == want_slots and 1 not in slots and len(slots) >= 2
    torch.testing.assert_close(crops, torch.cat(want), rtol=0, atol=0)
