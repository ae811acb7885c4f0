"""postprocess reduces the query maps a chunk at a time; the result is the whole softmax's.

The reference below is the standard protocol written out at once (README, conventions), in the
order of NACLIP's ``predict``: every query map upsampled to the resized image, then to the input
size, PAMR there (guided by the resized input upsampled to the input size), ``softmax(logit_scale
* logits)`` over all queries, the max over each class's synonyms, SCLIP's area threshold, argmax
over classes, background where a background word's probability beats the best class, unlabeled
below the threshold. The engine must give the same labels and
(up to float rounding) the same confidence with chunks of 1, 2, 3 or all queries; a label may
differ only where the confidence is within float rounding of ``score_threshold`` (the CPU
kernel's confidence is within 1e-5 of the reference, not its bits; this photo has a row at
0.3000001 with a threshold of 0.3).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.pamr import pamr


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64, templates="single"
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(
        ["person", "tv; television; monitor", "dog; puppy", "cat | a small furry pet", "chair"]
    )
    return segmenter


def reference(segmenter, rgb, unlabeled=255):
    """The whole softmax at once: (labels, confidence) as numpy arrays."""
    config, size = segmenter.config, rgb.shape[:2]
    up = lambda x: F.interpolate(x[None].float(), size, mode="bilinear")[0]  # noqa: E731
    with torch.inference_mode():
        encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
        logits, scores = segmenter.method.head(encoded)
        jbu = config.dense.upsample == "jbu"
        logits = up(segmenter.method.to_image(logits, encoded, jbu and scores is None))
        if scores is not None:
            scores = up(segmenter.method.to_image(scores, encoded, jbu))
        if config.dense.pamr:
            guide = up(segmenter.method._full_resolution(encoded)[0])[None]
            if scores is None:
                logits = pamr(guide, logits[None])[0]
            else:
                scores = pamr(guide, scores[None])[0]
        probs = torch.softmax(config.dense.logit_scale * logits, dim=0)
        owner, classes = segmenter.method._query_owner, len(segmenter.classes)
        per_label = torch.zeros((classes + 1, *size))
        for query, label in enumerate(owner.tolist()):
            per_label[label] = torch.maximum(per_label[label], probs[query])
        if scores is None:
            confidence, labels = per_label[:classes].max(dim=0)
            background = per_label[classes] > confidence
            if config.dense.area_threshold:  # SCLIP's postprocess_result, background first
                area = torch.bincount(labels[~background], minlength=classes)
                keep = (area > config.dense.area_threshold * area.sum()).float()
                per_label[:classes] *= keep.view(-1, 1, 1)
                confidence, labels = per_label[:classes].max(dim=0)
                background = per_label[classes] > confidence
        elif config.refinement == "freecp":  # FreeCP's postprocess_result, background first
            labels, best = scores.argmax(dim=0), scores.amax(dim=0)
            background = 1 - best >= best if config.background_words else best <= 0
            confidence = per_label.gather(0, labels[None])[0]
        else:
            labels = scores.argmax(dim=0)
            background = labels == classes
            labels = labels.clamp(max=classes - 1)
            confidence = per_label.gather(0, labels[None])[0]
    rejected = background | (confidence < config.score_threshold)
    return labels.masked_fill(rejected, unlabeled).numpy(), confidence.numpy()


SETTINGS = {
    "whole": {},
    "background": {"background_words": ("sky", "wall", "floor")},
    "threshold": {"score_threshold": 0.3, "background_words": ("sky",)},
    "windows": {"dense.crop": 32, "dense.stride": 16, "background_words": ("sky",)},
    "jbu": {"dense.upsample": "jbu", "background_words": ("sky",)},
    "dense.pamr": {"dense.pamr": True, "dense.crop": 32, "dense.stride": 16},
    "dslo": {"refinement": "dslo", "background_words": ("sky", "wall")},
    "dslo+jbu+pamr": {"refinement": "dslo", "dense.upsample": "jbu", "dense.pamr": True},
    "freecp": {"refinement": "freecp", "background_words": ("sky",)},
    "area": {
        "dense.area_threshold": 0.1,
        "background_words": ("sky",),
        "dense.crop": 32,
        "dense.stride": 16,
    },
    "area+pamr": {"dense.area_threshold": 0.2, "dense.pamr": True},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("chunk", [1, 2, 3, None], ids=["1", "2", "3", "all"])
def test_chunked_postprocess_equals_the_whole_softmax(
    segmenter, voc_rgb, monkeypatch, settings, chunk
):
    rgb = voc_rgb[2]  # varied labels even from the tiny random model
    base = {name: segmenter.config.flat()[name] for name in settings}
    segmenter.reconfigure(**settings)
    try:
        want_labels, want_confidence = reference(segmenter, rgb)
        if chunk is not None:
            monkeypatch.setattr(segmenter.method, "_chunk", lambda encoded, size: chunk)
        seg = segmenter.segment(rgb)
    finally:
        segmenter.reconfigure(**base)
    differ = seg.labels != want_labels
    if settings.get("score_threshold"):  # confidence within rounding of the threshold decides
        at_threshold = np.isclose(want_confidence, settings["score_threshold"], rtol=1e-5, atol=0)
        differ &= ~at_threshold
    assert not differ.any()
    np.testing.assert_allclose(seg.confidence, want_confidence, rtol=1e-5, atol=1e-6)
    assert (seg.labels != 255).any() and len(np.unique(seg.labels)) > 1  # not a trivial map


def test_chunk_size_follows_the_largest_buffer(segmenter, voc_rgb):
    rgb = voc_rgb[0]
    encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
    pixels = rgb.shape[0] * rgb.shape[1]  # the input is the largest map here
    assert segmenter.method._chunk(encoded, rgb.shape[:2]) == (1 << 24) // pixels
    assert segmenter.method._chunk(encoded, (4096, 8192)) == 1  # never fewer than one map
    segmenter.reconfigure({"dense.crop": 32, "dense.stride": 16})
    try:  # windows: each window's maps are upsampled to the window size first
        encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
        windows = encoded.windows.shape[0] * 32 * 32
        assert windows > 8 * 8  # larger than a tiny input
        assert segmenter.method._chunk(encoded, (8, 8)) == (1 << 24) // windows
    finally:
        segmenter.reconfigure({"dense.crop": 0, "dense.stride": 0})
