"""Trying every method without weights (issue 20): ``scripts/make_tiny_models.py DIR`` end to end.

The script runs in a subprocess from a folder outside the repository; the commands it prints are
parsed from its output and run as printed (``ovss-segment`` on a real VOC sample through the
console scripts' entry functions, ``ovss-train-deop`` on its shapes set, the node over real DDS
with the trained DeOP checkpoint), and docs/without_weights.md must show exactly those commands,
so neither can drift. The node commands of the other methods must set what their ovss-segment
commands set. Bad input: one line on stderr, status 2, before torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
import yaml
from conftest import voc_image_paths
from ros_harness import (
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    OvssClient,
    child_environment,
    console_script,
    image_array,
    make_image,
    next_header,
)

from ovss_ros.cli.engine_args import config_from_args
from ovss_ros.cli.segment import parse_args as segment_args
from ovss_ros.core.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_tiny_models.py"
DOCS = REPO / "docs" / "without_weights.md"
COMMANDS = ("ovss-segment", "ovss_node", "ovss-train-deop")
METHODS = ("pnp_ovss", "naclip + dslo (sd2 affinity)", "deop with that checkpoint")
TRAIN = "train DeOP on the tiny CLIP (a few steps)"
TOOL_TIMEOUT_S = 600  # one tool run on a loaded 2-core machine (about 15 s when idle)


def run_script(
    args: list[str], cwd: Path, importtime: bool = False
) -> subprocess.CompletedProcess:
    """The script as a user runs it: the venv's python, no PYTHONPATH, from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    flags = ["-X", "importtime"] if importtime else []
    command = [sys.executable, *flags, str(SCRIPT), *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


def printed_commands(stdout: str) -> dict[str, list[str]]:
    """``# comment:`` line -> the words of the command on the next line."""
    found, comment = {}, None
    for line in stdout.splitlines():
        if line.startswith("# "):
            comment = line[2:].rstrip(":")
        elif line.split(" ", 1)[0] in COMMANDS:
            found[comment] = shlex.split(line)
    return found


def entry_argv(words: list[str]) -> list[str]:
    """A printed command as its console script runs it (setup.py's entry function), without
    needing the package installed."""
    module, function = console_script(words[0])
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", script, *words[1:]]


def run_tool(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A printed tool command run in ``cwd`` (this checkout importable, offline, one thread)."""
    env = child_environment()
    return subprocess.run(
        entry_argv(words),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path, dict[str, list[str]]]:
    """(where it ran, the image, comment -> command): the script writes ``tiny`` (written by an
    earlier run, as its marker says, with a note added since: --force) relative to a folder
    outside the repository."""
    root = tmp_path_factory.mktemp("recipes")
    (root / "tiny").mkdir()
    (root / "tiny" / ".ovss_tiny_models").write_text("written by scripts/make_tiny_models.py\n")
    (root / "tiny" / "notes.txt").write_text("mine\n")
    image = voc_image_paths()[0]
    result = run_script(["tiny", "--force", "--image", str(image)], root)
    assert result.returncode == 0, result.stderr
    assert "MEANINGLESS" in result.stdout and "RANDOM" in result.stdout
    assert (root / "tiny" / "notes.txt").read_text() == "mine\n"  # --force writes beside it
    commands = printed_commands(result.stdout)
    expected = {f"{name}, {how}" for name in METHODS for how in ("one image", "the node")}
    assert set(commands) == expected | {TRAIN}, result.stdout
    return root, image, commands


def check_segmented(result: subprocess.CompletedProcess, words: list[str], cwd: Path, image: Path):
    """ovss-segment ended well and wrote labels and overlay of the image's size."""
    assert result.returncode == 0, result.stderr
    out = cwd / words[words.index("-o") + 1]
    height, width = cv2.imread(str(image)).shape[:2]
    labels = cv2.imread(str(out / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(out / f"{image.stem}_overlay.jpg"))
    classes = words[words.index("--classes") + 1 : words.index("--classes") + 4]
    assert labels.shape == (height, width) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {*range(len(classes)), 255}  # 255: unlabeled
    assert overlay.shape == (height, width, 3)


@pytest.mark.parametrize("method", METHODS[:2])
def test_each_printed_segment_command_runs_on_a_voc_image(made, method):
    root, image, commands = made
    words = commands[f"{method}, one image"]
    assert words[:2] == ["ovss-segment", str(image)]
    check_segmented(run_tool(words, root), words, root, image)


@contextmanager
def node_from(words: list[str], cwd: Path):
    """The printed node command running in ``cwd`` (its console script's entry function) and a
    client, once the node subscribes and its label_info is in; Ctrl-C must end it with 0."""
    log_path = cwd / "node.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            entry_argv(words),
            cwd=cwd,
            env=child_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    rclpy.init()
    client = OvssClient()
    try:
        client.spin_until(
            lambda: process.poll() is not None or client.ready(),
            STARTUP_TIMEOUT_S,
            message=lambda: (
                f"node start-up; its output:\n{log_path.read_text()}"
                f"\nthe client:\n{client.describe()}"
            ),
        )
        assert process.poll() is None, log_path.read_text()
        yield client
    finally:
        client.destroy()
        rclpy.shutdown()
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
    assert returncode == 0, log_path.read_text()


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_deop_trains_on_the_tiny_clip_and_its_checkpoint_runs_in_the_tool_and_the_node(made):
    root, image, commands = made
    train = commands[TRAIN]
    result = run_tool(train, root)
    assert result.returncode == 0, result.stderr
    checkpoint = root / train[train.index("--output") + 1] / "checkpoint.pt"
    assert checkpoint.is_file()
    # strict JSON on stdout and in metrics.json (a class without pixels has a NaN IoU: null)
    summary = json.loads(result.stdout.strip().splitlines()[-1], parse_constant=_no_constant)
    assert summary["step"] > 0
    json.loads((checkpoint.parent / "metrics.json").read_text(), parse_constant=_no_constant)
    words = commands["deop with that checkpoint, one image"]
    assert shown_path(words, "--deop-checkpoint", root) == checkpoint.resolve()
    check_segmented(run_tool(words, root), words, root, image)
    # the node, as printed, with the same checkpoint
    check_node_segments(commands["deop with that checkpoint, the node"], root, image)


def check_node_segments(words: list[str], cwd: Path, image: Path) -> None:
    """The node command, run as printed in ``cwd``, serves one labels frame of ``image``."""
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    with node_from(words, cwd) as client:
        message = make_image(rgb, "rgb8", next_header(client.node))
        labels = image_array(client.wait_for_output(message, ("labels",))["labels"])
    assert labels.shape == rgb.shape[:2] and set(np.unique(labels)) <= {0, 1, 2, 255}


@pytest.mark.parametrize("method", METHODS[:2])
def test_each_printed_node_command_serves_a_frame(made, method):
    root, image, commands = made
    check_node_segments(commands[f"{method}, the node"], root, image)


def shown_path(words: list[str], flag: str, root: Path) -> Path:
    return (root / words[words.index(flag) + 1]).resolve()


def node_parameters(words: list[str]) -> dict[str, object]:
    """``-p name:=value`` of a node command, values read as YAML (as rclpy reads them)."""
    assert words[:2] == ["ovss_node", "--ros-args"] and words[2::2] == ["-p"] * (
        len(words) // 2 - 1
    )
    pairs = [word.split(":=", 1) for word in words[3::2]]
    return {name: yaml.safe_load(value) for name, value in pairs}


@pytest.mark.parametrize("method", METHODS)
def test_each_node_command_sets_what_its_segment_command_sets(made, method):
    """The node runs the configuration the tool ran: every engine setting the ovss-segment
    command changes from its default is on the node's command line, and every setting there
    is an engine setting with the tool's value (no unknown name); the same classes."""
    _, _, commands = made
    segment = commands[f"{method}, one image"]
    node = node_parameters(commands[f"{method}, the node"])
    args = segment_args(segment[1:])
    tool = config_from_args(args).flat()
    default = EngineConfig().flat()
    assert list(node.pop("classes")) == args.classes
    changed = {name: value for name, value in tool.items() if value != default[name]}
    assert changed.keys() <= node.keys(), (changed, node)
    assert node == {name: tool[name] for name in node}, (tool, node)


def docs_commands() -> list[list[str]]:
    """The commands in the docs' code blocks that use the tiny models (``./tiny/``), a command
    continued with a backslash joined."""
    text = DOCS.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in COMMANDS and any("./tiny/" in w for w in words):
                found.append(words)
    return found


def test_the_docs_show_exactly_the_printed_commands(made):
    """docs/without_weights.md runs the script as ``make_tiny_models.py tiny``: its commands are
    the printed ones with the default image (``./tiny/example.jpg``), in the same order."""
    root, image, commands = made
    assert (root / "tiny" / "example.jpg").is_file()
    printed = [
        ["./tiny/example.jpg" if word == str(image) else word for word in words]
        for words in commands.values()
    ]
    assert docs_commands() == printed
    assert "python scripts/make_tiny_models.py tiny" in DOCS.read_text()


MODEL_LIBRARIES = ("torch", "open_clip", "transformers", "diffusers")


def _file(root: Path) -> str:
    (root / "a_file").write_text("x")
    return "a_file"


def _not_empty(root: Path) -> str:
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    return "full"


@pytest.mark.parametrize(
    ("make_args", "reason"),
    [
        (lambda root: [_file(root)], "'a_file' exists and is not a folder"),
        (lambda root: [_not_empty(root)], "'full' is not empty: give an empty or new folder"),
        (
            lambda root: [_not_empty(root), "--force"],
            "'full' is not empty and no earlier run of this script wrote it",
        ),
        (lambda root: [f"{_file(root)}/sub"], "'a_file/sub' cannot be made: "),
        (lambda root: ["/proc/ovss_tiny_models"], "'/proc/ovss_tiny_models' cannot be written"),
        (lambda root: ["new", "--image", "missing.jpg"], "--image 'missing.jpg' is not a file"),
        (lambda root: [], "the following arguments are required: DIR"),
        (lambda root: ["new", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ],
    ids=[
        "file",
        "not empty",
        "force on another folder",
        "under a file",
        "not writable",
        "no image",
        "no DIR",
        "bad seed",
    ],
)
def test_bad_input_is_refused_in_one_line_before_torch(tmp_path, make_args, reason):
    args = make_args(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_script(args, tmp_path, importtime=True)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("make_tiny_models.py: error: "), lines
    assert reason in lines[0]
    assert not imported & set(MODEL_LIBRARIES), imported & set(MODEL_LIBRARIES)
    assert result.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched
