"""ovss-eval: score the segmenter on a standard benchmark (mIoU, mAcc, aAcc per data set).

    ovss-eval voc21 ~/data/VOCdevkit/VOC2012 --limit 100 --output voc21.json
    ovss-eval cityscapes ~/data/cityscapes --method sclip --device cuda

The engine settings default to the published protocol of the data set (short side, sliding
window, probability threshold, class names and background words, see
``ovss_ros.evaluation.protocol``); any engine flag overrides them (--background replaces the
data set's background words). Data sets: voc21, context60, coco_object, voc20, context59,
coco_stuff, cityscapes, ade20k.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.core import EngineConfig, ModelLoadError, Segmenter, VocabularyError
from ovss_ros.core.refine.freecp import DATASET_THRESHOLDS as FREECP_THRESHOLDS
from ovss_ros.evaluation import PROTOCOLS, EvaluationResult, evaluate, get_protocol
from ovss_ros.evaluation.protocol import DatasetProtocol, load_vocabulary

logger = logging.getLogger("ovss-eval")


def build_parser(protocol: DatasetProtocol | None) -> argparse.ArgumentParser:
    """Parser whose engine defaults are the protocol's (generic ones before it is known)."""
    parser = argparse.ArgumentParser(
        prog="ovss-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset", help=f"one of {', '.join(PROTOCOLS)}")
    parser.add_argument("root", type=Path, help="data set folder (e.g. VOCdevkit/VOC2012)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--output", "-o", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--class-names",
        type=Path,
        help="replacement class-name file (same lines as the built-in one, ';' synonyms)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = {}
    if protocol is not None:
        defaults = {
            "short_side": protocol.short_side,
            "crop": protocol.crop,
            "stride": protocol.stride,
            "score_threshold": protocol.threshold,
        }
        if protocol.name in FREECP_THRESHOLDS:  # FreeCP's released per-data-set settings
            redundancy, ambiguity = FREECP_THRESHOLDS[protocol.name]
            defaults.update(freecp_redundancy=redundancy, freecp_ambiguity=ambiguity)
    add_engine_arguments(parser, **defaults)
    # The papers say "short side"; accept it next to the shared --size.
    parser.add_argument(
        "--short-side", dest="size", type=int, default=argparse.SUPPRESS, help="same as --size"
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, DatasetProtocol]:
    """Two passes: the data set named first decides the defaults of the engine flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("dataset", nargs="?")
    known, _ = first.parse_known_args(argv)
    protocol = None
    if known.dataset is not None:
        try:
            protocol = get_protocol(known.dataset)
        except ValueError as error:
            build_parser(None).error(str(error))
    args = build_parser(protocol).parse_args(argv)
    if args.limit is not None and args.limit < 1:
        build_parser(protocol).error("--limit must be at least 1")
    return args, protocol


def engine_config(args: argparse.Namespace, background_words: tuple[str, ...]) -> EngineConfig:
    """Flags -> EngineConfig; the data set's background words unless --background is given."""
    config = config_from_args(args)
    if not config.background_words:
        config = replace(config, background_words=background_words)
    if config.crop == 0:
        config = replace(config, stride=0)  # whole-image inference has no stride
    return config


def format_report(result: EvaluationResult, title: str) -> str:
    """Per-class IoU / Acc table followed by the summary line, as a plain-text block."""
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, protocol = parse_args(argv)
    try:
        vocabulary = load_vocabulary(protocol, args.class_names)
        reader = protocol.read(args.root)
        config = engine_config(args, vocabulary.background_words)
        config.validate()
        segmenter = Segmenter(config)
        segmenter.set_classes(vocabulary.classes)
        result = evaluate(
            segmenter,
            reader,
            vocabulary.label_names,
            vocabulary.has_background,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except (OSError, ValueError, ModelLoadError, VocabularyError) as error:
        print(f"ovss-eval: error: {error}", file=sys.stderr)
        return 1
    print(format_report(result, protocol.title))
    if args.output:
        report = {
            **result.to_dict(),
            "data_root": str(args.root),
            "engine": asdict(config),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
