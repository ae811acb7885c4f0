"""DSLO's paper configuration and the sd2 affinity in every command-line tool.

ovss-segment, ovss-bag and ovss-bench read ``config/dslo_paper.yaml`` with ``--params-file``
(flags given override it); ``ovss-eval --protocol dslo`` uses the same configuration
(``protocol.DSLO_PAPER``) on a VOC-layout folder the tests write from the real samples. The CLIP
model and the Stable Diffusion pipeline are tiny random ones (real open_clip / diffusers
classes, the SD pipeline written with ``save_pretrained``).
"""

import json
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths
from test_cli_bag import raw_sqlite3_bag, read_bag  # noqa: F401 (a fixture)
from test_evaluation_readers import make_voc_layout
from test_node_dslo_sd2 import PRESET
from tiny_diffusion import save_tiny_pipeline

from ovss_ros.cli import bag, bench, evaluate, segment
from ovss_ros.cli.engine_args import config_from_args, params_file_defaults, params_file_values
from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.evaluation.protocol import DSLO_PAPER

MISSING = "ovss-test/not-cached-sd2"
PAPER = {
    "method": "vanilla",
    "refinement": "dslo",
    "dslo.affinity": "sd2",
    "dense.upsample": "jbu",
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


def tiny(pipeline) -> list[str]:
    """Overrides of the preset for what is not reachable here: weights of both models."""
    return ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"] + [
        "--dslo-sd-model",
        str(pipeline),
        "--dslo-sd-size",
        "64",
    ]


def engine_settings(config: EngineConfig) -> dict:
    values = config.flat()
    return {name: values[name] for name in PAPER}


def test_params_file_gives_the_flag_defaults_and_flags_override(pipeline):
    args = segment.parse_args(["x.jpg", "--classes", "cat", "--params-file", str(PRESET)])
    config = config_from_args(args)
    assert engine_settings(config) == PAPER
    assert (config.model, config.pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert config.dslo.sd.model == DSLO_PAPER["dslo.sd.model"]
    args = segment.parse_args(
        ["x.jpg", "--classes", "cat", "--params-file", str(PRESET), "--dslo-affinity", "keykey"]
        + ["--dslo-sd-timestep", "250", "--no-dslo-sd-noise", "--dslo-velocity-tau", "0.5"]
    )
    config = config_from_args(args)
    got = (config.dslo.affinity, config.dslo.sd.timestep, config.dslo.velocity_tau)
    assert got == ("keykey", 250, 0.5)
    assert config.method == "vanilla"  # still the file's


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            "/**:\n  ros__parameters:\n    dslo:\n      sd: {modle: x}\n",
            "unknown parameter 'dslo.sd.modle'",
        ),
        ("dslo: {sd: {timestep: high}}\n", "dslo.sd.timestep must be an integer, got 'high'"),
        (
            "/**:\n  ros__parameters:\n    dslo.sd.noise: 1\n",
            "dslo.sd.noise must be true or false",
        ),
        ("dslo: {sd: {size: 2048}}\n", "dslo.sd.size 2048 needs a 2.15 GB VAE activation"),
        ("dense: {crop: -1}\n", "dense.crop must be in [0, 4096]"),
        ("method: nacl\n", "unknown method 'nacl'"),
        ("sd_model: x\n", "sd_model was renamed dslo.sd.model"),
        ("/**:\n  ros__parameters:\n    crop: 224\n", "crop was renamed dense.crop"),
        ("ovss:\n  ros__parameters:\n    pnp_layer: 3\n", "pnp_layer was renamed pnp.layer"),
        (
            "a: {ros__parameters: {}}\nb: {ros__parameters: {}}\n",
            "has ros__parameters only for other nodes (['a', 'b']): none for the ovss node",
        ),
        (
            "/**:\n  ros__parameters:\n    dense.crop: 64\n    dense: {crop: 32}\n",
            "dense.crop is given twice with different values (64 and 32)",
        ),
        ("dense: {crop: 32}\ndense: {crop: 64}\n", "given twice with different values"),
        ("- 1\n", "must be a mapping"),
        ("/**: [\n", "cannot be read"),
    ],
)
def test_a_bad_params_file_is_refused_with_the_reason(tmp_path, capsys, content, reason):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        segment.parse_args(["x.jpg", "--classes", "cat", "--params-file", str(path)])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def test_a_params_file_ignores_node_only_parameters(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("/**:\n  ros__parameters:\n    classes: [cat]\n    publish_masks: false\n")
    assert params_file_defaults(path) == {}


NESTED = {"dslo.sd.size": 256, "dense.crop": 224}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "/**:\n  ros__parameters:\n    dslo:\n      sd:\n        size: 256\n"
            "    dense: {crop: 224}\n",
            NESTED,
        ),
        ("ovss:\n  ros__parameters:\n    dslo.sd.size: 256\n    dense.crop: 224\n", NESTED),
        (
            "dslo: {sd: {size: 256}}\ndense:\n  crop: 224\nscore_threshold: 1\n",
            NESTED | {"score_threshold": 1.0},  # an integer for a float: the float it means
        ),
        # two dense: blocks are one namespace, as rcl reads them (the node does the same)
        (
            "/**:\n  ros__parameters:\n    dslo.sd.size: 256\n    dense: {crop: 224}\n"
            "    dense: {stride: 0}\n",
            NESTED | {"dense.stride": 0},
        ),
        # another node's section is ignored, as the node ignores it; later sections win
        (
            "camera:\n  ros__parameters:\n    dense: {crop: 64}\n/**:\n  ros__parameters:\n"
            "    dense: {crop: 32}\n    dslo.sd.size: 256\novss:\n  ros__parameters:\n"
            "    dense.crop: 224\n",
            NESTED,
        ),
    ],
    ids=["node-nested", "node-dotted", "settings-nested", "twice-merged", "other-node"],
)
def test_a_params_file_nests_settings_by_namespace(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    assert params_file_values(path) == expected
    args = segment.parse_args(["x.jpg", "--classes", "cat", "--params-file", str(path)])
    config = config_from_args(args)
    assert (config.dslo.sd.size, config.dense.crop) == (256, 224)


def test_the_code_preset_is_the_params_file():
    assert params_file_values(PRESET) == dict(DSLO_PAPER)


def test_ovss_segment_runs_the_paper_preset(tmp_path, pipeline):
    image = voc_image_paths()[0]
    out = tmp_path / "out"
    args = [str(image), "--classes", "person", "tv; monitor", "dog", "-o", str(out)]
    args += ["--params-file", str(PRESET), "--short-side", "64", *tiny(pipeline)]
    torch.manual_seed(0)  # the tiny CLIP's random weights
    assert segment.main(args) == 0
    labels = cv2.imread(str(out / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    # the same labels as the engine with that configuration
    config = config_from_args(segment.parse_args(args))
    assert engine_settings(config) == PAPER
    torch.manual_seed(0)
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "tv; monitor", "dog"])
    np.testing.assert_array_equal(labels, segmenter.segment(rgb).labels)


def test_ovss_segment_without_the_sd_model_offline_exits_2_at_once(tmp_path, pipeline, caplog):
    image = voc_image_paths()[0]
    args = [str(image), "--classes", "cat", "-o", str(tmp_path / "out")]
    args += ["--params-file", str(PRESET), *tiny(pipeline), "--dslo-sd-model", MISSING]
    began = time.monotonic()
    assert segment.main(args) == 2
    assert time.monotonic() - began < 60
    assert "HF_HUB_OFFLINE" in caplog.text and "set dslo.sd.model" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc_layout(tmp_path_factory.mktemp("voc"))


def test_ovss_eval_protocol_dslo_end_to_end(voc_root, tmp_path, pipeline, capsys):
    output = tmp_path / "results.json"
    args = ["voc21", str(voc_root), "--protocol", "dslo", *tiny(pipeline), "--short-side", "64"]
    assert evaluate.main([*args, "--no-progress", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "dslo protocol" in printed and "mIoU" in printed
    report = json.loads(output.read_text())
    assert report["protocol"] == "dslo" and report["images"] == 3
    engine = report["engine"]
    assert {name: engine[name] for name in PAPER} == PAPER
    expected = {k: v for k, v in DSLO_PAPER.items() if k not in ("model", "pretrained")}
    expected |= {"dslo.sd.model": str(pipeline), "dslo.sd.size": 64}  # the flags given
    assert {name: engine[name] for name in expected} == expected
    # the data-set settings of the standard protocol (DSLO's own are not public)
    got = (engine["dense.crop"], engine["score_threshold"], engine["dense.pamr"])
    assert got == (0, 0.1, False)
    assert engine["background_words"][:2] == ["sky", "wall"]


def test_ovss_eval_protocol_dslo_defaults_to_the_papers_model():
    args, _, method = evaluate.parse_args(["voc21", "/data", "--protocol", "dslo"])
    config = evaluate.engine_config(args, ())
    assert method.name == "dslo" and engine_settings(config) == PAPER
    assert (config.model, config.pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert config.dslo.sd.model == "stabilityai/stable-diffusion-2-1-base"


def test_ovss_eval_without_the_sd_model_offline_fails_at_once(voc_root, capsys):
    args = ["voc21", str(voc_root), "--protocol", "dslo", "--dslo-sd-model", MISSING]
    args += ["--model", str(TINY_VIT), "--pretrained", "none", "--no-progress"]
    began = time.monotonic()
    assert evaluate.main(args) == 2  # a model that cannot be loaded: bad input, as every tool
    assert time.monotonic() - began < 60
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_ovss_bag_runs_the_paper_preset(tmp_path, raw_sqlite3_bag, pipeline):  # noqa: F811
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--classes", "cat"]
    args += ["dog", "--params-file", str(PRESET), "--short-side", "64", *tiny(pipeline)]
    assert engine_settings(config_from_args(bag.parse_args(args))) == PAPER
    assert bag.main(args) == 0
    assert len(read_bag(out)["/ovss/labels"]) == 3


def test_ovss_bench_rows_for_dslo_on_every_affinity_source(tmp_path, pipeline, capsys):
    out = tmp_path / "bench.json"
    combos = [f"vanilla+dslo:{source}+jbu" for source in ("naclip", "keykey", "mean", "sd2")]
    args = ["--combos", *combos, "--iterations", "1", "--warmup", "1", "--short-side", "64"]
    args += ["--json", str(out), *tiny(pipeline)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert report["input"] == [640, 480] and report["dslo.sd.model"] == str(pipeline)
    assert list(report["combos"]) == combos
    for result in report["combos"].values():
        assert result["end_to_end"]["median_ms"] > 0
    printed = capsys.readouterr().out
    assert all(combo in printed for combo in combos)


def test_ovss_bench_refuses_a_combo_whose_sd_model_cannot_load(pipeline, capsys):
    args = ["--combos", "vanilla", "vanilla+dslo:sd2", "--iterations", "1", "--warmup", "0"]
    args += ["--short-side", "64", *tiny(pipeline), "--dslo-sd-model", MISSING]
    assert bench.main(args) == 2
    assert "combo vanilla+dslo:sd2" in capsys.readouterr().err
