"""Write tiny random models for trying every method without weights, then print the commands.

    python scripts/make_tiny_models.py tiny

writes ``tiny/blip`` (a BLIP for pnp_ovss), ``tiny/sd2`` (a Stable Diffusion pipeline for DSLO's
sd2 affinity), ``tiny/clip-tiny.json`` + ``tiny/clip-tiny.pt`` (an open_clip ViT and its random
state dict, the CLIP of every method and of DeOP training), ``tiny/shapes`` (a small labelled
data set for ovss-train-deop) and ``tiny/example.jpg``, with the real transformers, diffusers and
open_clip classes at tiny random configurations, and prints the commands that run each method
with them (``ovss-segment`` on an image, and the node). Their outputs are MEANINGLESS (random
weights): this is for trying the plumbing and seeing the shape of the CPU cost. See
docs/without_weights.md. Exit status 0 done, 2 bad arguments (one line on stderr), 1 a part
could not be written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ovss_ros

from ovss_ros.cli.tool_parser import ToolParser, bad_input, one_line  # noqa: E402

PROG = "make_tiny_models.py"
CLASSES = ("person", "chair", "table")
# The tiny models' sizes (ovss_ros.tools): CLIP 64 px; BLIP 32 px, 3 text layers x 4 heads.
CLIP_SETTINGS = {"device": "cpu", "short_side": 64, "templates": "single"}
PNP = {"method": "pnp_ovss", "pnp.image_size": 32, "pnp.layer": 2, "pnp.head": 3}
SD2 = {"method": "naclip", "refinement": "dslo", "dslo.affinity": "sd2", "dslo.sd.size": 64}
TRAINING = ["--steps", "4", "--batch-size", "2", "--crop", "64", "--proposals", "8"]
TRAINING += ["--checkpoint-every", "0", "--validate-every", "0", "--no-progress"]


MARKER = ".ovss_tiny_models"  # in DIR: what --force may write into again


def parse_args(argv: list[str] | None):  # noqa: ANN201 (argparse.Namespace)
    parser = ToolParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", metavar="DIR", help="folder to write (made if missing)")
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"write again into a DIR an earlier run wrote (it holds {MARKER})",
    )
    parser.add_argument(
        "--image",
        help="image the printed ovss-segment commands segment (default: DIR/example.jpg, a "
        "photo the package ships, copied there)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed (default: 0)")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**32:  # numpy's and torch's seeds
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    return args


def prepare_folder(folder: Path, force: bool) -> None:
    """Make ``folder`` and check that a file can be written in it, before any model library
    loads; refuse (status 2, one line) one that is a file, is not empty without ``force``, or
    cannot be made or written."""
    if os.path.lexists(folder):
        if not folder.is_dir():
            bad_input(PROG, f"{str(folder)!r} exists and is not a folder")
        if any(folder.iterdir()) and not force:
            bad_input(
                PROG, f"{str(folder)!r} is not empty: give an empty or new folder, or --force"
            )
        if any(folder.iterdir()) and not (folder / MARKER).is_file():
            bad_input(
                PROG,
                f"{str(folder)!r} is not empty and no earlier run of this script wrote it (no "
                f"{MARKER}): --force only writes again into such a folder",
            )
    else:
        place = next(p for p in folder.absolute().parents if os.path.lexists(p))
        if not place.is_dir():
            bad_input(PROG, f"{str(folder)!r} cannot be made: {str(place)!r} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        bad_input(PROG, f"{str(folder)!r} cannot be written: {error.strerror or error}")


def check_image(image: str | None) -> None:
    if image is not None and not Path(image).expanduser().is_file():
        bad_input(PROG, f"--image {image!r} is not a file")


def shown(path: Path) -> str:
    """A path as the commands give it: relative ones start with ./ so that ``pnp.vlm_pretrained``
    and ``dslo.sd.model`` read them as folders, never as Hugging Face hub ids (``a/b``), even
    run from another folder (then: not found)."""
    text = str(path)
    return text if path.is_absolute() or text.startswith(".") else f".{os.sep}{text}"


def flag(name: str) -> str:
    return "--" + name.replace(".", "-").replace("_", "-")


def segment_command(image: str, output: str, settings: dict) -> str:
    words = ["ovss-segment", image, "--classes", *CLASSES]
    for name, value in settings.items():
        words += [flag(name), str(value)]
    return shlex.join([*words, "-o", output])


def node_command(settings: dict) -> str:
    words = ["ovss_node", "--ros-args"]
    for name, value in {**settings, "classes": f"[{', '.join(CLASSES)}]"}.items():
        words += ["-p", f"{name}:={value}"]
    return shlex.join(words)


def commands(folder: Path, image: str) -> list[tuple[str, str]]:
    """(comment, command) in the order to run them; paths as ``shown``."""
    from ovss_ros.tools import tiny_models as tm

    def path(name: str) -> str:
        return shown(folder / name)

    clip = {"model": path(tm.CLIP_JSON), "pretrained": path(tm.CLIP_WEIGHTS), **CLIP_SETTINGS}
    run = path("deop-run")
    deop = {**clip, "method": "deop", "deop.checkpoint": shown(folder / "deop-run/checkpoint.pt")}
    methods = {
        "pnp_ovss": {**clip, **PNP, "pnp.vlm_pretrained": path(tm.BLIP)},
        "naclip + dslo (sd2 affinity)": {**clip, **SD2, "dslo.sd.model": path(tm.SD2)},
    }
    out = []
    for name, settings in methods.items():
        slug = settings["method"] if name == "pnp_ovss" else "dslo_sd2"
        out.append((f"{name}, one image", segment_command(image, path(f"out/{slug}"), settings)))
        out.append((f"{name}, the node", node_command(settings)))
    train = ["ovss-train-deop", "folder", path(tm.SHAPES), "--stage", "head", "--output", run]
    train += ["--model", clip["model"], "--pretrained", clip["pretrained"], "--device", "cpu"]
    out.append(("train DeOP on the tiny CLIP (a few steps)", shlex.join(train + TRAINING)))
    out.append(
        ("deop with that checkpoint, one image", segment_command(image, path("out/deop"), deop))
    )
    out.append(("deop with that checkpoint, the node", node_command(deop)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.folder).expanduser()
    check_image(args.image)
    prepare_folder(folder, args.force)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bars per saved part
    from transformers.utils import logging as transformers_logging  # arguments checked: torch

    from ovss_ros.tools.tiny_models import EXAMPLE, write_all

    transformers_logging.disable_progress_bar()
    try:
        (folder / MARKER).write_text("written by scripts/make_tiny_models.py\n")
        write_all(folder, args.seed)
    except OSError as error:
        print(
            f"{PROG}: error: could not write {str(folder)!r}: {one_line(error)}", file=sys.stderr
        )
        return 1
    image = shown(Path(args.image).expanduser()) if args.image else shown(folder / EXAMPLE)
    print(
        f"Tiny RANDOM models written to {shown(folder)}: every output of them is MEANINGLESS "
        "(random weights); they are for trying the plumbing and the CPU cost's shape "
        "(docs/without_weights.md).\n"
    )
    for comment, command in commands(folder, image):
        print(f"# {comment}:\n{command}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
