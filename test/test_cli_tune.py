"""ovss-tune's first trial inside its search space, and a params file the node runs as tuned
(issue 20: ``ovss-tune --layers 1-3 --heads 1-4`` started at layer 8 and failed on a small VLM;
its params file had no ``classes``, and nothing that undoes another params file's threshold or
background words, precision or relative model paths).

The runs are real: ovss-tune's ``main`` with the tiny random CLIP (test/data/tiny-vit.json) and
the tiny random BLIP (test/tiny_blip.py: 3 text layers, 4 heads) on the VOC sample photos. The
params file is read as the node reads it: by rcl's rules (``launch_plan.params_file_parameters``,
later files winning) into the node's own validation (``ros.parameters.validate``), and by a real
node started with ``--params-file`` over DDS.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import tool_process
from conftest import TINY_VIT, voc_image_paths
from tiny_blip import IMAGE_SIZE, TEXT_HEADS, TEXT_LAYERS, save_tiny_blip

from ovss_ros.cli import tune
from ovss_ros.cli.tune_space import SEARCHED, start_inside
from ovss_ros.core.methods.pnp_ovss.settings import PnpSettings
from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace
from ovss_ros.ros import parameters as node_parameters
from ovss_ros.ros.launch_plan import params_file_parameters

CLASSES = ["person", "dog", "tv; monitor"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def arguments(blip, output, *extra: str) -> list[str]:
    """A quick run: one trial, the VLM's native size, no refinement (the PnP-OVSS defaults
    otherwise: layer 8, head 10, threshold 0.15, 4 dropout rounds)."""
    return [
        str(voc_image_paths()[0].parent), "--classes", *CLASSES,
        "--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu",
        "--templates", "single", "--pnp-vlm-pretrained", str(blip),
        "--pnp-image-size", str(IMAGE_SIZE), "--pnp-dropout-patches", "2",
        "--pnp-refine", "none", "--budget", "1", "-o", str(output),
        "--reward-model", str(TINY_VIT), "--reward-pretrained", "none", *extra,
    ]  # fmt: skip


def first_trial(printed: str) -> dict[str, float]:
    line = next(line for line in printed.splitlines() if line.startswith("start "))
    return {key: float(value) for key, value in re.findall(r"'(\w+)': ([\d.]+)", line)}


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        # the example: the default layer 8 and head 10 are outside
        (["--layers", "1-3", "--heads", "1-4"], {"layer": 3, "head": 4}),
        # no --layers / --heads: every one of the 3-layer, 4-head VLM's
        ([], {"layer": TEXT_LAYERS, "head": TEXT_HEADS}),
        # every searched setting: the default threshold 0.15 is outside too
        (
            ["--layers", "1-2", "--heads", "2,3", "--thresholds", "0.3,0.4"],
            {"layer": 2, "head": 3, "threshold": 0.3},
        ),
    ],
)
def test_the_first_trial_is_inside_the_search_space(blip, tmp_path, capsys, space, expected):
    """With one trial the best is the first: the params file holds it."""
    output = tmp_path / "tuned.yaml"
    assert tune.main(arguments(blip, output, *space)) == 0, capsys.readouterr().err[-2000:]
    start = first_trial(capsys.readouterr().out)
    defaults = {"threshold": 0.15}
    assert start == defaults | expected
    pnp = params_file_parameters(output, "/ovss")
    assert {name: pnp[f"pnp.{name}"] for name in SEARCHED} == defaults | expected
    assert pnp["pnp.dropout_rounds"] == 4  # not searched: the start's


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--layers", "1-3", "--pnp-layer", "8"], "--pnp-layer 8 is outside the search space"),
        (["--heads", "2,3", "--pnp-head", "1"], "--pnp-head 1 is outside the search space"),
        (
            ["--thresholds", "0.3", "--pnp-threshold=0.15"],
            "--pnp-threshold 0.15 is outside the search space (--thresholds 0.3)",
        ),
        # every layer of the VLM: its own limit, named as PnpOvss names it
        (["--pnp-layer", "8"], "pnp.layer 8 > the VLM's 3 text layers"),
    ],
)
def test_a_first_trial_given_outside_the_space_is_refused(blip, tmp_path, flags, reason):
    """Written on the command line, a first trial the space leaves out is a mistake: one line,
    status 2, and (the space listed) before any model loads."""
    output = tmp_path / "tuned.yaml"
    done = tool_process.run_tool("tune", *arguments(blip, output, *flags), timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and reason in lines[0], done.stderr[-2000:]
    if "outside" in reason:
        assert "RANDOM weights" not in done.stderr  # refused before the models load
    assert not output.exists()


def test_a_default_outside_the_space_becomes_the_nearest_searched_value():
    space = SearchSpace(layers=[1, 2, 3], heads=[9, 11], thresholds=[0.1, 0.2])
    start = start_inside(PnpSettings(), space, given=set())
    # layer 8 -> 3; head 10 is as near to 9 as to 11 -> the smaller; 0.15 -> 0.1
    assert (start.layer, start.head, start.threshold) == (3, 9, 0.1)
    inside = SearchSpace(layers=[8], heads=[10], thresholds=[0.15])
    assert start_inside(PnpSettings(), inside, given=set()) == PnpSettings()
    given = start_inside(PnpSettings(layer=2), space, given={"--pnp-head"})
    assert (given.layer, given.head) == (2, 10)  # a given setting is never moved


def node_values(*paths) -> dict:
    """The node's parameter values after ``--params-file`` of each of ``paths`` in order."""
    values = node_parameters.defaults()
    for path in paths:
        values |= params_file_parameters(path, "/ovss")
    return values


def test_the_params_file_makes_the_node_run_as_tuned(blip, tmp_path, capsys, monkeypatch):
    """Read after the robot's own params file (a threshold, background words, fp16, another
    vocabulary), the tuned file still gives the node exactly the tuned run: its classes, every
    PnP-OVSS setting, CLIP's model and weights as absolute paths (the node starts elsewhere),
    no probability threshold and no background words (pnp_ovss makes its own background)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(TINY_VIT, models / "tiny-vit.json")
    monkeypatch.chdir(tmp_path)  # the tool is given relative paths
    output = tmp_path / "tuned.yaml"
    args = arguments(blip, output, "--layers", "2", "--heads", "3")
    args[args.index(str(TINY_VIT))] = "models/tiny-vit.json"
    assert tune.main(args) == 0, capsys.readouterr().err[-2000:]
    robot = tmp_path / "robot.yaml"
    robot.write_text(
        "/**:\n  ros__parameters:\n    classes: [chair, floor]\n    score_threshold: 0.4\n"
        "    background_words: [sky, wall]\n    precision: fp16\n    templates: imagenet\n"
    )
    values = node_values(robot, output)
    settings = node_parameters.validate(values | {"device": "cpu"})
    assert [entry.name for entry in settings.classes] == ["person", "dog", "tv"]
    assert settings.classes[2].synonyms == ("tv", "monitor")
    engine = settings.engine
    assert engine.method == "pnp_ovss"
    assert (engine.score_threshold, engine.background_words) == (0.0, ())
    assert (engine.precision, engine.templates) == ("fp32", "single")
    assert engine.model == str(models / "tiny-vit.json") and engine.pretrained == "none"
    assert engine.pnp.vlm_pretrained == str(blip)
    tuned = PnpSettings(
        vlm_pretrained=str(blip),
        image_size=IMAGE_SIZE,
        layer=2,
        head=3,
        dropout_patches=2,
        refine="none",
    )
    assert engine.pnp == tuned


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_a_params_file_that_cannot_be_written_is_refused_before_the_work(blip, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        done = tool_process.run_tool("tune", *arguments(blip, locked / "tuned.yaml"))
    finally:
        locked.chmod(0o700)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot write in" in done.stderr and "RANDOM weights" not in done.stderr


def test_ctrl_c_ends_ovss_tune_with_130_and_no_params_file(blip, tmp_path):
    """Interrupted during the search (many trials on larger inputs): status 130, one line, no
    traceback, no params file."""
    output = tmp_path / "tuned.yaml"
    args = arguments(blip, output, "--budget", "60", "--pnp-image-size", "256")
    status, out, err = tool_process.interrupted(
        "tune", args, b"trial", tmp_path
    )  # the search began
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "ovss-tune: interrupted; no params file written" in err
    assert not output.exists() and "wrote" not in out
