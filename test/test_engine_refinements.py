"""DSLO, FreeCP, PAMR and JBU wired into the segmenter, after every last-block mode."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES, dense_forward
from ovss_ros.core.methods.dense.pamr import pamr
from ovss_ros.core.methods.dslo.dslo import dslo_scores

REFINEMENTS = [
    {"refinement": "dslo", "dslo.mode": "ot"},
    {"refinement": "dslo", "dslo.mode": "velocity", "dslo.affinity": "mean"},
    {"refinement": "freecp"},
    {"dense.pamr": True},
    {"dense.upsample": "jbu"},
    {"refinement": "dslo", "dense.upsample": "jbu", "dense.pamr": True},
]


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64, templates="single"
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "tv; television; monitor", "dog", "cat | a small furry pet"])
    return segmenter


@pytest.fixture()
def fresh(segmenter):
    base = segmenter.config.flat()
    yield segmenter
    segmenter.reconfigure(base)


@pytest.mark.parametrize("method", LAST_BLOCK_MODES)
@pytest.mark.parametrize("changes", REFINEMENTS, ids=lambda c: "+".join(map(str, c.values())))
def test_every_refinement_after_every_mode(fresh, voc_rgb, method, changes):
    fresh.reconfigure(method=method, **changes)
    rgb = voc_rgb[0]
    seg = fresh.segment(rgb)
    assert seg.labels.shape == rgb.shape[:2] and seg.labels.dtype == np.uint8
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 3}
    assert seg.confidence.dtype == np.float32 and np.isfinite(seg.confidence).all()
    assert seg.class_names == ["person", "tv", "dog", "cat"]


@pytest.mark.parametrize("changes", REFINEMENTS[:3], ids=["ot", "velocity", "freecp"])
def test_refinements_with_background_words_and_windows(fresh, voc_rgb, changes):
    fresh.reconfigure(
        background_words=("sky", "wall"), **{"dense.crop": 32, "dense.stride": 16}, **changes
    )
    seg = fresh.segment(voc_rgb[1])
    assert seg.labels.shape == voc_rgb[1].shape[:2]
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 3, 255}
    fresh.reconfigure(score_threshold=1.0)
    assert (fresh.segment(voc_rgb[1]).labels == 255).all()


@pytest.mark.parametrize("mode", ["ot", "velocity"])
@pytest.mark.parametrize("source", ["naclip", "keykey", "mean"])
def test_dslo_gets_its_affinity_and_decides_the_labels(fresh, voc_rgb, mode, source):
    """Wiring check: the engine's labels are the argmax of DSLO run by hand on the same inputs."""
    fresh.reconfigure(
        {"dslo.mode": mode, "dslo.affinity": source}, refinement="dslo", short_side=0
    )
    rgb = voc_rgb[2][:128, :192].copy()
    pixels = fresh.method.preprocess(rgb)
    dense = dense_forward(fresh.clip.model.visual, pixels, "naclip", affinity=source)
    logits = torch.einsum("nhwd,qd->nqhw", dense.features, fresh.method._text_embeddings)
    per_class = torch.stack(
        [logits[:, [0]].amax(1), logits[:, 1:4].amax(1), logits[:, 4], logits[:, 5]], dim=1
    )
    scores = dslo_scores(per_class, dense.affinity, mode=mode)
    want = F.interpolate(scores, size=rgb.shape[:2], mode="bilinear").argmax(1)[0].numpy()
    np.testing.assert_array_equal(fresh.segment(rgb).labels, want)


def test_pamr_refines_the_base_logits(fresh, voc_rgb):
    fresh.reconfigure({"dense.pamr": True}, short_side=0)
    rgb = voc_rgb[0][:128, :128].copy()
    pixels = fresh.method.preprocess(rgb)
    encoded = fresh.method.encode(pixels)
    logits = fresh.method.head(encoded)[0]
    up = F.interpolate(logits, size=(128, 128), mode="bilinear")
    refined = pamr(pixels, up)[0]
    probs = torch.softmax(40 * refined, 0)
    per_class = torch.stack([probs[0], probs[1:4].amax(0), probs[4], probs[5]])
    np.testing.assert_array_equal(fresh.segment(rgb).labels, per_class.argmax(0).numpy())


def test_descriptions_feed_the_crop_check(fresh):
    described = fresh.text.sentence_embeddings(["a small furry pet"])[0]
    torch.testing.assert_close(fresh.method._descriptions[3], described)
    torch.testing.assert_close(fresh.method._descriptions[0], fresh.method._class_text[0])


def test_refinement_settings_are_validated(fresh):
    for bad in [
        {"refinement": "crf"},
        {"dslo.mode": "fast"},
        {"dense.upsample": "nearest"},
        {"dslo.affinity": "sd3"},
        {"dslo.ipf_rounds": 0},
        {"freecp.redundancy": 2.0},
    ]:
        with pytest.raises(ValueError):
            fresh.reconfigure(**bad)
