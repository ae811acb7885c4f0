"""The command-line tools accept pnp_ovss, superpixel_clip and twostream (issues 9, 10, 21).

ovss-segment runs each end to end on a VOC sample (tiny random CLIP, tiny random BLIP saved with
save_pretrained) and writes what the engine gives for the same flags; a missing checkpoint or
VLM ends with status 2 and the reason; ovss-bench times them next to naclip in one run; ovss-bag
and ovss-eval parse the methods' flags into the engine configuration.
"""

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.cli import bag, evaluate
from ovss_ros.cli.bench import STAGES
from ovss_ros.cli.bench import main as bench
from ovss_ros.cli.engine_args import config_from_args
from ovss_ros.cli.segment import main as segment
from ovss_ros.cli.segment import parse_args
from ovss_ros.core import Segmenter

ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--short-side", "64"]
ENGINE += ["--templates", "single"]
PNP = ["--pnp-image-size", str(IMAGE_SIZE), "--pnp-layer", "2", "--pnp-head", "3"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "pnp_ovss", "--pnp-dropout-rounds", "2", "--pnp-refine", "pamr"],
        ["--method", "superpixel_clip", "--deop-proposals", "20", "--deop-proposal-source"]
        + ["clusters", "--superpixel-clip-severance-residual", "0.5"],
        ["--method", "twostream", "--deop-proposals", "8", "--twostream-crop-batch", "3"],
    ],
    ids=lambda flags: flags[1],
)
def test_ovss_segment_runs_each_method(tmp_path, blip, flags):
    image = voc_image_paths()[0]
    args = [str(image), "--classes", "person", "dog", "tv", "-o", str(tmp_path / "out")]
    args += ENGINE + PNP + ["--pnp-vlm-pretrained", str(blip)] + flags
    torch.manual_seed(0)
    assert segment(args) == 0
    labels = cv2.imread(str(tmp_path / "out" / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    config = config_from_args(parse_args(args))
    assert config.method == flags[1]
    torch.manual_seed(0)  # the same random CLIP as the command's
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "dog", "tv"])
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(labels, segmenter.segment(rgb).labels)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--method", "deop", "--deop-checkpoint", "/nonexistent/deop.pt"], "not found"),
        (["--method", "pnp_ovss", "--pnp-vlm-pretrained", "Salesforce/x"], "HF_HUB_OFFLINE"),
        (["--method", "pnp_ovss", "--pnp-layer", "7"], "pnp.layer 7 > the VLM's 3"),
        (["--method", "superpixel_clip", "--dense-crop", "32"], "dense.crop applies to the dense"),
        (["--method", "deop"], "method deop needs its proposal network"),
    ],
)
def test_ovss_segment_refuses_with_the_reason(tmp_path, blip, caplog, flags, reason):
    args = [str(voc_image_paths()[0]), "--classes", "dog", "-o", str(tmp_path)]
    args += ENGINE + ["--pnp-vlm-pretrained", str(blip)] + flags
    assert segment(args) == 2
    assert reason in caplog.text


def test_ovss_bench_times_the_methods_next_to_naclip(tmp_path, blip, capsys):
    out = tmp_path / "bench.json"
    combos = ["naclip", "pnp_ovss", "superpixel_clip+p10", "twostream+p10"]
    args = ["--combos", *combos, "--iterations", "1", "--warmup", "0", "--json", str(out)]
    args += ["--width", "128", "--height", "96", "--pnp-vlm-pretrained", str(blip)]
    assert bench(args + ENGINE + PNP + ["--pnp-dropout-rounds", "2"]) == 0
    report = json.loads(out.read_text())
    assert list(report["combos"]) == combos
    for result in report["combos"].values():
        assert set(result["stages"]) == set(STAGES)
        assert all(s["median_ms"] > 0 for s in result["stages"].values())
        assert result["end_to_end"]["median_ms"] > 0
    assert "pnp_ovss" in capsys.readouterr().out


def test_ovss_bag_and_ovss_eval_take_the_methods_flags(tmp_path):
    args = bag.parse_args(
        ["in", "out", "--topic", "/image", "--classes", "dog", "--method", "superpixel_clip"]
        + ["--deop-proposals", "50", "--deop-pooling", "mean"]
        + ["--superpixel-clip-severance-residual", "0.3"]
    )
    config = config_from_args(args)
    assert (config.method, config.deop.proposals, config.deop.pooling) == (
        "superpixel_clip",
        50,
        "mean",
    )
    assert config.superpixel_clip.severance_residual == 0.3
    # ovss-eval: the dense protocol's windows, PAMR and background words do not apply to
    # pnp_ovss (its own background); superpixel_clip keeps the data set's background words.
    for method, background in (("pnp_ovss", ()), ("superpixel_clip", ("sky",))):
        args, _, _ = evaluate.parse_args(
            ["voc", str(tmp_path), "--method", method, "--dense-crop", "224", "--dense-pamr"]
        )
        config = evaluate.engine_config(args, ("sky",))
        assert (config.method, config.dense.crop, config.dense.pamr) == (method, 0, False)
        assert config.background_words == background
        config.validate()


def tuned_params_file(folder) -> tuple:
    """A params file as ovss-tune writes it (``node_parameters``) and the config it holds."""
    import yaml

    from ovss_ros.cli import tune
    from ovss_ros.core import EngineConfig

    tuned = EngineConfig.from_flat(
        {"pretrained": "none", "templates": "single", "pnp.vlm_pretrained": "/models/blip"}
        | {"pnp.layer": 5, "pnp.head": 2, "pnp.threshold": 0.3, "pnp.dropout_rounds": 2}
    )
    content = tune.node_parameters(tuned, ["cat", "tv; monitor"])
    path = folder / "tuned.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path, content, tuned


def test_the_params_file_of_ovss_tune_is_nested_and_accepted_by_the_node(tmp_path):
    from ovss_ros.ros import parameters as node_parameters

    _, content, tuned = tuned_params_file(tmp_path)
    values = content["/**"]["ros__parameters"]
    # nested by namespace, as ROS 2 nests pnp.layer; the classes tuned on
    assert values["pnp"]["layer"] == 5 and values["pnp"]["vlm_pretrained"] == "/models/blip"
    assert values["classes"] == ["cat", "tv; monitor"]
    flat = {k: v for k, v in values.items() if k != "pnp"}
    flat |= {f"pnp.{name}": value for name, value in values["pnp"].items()}
    engine = node_parameters.validate(node_parameters.defaults() | flat).engine
    assert engine.method == "pnp_ovss" and engine.pnp == tuned.pnp
    assert engine.pnp.vlm_pretrained == "/models/blip"
    assert (engine.pnp.layer, engine.pnp.head, engine.pnp.threshold) == (5, 2, 0.3)
    assert engine.pnp.dropout_rounds == 2


def test_the_params_file_of_ovss_tune_is_read_by_the_tools(tmp_path):
    path, _, tuned = tuned_params_file(tmp_path)
    config = config_from_args(
        parse_args(["x.jpg", "--classes", "cat", "--params-file", str(path)])
    )
    assert config.method == "pnp_ovss" and config.pnp == tuned.pnp
    assert (config.pretrained, config.templates) == ("none", "single")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The DeOP release's layout (test_deop_released.released_file) on the tiny CLIP that
    ``--pretrained none`` builds after ``torch.manual_seed(0)``."""
    from test_deop_released import released_file

    from ovss_ros.core.clip.model_loading import load_clip

    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu", "fp32")
    path = tmp_path_factory.mktemp("release") / "model_final.pth"
    released_file(path, clip.model)
    return path


def test_ovss_segment_runs_published_deop_on_the_release_file(tmp_path, release, caplog):
    caplog.set_level(logging.INFO, logger="ovss_ros")
    image = voc_image_paths()[0]
    args = [str(image), "--classes", "person", "dog", "tv", "-o", str(tmp_path / "out")]
    args += ENGINE + ["--method", "deop", "--deop-checkpoint", str(release)]
    torch.manual_seed(0)
    assert segment(args) == 0
    assert "DeOP as released from" in caplog.text
    labels = cv2.imread(str(tmp_path / "out" / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    torch.manual_seed(0)
    segmenter = Segmenter(config_from_args(parse_args(args)))
    segmenter.set_classes(["person", "dog", "tv"])
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(labels, segmenter.segment(rgb).labels)


def test_ovss_segment_says_what_runs_on_the_release_file(tmp_path, release, caplog):
    """The node logs the method at start-up; the tools did not, so a user was not told that the
    release's input size (short side 512) replaces --short-side."""
    args = [str(voc_image_paths()[0]), "--classes", "dog", "-o", str(tmp_path)]
    args += ENGINE + ["--method", "deop", "--deop-checkpoint", str(release)]
    torch.manual_seed(0)
    assert segment(args) == 0
    told = [r.getMessage() for r in caplog.records if r.name == "ovss-segment"]
    assert any(
        line.startswith("method DeOP as released from") and "input short side 512" in line
        for line in told
    ), told


def test_ovss_bench_times_deop_and_twostream_on_the_release_file(tmp_path, release, capsys):
    """Before: the deop row ended in a traceback (the bench built the frame without the
    release's proposal network: AttributeError on mask_logits None)."""
    out = tmp_path / "bench.json"
    combos = ["deop", "twostream"]
    args = ["--combos", *combos, "--iterations", "1", "--warmup", "0", "--json", str(out)]
    args += ["--width", "96", "--height", "64", "--deop-checkpoint", str(release)]
    torch.manual_seed(0)  # the file's CLIP
    assert bench(args + ENGINE) == 0
    report = json.loads(out.read_text())
    assert list(report["combos"]) == combos
    for result in report["combos"].values():
        assert set(result["stages"]) == set(STAGES)
        assert result["end_to_end"]["median_ms"] > 0
    # The header's short side is the engine's; the release rows say they run at their own.
    assert report["release_rows"] == combos and report["short_side"] == 64
    printed = capsys.readouterr().out
    assert (
        "deop, twostream: on the DeOP release's file, at its own input size (short side 512"
        in (printed)
    )


def test_ovss_segment_refuses_the_release_on_another_clip(tmp_path, release, caplog):
    args = [str(voc_image_paths()[0]), "--classes", "dog", "-o", str(tmp_path)]
    args += ENGINE + ["--method", "deop", "--deop-checkpoint", str(release)]
    torch.manual_seed(1)  # another random CLIP than the file's
    assert segment(args) == 2
    assert "differs from the file's" in caplog.text and "ViT-B-16" in caplog.text
