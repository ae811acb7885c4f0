"""ovss-tune: choose PnP-OVSS settings without labels (CLIP reward, random search).

    ovss-tune photos/ --classes person dog "tv; monitor" --budget 30 -o pnp_tuned.yaml

Every trial segments the images with one choice of layer, head, threshold and dropout rounds;
its reward is how often CLIP recognises a class better with the class's mask region kept than
removed (ovss_ros/core/methods/pnp_ovss/tuning.py). The classes of each image are decided once,
by CLIP, with the starting settings, which are always the first trial. The best settings are
printed and written as a ROS 2 params file (``/**: ros__parameters:``, the PnP-OVSS settings
nested under ``pnp:``) for the node (``--params-file``) and the other tools (``--params-file``),
with the classes tuned on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.segment import image_files
from ovss_ros.cli.tool_parser import ToolParser, not_an_input, one_line
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.config import EngineConfig
from ovss_ros.core.methods.pnp_ovss.settings import PnpSettings
from ovss_ros.core.vocabulary import VocabularyError
from ovss_ros.ros.image_conversion import ImageConversionError, ImageTooLarge, image_file_to_rgb8

if TYPE_CHECKING:  # the model libraries are imported once the arguments are checked
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

logger = logging.getLogger("ovss-tune")
THRESHOLDS = "0.05,0.15,0.25,0.35,0.45"  # the release's search grid (np.arange(0.05, 0.5, 0.1))
ROUNDS = "1,2,3,4,5"
# The engine settings ovss-tune takes (flags from the schema): CLIP's, and every PnP-OVSS one.
SHARED = ("model", "pretrained", "device", "precision", "templates")
ENGINE_SETTINGS = SHARED + tuple(f"pnp.{name}" for name in asdict(PnpSettings()))
# Its flags before the settings were namespaced (ovss-tune --layer 8): refused with the new one.
OLD_FLAGS = {
    f"--{name.replace('_', '-')}": f"--pnp-{name.replace('_', '-')}"
    for name in asdict(PnpSettings())
    if not name.startswith("vlm")
}


def node_parameters(
    config: EngineConfig, classes: Sequence[str] = ()
) -> dict[str, dict[str, dict[str, object]]]:
    """The params-file content: method pnp_ovss, CLIP's model, every PnP-OVSS setting of
    ``config`` (nested under ``pnp``, as ROS 2 nests ``pnp.layer``), and ``classes`` if any."""
    parameters: dict[str, object] = {
        "method": "pnp_ovss",
        "model": config.model,
        "pretrained": config.pretrained,
        "templates": config.templates,
    }
    if classes:
        parameters["classes"] = list(classes)
    parameters["pnp"] = asdict(config.pnp)
    return {"/**": {"ros__parameters": parameters}}


# Values one search-space flag may list, and candidates the whole space may hold: BLIP large has
# 12 x 12 layer-head pairs; 5 thresholds x 5 rounds make 3600 candidates, a budget far beyond any
# run. A range like 0-1000000 is refused instead of listed (it cost 7.9 GB, then MemoryError).
MAX_VALUES = 1000
MAX_CANDIDATES = 100_000


def int_list(text: str, flag: str = "list") -> list[int]:
    """``"1-3,8"`` -> [1, 2, 3, 8]; ValueError naming ``flag`` for text that is not such a
    list or lists more than MAX_VALUES values."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(
                f"{flag} {text!r}: {part!r} is not an integer or a range like 2-5"
            ) from None
        if last < first:
            raise ValueError(
                f"{flag} {text!r}: {part!r} runs backwards: write the smaller number first "
                f"({last}-{first})"
            )
        if len(values) + last - first + 1 > MAX_VALUES:
            raise ValueError(
                f"{flag} {text!r}: {part!r} is not a range of at most {MAX_VALUES} values"
            )
        values += range(first, last + 1)
    return values


def float_list(text: str, flag: str = "list") -> list[float]:
    """``"0.1,0.2"`` -> [0.1, 0.2]; ValueError naming ``flag`` for anything else."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of numbers") from None
    if len(values) > MAX_VALUES:
        raise ValueError(f"{flag} lists {len(values)} values; at most {MAX_VALUES}")
    return values


def space_values(args: argparse.Namespace) -> dict[str, list]:
    """The values the search-space flags list (layers and heads empty: every one of the VLM's),
    read before any model loads; ValueError naming the flag for a bad or empty list."""
    values = {
        "layers": int_list(args.layers, "--layers"),
        "heads": int_list(args.heads, "--heads"),
        "thresholds": float_list(args.thresholds, "--thresholds"),
        "dropout_rounds": int_list(args.rounds, "--rounds"),
    }
    for flag, name in (("--thresholds", "thresholds"), ("--rounds", "dropout_rounds")):
        if not values[name]:
            raise ValueError(f"{flag} is empty: give at least one value")
    return values


def search_space(args: argparse.Namespace, layers: int, heads: int) -> SearchSpace:
    """The search space of the flags (empty layers/heads: every one of the VLM's); ValueError
    for an empty list or a space of more than MAX_CANDIDATES candidates."""
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

    values = space_values(args)
    space = SearchSpace(
        layers=values["layers"] or list(range(1, layers + 1)),
        heads=values["heads"] or list(range(1, heads + 1)),
        thresholds=values["thresholds"],
        dropout_rounds=values["dropout_rounds"],
    )
    size = len(space.layers) * len(space.heads) * len(space.thresholds) * len(space.dropout_rounds)
    if size > MAX_CANDIDATES:
        raise ValueError(
            f"the search space has {size} candidates (layers x heads x thresholds x rounds); "
            f"at most {MAX_CANDIDATES}: narrow --layers, --heads, --thresholds or --rounds"
        )
    return space


def build_parser() -> ToolParser:
    """ovss-tune's flags: its own, the search space, then its engine settings' (the schema's
    CLIP and PnP-OVSS settings; the ``pnp`` ones are the first trial, fixed unless searched)."""
    parser = ToolParser(prog="ovss-tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="unlabeled image files or folders")
    parser.add_argument("--classes", nargs="+", required=True, help="class names ('a; synonym')")
    parser.add_argument("--output", "-o", default="pnp_ovss_tuned.yaml", help="params file")
    parser.add_argument("--budget", type=int, default=20, help="number of settings to try")
    parser.add_argument("--seed", type=int, default=0, help="random search seed")
    parser.add_argument("--max-images", type=int, default=0, help="use the first N (0 = all)")
    add_max_input_pixels_argument(parser)
    space = parser.add_argument_group("search space (1-based layers and heads)")
    space.add_argument("--layers", default="", help="e.g. 6-10 (default: every text layer)")
    space.add_argument("--heads", default="", help="e.g. 1-12 (default: every head)")
    space.add_argument("--thresholds", default=THRESHOLDS, help="comma-separated")
    space.add_argument("--rounds", default=ROUNDS, help="dropout rounds, e.g. 1-5")
    add_engine_arguments(parser, ENGINE_SETTINGS, params_file=False)
    parser.renamed_flags |= OLD_FLAGS
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    config = config_from_args(args)
    start = config.pnp
    try:
        if args.budget < 1:
            raise ValueError(f"--budget must be at least 1 (settings to try), got {args.budget}")
        if args.max_images < 0:
            raise ValueError(f"--max-images must be at least 0 (0 = all), got {args.max_images}")
        files = image_files(args.inputs)[: args.max_images or None]
        if not files:
            raise FileNotFoundError("no images found in the inputs")
        not_an_input(args.output, files, "--output")
        space_values(args)  # the search space's flags, before the models load
        start.validate()
        from ovss_ros.core.clip.model_loading import load_clip  # arguments checked: the models
        from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
        from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm

        clip = load_clip(config.model, config.pretrained, config.device, config.precision)
        vlm = load_vlm(start.vlm_model, start.vlm_pretrained, config.device, config.precision)
        pipeline = PnpOvss(clip, vlm, start, templates=config.templates)
        pipeline.set_classes(args.classes)
        space = search_space(args, vlm.num_layers, vlm.num_heads)
        for candidate in space.candidates():  # refuse a bad space before any work
            pipeline.check(replace(start, **candidate))
    except (OSError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", one_line(error))
        return 2
    images = []
    for path in files:  # bounded before decoding, stored pixel grid (EXIF ignored)
        try:
            images.append(image_file_to_rgb8(path, max_pixels=args.max_input_pixels))
        except ImageTooLarge as error:
            logger.warning("skipping %s: %s", path, error)
        except (ImageConversionError, OSError) as error:
            logger.warning("skipping %s: not a readable image (%s)", path, error)
    if not images:
        logger.error("no readable images")
        return 2
    present = [pipeline.present_classes(pipeline.preprocess(rgb)[1]) for rgb in images]
    first = {
        name: getattr(start, name) for name in ("layer", "head", "threshold", "dropout_rounds")
    }
    from ovss_ros.core.methods.pnp_ovss.tuning import best_of, evaluate_settings, random_search

    results = random_search(
        lambda candidate: evaluate_settings(pipeline, images, present, candidate),
        space,
        args.budget,
        args.seed,
        first=first,
        progress=lambda total: tqdm(total=total, desc="ovss-tune", unit="trial", file=sys.stderr),
    )
    best, best_reward = best_of(results)
    tuned = replace(config, pnp=replace(start, **best))
    first_reward = results[0][1]
    print(
        f"start {first}: win rate {first_reward.win_rate:.3f}, margin {first_reward.margin:+.4f}"
    )
    print(
        f"best  {best}: win rate {best_reward.win_rate:.3f}, margin {best_reward.margin:+.4f} "
        f"({best_reward.pairs} image-class pairs, {len(results)} trials, {len(images)} images)"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# PnP-OVSS settings chosen by ovss-tune (CLIP reward, no labels): "
        f"win rate {best_reward.win_rate:.3f} on {len(images)} images\n"
    )
    content = yaml.safe_dump(node_parameters(tuned, args.classes), sort_keys=False)
    output.write_text(header + content)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
