"""ovss-tune's search space: the flags that list it, and the first trial inside it.

The search space is ``--layers x --heads x --thresholds`` (empty ``--layers`` / ``--heads``:
every one of the VLM's). The first trial, which also decides each image's classes when CLIP
decides them, is the ``--pnp-layer``, ``--pnp-head`` and ``--pnp-threshold`` settings: inside
the space always. A setting given on the command line
that the space leaves out is refused (bad input); a default that the space leaves out (layer 8
of BLIP large with ``--layers 1-3``, or on a 3-layer VLM) is replaced by the searched value
nearest to it (the smaller of two as near).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ovss_ros.core.methods.pnp_ovss.settings import PnpSettings

if TYPE_CHECKING:  # the model libraries are imported once the arguments are checked
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

# Values one search-space flag may list, and candidates the whole space may hold: BLIP large has
# 12 x 12 layer-head pairs; 5 thresholds make 720 candidates, a budget far beyond any run. A
# range like 0-1000000 is refused instead of listed (it cost 7.9 GB, then MemoryError).
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
    }
    if not values["thresholds"]:
        raise ValueError("--thresholds is empty: give at least one value")
    outside = [t for t in values["thresholds"] if not 0.0 <= t <= 1.0]  # NaN too
    if outside:
        raise ValueError(
            f"--thresholds {args.thresholds!r}: {outside[0]} is not in [0, 1] (the threshold is "
            "on each class map min-max normalised to 0..1)"
        )
    # a value listed twice would be a second, identical candidate: each once, in order
    return {name: list(dict.fromkeys(listed)) for name, listed in values.items()}


def search_space(args: argparse.Namespace, layers: int, heads: int) -> SearchSpace:
    """The search space of the flags (empty layers/heads: every one of the VLM's); ValueError
    for an empty list or a space of more than MAX_CANDIDATES candidates."""
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

    values = space_values(args)
    space = SearchSpace(
        layers=values["layers"] or list(range(1, layers + 1)),
        heads=values["heads"] or list(range(1, heads + 1)),
        thresholds=values["thresholds"],
    )
    size = len(space.layers) * len(space.heads) * len(space.thresholds)
    if size > MAX_CANDIDATES:
        raise ValueError(
            f"the search space has {size} candidates (layers x heads x thresholds); at most "
            f"{MAX_CANDIDATES}: narrow --layers, --heads or --thresholds"
        )
    return space


# Searched PnP-OVSS setting -> (the flag listing its values, the flag of its first trial,
# the SearchSpace field).
SEARCHED = {
    "layer": ("--layers", "--pnp-layer", "layers"),
    "head": ("--heads", "--pnp-head", "heads"),
    "threshold": ("--thresholds", "--pnp-threshold", "thresholds"),
}


def given_flags(argv: Sequence[str]) -> set[str]:
    """The flags written on the command line ``argv`` (``--pnp-layer 3``, ``--pnp-layer=3``);
    the tools take no abbreviations, so each is spelled out."""
    flags = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            flags.add(token.split("=", 1)[0])
    return flags


def refuse_start_outside(
    start: PnpSettings, listed: dict[str, list], given: set[str], texts: dict[str, str]
) -> None:
    """ValueError if a first-trial setting written on the command line (``given``) is not one of
    the values its search-space flag lists (``listed``: ``space_values``; an empty list, every
    one of the VLM's, is checked against the VLM by ``PnpOvss``); ``texts``: each space flag as
    written, for the message."""
    for name, (space_flag, start_flag, field) in SEARCHED.items():
        values, value = listed[field], getattr(start, name)
        if start_flag in given and values and value not in values:
            raise ValueError(
                f"{start_flag} {value} is outside the search space ({space_flag} "
                f"{texts[field]}): the first trial is one of the searched settings; add "
                f"{value} to {space_flag} or leave {start_flag} out"
            )


def start_inside(start: PnpSettings, space: SearchSpace, given: set[str]) -> PnpSettings:
    """``start`` with each searched setting that was not written on the command line and is not
    in ``space`` replaced by the space's value nearest to it (the smaller of two as near)."""
    changes = {}
    for name, (_, start_flag, field) in SEARCHED.items():
        values, value = list(getattr(space, field)), getattr(start, name)
        if start_flag not in given and values and value not in values:
            changes[name] = min(values, key=lambda v: (abs(v - value), v))
    return replace(start, **changes)


def flag_texts(args: argparse.Namespace) -> dict[str, str]:
    """Each search-space flag's text as given, by SearchSpace field."""
    return {
        "layers": args.layers,
        "heads": args.heads,
        "thresholds": args.thresholds,
    }
