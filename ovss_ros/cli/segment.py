"""ovss-segment: segment image files or folders into label PNGs and overlays.

    ovss-segment photos/ --classes "person" "cup; mug" "door handle" --output out/

For each input image it writes ``<name>_labels.png`` (label value = class index, 255 or 65535 =
unlabeled, as on the node's ~/labels topic) and ``<name>_overlay.jpg``; ``labels.txt`` maps class
index -> name and ``images.tsv`` maps each image written to its output files. ``<name>`` is the
file's stem; where stems clash (``a.jpg`` and ``a.png``, the same file name in two folders, names
that differ only in case or Unicode normalisation, compared as a case-insensitive file system
does), every image of the clash is named longer: ``<stem>_<ext>``, then ``<folder>_<stem>_<ext>``,
then ``<stem>_<ext>_<n>`` (n = its position among the inputs). A file given more than once
(twice, or as itself and through its folder) is segmented once. Outputs are in the file's stored
pixel grid (EXIF orientation is not applied), like the ground-truth masks of data sets.
``--presence-lists`` (method pnp_ovss): the classes of each image from a class-list file in the
PnP-OVSS release's JSON layout (key: the file's stem; class ids: 1-based positions in
--classes; probability above 70 kept, the first class when none is), instead of CLIP presence.
Exit status: 0 every image written, 1 some skipped (unreadable, over --max-input-pixels, failed),
2 bad arguments or inputs, 130 Ctrl-C and 143 SIGTERM (the images written so far are complete).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args, parse_engine_args
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.tool_parser import IMAGE_SUFFIXES, ToolParser
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.methods.pnp_ovss.presence_lists import (
    PresenceLists,
    lists_argument,
    load_for_method,
)
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.core.vocabulary import VocabularyError
from ovss_ros.ros.image_conversion import ImageConversionError, ImageTooLarge, image_file_to_rgb8
from ovss_ros.ros.signals import StopSignals

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

LABELS_SUFFIX = "_labels.png"
OVERLAY_SUFFIX = "_overlay.jpg"
MANIFEST = "images.tsv"
# Why an image has no outputs.
UNREADABLE = "unreadable"
TOO_LARGE = "over --max-input-pixels"
FAILED = "failed"
logger = logging.getLogger("ovss-segment")


def _file_id(path: Path) -> tuple[int, int]:
    info = path.stat()  # follows links: two names of one file are one file
    return info.st_dev, info.st_ino


def image_files(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive); each file once.

    A file reached twice (given twice, through a link, or as itself and through its folder) is
    kept where it first appears. Raises FileNotFoundError for an input that does not exist,
    ValueError for one that is neither a regular file nor a folder (never opened).
    """
    files: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        elif item.is_file():
            found = [item]
        elif os.path.lexists(item):
            raise ValueError(
                f"input {str(item)!r} is not a regular file or folder (a device, pipe or socket, "
                "or a broken link)"
            )
        else:
            raise FileNotFoundError(f"input {str(item)!r} does not exist")
        for path in found:
            key = _file_id(path)
            if key in seen:
                logger.info("%s is the same file as %s: segmenting it once", path, seen[key])
                continue
            seen[key] = path
            files.append(path)
    return files


def _name_key(name: str) -> str:
    """How a case-insensitive, normalisation-insensitive file system (macOS, Windows) compares."""
    return unicodedata.normalize("NFC", name).casefold()


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct output name per file: its stem, made longer only for the files whose names clash.

    Each file has four candidate names, the last unique by construction (it ends in the file's
    position): stem, stem_ext, folder_stem_ext, stem_ext_<n>. Every file in a clash moves to its
    next candidate until no two names compare equal (NFC, case-folded), so the result does not
    depend on which file of a clash comes first.
    """
    candidates = []
    for number, path in enumerate(files, start=1):
        with_ext = f"{path.stem}_{path.suffix[1:]}" if path.suffix else path.stem
        folder = path.resolve().parent.name
        in_folder = f"{folder}_{with_ext}" if folder else with_ext
        candidates.append([path.stem, with_ext, in_folder, f"{with_ext}_{number}"])
    level = [0] * len(files)
    while True:
        names = [options[i] for options, i in zip(candidates, level, strict=True)]
        counts = Counter(map(_name_key, names))
        clashing = [i for i, name in enumerate(names) if counts[_name_key(name)] > 1]
        if not clashing:
            return names
        for i in clashing:
            level[i] = min(level[i] + 1, 3)


@dataclass(frozen=True)
class ImageJob:
    """One input image and the outputs it gets."""

    path: Path
    name: str

    def outputs(self, folder: Path, with_overlay: bool) -> list[Path]:
        paths = [folder / f"{self.name}{LABELS_SUFFIX}"]
        return paths + ([folder / f"{self.name}{OVERLAY_SUFFIX}"] if with_overlay else [])


def plan(inputs: Sequence[str], output: Path, with_overlay: bool) -> list[ImageJob]:
    """The images and their output names, checked before any model is loaded.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: ``output`` is not a folder, an input is not a regular file or folder, or an
            output file (labels, overlay, labels.txt, images.tsv) would overwrite an input.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is not a folder")
    files = image_files(inputs)
    jobs = [ImageJob(p, n) for p, n in zip(files, output_names(files), strict=True)]
    for job in jobs:
        if job.name != job.path.stem:
            logger.info("%s shares its name with another input: writing %s_*", job.path, job.name)
    inputs_by_id = {_file_id(job.path): job.path for job in jobs}
    outputs = [output / "labels.txt", output / MANIFEST]
    outputs += [path for job in jobs for path in job.outputs(output, with_overlay)]
    for path in outputs:
        if path.exists() and (clash := inputs_by_id.get(_file_id(path))) is not None:
            raise ValueError(
                f"output {str(path)!r} would overwrite the input image {str(clash)!r}; "
                "choose another --output"
            )
    return jobs


@dataclass
class SegmentReport:
    """What happened to the images; ``written`` is what the output folder holds from this run."""

    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # cause -> images
    interrupted: bool = False

    def skip(self, cause: str) -> None:
        self.skipped[cause] = self.skipped.get(cause, 0) + 1


def build_parser() -> ToolParser:
    """ovss-segment's flags: its own, then every engine setting's (``engine_args``)."""
    parser = ToolParser(
        prog="ovss-segment",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--classes", nargs="+", required=True, help="class names ('a; synonym')")
    parser.add_argument("--output", "-o", default="ovss_out", help="output folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("--no-overlay", action="store_true", help="write label PNGs only")
    parser.add_argument(
        "--no-legend", action="store_true", help="no legend (classes and colours) on the overlay"
    )
    parser.add_argument(
        "--presence-lists",
        type=lists_argument,
        help="pnp_ovss: per-image class lists in the PnP-OVSS release's JSON layout (a file, or "
        "a folder whose .json files are merged) instead of CLIP presence",
    )
    add_max_input_pixels_argument(parser)
    add_engine_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_engine_args(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    output = Path(args.output)
    try:
        if not 0.0 <= args.alpha <= 1.0:  # False for NaN too
            raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
        jobs = plan(args.inputs, output, not args.no_overlay)
        config = config_from_args(args)
        config.validate()
        lists = load_for_method(args.presence_lists, config.method)
        if lists is not None:
            lists.check_ids(len(args.classes))
            lists.check_images([job.path.stem for job in jobs])
        from ovss_ros.core.segmenter import Segmenter  # the model libraries: arguments checked

        segmenter = Segmenter(config)
        segmenter.set_classes(args.classes)
        args.segment = _segment_function(segmenter, lists)
        notice, warn = segmenter.method_notice()  # e.g. the DeOP release's own input size
        if notice != config.method:
            (logger.warning if warn else logger.info)("method %s", notice)
    except (FileNotFoundError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing was written
        logger.warning("interrupted before the first image; nothing written")
        return 130
    output.mkdir(parents=True, exist_ok=True)
    (output / "labels.txt").write_text(
        "".join(f"{i} {c.name}\n" for i, c in enumerate(segmenter.classes))
    )
    with StopSignals() as stop:
        report = _segment_all(jobs, segmenter, output, args, stop)
        status = _summarise(len(jobs), output, report, stop)
        if stop.received is not None:
            stop.ignore_further()  # told to stop: only the exit is left, a second Ctrl-C waits
    return status


def _segment_all(
    jobs: Sequence[ImageJob],
    segmenter: Segmenter,
    output: Path,
    args: argparse.Namespace,
    stop: StopSignals,
) -> SegmentReport:
    """Each image is read and segmented (interruptible), then its files are written together."""
    report = SegmentReport()
    with (output / MANIFEST).open("w", newline="", encoding="utf-8") as manifest_file:
        manifest = csv.writer(manifest_file, dialect="excel-tab")
        manifest.writerow(["image", "labels", "overlay"])
        try:
            for job in jobs:
                with stop.interruptible():  # nothing of this image is written yet
                    result = _segment_one(job, segmenter, args)
                if isinstance(result, str):
                    report.skip(result)
                    continue
                rgb, segmentation = result
                paths = job.outputs(output, not args.no_overlay)
                if _write_outputs(job, paths, rgb, segmentation, args.alpha, not args.no_legend):
                    overlay_name = paths[1].name if len(paths) > 1 else ""
                    manifest.writerow([str(job.path), paths[0].name, overlay_name])
                    manifest_file.flush()
                    report.written += 1
                    _log_classes(job, segmentation)
                else:
                    report.skip(FAILED)
        except KeyboardInterrupt:
            report.interrupted = True
    return report


def _segment_one(
    job: ImageJob, segmenter: Segmenter, args: argparse.Namespace
) -> tuple[np.ndarray, Segmentation] | str:
    """(RGB, segmentation) of one image, or the cause of its skip (logged)."""
    try:
        rgb = image_file_to_rgb8(job.path, max_pixels=args.max_input_pixels)
    except ImageTooLarge as error:
        logger.warning("skipping %s: %s", job.path, error)
        return TOO_LARGE
    except (ImageConversionError, OSError) as error:
        logger.warning("skipping %s: not a readable image (%s)", job.path, error)
        return UNREADABLE
    try:
        return rgb, args.segment(rgb, job.path)
    except Exception as error:  # e.g. out of memory: this image fails, the next may not
        reason = f"{type(error).__name__}: {error}"
        logger.warning("skipping %s: segmentation failed: %s", job.path, reason)
        return FAILED


def _segment_function(
    segmenter: Segmenter, lists: PresenceLists | None
) -> Callable[[np.ndarray, Path], Segmentation]:
    """segment(rgb, path): the engine's, or PnP-OVSS prompted with the image's listed classes."""
    if lists is None:
        return lambda rgb, _path: segmenter.segment(rgb)
    core, count = segmenter.pipeline.core, len(segmenter.classes)
    return lambda rgb, path: core.segment(rgb, lists.vocabulary_indices(path.stem, count))


def _write_outputs(
    job: ImageJob,
    paths: list[Path],
    rgb: np.ndarray,
    segmentation: Segmentation,
    alpha: float,
    legend: bool,
) -> bool:
    """Write the label PNG (and overlay); all or none: a partial set is removed."""
    from ovss_ros.core.drawing import overlay  # its palette costs 0.25 s: not at start-up

    images = [segmentation.labels]
    if len(paths) > 1:
        images.append(overlay(rgb, segmentation, alpha, legend=legend)[:, :, ::-1])
    for number, (path, image) in enumerate(zip(paths, images, strict=True)):
        try:
            written = cv2.imwrite(str(path), image)
            reason = "" if written else "OpenCV could not write it"
        except cv2.error as error:
            written, reason = False, str(error).strip().splitlines()[-1]
        if not written:
            logger.warning("skipping %s: cannot write %s: %s", job.path, path, reason)
            for done in paths[:number]:
                done.unlink(missing_ok=True)
            return False
    return True


def _log_classes(job: ImageJob, segmentation: Segmentation) -> None:
    labels = segmentation.labels
    counts = np.bincount(labels[labels != segmentation.unlabeled].ravel())
    found = ", ".join(
        f"{segmentation.class_names[i]} {n / labels.size:.1%}" for i, n in enumerate(counts) if n
    )
    logger.info("%s: %s", job.path, found or "nothing labelled")


def _summarise(total: int, output: Path, report: SegmentReport, stop: StopSignals) -> int:
    skipped = sum(report.skipped.values())
    causes = ", ".join(f"{n} {cause}" for cause, n in report.skipped.items())
    line = f"wrote {report.written} of {total} images to {output}"
    line += f" ({skipped} skipped: {causes})" if skipped else ""
    if report.interrupted:
        name = stop.received.name if stop.received is not None else "SIGINT"
        logger.warning("interrupted by %s: %s", name, line)
        return stop.exit_status()
    logger.info("%s", line)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
