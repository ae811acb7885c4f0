"""ovss-segment: segment image files or folders into label PNGs and overlays.

    ovss-segment photos/ --classes "person" "cup; mug" "door handle" --output out/

For each input image it writes ``<stem>_labels.png`` (label value = class index, 255 or 65535 =
unlabeled, as on the node's ~/labels topic), ``<stem>_overlay.jpg`` and one ``labels.txt`` with
the class index -> name map.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.core import ModelLoadError, Segmenter, VocabularyError, overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
logger = logging.getLogger("ovss-segment")


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {str(item)!r} does not exist")
    return files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ovss-segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--classes", nargs="+", required=True, help="class names ('a; synonym')")
    parser.add_argument("--output", "-o", default="ovss_out", help="output folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("--no-overlay", action="store_true", help="write label PNGs only")
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        files = image_files(args.inputs)
        config = config_from_args(args)
        config.validate()
        segmenter = Segmenter(config)
        segmenter.set_classes(args.classes)
    except (FileNotFoundError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", error)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "labels.txt").write_text(
        "".join(f"{i} {c.name}\n" for i, c in enumerate(segmenter.classes))
    )
    failures = 0
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            logger.warning("skipping %s: not a readable image", path)
            failures += 1
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        result = segmenter.segment(rgb)
        cv2.imwrite(str(output / f"{path.stem}_labels.png"), result.labels)
        if not args.no_overlay:
            blended = overlay(rgb, result, args.alpha)
            cv2.imwrite(str(output / f"{path.stem}_overlay.jpg"), blended[:, :, ::-1])
        counts = np.bincount(result.labels[result.labels != result.unlabeled].ravel())
        found = ", ".join(
            f"{result.class_names[i]} {n / result.labels.size:.1%}"
            for i, n in enumerate(counts)
            if n
        )
        logger.info("%s: %s", path.name, found or "nothing labelled")
    logger.info("wrote %d of %d images to %s", len(files) - failures, len(files), output)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
