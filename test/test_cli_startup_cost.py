"""Issue 19 (design note section 6): every tool checks its arguments before any model library
loads, so a mistake ends with its one line on stderr (status 2) in well under a second.

Each case runs the tool as its console script does (``sys.exit(main())``) in a fresh interpreter
with ``-X importtime``: the interpreter's own log of every module it imported (the stderr lines
``import time: ...``) must name none of torch, open_clip, transformers, diffusers, scipy, skimage.
The other stderr lines are the tool's: exactly one for a refusal (no traceback); ``--help``
prints its usage on stdout and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import voc_image_paths

REPO = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = {"torch", "open_clip", "transformers", "diffusers", "scipy", "skimage"}
MISSING = "no_such_input_3f9c"  # a path that does not exist (relative to the temporary folder)


def _params_file(folder: Path, text: str) -> str:
    path = folder / "params.yaml"
    path.write_text(text)
    return str(path)


OLD_NAME = "/**:\n  ros__parameters:\n    crop: 224\n"  # a node params file with an old name
NOT_YAML = "dense: {crop: [\n"

# tool module -> [(case id, argv builder (temporary folder -> argv), expected status, text)]
# ``text``: what the one line must say (None for --help).
DEOP_RUN = ["voc", "root", "--stage", "deop"]  # ovss-train-deop needs a stage

CASES = {
    "segment": [
        ("help", lambda d: ["--help"], 0, None),
        ("old flag", lambda d: ["a.jpg", "--classes", "cup", "--crop", "224"], 2, "--dense-crop"),
        (
            "bad value",
            lambda d: ["a.jpg", "--classes", "cup", "--short-side", "-1"],
            2,
            "short_side",
        ),
        (
            "bad crop",
            lambda d: ["a.jpg", "--classes", "cup", "--dense-crop", "7x"],
            2,
            "dense.crop",
        ),
        ("missing input", lambda d: [MISSING, "--classes", "cup"], 2, MISSING),
        (
            "old name in params file",
            lambda d: ["a.jpg", "--classes", "cup", "--params-file", _params_file(d, OLD_NAME)],
            2,
            "crop was renamed dense.crop",
        ),
        (
            "params file not YAML",
            lambda d: ["a.jpg", "--classes", "cup", "--params-file", _params_file(d, NOT_YAML)],
            2,
            "cannot be read",
        ),
        ("bad method", lambda d: ["a.jpg", "--classes", "cup", "--method", "nope"], 2, "nope"),
    ],
    "bag": [
        ("help", lambda d: ["--help"], 0, None),
        (
            "old flag",
            lambda d: ["in", "out", "--topic", "/i", "--classes", "cup", "--crop", "224"],
            2,
            "--dense-crop",
        ),
        (
            "bad value",
            lambda d: ["in", "out", "--topic", "/i", "--classes", "cup", "--short-side", "-1"],
            2,
            "short_side",
        ),
        (
            "missing input",
            lambda d: [MISSING, "out", "--topic", "/i", "--classes", "cup"],
            2,
            MISSING,
        ),
        (
            "params file not YAML",
            lambda d: [
                "in",
                "out",
                "--topic",
                "/i",
                "--classes",
                "cup",
                "--params-file",
                _params_file(d, NOT_YAML),
            ],
            2,
            "cannot be read",
        ),
    ],
    "evaluate": [
        ("help", lambda d: ["--help"], 0, None),
        ("help of a data set", lambda d: ["voc21", "root", "--help"], 0, None),
        ("old flag", lambda d: ["voc21", "root", "--crop", "224"], 2, "--dense-crop"),
        ("bad value", lambda d: ["voc21", "root", "--short-side", "-1"], 2, "short_side"),
        (
            "freecp data set, bad value",
            lambda d: ["coco_stuff", "root", "--method", "sclip_freecp", "--dense-crop", "-3"],
            2,
            "dense.crop",
        ),
        ("unknown data set", lambda d: ["voc99", "root"], 2, "voc99"),
        ("missing input", lambda d: ["voc21", MISSING], 2, MISSING),
        (
            "old name in params file",
            lambda d: ["voc21", "root", "--params-file", _params_file(d, OLD_NAME)],
            2,
            "crop was renamed dense.crop",
        ),
    ],
    "bench": [
        ("help", lambda d: ["--help"], 0, None),
        ("old flag", lambda d: ["--crop", "224"], 2, "--dense-crop"),
        ("bad value", lambda d: ["--short-side", "-1"], 2, "short_side"),
        ("bad combo", lambda d: ["--combos", "naclip+nope"], 2, "nope"),
        ("missing input", lambda d: ["--image", MISSING], 2, MISSING),
        (
            "params file not YAML",
            lambda d: ["--params-file", _params_file(d, NOT_YAML)],
            2,
            "cannot be read",
        ),
    ],
    "tune": [
        ("help", lambda d: ["--help"], 0, None),
        ("old flag", lambda d: ["a.jpg", "--classes", "cup", "--layer", "8"], 2, "--pnp-layer"),
        ("bad value", lambda d: ["a.jpg", "--classes", "cup", "--pnp-layer", "0"], 2, "pnp.layer"),
        (
            "bad search space",
            lambda d: [str(voc_image_paths()[0]), "--classes", "cup", "--layers", "5-2"],
            2,
            "backwards",
        ),
        ("missing input", lambda d: [MISSING, "--classes", "cup"], 2, MISSING),
    ],
    "train_deop": [
        ("help", lambda d: ["--help"], 0, None),
        ("unknown flag", lambda d: [*DEOP_RUN, "--dense-crop", "224"], 2, "--dense-crop"),
        ("bad value", lambda d: [*DEOP_RUN, "--precision", "fp7"], 2, "fp7"),
        ("bad training value", lambda d: [*DEOP_RUN, "--steps", "0"], 2, "steps"),
        ("stage order", lambda d: DEOP_RUN, 2, "--proposal-network"),
        ("missing input", lambda d: ["folder", MISSING, "--stage", "prompt"], 2, MISSING),
    ],
}


def run_tool(tool: str, argv: list[str], folder: Path) -> subprocess.CompletedProcess:
    code = f"import sys; from ovss_ros.cli.{tool} import main; sys.exit(main())"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("tool", "argv", "status", "text"),
    [
        pytest.param(tool, argv, status, text, id=f"{tool}: {name}")
        for tool, cases in CASES.items()
        for name, argv, status, text in cases
    ],
)
def test_a_mistake_is_refused_before_any_model_library_loads(tmp_path, tool, argv, status, text):
    result = run_tool(tool, argv(tmp_path), tmp_path)
    lines = result.stderr.splitlines()
    log = [line for line in lines if line.startswith("import time:")]
    own = [line for line in lines if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in log}
    top_level = {name.split(".")[0] for name in imported}
    shown = f"status {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {own[-30:]}"
    assert "ovss_ros.cli" in imported, shown  # the log is read
    assert result.returncode == status, shown
    assert not top_level & MODEL_LIBRARIES, (sorted(top_level & MODEL_LIBRARIES), shown)
    if text is None:
        assert "usage:" in result.stdout and not own, shown
    else:
        assert len(own) == 1, shown
        assert "Traceback" not in own[0] and text in own[0], shown
