"""ovss-eval's data-set layouts, as its ``--help`` lists them, are what it reads (issue 20: the
help said "their usual layouts"), and its exit statuses (130 on Ctrl-C, no traceback).

For every data set the help's block (``name: FOLDER/``, then ``path: what`` lines) is parsed
and a tiny synthetic data set is written exactly as it says (two images, their labels, the split
list) in a temporary folder; ovss-eval then scores it for real with the tiny random CLIP and
must have read both images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VIT, voc_image_paths
from PIL import Image
from tool_process import interrupted

from ovss_ros.cli import evaluate
from ovss_ros.evaluation.protocol import PROTOCOLS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]
FAST = ["--templates", "single", "--short-side", "64", "--dense-crop", "0", "--no-progress"]
IDS = {"<id>": ["img_a", "img_b"], "<city>": ["lindau"] * 2, "<name>": ["lindau_01", "lindau_02"]}


def tool_script(module: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from ovss_ros.cli.{module} import main; "
            "sys.exit(main())"]  # fmt: skip


def help_layouts() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """data set -> (its folder, [(file path pattern, what it holds)]) from ``ovss-eval --help``."""
    done = subprocess.run(
        [*tool_script("evaluate"), "--help"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    layouts: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current = None
    for line in done.stdout.splitlines():
        header = re.fullmatch(r"(\w+): (\S+)/", line)
        if header and header[1] in PROTOCOLS:
            current = header[1]
            layouts[current] = (header[2], [])
        elif current and line.startswith("  ") and not line.strip().startswith("label values"):
            path, _, what = line.strip().partition(": ")
            layouts[current][1].append((path, what))
        elif not line.startswith("  "):
            current = None
    return layouts


LAYOUTS = help_layouts()


def test_the_help_lists_every_data_set_layout():
    assert sorted(LAYOUTS) == sorted(PROTOCOLS)
    for name, (folder, files) in LAYOUTS.items():
        kinds = [what.split(",")[0] for _, what in files]
        assert folder and "the images" in kinds and "labels" in kinds, (name, files)


def write_as_documented(root: Path, folder: str, files: list[tuple[str, str]]) -> None:
    """Two images, their labels (a few classes, 0 and 255 included), and a split list where the
    layout has one, at the paths the help gives."""
    rng = np.random.default_rng(0)
    for index in range(2):
        for pattern, what in files:
            path = pattern
            for key, values in IDS.items():
                path = path.replace(key, values[index])
            target = root / folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if pattern.endswith(".txt"):
                target.write_text("".join(f"{i}\n" for i in IDS["<id>"]))
            elif what.startswith("the images"):
                Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(target)
            else:
                labels = np.zeros((48, 64), np.uint8)
                labels[:, 16:32], labels[:, 32:48], labels[:, 48:] = 1, 2, 255
                Image.fromarray(labels).save(target)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_data_set_laid_out_as_the_help_says_is_scored(name, tmp_path, capsys):
    folder, files = LAYOUTS[name]
    write_as_documented(tmp_path / "data", folder, files)
    report = tmp_path / "report.json"
    status = evaluate.main([name, str(tmp_path / "data"), *TINY, *FAST, "-o", str(report)])
    assert status == 0, capsys.readouterr().err[-2000:]
    assert json.loads(report.read_text())["images"] == 2


def test_ctrl_c_ends_ovss_eval_with_130_and_no_report(tmp_path):
    """A long run (the VOC samples listed 300 times) interrupted once the model is made."""
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    samples = voc_image_paths()[0].parents[1]
    for image in voc_image_paths():
        shutil.copy(image, base / "JPEGImages")
        labels = samples / "SegmentationClassPNG" / f"{image.stem}.png"
        shutil.copy(labels, base / "SegmentationClass")
    ids = "".join(f"{p.stem}\n" for p in voc_image_paths()) * 300
    (base / "ImageSets/Segmentation/val.txt").write_text(ids)
    report = tmp_path / "report.json"
    args = ["voc21", str(tmp_path), *TINY, "--no-progress", "-o", str(report)]
    # the model is made (its random-weights warning): scoring has started
    status, out, err = interrupted("evaluate", args, b"RANDOM weights", REPO)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "ovss-eval: interrupted; nothing scored"
    )
    assert not report.exists() and not out.strip()


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cpu", "--method", "sclip", "voc21", "ROOT"],
        ["--model", "ViT-B-16", "voc21", "--device", "cpu", "ROOT", "--method", "sclip"],
        ["voc21", "ROOT", "--device", "cpu", "--method", "sclip"],
        ["--dense-crop", "224", "--device=cpu", "--method=sclip", "voc21", "ROOT"],
    ],
)
def test_flags_with_values_may_come_before_the_data_set(argv, tmp_path):
    """``ovss-eval --device cpu voc21 ROOT`` took 'cpu' for the data set (the first pass knew
    only --method and --protocol)."""
    argv = [str(tmp_path) if word == "ROOT" else word for word in argv]
    args, protocol, method = evaluate.parse_args(argv)
    assert (args.dataset, args.root, args.device) == ("voc21", tmp_path, "cpu")
    assert protocol.name == "voc21" and method.name == "sclip"
    assert args.method == "sclip"
