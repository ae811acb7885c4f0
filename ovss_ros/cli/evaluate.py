"""ovss-eval: score the segmenter on a standard benchmark (mIoU, mAcc, aAcc per data set).

    ovss-eval voc21 ~/data/VOCdevkit/VOC2012 --limit 100 --output voc21.json
    ovss-eval cityscapes ~/data/cityscapes --method sclip --device cuda
    ovss-eval voc21 ~/data/VOCdevkit/VOC2012 --method naclip --protocol standard
    ovss-eval voc21 ~/data/VOCdevkit/VOC2012 --protocol dslo --dslo-sd-model ~/models/sd2-base
    ovss-eval coco_stuff ~/data/coco_stuff164k --method deop --deop-checkpoint model_final.pth

The engine settings default to the official protocol of the method (``--method``; naclip,
sclip, clearclip and deop have their own, the other methods get ``standard``) on the data set:
weights, short side, sliding window, probability threshold, logit scale, SCLIP's area
threshold, PAMR, class names and background words (``ovss_ros.evaluation.protocol``).
``--protocol`` picks another method's protocol (``freecp``: FreeCP's settings, refinement and
variant of the base method, e.g. ``--method sclip --protocol freecp``; ``dslo``: DSLO's
published configuration, ``config/dslo_paper.yaml``; give the Stable Diffusion model with
``--dslo-sd-model`` where the hub is not reachable; ``deop``, the default of ``--method deop``:
DeOP's released evaluation, COCO-Stuff's 171 classes at short side 512, with the mIoU of its
156 seen and 15 unseen classes and their harmonic mean, hIoU; ``--seen-unseen`` adds those to
any protocol on coco_stuff; ``--method twostream`` on the DeOP release's file runs the
release's ensemble with the data set's seen classes in ``twostream.seen_classes``: COCO-Stuff's
156, VOC20's 15, none elsewhere, unless given; ``pnp_ovss``: PnP-OVSS as its release evaluates
it, with ``--presence-lists`` its per-image class lists, and the release's scoring printed
beside the standard one, ``ovss_ros.evaluation.pnp_release``); ``--params-file`` reads engine
settings from a params file over the protocol's; any engine flag overrides single settings
(``--background-words`` replaces the data set's background words). Data sets: voc21, context60,
coco_object, voc20, context59, coco_stuff, cityscapes, ade20k, each read from the folder layout
listed below (``ovss_ros.evaluation.dataset_readers.LAYOUTS``, docs/tools.md).

Exit status: 0 scored, 1 the report could not be written (the scores are printed first), 2 bad
arguments, data set, files or settings (one line on stderr; a damaged image or label stops the
run, naming the file: skipping it would change the score), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args, parse_engine_args
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.tool_parser import (
    BAD_INPUT,
    FAILED,
    INTERRUPTED,
    ToolParser,
    not_an_input,
    one_line,
    writable_folder,
)
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.config import PIPELINE_METHODS, EngineConfig
from ovss_ros.core.methods.freecp.settings import DATASET_THRESHOLDS as FREECP_THRESHOLDS
from ovss_ros.core.methods.pnp_ovss.presence_lists import lists_argument
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.core.vocabulary import VocabularyError
from ovss_ros.evaluation import PROTOCOLS, EvaluationResult, evaluate, get_protocol
from ovss_ros.evaluation.class_splits import SPLITS, ClassSplit, seen_class_names
from ovss_ros.evaluation.dataset_readers import layout_text
from ovss_ros.evaluation.pnp_release import (
    CATEGORY_IDS,
    ListedRun,
    ReleaseRun,
    check_release_set,
    checked_lists,
    release_report,
)
from ovss_ros.evaluation.protocol import (
    METHOD_PROTOCOLS,
    DatasetProtocol,
    MethodProtocol,
    load_vocabulary,
    method_protocol,
)

if TYPE_CHECKING:  # the model libraries are imported once the arguments are checked
    from ovss_ros.core.segmenter import Segmenter

logger = logging.getLogger("ovss-eval")
EXIT_STATUS = textwrap.fill(" ".join(__doc__.rsplit("\n\n", 1)[1].split()), 79)
LAYOUT_HELP = (
    textwrap.fill(
        "Data-set layouts: the data set's folder (the one named here, or a folder above it that "
        "holds it under that name; VOC: VOCdevkit/VOC2012 or VOC2012) holds these files "
        "(<id>, <city>, <name>: any part of a file name; an image without its labels is refused "
        "before any work):",
        79,
    )
    + "\n"
    + layout_text()
)


def build_parser(
    protocol: DatasetProtocol | None, method: MethodProtocol | None = None, first: bool = False
) -> argparse.ArgumentParser:
    """Parser whose engine defaults are the method protocol's on the data set (generic ones
    before they are known). ``first``: the pass that finds the data set and the method, with
    every flag (so that a flag's value is never taken for the data set) but no --help and no
    positional required."""
    parser = ToolParser(
        prog="ovss-eval",
        description=__doc__.split("\n\n")[0],
        epilog=f"{EXIT_STATUS}\n\n{LAYOUT_HELP}",
        add_help=not first,
    )
    optional = {"nargs": "?"} if first else {}
    parser.add_argument("dataset", help=f"one of {', '.join(PROTOCOLS)}", **optional)
    parser.add_argument(
        "root",
        type=Path,
        help="data set folder (e.g. VOCdevkit/VOC2012; layouts below)",
        **optional,
    )
    parser.add_argument(
        "--protocol",
        choices=list(METHOD_PROTOCOLS),
        help="official settings of this method's code (default: the --method's own)",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--output", "-o", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--class-names",
        type=Path,
        help="replacement class-name file (same lines as the built-in one, ';' synonyms)",
    )
    parser.add_argument(
        "--seen-unseen",
        action=argparse.BooleanOptionalAction,
        help="also report mIoU of the seen and the unseen classes and their harmonic mean "
        "(hIoU) on a data set with a zero-shot split (coco_stuff: DeOP's 156/15); default: on "
        "with the deop protocol, off with the others",
    )
    parser.add_argument(
        "--presence-lists",
        type=lists_argument,
        help="method pnp_ovss: per-image class lists in the PnP-OVSS release's JSON layout (a "
        "file, or the release's GPT4o_classification folder) instead of CLIP presence",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_max_input_pixels_argument(parser)
    defaults = {}
    if protocol is not None and method is not None:
        settings = method.for_dataset(protocol)
        defaults = {
            "model": method.model,
            "pretrained": method.pretrained,
            **settings.engine(),
            "refinement": method.refinement,
            **method.engine,
            **method.dataset_engine.get(protocol.name, {}),
        }
        if protocol.name in FREECP_THRESHOLDS:  # FreeCP's released per-data-set settings
            redundancy, ambiguity = FREECP_THRESHOLDS[protocol.name]
            defaults |= {"freecp.redundancy": redundancy, "freecp.ambiguity": ambiguity}
    add_engine_arguments(parser, defaults=defaults)
    return parser


def parse_args(
    argv: list[str] | None,
) -> tuple[argparse.Namespace, DatasetProtocol, MethodProtocol]:
    """Two passes: the data set and the method (or --protocol) decide the engine defaults."""
    known, _ = build_parser(None, first=True).parse_known_args(argv)
    protocol = method = None
    if known.dataset is not None:
        try:
            protocol = get_protocol(known.dataset)
            method = method_protocol(known.protocol, known.method)
        except ValueError as error:
            build_parser(None).error(str(error))
    args = parse_engine_args(build_parser(protocol, method), argv)
    if args.limit is not None and args.limit < 1:
        build_parser(protocol, method).error("--limit must be at least 1")
    if method.name == "pnp_ovss":
        try:
            check_release_set(protocol.name)
            if args.method != "pnp_ovss":
                raise ValueError(
                    f"the pnp_ovss protocol runs --method pnp_ovss, not {args.method}"
                )
            if args.score_threshold:
                raise ValueError(
                    f"--score-threshold {args.score_threshold}: the pnp_ovss protocol scores as "
                    "the release, which has no score threshold (its pixels would be scored as a "
                    "class): leave it at 0"
                )
        except ValueError as error:
            build_parser(protocol, method).error(str(error))
    if args.seen_unseen and protocol.name not in SPLITS:
        build_parser(protocol, method).error(
            f"--seen-unseen: {protocol.name} has no seen/unseen class split (only "
            f"{', '.join(SPLITS)}: {', '.join(s.name for s in SPLITS.values())})"
        )
    return args, protocol, method


def class_split(
    args: argparse.Namespace, protocol: DatasetProtocol, method: MethodProtocol
) -> ClassSplit | None:
    """The data set's seen/unseen split when --seen-unseen (default: the protocol's
    ``class_splits``) asks for it and the data set has one."""
    wanted = method.class_splits if args.seen_unseen is None else args.seen_unseen
    return SPLITS.get(protocol.name) if wanted else None


def engine_config(
    args: argparse.Namespace,
    background_words: tuple[str, ...],
    method: MethodProtocol | None = None,
) -> EngineConfig:
    """Flags -> EngineConfig; the data set's background words unless --background-words is
    given; the protocol's own variant of the --method (``method.base_variants``, e.g. FreeCP's)."""
    config = config_from_args(args)
    if method is not None and config.method in method.base_variants:
        config = replace(config, method=method.base_variants[config.method])
    if config.method in PIPELINE_METHODS:
        # The dense methods' protocol (windows, PAMR, area filter) does not apply to them, and
        # pnp_ovss makes its own background (where no class map fires).
        config = config.replace(
            {"dense.crop": 0, "dense.stride": 0, "dense.pamr": False, "dense.area_threshold": 0.0}
        )
        if config.method == "pnp_ovss":
            background_words = ()
    if not config.background_words:
        config = replace(config, background_words=background_words)
    if config.dense.crop == 0:
        config = config.replace({"dense.stride": 0})  # whole-image inference has no stride
    return config


@dataclass
class EmptyAsFirstClass:
    """A segmenter whose unlabeled pixels are scored as class 0 (FreeCP's protocol on data sets
    without background and without a probability threshold, ``MethodProtocol.empty_as_first``:
    there the engine leaves only pixels without any surviving class unlabeled, which FreeCP's
    argmax over all-zero scores gives its first class)."""

    segmenter: Segmenter

    def segment(self, rgb: np.ndarray) -> Segmentation:
        segmentation = self.segmenter.segment(rgb)
        labels = segmentation.labels.copy()
        labels[labels == segmentation.unlabeled] = 0
        return replace(segmentation, labels=labels)


def protocol_segmenter(
    segmenter: Segmenter, method: MethodProtocol, has_background: bool
) -> Segmenter | EmptyAsFirstClass:
    """The segmenter as the protocol scores it (see ``EmptyAsFirstClass``)."""
    config = segmenter.config
    if (
        method.empty_as_first
        and not has_background
        and config.refinement == "freecp"
        and config.score_threshold == 0
    ):
        return EmptyAsFirstClass(segmenter)
    return segmenter


def format_report(result: EvaluationResult, title: str, split: ClassSplit | None = None) -> str:
    """Per-class IoU / Acc table followed by the summary line (and with a ``split``, the line
    of its seen / unseen mIoU and hIoU), as a plain-text block."""
    width = max(len(name) for name in result.label_names)
    lines = [f"{title}: {result.images} images", f"{'class':<{width}}     IoU     Acc"]
    for row in result.per_class():
        iou = "   -  " if row["iou"] is None else f"{row['iou']:6.2f}"
        acc = "   -  " if row["acc"] is None else f"{row['acc']:6.2f}"
        lines.append(f"{row['name']:<{width}}  {iou}  {acc}")
    summary = result.summary()
    lines.append(
        f"mIoU {summary['mIoU']:.2f}  mAcc {summary['mAcc']:.2f}  aAcc {summary['aAcc']:.2f}  "
        f"({result.images / max(result.segment_seconds, 1e-9):.2f} images/s in the engine)"
    )
    if split is not None:
        scores = result.confusion.split_summary(split.unseen)
        seen = len(split.seen(len(result.label_names)))
        lines.append(
            f"mIoU seen ({seen}) {scores['mIoU_seen']:.2f}  unseen ({len(split.unseen)}) "
            f"{scores['mIoU_unseen']:.2f}  hIoU {scores['hIoU']:.2f}  ({split.name} split)"
        )
    return "\n".join(lines)


def split_report(result: EvaluationResult, split: ClassSplit | None) -> dict[str, object]:
    """The JSON report's split entries: the seen / unseen mIoU and hIoU (None where NaN) and the
    split itself; nothing without a split."""
    if split is None:
        return {}
    scores = result.confusion.split_summary(split.unseen)
    return {
        **{
            key: None if math.isnan(scores[key]) else scores[key]
            for key in ("mIoU_seen", "mIoU_unseen", "hIoU")
        },
        "class_split": split.to_dict(len(result.label_names)),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, protocol, method = parse_args(argv)
    try:
        return score(args, protocol, method)
    except KeyboardInterrupt:  # Ctrl-C: no report (a partial score would mislead)
        print("ovss-eval: interrupted; nothing scored", file=sys.stderr)
        return INTERRUPTED


def score(args: argparse.Namespace, protocol: DatasetProtocol, method: MethodProtocol) -> int:
    """Check, load, score, report: 0 scored, 1 the report not written, 2 bad input."""
    try:
        builtin = method.for_dataset(protocol).class_file(protocol)
        vocabulary = load_vocabulary(protocol, args.class_names, builtin)
        reader = protocol.read(args.root)
        if args.output is not None:
            inputs = [path for pair in reader.pairs for path in pair]
            not_an_input(args.output, [*inputs, *filter(None, [args.class_names])], "--output")
            writable_folder(args.output.expanduser().absolute().parent, "--output")
        config = engine_config(args, vocabulary.background_words, method)
        if config.method == "twostream" and not config.twostream.seen_classes:
            names, background = vocabulary.label_names, vocabulary.has_background
            seen = seen_class_names(protocol.name, names, background)
            config = config.replace({"twostream.seen_classes": seen})
        config.validate()
        lists = checked_lists(args, config.method, protocol, reader, len(vocabulary.classes))
        from ovss_ros.core.segmenter import Segmenter  # the model libraries: arguments checked

        segmenter = Segmenter(config)
        segmenter.set_classes(vocabulary.classes)
        run = protocol_segmenter(segmenter, method, vocabulary.has_background)
        if method.name == "pnp_ovss":
            run = ReleaseRun(segmenter, protocol.name, vocabulary.has_background, lists)
        elif lists is not None:
            run = ListedRun(segmenter, lists, CATEGORY_IDS.get(protocol.name))
        result = evaluate(
            run,
            reader,
            vocabulary.label_names,
            vocabulary.has_background,
            limit=args.limit,
            progress=not args.no_progress,
            max_pixels=args.max_input_pixels,
        )
    except (OSError, ValueError, ModelLoadError, VocabularyError) as error:
        print(f"ovss-eval: error: {one_line(error)}", file=sys.stderr)
        return BAD_INPUT
    split = class_split(args, protocol, method)
    print(format_report(result, f"{protocol.title}, {method.name} protocol", split))
    release = release_report(run, args.presence_lists)
    if release:
        print(release["line"])
    if args.output:
        report = {
            **result.to_dict(),
            **split_report(result, split),
            **{k: v for k, v in release.items() if k != "line"},
            "data_root": str(args.root),
            "protocol": method.name,
            "protocol_source": method.source,
            "engine": config.flat(),
        }
        output = args.output.expanduser()
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as error:  # checked writable before the work: a full disk, a lost mount
            print(f"ovss-eval: error: {one_line(error)}", file=sys.stderr)
            return FAILED
        print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
