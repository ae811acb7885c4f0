"""Every tool refuses bad input with one line on stderr and exit status 2 (issue 18, item 8).

Each tool is run as a user runs it, in its own process (its console script's ``main()``, in a
child forked from a process that has imported the tools: test/tool_process.py), with
the bad inputs an attacker would try: out-of-range and non-finite numbers, sizes beyond the
per-frame budget, a FIFO, a directory or /dev/zero where a file belongs, empty, corrupt,
truncated and decompression-bomb images, an output that is one of its inputs. The run must end
with status 2, no traceback, and exactly one line saying why (besides the warnings a random
tiny model prints), and an input must never be overwritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tool_process
from conftest import TINY_VIT, voc_image_paths
from PIL import Image
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]
# What a tiny random model and transformers print on their own: not the tool's words.
NOISE = ("RANDOM weights", "No pretrained weights loaded", "Loading weights", "Writing model")
STORE = get_typestore(Stores.LATEST)
LONG_CLASS = "part " + "7" * 80  # 81 BPE tokens: longer than CLIP's 77 with any template
# Issue 21: deop without its proposal network is not DeOP.
DEOP_WITHOUT_CHECKPOINT = "method deop needs its proposal network and deop.checkpoint is empty"


# The tool's address space: 8 GB (the imports take about 4): a tool that would allocate far more
# (before issue 18: a range 0-1000000 took 7.9 GB) fails there, not the machine.
ADDRESS_SPACE = 8 << 30


def run_tool(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ovss-<tool> args`` in a process of its own (test/tool_process.py), run in the repo."""
    return tool_process.run_tool(
        tool, *args, timeout=timeout, cwd=ROOT, address_space=ADDRESS_SPACE
    )


def assert_refused(done: subprocess.CompletedProcess, reason: str) -> None:
    """Status 2, no traceback, nothing on stdout, one line of the tool's own on stderr (its INFO
    progress lines aside), naming ``reason``."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not done.stdout.strip(), done.stdout[-3000:]
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip()
        and not line.startswith("INFO ")
        and not any(noise in line for noise in NOISE)
    ]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert len(lines) == 1, done.stderr[-3000:]
    assert reason in lines[0], lines[0]


CONSOLE_SCRIPT_CASES = {
    "segment": ["IMAGE", "--classes", "cat", *TINY, "-o", "OUT", "--alpha", "5"],
    "bag": ["IMAGE", "OUT", "--topic", "/image", "--classes", "cat", *TINY],
    "evaluate": ["voc21", "OUT", *TINY],
    "bench": ["--image", "IMAGE", "--iterations", "-1", *TINY],
    "tune": ["IMAGE", "--classes", "cat", "--max-images", "-4", *TINY],
    "train_deop": ["--dataset", "folder", "--root", "OUT", "--batch-size", "0", *TINY],
}


@pytest.mark.parametrize("tool", CONSOLE_SCRIPT_CASES)
def test_each_tool_refuses_as_its_real_console_script(files, tmp_path, tool):
    """The other tests fork each run from a process that has imported every tool
    (test/tool_process.py); here each tool runs once as pip's script runs it, in a fresh
    interpreter (``sys.exit(main())``), so a module it uses without importing, or anything at
    the interpreter's exit, would show."""
    args = [
        {"IMAGE": str(files["good"]), "OUT": str(tmp_path / "out")}.get(arg, arg)
        for arg in CONSOLE_SCRIPT_CASES[tool]
    ]
    script = f"import sys; from ovss_ros.cli.{tool} import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines and "error" in lines[-1].lower(), done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every kind, good and bad, shared by the tests."""
    root = tmp_path_factory.mktemp("inputs")
    good = root / "good.jpg"
    shutil.copy(voc_image_paths()[0], good)
    fifo = root / "fifo.jpg"
    os.mkfifo(fifo)
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    bomb = root / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)  # 50 kB, 400 MP declared
    folder = root / "images"
    folder.mkdir()
    shutil.copy(good, folder / "a.jpg")
    shutil.copy(good, folder / "b.jpg")
    return {"good": good, "fifo": fifo, "empty": empty, "bomb": bomb, "folder": folder}


# --- ovss-segment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--classes", "cat", LONG_CLASS], "is too long for the text model"),
        (["--short-side", "-5"], "argument --short-side: short_side must be in [0, 4096]"),
        (["--dense-crop", "100000"], "argument --dense-crop: dense.crop must be in [0, 4096]"),
        (["--dense-crop", "x"], "argument --dense-crop: dense.crop must be an integer, got 'x'"),
        (["--max-long-side", "0"], "max_long_side must be in [1, 4096]"),
        (["--dense-logit-scale", "inf"], "dense.logit_scale must be in (0, 1000], got inf"),
        (["--dslo-sinkhorn-epsilon", "nan"], "dslo.sinkhorn_epsilon must be in (0, 100], got nan"),
        (["--dslo-sd-size", "2048"], "dslo.sd.size 2048 needs a 2.15 GB VAE activation per frame"),
        (["--pnp-image-size", "1024"], "pnp.image_size 1024 needs a 1.07 GB attention map"),
        (["--twostream-crop-batch", "1024"], "twostream.crop_batch 1024 needs a 2.48 GB"),
        (["--dslo-mode", "x"], "argument --dslo-mode: unknown dslo.mode 'x'"),
        (
            ["--refinement", "dslo", "--short-side", "4096", "--max-long-side", "4096"],
            "patch affinity needs a 17.2 GB map per frame",
        ),
        # the flags of earlier releases, refused with the flag that replaced them
        (["--crop", "224"], "--crop was renamed --dense-crop"),
        (["--size", "64"], "--size was renamed --short-side"),
        (["--threshold", "0.1"], "--threshold was renamed --score-threshold"),
        (["--background", "sky"], "--background was renamed --background-words"),
        (["--no-pamr"], "--no-pamr was renamed --no-dense-pamr"),
        (["--sd-size=256"], "--sd-size was renamed --dslo-sd-size"),
        (
            ["--proposal-logit-scale", "50"],
            "--proposal-logit-scale was renamed --deop-logit-scale",
        ),
        (["--vlm-pretrained", "x"], "--vlm-pretrained was renamed --pnp-vlm-pretrained"),
        (["--dense-cro", "224"], "unrecognized arguments: --dense-cro"),  # no abbreviations
        (["--params-file", "OLD_PARAMS"], "crop was renamed dense.crop"),
        (["--alpha", "5"], "--alpha must be between 0 and 1"),
        (["--params-file", "/dev/zero"], "is not a regular file"),
        (["--pretrained", "/dev/zero"], "is not a regular file"),
        (["--max-input-pixels", "0"], "expected a positive integer"),
        (["--method", "deop", "--deop-checkpoint", "/dev/zero"], "is not a regular file"),
        (["--method", "deop"], DEOP_WITHOUT_CHECKPOINT),
    ],
)
def test_ovss_segment_refuses_bad_flags(files, tmp_path, flags, reason):
    old_params = tmp_path / "old.yaml"
    old_params.write_text("/**:\n  ros__parameters:\n    crop: 224\n")
    flags = [str(old_params) if flag == "OLD_PARAMS" else flag for flag in flags]
    classes = [] if "--classes" in flags else ["--classes", "cat"]
    done = run_tool(
        "segment", str(files["good"]), *classes, *TINY, "-o", str(tmp_path / "out"), *flags
    )
    assert_refused(done, reason)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_ovss_segment_refuses_an_input_that_is_not_a_regular_file(files, tmp_path, kind):
    path = str(files["fifo"]) if kind == "fifo" else kind
    done = run_tool("segment", path, "--classes", "cat", *TINY, "-o", str(tmp_path / "out"))
    assert_refused(done, "is not a regular file or folder")


def test_ovss_segment_never_overwrites_an_input_named_like_its_outputs(files, tmp_path):
    """Given as an input, ``out/labels.txt`` was overwritten by the class list (exit 1)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.txt").write_text("keep me")
    (out / "images.tsv").write_text("keep me too")
    for name in ("labels.txt", "images.tsv"):
        done = run_tool("segment", str(out / name), "--classes", "cat", *TINY, "-o", str(out))
        assert_refused(done, "would overwrite the input image")
    assert (out / "labels.txt").read_text() == "keep me"
    assert (out / "images.tsv").read_text() == "keep me too"


def test_ovss_segment_skips_unreadable_and_bomb_images_bounded(files, tmp_path):
    """Not bad arguments: each image is skipped with its reason (status 1), none decoded."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("empty", "bomb"):
        shutil.copy(files[name], folder / files[name].name)
    done = run_tool("segment", str(folder), "--classes", "cat", *TINY, "-o", str(tmp_path / "o"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "bomb.png: image declares more than" in done.stderr
    assert "empty.jpg: not a readable image" in done.stderr


# --- ovss-eval -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    from test_evaluation_readers import make_voc_layout

    return make_voc_layout(tmp_path_factory.mktemp("voc"))


def _voc_files(root: Path) -> tuple[Path, Path]:
    base = next(root.rglob("JPEGImages")).parent
    image = sorted((base / "JPEGImages").glob("*.jpg"))[0]
    return image, base / "SegmentationClass" / f"{image.stem}.png"


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--class-names", "/dev/zero"], "is not a regular file"),
        (["--short-side", "-3"], "short_side must be in [0, 4096]"),
        (["--max-input-pixels", "-1"], "expected a positive integer"),
        (["--size", "64"], "--size was renamed --short-side"),
        (["--sd-model", "x"], "--sd-model was renamed --dslo-sd-model"),
        (["--method", "deop"], DEOP_WITHOUT_CHECKPOINT),
    ],
)
def test_ovss_eval_refuses_bad_flags(voc_root, flags, reason):
    done = run_tool("evaluate", "voc21", str(voc_root), *TINY, "--no-progress", *flags)
    assert_refused(done, reason)


def test_ovss_eval_refuses_a_missing_data_set_and_an_unknown_one(tmp_path):
    assert_refused(run_tool("evaluate", "voc21", str(tmp_path / "nope"), *TINY), "does not exist")
    assert_refused(run_tool("evaluate", "nosuchset", str(tmp_path)), "unknown data set")


def test_ovss_eval_never_overwrites_an_input(voc_root):
    image, labels = _voc_files(voc_root)
    before = labels.read_bytes()
    done = run_tool("evaluate", "voc21", str(voc_root), *TINY, "--no-progress", "-o", str(labels))
    assert_refused(done, "writing it would overwrite the input")
    assert labels.read_bytes() == before


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("missing labels", "1 files missing"),
        ("labels a folder", "1 files missing"),
        ("split list a folder", "is not a regular file (it is a directory)"),
        ("split list not UTF-8", "is not UTF-8 text"),
        ("images a file", "files missing"),
    ],
)
def test_ovss_eval_refuses_a_bad_layout_with_status_2(voc_root, tmp_path, fault, reason):
    """Issue 20 (ovss-eval exited 1 where the other tools exit 2): the layout's faults."""
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    image, labels = _voc_files(root)
    split = labels.parent.parent / "ImageSets" / "Segmentation" / "val.txt"
    if fault == "missing labels":
        labels.unlink()
    elif fault == "labels a folder":
        labels.unlink()
        labels.mkdir()
    elif fault == "split list a folder":
        split.unlink()
        split.mkdir()
    elif fault == "split list not UTF-8":
        split.write_bytes(b"\xff\xfe bad\n")
    else:
        shutil.rmtree(image.parent)
        image.parent.write_text("not a folder")
    done = run_tool("evaluate", "voc21", str(root), *TINY, "--no-progress")
    assert_refused(done, reason)


@pytest.mark.parametrize("damage", ["empty image", "truncated labels", "bomb image"])
def test_ovss_eval_names_a_damaged_file_of_the_data_set(voc_root, files, tmp_path, damage):
    """A damaged file stops the run (skipping it would change the score) with its name."""
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    image, labels = _voc_files(root)
    if damage == "empty image":
        image.write_bytes(b"")
    elif damage == "truncated labels":
        labels.write_bytes(labels.read_bytes()[:70])
    else:
        shutil.copy(files["bomb"], image)
    done = run_tool("evaluate", "voc21", str(root), *TINY, "--no-progress", "--limit", "1")
    assert_refused(done, image.name if "image" in damage else labels.name)


# --- ovss-bench ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--width", "100000", "--height", "100000"], "make at most 40000000 pixels"),
        (["--width", "0"], "must be at least 1"),
        (["--threads", "-1"], "--threads must be at least 0"),
        (["--iterations", "0"], "--iterations must be at least 1"),
        (["--image", "/dev/zero"], "is not a regular file"),
        (["--image", "BOMB"], "declares more than"),
        (["--affinity", "sd2"], "--affinity was renamed --dslo-affinity"),
        (["--dslo-affinity", "sd3"], "argument --dslo-affinity: unknown dslo.affinity 'sd3'"),
        (["--combos", "naclip+dslo:sd3"], "unknown dslo.affinity 'sd3'"),
        (["--combos", "naclip", "deop+p10"], DEOP_WITHOUT_CHECKPOINT),
    ],
)
def test_ovss_bench_refuses_bad_flags(files, flags, reason):
    flags = [str(files["bomb"]) if flag == "BOMB" else flag for flag in flags]
    assert_refused(run_tool("bench", *TINY, "--iterations", "1", "--warmup", "0", *flags), reason)


def test_ovss_bench_never_overwrites_its_image(files, tmp_path):
    image = tmp_path / "frame.jpg"
    shutil.copy(files["good"], image)
    before = image.read_bytes()
    done = run_tool("bench", *TINY, "--image", str(image), "--json", str(image))
    assert_refused(done, "writing it would overwrite the input")
    assert image.read_bytes() == before


# --- ovss-tune -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    from tiny_blip import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def tune_args(folder: Path, blip: Path, output: Path) -> list[str]:
    return [
        str(folder), "--classes", "cat", "dog", *TINY, "--templates", "single",
        "--pnp-vlm-pretrained", str(blip), "--pnp-image-size", "32", "--pnp-layer", "2",
        "--pnp-head", "3", "--pnp-dropout-patches", "2", "--pnp-refine", "none",
        "--budget", "2",
        "-o", str(output),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--budget", "0"], "--budget must be at least 1"),
        (["--budget", "-1"], "--budget must be at least 1"),
        (["--thresholds", ""], "--thresholds is empty"),
        (["--thresholds", "a,b"], "is not a comma-separated list of numbers"),
        (["--heads", "0-1000000"], "is not a range of at most 1000 values"),
        (["--layers", "x-y"], "'x-y' is not an integer or a range"),
        (["--heads", "1-1000", "--layers", "1-1000"], "candidates"),
        (["--max-images", "-1"], "--max-images must be at least 0"),
        (["--pnp-image-size", "1024"], "pnp.image_size 1024 needs a 1.07 GB attention map"),
        (["--pnp-layer", "0"], "argument --pnp-layer: pnp.layer must be in [1, 1000], got 0"),
        (["--pnp-layer", "9"], "pnp.layer 9 > the VLM's"),
        (["--layer", "2"], "--layer was renamed --pnp-layer"),
        (["--threshold", "0.2"], "--threshold was renamed --pnp-threshold"),
        (["--vlm-model", "blip_itm"], "--vlm-model was renamed --pnp-vlm-model"),
        (["--classes", LONG_CLASS], "is too long for the text model"),
    ],
)
def test_ovss_tune_refuses_bad_flags(files, blip, tmp_path, flags, reason):
    output = tmp_path / "tuned.yaml"
    done = run_tool("tune", *tune_args(files["folder"], blip, output), *flags)
    assert_refused(done, reason)
    assert not output.exists()


def test_ovss_tune_never_overwrites_an_input_image(files, blip, tmp_path):
    """-o onto one of its images overwrote it with YAML (exit 0)."""
    folder = tmp_path / "images"
    shutil.copytree(files["folder"], folder)
    before = (folder / "b.jpg").read_bytes()
    done = run_tool("tune", *tune_args(folder, blip, folder / "b.jpg"))
    assert_refused(done, "writing it would overwrite the input")
    assert (folder / "b.jpg").read_bytes() == before


# --- ovss-train-deop -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from planted_shapes import write_planted_set

    return write_planted_set(tmp_path_factory.mktemp("planted"), train=6, val=3, size=64)


TRAIN = [
    "--stage", "head", *TINY, "--templates", "single", "--no-progress", "--steps", "2",
    "--batch-size", "2", "--crop", "64", "--proposals", "8", "--prompt-length", "0",
]  # fmt: skip


def _damaged(planted: Path, tmp_path: Path, damage: str, bomb: Path) -> Path:
    root = tmp_path / "set"
    shutil.copytree(planted, root)
    images = sorted((root / "train" / "images").iterdir())
    labels = sorted((root / "train" / "labels").iterdir())
    if damage == "empty classes.txt":
        (root / "classes.txt").write_text("")
    elif damage == "every class unseen":
        (root / "unseen.txt").write_text((root / "classes.txt").read_text())
    elif damage == "corrupt image":
        images[1].write_bytes(b"not an image at all")
    elif damage == "0-byte image":
        images[1].write_bytes(b"")
    elif damage == "truncated label":  # the header is whole: found when the pixels are read
        for path in labels:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    elif damage == "bomb image":
        shutil.copy(bomb, images[1])
    elif damage == "mismatched label":
        cv2.imwrite(str(labels[1]), np.zeros((40, 50), np.uint8))
    return root


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("empty classes.txt", "the class list is empty"),
        ("every class unseen", "every class is unseen"),
        ("corrupt image", "0001.png"),
        ("0-byte image", "0001.png"),
        ("truncated label", "labels/000"),
        ("bomb image", "declares more than"),
        ("mismatched label", "differ in size"),
    ],
)
def test_ovss_train_deop_refuses_damaged_data_with_one_line(
    planted, files, tmp_path, damage, reason
):
    """Every file's header is checked before the model loads; a truncated label (its header
    whole) is found when its pixels are read: either way one line naming it, status 2."""
    root = _damaged(planted, tmp_path, damage, files["bomb"])
    done = run_tool("train_deop", "folder", str(root), *TRAIN, "--output", str(tmp_path / "run"))
    assert_refused(done, reason)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--batch-size", "100000"], "batch_size 100000 of 64x64 crops"),
        (["--crop", "100000"], "crop must be at most 2048"),
        (["--workers", "-1"], "workers must be >= 0"),
        (["--lr", "inf"], "lr must be > 0 and finite"),
        (["--scale", "nan", "1"], "scale_min must be > 0 and finite"),
        (["--val-size", "-1"], "val_short_side must be >= 0"),
        (["--max-input-pixels", "0"], "expected a positive integer"),
    ],
)
def test_ovss_train_deop_refuses_bad_flags(planted, tmp_path, flags, reason):
    done = run_tool(
        "train_deop", "folder", str(planted), *TRAIN, "--output", str(tmp_path / "run"), *flags
    )
    assert_refused(done, reason)


def test_ovss_train_deop_refuses_an_output_that_is_a_file(planted, tmp_path):
    output = tmp_path / "a_file"
    output.write_text("keep")
    done = run_tool("train_deop", "folder", str(planted), *TRAIN, "--output", str(output))
    assert_refused(done, "exists and is not a folder")
    assert output.read_text() == "keep"


def test_ovss_train_deop_refuses_an_output_below_a_file_before_the_model_loads(
    planted, tmp_path
):
    """Issue 20: status 1 (after loading the model) where ovss-eval says 2 for the same path."""
    blocking = tmp_path / "a_file"
    blocking.write_text("keep")
    output = blocking / "run"
    done = run_tool("train_deop", "folder", str(planted), *TRAIN, "--output", str(output))
    assert_refused(done, f"{str(blocking)!r} is not a folder")
    assert "RANDOM weights" not in done.stderr  # refused before the model loads
    assert blocking.read_text() == "keep"


# --- ovss-bag ------------------------------------------------------------------------------------


def test_ovss_bag_refuses_an_input_that_is_not_a_bag(files, tmp_path):
    base = ["--topic", "/camera/image_raw", "--classes", "cat", *TINY]
    out = str(tmp_path / "out")
    assert_refused(run_tool("bag", str(files["fifo"]), out, *base), "is not a regular file")
    bag = tmp_path / "bag"
    bag.mkdir()
    os.mkfifo(bag / "metadata.yaml")
    assert_refused(run_tool("bag", str(bag), out, *base, timeout=120), "is not a regular file")
    for storage in (StoragePlugin.SQLITE3, StoragePlugin.MCAP):
        # A bag whose storage file is a FIFO: the reader blocked on it for ever before (found by
        # a reviewer of issue 18). The bag is real, its metadata complete.
        piped = tmp_path / f"piped_{storage.name}"
        with Writer(piped, version=9, storage_plugin=storage) as writer:
            note = writer.add_connection("/note", "std_msgs/msg/String", typestore=STORE)
            text = STORE.types["std_msgs/msg/String"](data="frame")
            writer.write(note, 1, STORE.serialize_cdr(text, "std_msgs/msg/String"))
        (storage_file,) = (p for p in piped.iterdir() if p.name != "metadata.yaml")
        storage_file.unlink()
        os.mkfifo(storage_file)
        done = run_tool("bag", str(piped), out, *base, timeout=120)
        assert_refused(done, f"{storage_file.name}' is not a regular file")
    assert_refused(run_tool("bag", str(files["good"]), out, *base), "is not a rosbag2 folder")
    assert_refused(run_tool("bag", str(tmp_path), out, *base, "--alpha", "5"), "--alpha")
