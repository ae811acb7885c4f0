"""ovss-eval's per-method protocols are the official configs, and SCLIP's area threshold.

Each row below is read off the official repository (the file named in the comment): its
``Resize(scale=(2048, S))``, ``slide_crop`` / ``slide_stride``, ``prob_thd``, ``logit_scale``,
``area_thd`` and PAMR, with the segmentor's defaults where a config leaves a value out. The
tests run them through ovss-eval's own argument parsing into the EngineConfig it would use.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.cli.evaluate import engine_config, parse_args
from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES
from ovss_ros.evaluation.protocol import (
    DEFAULT_PROTOCOL,
    METHOD_PROTOCOLS,
    PROTOCOLS,
    load_vocabulary,
)

# (short side, crop, stride, prob_thd, logit_scale, area_thd, pamr)
NACLIP = {  # sinahmr/NACLIP configs/cfg_*.py; naclip.py: logit 40, 224/112, pamr_steps 10
    "voc21": (336, 0, 0, 0.1, 40, 0, True),  # slide_crop=0
    "context60": (336, 224, 112, 0.1, 40, 0, True),
    "coco_object": (336, 224, 112, 0.1, 40, 0, True),
    "voc20": (336, 0, 0, 0.0, 40, 0, True),  # slide_crop=0
    "context59": (336, 224, 112, 0.0, 40, 0, True),
    "coco_stuff": (336, 224, 112, 0.0, 40, 0, True),
    "cityscapes": (560, 224, 112, 0.0, 40, 0, True),
    "ade20k": (336, 224, 112, 0.0, 40, 0, True),
}
SCLIP = {  # wangf3014/SCLIP configs/cfg_*.py; clip_segmentor.py: logit 40, 224/112, no PAMR
    "voc21": (336, 224, 112, 0.1, 65, 0.1, False),  # logit_scale=65, area_thd=0.1
    "context60": (336, 224, 112, 0.1, 50, 0, False),
    "coco_object": (336, 224, 112, 0.1, 50, 0, False),
    "voc20": (336, 224, 112, 0.0, 40, 0, False),
    "context59": (336, 224, 112, 0.0, 40, 0, False),
    "coco_stuff": (448, 224, 112, 0.0, 40, 0, False),  # cfg_coco_stuff164k.py: (2048, 448)
    "cityscapes": (560, 224, 112, 0.0, 40, 0, False),
    "ade20k": (336, 224, 112, 0.0, 40, 0, False),
}
CLEARCLIP = {  # mc-lan/ClearCLIP configs/cfg_*.py; clearclip_segmentor.py: logit 50, 448/224
    "voc21": (448, 448, 224, 0.5, 50, 0, False),
    "context60": (448, 448, 224, 0.15, 50, 0, False),
    "coco_object": (448, 448, 224, 0.4, 50, 0, False),
    "voc20": (448, 448, 224, 0.0, 50, 0, False),
    "context59": (448, 448, 224, 0.0, 50, 0, False),
    "coco_stuff": (448, 448, 224, 0.0, 50, 0, False),
    "cityscapes": (448, 224, 224, 0.0, 50, 0, False),  # slide_crop=224, default stride 224
    "ade20k": (448, 448, 224, 0.0, 50, 0, False),
}
OFFICIAL = {"naclip": NACLIP, "sclip": SCLIP, "clearclip": CLEARCLIP}


def settings_of(config: EngineConfig) -> tuple:
    return (
        config.short_side,
        config.dense.crop,
        config.dense.stride,
        config.score_threshold,
        config.dense.logit_scale,
        config.dense.area_threshold,
        config.dense.pamr,
    )


@pytest.mark.parametrize("method", OFFICIAL)
@pytest.mark.parametrize("dataset", PROTOCOLS)
def test_each_method_defaults_to_its_own_protocol(tmp_path, method, dataset):
    args, _, protocol = parse_args([dataset, str(tmp_path), "--method", method])
    config = engine_config(args, ())
    config.validate()
    assert protocol.name == method
    assert settings_of(config) == OFFICIAL[method][dataset]
    assert (config.model, config.pretrained) == ("ViT-B-16", "openai")  # OpenAI's ViT-B/16
    assert config.dense.pos_interpolation == "official" and config.method == method


@pytest.mark.parametrize("protocol", ["sclip", "clearclip"])
def test_protocol_flag_picks_another_methods_protocol(tmp_path, protocol):
    args, _, chosen = parse_args(["voc21", str(tmp_path), "--protocol", protocol])
    config = engine_config(args, ())
    assert chosen.name == protocol and config.method == "naclip"
    assert settings_of(config) == OFFICIAL[protocol]["voc21"]
    args, _, _ = parse_args(
        ["voc21", str(tmp_path), "--protocol", protocol, "--dense-logit-scale", "7"]
    )
    assert engine_config(args, ()).dense.logit_scale == 7.0  # a flag overrides one setting


def test_methods_without_a_protocol_get_the_standard_one(tmp_path):
    for method, want in [("maskclip", "standard"), ("vanilla", "standard")]:
        assert parse_args(["voc21", str(tmp_path), "--method", method])[2].name == want
    args, _, protocol = parse_args(["voc21", str(tmp_path), "--method", "maskclip_reduced"])
    assert protocol.name == "clearclip"  # ClearCLIP's ablation is evaluated by its code
    args, _, _ = parse_args(["context60", str(tmp_path), "--method", "maskclip"])
    assert settings_of(engine_config(args, ())) == (336, 224, 112, 0.1, 40, 0, False)
    # every last-block method has a default, and DeOP its own (test_evaluation_splits.py)
    assert set(DEFAULT_PROTOCOL) == {*LAST_BLOCK_MODES, "deop"}


def test_unknown_protocol_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["voc21", str(tmp_path), "--protocol", "magic"])
    err = capsys.readouterr().err
    assert "--protocol: invalid choice: 'magic'" in err and "'naclip'" in err, err


def test_clearclip_class_names_are_its_own():
    """ClearCLIP's cls_voc21.txt: "background", "person", "tvmonitor"; cls_coco_object.txt:
    "background", "person"; the other data sets share NACLIP's and SCLIP's files."""
    clear = METHOD_PROTOCOLS["clearclip"]
    voc21 = PROTOCOLS["voc21"]
    vocabulary = load_vocabulary(voc21, builtin=clear.for_dataset(voc21).class_file(voc21))
    assert vocabulary.background_words == ("background",)
    assert vocabulary.classes[14] == "person" and vocabulary.classes[19] == "tvmonitor"
    coco = PROTOCOLS["coco_object"]
    vocabulary = load_vocabulary(coco, builtin=clear.for_dataset(coco).class_file(coco))
    assert vocabulary.background_words == ("background",) and vocabulary.classes[0] == "person"
    assert clear.for_dataset(PROTOCOLS["ade20k"]).class_file(PROTOCOLS["ade20k"]) == "ade20k.txt"


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64, templates="single"
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "tv; monitor", "dog", "cat", "chair"])
    return segmenter


def test_area_threshold_moves_small_classes_to_the_next_best(segmenter, voc_rgb):
    """SCLIP's area_thd: a class labelling at most the threshold's share of the labelled
    pixels loses them to the next best class; the larger classes keep theirs."""
    rgb = voc_rgb[2]
    before = segmenter.segment(rgb).labels
    classes, counts = np.unique(before, return_counts=True)
    share = dict(zip(classes.tolist(), (counts / counts.sum()).tolist(), strict=True))
    threshold = 0.1
    small = {c for c, s in share.items() if s <= threshold}
    assert small and len(small) < len(share)  # the image has both kinds
    segmenter.reconfigure({"dense.area_threshold": threshold})
    try:
        after = segmenter.segment(rgb).labels
    finally:
        segmenter.reconfigure({"dense.area_threshold": 0.0})
    assert not small & set(np.unique(after).tolist())
    large = ~np.isin(before, list(small))
    np.testing.assert_array_equal(after[large], before[large])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dense.area_threshold": 1.5}, "dense.area_threshold must be in"),
        ({"dense.area_threshold": -0.1}, "dense.area_threshold must be in"),
        ({"dense.area_threshold": 0.1, "refinement": "dslo"}, "dense.area_threshold applies"),
        ({"dense.pos_interpolation": "nearest"}, "unknown dense.pos_interpolation"),
        ({"method": "maskclip_full"}, "unknown method"),
    ],
)
def test_new_settings_are_validated(segmenter, changes, message):
    before = segmenter.config
    with pytest.raises(ValueError, match=message):
        segmenter.reconfigure(**changes)
    assert segmenter.config == before
