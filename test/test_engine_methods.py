"""pnp_ovss, deop and twostream through the engine's one entry point (issues 9 and 10).

``Segmenter(EngineConfig(method=...))`` and ``reconfigure(method=...)`` build the method's
pipeline (ovss_ros.core.method_pipelines) from the engine's CLIP: real open_clip tiny random
towers (test/data), a tiny random BLIP ITM saved with ``save_pretrained`` (test/tiny_blip.py) and
loaded through the real path, DeOP checkpoints written by ``save_checkpoint``. Each method's
output through the dispatch equals the method's own class built here from the same models and
the settings written out by hand (so the field mapping is checked too). Every refusal leaves the
method in force serving exactly as before.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_B32
from tiny_blip import IMAGE_SIZE, TEXT_HEADS, TEXT_LAYERS, save_tiny_blip

from ovss_ros.core import EngineConfig, ModelLoadError, Segmenter, Stopped, VocabularyError
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.config import DEOP_FIELDS, PNP_FIELDS, TWOSTREAM_FIELDS
from ovss_ros.core.methods.deop.checkpoint import CheckpointError, save_checkpoint
from ovss_ros.core.methods.deop.deop import Deop, DeopConfig
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.twostream import TwoStream, TwoStreamConfig
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings

CLASSES = ["person", "dog; puppy", "tv"]
# What the tiny BLIP allows (3 text layers, 4 heads, patch 8 at 32 px).
PNP = {"pnp_image_size": IMAGE_SIZE, "pnp_layer": 2, "pnp_head": 3, "pnp_dropout_patches": 2}


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def rgb(voc_rgb):
    return np.ascontiguousarray(voc_rgb[0][:96, :128])


def config(blip, **changes) -> EngineConfig:
    base = {
        "model": str(TINY_VIT),
        "pretrained": "none",
        "device": "cpu",
        "short_side": 64,
        "templates": "single",
        "vlm_pretrained": str(blip),
        "proposals": 12,
        **PNP,
    }
    return EngineConfig(**(base | changes))


def make(blip, stop=None, **changes) -> Segmenter:
    torch.manual_seed(0)  # the same random CLIP every time
    segmenter = Segmenter(config(blip, **changes), stop)
    segmenter.set_classes(CLASSES)
    return segmenter


def assert_same(a, b):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-5, atol=1e-6)
    assert a.class_names == b.class_names


def test_config_defaults_are_the_methods_own():
    engine = EngineConfig()
    for fields_map, settings in (
        (PNP_FIELDS, PnpSettings()),
        (DEOP_FIELDS, DeopConfig()),
        (TWOSTREAM_FIELDS, TwoStreamConfig()),
    ):
        own = {f.name for f in fields(settings)}
        assert set(fields_map.values()) == own  # every setting of the method is a field
        shared = {"short_side", "max_long_side", "templates", "background_words"}
        shared |= {"score_threshold"}
        for name, setting in fields_map.items():
            if name not in shared:  # the engine's own defaults for those
                assert getattr(engine, name) == getattr(settings, setting), name


def test_pnp_ovss_through_the_dispatch_equals_pnp_ovss(blip, rgb):
    segmenter = make(blip, method="pnp_ovss", pnp_presence="all", pnp_refine="pamr")
    pipeline = segmenter.pipeline
    assert pipeline.method == "pnp_ovss" and pipeline.vlm.num_layers == TEXT_LAYERS
    settings = PnpSettings(
        image_size=IMAGE_SIZE, layer=2, head=3, dropout_patches=2, presence="all", refine="pamr"
    )
    direct = PnpOvss(segmenter.clip, pipeline.vlm, settings, templates="single")
    direct.set_classes(CLASSES)
    expected = direct.segment(rgb)
    assert_same(segmenter.segment(rgb), expected)
    both = segmenter.segment_many([rgb, rgb[:64]])
    assert_same(both[0], expected)
    assert segmenter.batch_groups([rgb, rgb]) == [[0], [1]]  # one gradient pass per image
    # score_threshold on PnP-OVSS's own confidence: below it, unlabeled
    cut = float(np.median(expected.confidence))
    segmenter.reconfigure(score_threshold=cut)
    assert segmenter.pipeline is pipeline  # no rebuild for the threshold
    thresholded = segmenter.segment(rgb)
    low = expected.confidence < cut
    assert low.any() and (thresholded.labels[low] == 255).all()
    np.testing.assert_array_equal(thresholded.labels[~low], expected.labels[~low])


@pytest.mark.parametrize("method", ["deop", "twostream"])
def test_proposal_methods_through_the_dispatch_equal_their_class(blip, rgb, method):
    segmenter = make(
        blip,
        method=method,
        proposal_source="clusters",
        mask_cells=2,
        proposal_logit_scale=50.0,
        score_threshold=0.2,
        background_words=("sky",),
    )
    kind, settings_type = {
        "deop": (Deop, DeopConfig),
        "twostream": (TwoStream, TwoStreamConfig),
    }[method]
    settings = settings_type(
        proposals=12,
        proposal_source="clusters",
        short_side=64,
        templates="single",
        background_words=("sky",),
        score_threshold=0.2,
        logit_scale=50.0,
        mask_cells=2,
    )
    direct = kind(segmenter.clip, settings)
    direct.set_classes(CLASSES)
    assert_same(segmenter.segment(rgb), direct.segment(rgb))
    assert segmenter.batch_groups([rgb, rgb, rgb[:50]]) == [[0, 1], [2]]


def test_switching_to_each_method_and_back_gives_naclips_output_again(blip, rgb):
    segmenter = make(blip)
    naclip = segmenter.segment(rgb)
    for method in ("pnp_ovss", "deop", "twostream"):
        segmenter.reconfigure(method=method)
        assert segmenter.pipeline.method == method
        assert segmenter.segment(rgb).class_names == [c.split(";")[0] for c in CLASSES]
    segmenter.set_classes(["cat", *CLASSES])  # while on twostream: its vocabulary
    assert segmenter.pipeline.core.classes == segmenter.classes
    segmenter.reconfigure(method="naclip")
    assert segmenter.pipeline is None  # the pipeline (and the VLM) are let go
    segmenter.set_classes(CLASSES)
    assert_same(segmenter.segment(rgb), naclip)


def serving(segmenter, rgb, expected, method):
    assert segmenter.config.method == method
    assert_same(segmenter.segment(rgb), expected)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"pnp_layer": 0}, "pnp_layer must be in [1, 1000], got 0"),
        ({"pnp_presence": "gpt"}, "unknown pnp_presence 'gpt'"),
        ({"deop_pooling": "max"}, "unknown deop_pooling 'max'"),
        ({"proposal_logit_scale": 0.0}, "proposal_logit_scale must be a finite number > 0"),
        ({"twostream_crop_batch": 0}, "twostream_crop_batch must be an integer in [1, 443]"),
        ({"method": "pnp_ovss", "pamr": True}, "pamr applies to the dense methods"),
        ({"method": "deop", "refinement": "dslo"}, "refinement applies to the dense methods"),
        ({"method": "pnp_ovss", "background_words": ["sky"]}, "set background_words to []"),
        ({"method": "deop", "deop_pooling": "cal"}, "deop_pooling cal needs a deop_checkpoint"),
        ({"method": "deop", "proposal_source": "learned"}, "proposal_source learned needs"),
        ({"method": "deop", "deop_checkpoint": "/nonexistent/deop.pt"}, "not found"),
        ({"vlm_pretrained": "other"}, "need a new Segmenter"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_settings_are_refused_before_anything_changes(blip, rgb, change, reason):
    segmenter = make(blip)
    before = segmenter.segment(rgb)
    with pytest.raises(ValueError) as error:
        segmenter.reconfigure(**change)
    assert reason in str(error.value)
    assert segmenter.pipeline is None
    serving(segmenter, rgb, before, "naclip")
    assert segmenter.config == config(blip)


def test_a_failed_load_keeps_the_old_method(blip, rgb, tmp_path):
    segmenter = make(blip)
    before = segmenter.segment(rgb)
    # The loaded VLM has 3 text layers: found out only once it is loaded.
    with pytest.raises(ValueError, match=r"pnp_layer 9 > the VLM's 3 text layers"):
        segmenter.reconfigure(method="pnp_ovss", pnp_layer=9)
    serving(segmenter, rgb, before, "naclip")
    # A checkpoint of another CLIP.
    other = load_clip(str(TINY_VIT_B32), "none", "cpu")
    modules = DeopModules.create(int(other.model.visual.output_dim), decoder={"heads": 4})
    path = save_checkpoint(tmp_path / "b32.pt", modules, other, asdict(DeopConfig()))
    with pytest.raises(CheckpointError, match="tiny-vit-b32"):
        segmenter.reconfigure(method="deop", deop_checkpoint=str(path))
    serving(segmenter, rgb, before, "naclip")
    # A corrupt one.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        segmenter.reconfigure(method="twostream", deop_checkpoint=str(corrupt))
    serving(segmenter, rgb, before, "naclip")


def test_an_unavailable_vlm_is_one_clear_error(blip, rgb):
    message = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set .*: set vlm_pretr"
    with pytest.raises(ModelLoadError, match=message):
        make(blip, method="pnp_ovss", vlm_pretrained="Salesforce/blip-itm-base-coco")
    with pytest.raises(ModelLoadError, match="not found; set vlm_pretrained"):
        make(blip, method="pnp_ovss", vlm_pretrained=str(blip / "missing"))


def test_refusals_while_on_a_pipeline_keep_it(blip, rgb, tmp_path):
    segmenter = make(blip, method="pnp_ovss")
    pipeline, before = segmenter.pipeline, segmenter.segment(rgb)
    with pytest.raises(ValueError, match=f"pnp_head 9 > the VLM's {TEXT_HEADS} heads"):
        segmenter.check_config(config(blip, method="pnp_ovss", pnp_head=9))  # the node's check
    with pytest.raises(ValueError, match="pnp_head 9"):
        segmenter.reconfigure(pnp_head=9)
    with pytest.raises(VocabularyError, match="tokens, more than the VLM's 64"):
        segmenter.set_classes([f"dog{i}" for i in range(70)])
    assert segmenter.pipeline is pipeline and segmenter.config.pnp_head == 3
    serving(segmenter, rgb, before, "pnp_ovss")
    # DeOP: a checkpoint with a proposal head of another mask grid.
    segmenter = make(blip, method="deop")
    before = segmenter.segment(rgb)
    visual = segmenter.clip.model.visual
    modules = DeopModules.create(
        int(visual.output_dim),
        decoder={"heads": 4},
        proposal_head={"width": 64, "queries": 12, "dim": 16, "heads": 4, "cells": 2},
    )
    path = save_checkpoint(tmp_path / "deop.pt", modules, segmenter.clip, {})
    with pytest.raises(ValueError, match="set mask_cells to 2"):
        segmenter.reconfigure(deop_checkpoint=str(path))
    serving(segmenter, rgb, before, "deop")
    segmenter.reconfigure(deop_checkpoint=str(path), mask_cells=2)
    notice, warn = segmenter.method_notice()
    assert not warn and "deop with checkpoint" in notice and "learned proposals" in notice


def test_deop_without_a_checkpoint_says_so(blip, caplog):
    with caplog.at_level(logging.WARNING):
        segmenter = make(blip, method="deop")
    assert "DeOP without a checkpoint" in caplog.text
    notice, warn = segmenter.method_notice()
    assert warn and "deop without a checkpoint: training-free superpixels proposals" in notice
    assert make(blip).method_notice() == ("naclip", False)


@pytest.mark.parametrize("method", ["pnp_ovss", "deop"])
def test_the_stop_event_ends_segmenting_and_switching(blip, rgb, method):
    stop = threading.Event()
    segmenter = make(blip, stop, method=method)
    before = segmenter.segment(rgb)
    stop.set()
    with pytest.raises(Stopped):
        segmenter.segment(rgb)
    with pytest.raises(Stopped):  # new texts to encode: the shared encoder stops
        segmenter.set_classes(["cat", "horse"])
    with pytest.raises(Stopped):
        segmenter.reconfigure(templates="a {} in a room")
    stop.clear()
    assert segmenter.classes[0].name == "person" and segmenter.config.templates == "single"
    serving(segmenter, rgb, before, method)


def test_pnp_ovss_stops_between_dropout_rounds(blip, rgb):
    stop = threading.Event()
    segmenter = make(blip, stop, method="pnp_ovss")
    core = segmenter.pipeline.core
    rounds = []
    original = core.token_gradcam

    def gradcam(*args):
        rounds.append(1)
        stop.set()  # set during the first round: the second does not start
        return original(*args)

    core.token_gradcam = gradcam
    with pytest.raises(Stopped, match="dropout round 2"):
        segmenter.segment(rgb)
    assert len(rounds) == 1
