"""pnp_ovss, deop, twostream and superpixel_clip through the engine's one entry point (issues 9,
10 and 21).

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
from ovss_ros.core.method_pipelines import proposal_config
from ovss_ros.core.methods.deop.checkpoint import CheckpointError, save_checkpoint
from ovss_ros.core.methods.deop.deop import Deop, DeopConfig, SuperpixelClip, SuperpixelClipConfig
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.settings import SUPERPIXEL_CLIP_RESIDUAL
from ovss_ros.core.methods.deop.twostream import TwoStream, TwoStreamConfig
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings

CLASSES = ["person", "dog; puppy", "tv"]
# What the tiny BLIP allows (3 text layers, 4 heads, patch 8 at 32 px).
PNP = {"pnp.image_size": IMAGE_SIZE, "pnp.layer": 2, "pnp.head": 3, "pnp.dropout_patches": 2}


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
        "pnp.vlm_pretrained": str(blip),
        "deop.proposals": 12,
        **PNP,
    }
    return EngineConfig.from_flat(base | changes)


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
    assert engine.pnp == PnpSettings()
    # what DeOP and two-stream run with by default is what they default to themselves
    assert proposal_config(engine, "deop") == DeopConfig()
    assert proposal_config(engine, "twostream") == TwoStreamConfig()
    assert proposal_config(engine, "superpixel_clip") == SuperpixelClipConfig()
    assert SuperpixelClipConfig().severance_residual == SUPERPIXEL_CLIP_RESIDUAL == 0.2
    # and every field of theirs comes from the engine's settings (none is left at its own)
    changed = EngineConfig.from_flat(
        {
            "deop.proposals": 7,
            "deop.logit_scale": 3.0,
            "deop.mask_cells": 2,
            "short_side": 96,
            "deop.superpixel_compactness": 2.0,
            "deop.cluster_iterations": 3,
            "deop.proposal_source": "clusters",
            "deop.pooling": "mean",
            "deop.severance_residual": 0.5,
            "superpixel_clip.severance_residual": 0.7,
            "twostream.crop_batch": 5,
            "twostream.seen_classes": ("cat",),
            "max_long_side": 512,
            "templates": "single",
            "background_words": ("sky",),
            "score_threshold": 0.5,
        }
    )
    for method, kind in (
        ("deop", DeopConfig),
        ("twostream", TwoStreamConfig),
        ("superpixel_clip", SuperpixelClipConfig),
    ):
        run = proposal_config(changed, method)
        for field in fields(kind):
            assert getattr(run, field.name) != getattr(kind(), field.name), (method, field.name)
    # each runs its own severance residual
    assert proposal_config(changed, "deop").severance_residual == 0.5
    assert proposal_config(changed, "superpixel_clip").severance_residual == 0.7


def test_pnp_ovss_through_the_dispatch_equals_pnp_ovss(blip, rgb):
    segmenter = make(
        blip,
        method="pnp_ovss",
        **{"pnp.presence": "all", "pnp.refine": "pamr"},
    )
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


@pytest.mark.parametrize("method", ["superpixel_clip", "twostream", "deop"])
def test_proposal_methods_through_the_dispatch_equal_their_class(blip, rgb, method, tmp_path):
    checkpoint = {}
    if method == "deop":  # DeOP needs its trained modules: a checkpoint of this tiny CLIP
        torch.manual_seed(0)  # the CLIP ``make`` loads
        clip = load_clip(str(TINY_VIT), "none", "cpu")
        modules = DeopModules.create(int(clip.model.visual.output_dim), decoder={"heads": 4})
        path = save_checkpoint(tmp_path / "deop.pt", modules, clip, {})
        checkpoint = {"deop.checkpoint": str(path)}
    segmenter = make(
        blip,
        method=method,
        **checkpoint,
        **{"deop.proposal_source": "clusters", "deop.mask_cells": 2, "deop.logit_scale": 50.0},
        score_threshold=0.2,
        background_words=("sky",),
    )
    kind, settings_type = {
        "superpixel_clip": (SuperpixelClip, SuperpixelClipConfig),
        "twostream": (TwoStream, TwoStreamConfig),
        "deop": (Deop, DeopConfig),
    }[method]
    settings = settings_type(
        proposals=12,
        proposal_source="clusters",
        logit_scale=50.0,
        mask_cells=2,
        short_side=64,
        templates="single",
        background_words=("sky",),
        score_threshold=0.2,
    )
    if checkpoint:
        direct = kind(segmenter.clip, settings, checkpoint=checkpoint["deop.checkpoint"])
        assert direct.pooling() == "cal" and direct.settings.severance_residual == 1.0
    else:
        direct = kind(segmenter.clip, settings)
    direct.set_classes(CLASSES)
    assert_same(segmenter.segment(rgb), direct.segment(rgb))
    assert segmenter.batch_groups([rgb, rgb, rgb[:50]]) == [[0, 1], [2]]


def test_switching_to_each_method_and_back_gives_naclips_output_again(blip, rgb):
    segmenter = make(blip)
    naclip = segmenter.segment(rgb)
    for method in ("pnp_ovss", "superpixel_clip", "twostream"):
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
        ({"pnp.layer": 0}, "pnp.layer must be in [1, 1000], got 0"),
        ({"pnp.presence": "gpt"}, "unknown pnp.presence 'gpt'"),
        ({"deop.pooling": "max"}, "unknown deop.pooling 'max'"),
        ({"deop.logit_scale": 0.0}, "deop.logit_scale must be in (0, 1000], got 0.0"),
        ({"twostream.crop_batch": 0}, "twostream.crop_batch must be in [1, 443], got 0"),
        ({"method": "pnp_ovss", "dense.pamr": True}, "pamr applies to the dense methods"),
        ({"method": "deop", "refinement": "dslo"}, "refinement applies to the dense methods"),
        ({"method": "pnp_ovss", "background_words": ["sky"]}, "set background_words to []"),
        ({"method": "deop"}, "method deop needs its proposal network and deop.checkpoint is "),
        ({"method": "deop", "deop.checkpoint": " "}, "or use method superpixel_clip for the "),
        (
            {"method": "superpixel_clip", "deop.pooling": "cal"},
            "deop.pooling cal needs a trained CAL decoder, and method superpixel_clip is",
        ),
        (
            {"method": "superpixel_clip", "deop.proposal_source": "learned"},
            "deop.proposal_source learned needs a trained proposal head, and method superpixel",
        ),
        (
            {"method": "twostream", "deop.proposal_source": "learned"},
            "deop.proposal_source learned needs a deop.checkpoint",
        ),
        ({"method": "deop", "deop.checkpoint": "/nonexistent/deop.pt"}, "not found"),
        ({"pnp.vlm_pretrained": "other"}, "need a new Segmenter"),
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
    with pytest.raises(ValueError, match=r"pnp.layer 9 > the VLM's 3 text layers"):
        segmenter.reconfigure({"pnp.layer": 9}, method="pnp_ovss")
    serving(segmenter, rgb, before, "naclip")
    # A checkpoint of another CLIP.
    other = load_clip(str(TINY_VIT_B32), "none", "cpu")
    modules = DeopModules.create(int(other.model.visual.output_dim), decoder={"heads": 4})
    path = save_checkpoint(tmp_path / "b32.pt", modules, other, asdict(DeopConfig()))
    with pytest.raises(CheckpointError, match="tiny-vit-b32"):
        segmenter.reconfigure({"deop.checkpoint": str(path)}, method="deop")
    serving(segmenter, rgb, before, "naclip")
    # A corrupt one.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        segmenter.reconfigure({"deop.checkpoint": str(corrupt)}, method="twostream")
    serving(segmenter, rgb, before, "naclip")


def test_an_unavailable_vlm_is_one_clear_error(blip, rgb):
    message = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set .*: set pnp.vlm_pretr"
    with pytest.raises(ModelLoadError, match=message):
        make(blip, method="pnp_ovss", **{"pnp.vlm_pretrained": "Salesforce/blip-itm-base-coco"})
    with pytest.raises(ModelLoadError, match="not found; set pnp.vlm_pretrained"):
        make(blip, method="pnp_ovss", **{"pnp.vlm_pretrained": str(blip / "missing")})


def test_refusals_while_on_a_pipeline_keep_it(blip, rgb, tmp_path):
    segmenter = make(blip, method="pnp_ovss")
    pipeline, before = segmenter.pipeline, segmenter.segment(rgb)
    with pytest.raises(ValueError, match=f"pnp.head 9 > the VLM's {TEXT_HEADS} heads"):
        segmenter.check_config(
            config(blip, method="pnp_ovss", **{"pnp.head": 9})
        )  # the node's check
    with pytest.raises(ValueError, match="pnp.head 9"):
        segmenter.reconfigure({"pnp.head": 9})
    with pytest.raises(VocabularyError, match="tokens, more than the VLM's 64"):
        segmenter.set_classes([f"dog{i}" for i in range(70)])
    assert segmenter.pipeline is pipeline and segmenter.config.pnp.head == 3
    serving(segmenter, rgb, before, "pnp_ovss")
    # DeOP: a checkpoint with a proposal head of another mask grid.
    segmenter = make(blip, method="superpixel_clip")
    before = segmenter.segment(rgb)
    visual = segmenter.clip.model.visual
    modules = DeopModules.create(
        int(visual.output_dim),
        decoder={"heads": 4},
        proposal_head={"width": 64, "queries": 12, "dim": 16, "heads": 4, "cells": 2},
    )
    path = save_checkpoint(tmp_path / "deop.pt", modules, segmenter.clip, {})
    with pytest.raises(ValueError, match="set deop.mask_cells to 2"):
        segmenter.reconfigure({"deop.checkpoint": str(path)}, method="deop")
    serving(segmenter, rgb, before, "superpixel_clip")
    segmenter.reconfigure({"deop.checkpoint": str(path), "deop.mask_cells": 2}, method="deop")
    notice, warn = segmenter.method_notice()
    assert not warn and "deop with checkpoint" in notice and "learned proposals" in notice


def test_deop_without_a_checkpoint_is_refused_and_superpixel_clip_says_what_it_is(blip, caplog):
    with pytest.raises(ValueError, match="method deop needs its proposal network") as error:
        make(blip, method="deop")
    assert "use method superpixel_clip for the training-free mode" in str(error.value)
    with caplog.at_level(logging.INFO):
        segmenter = make(blip, method="superpixel_clip")
    assert "DeOP without a checkpoint" not in caplog.text  # no longer DeOP's warning
    notice, warn = segmenter.method_notice()
    assert not warn
    assert notice == (
        "superpixel_clip (training-free): superpixels proposals, severed last block "
        "(residual 0.2), mean pooling"
    )
    # what it runs is DeOP's class without a checkpoint, at its own residual
    core = segmenter.pipeline.core
    assert isinstance(core, SuperpixelClip) and core.modules is None and core.checkpoint is None
    assert core.settings.severance_residual == 0.2
    segmenter.reconfigure(
        {"superpixel_clip.severance_residual": 1.0, "deop.severance_residual": 0.3}
    )
    assert segmenter.pipeline.core.settings.severance_residual == 1.0
    assert make(blip).method_notice() == ("naclip", False)


@pytest.mark.parametrize("method", ["pnp_ovss", "superpixel_clip"])
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


@pytest.mark.parametrize("method", ["deop", "twostream"])
def test_the_release_file_runs_the_published_methods_through_the_dispatch(
    blip, rgb, method, tmp_path
):
    """deop.checkpoint = the DeOP release's file: deop is PublishedDeop, twostream
    PublishedTwoStream (on the same proposals), with background words and a threshold; a switch
    between them reuses the loaded release."""
    from test_deop_released import released_file

    from ovss_ros.core.methods.deop.published import PublishedDeop
    from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream

    torch.manual_seed(0)  # the CLIP ``make`` loads
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    path = tmp_path / "model_final.pth"
    released_file(path, clip.model)
    common = {"background_words": ("sky",), "score_threshold": 0.2}
    segmenter = make(
        blip, method=method, **{"deop.checkpoint": str(path), "deop.proposals": 100}, **common
    )
    kind, settings_type = {
        "deop": (PublishedDeop, DeopConfig),
        "twostream": (PublishedTwoStream, TwoStreamConfig),
    }[method]
    core = segmenter.pipeline.core
    assert isinstance(core, kind)
    settings = settings_type(short_side=64, templates="single", **common)
    direct = kind(segmenter.clip, settings, checkpoint=str(path))
    direct.set_classes(CLASSES)
    assert_same(segmenter.segment(rgb), direct.segment(rgb))
    other = "twostream" if method == "deop" else "deop"
    segmenter.reconfigure({}, method=other)
    assert segmenter.pipeline.core.released is core.released  # not loaded again


def test_a_switch_to_the_release_reads_its_file_once(blip, tmp_path, monkeypatch):
    """superpixel_clip -> deop with the release's file in deop.checkpoint: the file is read
    once (it was read to tell it from an ovss_ros checkpoint, and again to load it)."""
    from test_deop_released import released_file

    from ovss_ros.core.methods.deop import released_checkpoint
    from ovss_ros.core.methods.deop.published import PublishedDeop

    torch.manual_seed(0)  # the CLIP ``make`` loads
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    path = tmp_path / "model_final.pth"
    released_file(path, clip.model)
    segmenter = make(blip, method="superpixel_clip")
    reads = []
    original = released_checkpoint.read_released

    def counted(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(released_checkpoint, "read_released", counted)
    changes = {"deop.checkpoint": str(path), "deop.proposals": 100}
    segmenter.reconfigure({}, method="deop", **changes)
    assert isinstance(segmenter.pipeline.core, PublishedDeop)
    assert reads == [str(path)]
