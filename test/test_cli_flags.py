"""Every tool's engine flags are the settings schema's (issue 19: one definition per setting).

For each tool, the flags of the engine settings it takes are exactly ``core.config.SCHEMA``'s:
one flag per setting, named ``cli_flag(name)``, of the setting's type, default and choices,
with the description, range and default in ``--help``; no flag of another name sets an engine
setting, and the flags of earlier releases are refused with their new names. A value is checked
by the schema as it is parsed (the flag named in the one line), and a params file's nested
names are the settings' full names.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from ovss_ros.cli import bag, bench, evaluate, segment, train_deop, tune
from ovss_ros.cli.engine_args import RENAMED_FLAGS, config_from_args, engine_flags, flag_help
from ovss_ros.core.config import NAMES, RENAMED, SCHEMA, EngineConfig
from ovss_ros.core.settings import cli_flag
from ovss_ros.training.deop_training import TrainingConfig

ALL = tuple(p.name for p in SCHEMA)
PNP = tuple(p.name for p in SCHEMA if p.name.startswith("pnp."))
CLIP = ("model", "pretrained", "device", "precision", "templates")
# tool -> (its parser, the engine settings it takes)
TOOLS = {
    "segment": (segment.build_parser, ALL),
    "bag": (bag.build_parser, ALL),
    "bench": (bench.build_parser, ALL),
    "evaluate": (lambda: evaluate.build_parser(None), ALL),
    "tune": (tune.build_parser, CLIP + PNP),
    "train_deop": (train_deop.build_parser, CLIP),
}
DEFINITIONS = {p.name: p for p in SCHEMA}
REQUIRED = {  # each tool's required arguments
    "segment": ["x.jpg", "--classes", "c"],
    "bag": ["in", "out", "--topic", "/i", "--classes", "c"],
    "evaluate": ["voc21", "root"],
    "tune": ["x.jpg", "--classes", "c"],
    "train_deop": ["folder", "root", "--stage", "deop"],
}


def option_strings(name: str) -> list[str]:
    flag = cli_flag(name)
    return [flag, "--no-" + flag[2:]] if DEFINITIONS[name].type is bool else [flag]


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tools_engine_flags_are_the_schemas(tool):
    build, names = TOOLS[tool]
    parser = build()
    flags = engine_flags(parser)
    assert list(flags) == list(names)  # every setting it takes, in the schema's order
    for name, action in flags.items():
        definition = DEFINITIONS[name]
        assert action.option_strings == option_strings(name), name
        assert action.default == definition.default, name
        assert tuple(action.choices or ()) == definition.info.choices, name
        if definition.type is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), name
        assert action.help == flag_help(definition)
    # no other flag sets an engine setting or has the name of one
    # (ovss-train-deop's --crop, --proposals are its training run's, TrainingConfig's)
    own = {f.name for f in fields(TrainingConfig)} if tool == "train_deop" else set()
    others = [a for a in parser._actions if a.dest not in NAMES | own]
    for action in others:
        assert action.dest not in RENAMED, (tool, action.dest)
        for option in action.option_strings:
            assert option not in {cli_flag(n) for n in NAMES}, (tool, option)
    # the defaults parse into the schema's defaults
    args = parser.parse_args(REQUIRED.get(tool, []))
    config = config_from_args(args)
    assert config.flat() == EngineConfig().flat()


def test_help_shows_description_range_and_default(capsys):
    with pytest.raises(SystemExit):
        segment.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dslo-sd-size SIZE" in text and "--dense-pamr, --no-dense-pamr" in text
    crop = DEFINITIONS["dense.crop"].info
    assert f"{crop.description}; range [0, 4096] pixels" in text
    assert "range [0, 2147483647]" in text  # dslo.sd.seed: an integer bound as written
    assert "(default: 'ViT-B-16')" in text and "(default: 512)" in text
    model = " ".join(DEFINITIONS["model"].info.description.split())
    assert f"{model} (default: 'ViT-B-16')" in text and "start-up only" not in text
    assert "strings separated by ';' (default: none)" in text  # background_words


def test_evaluate_defaults_are_the_protocols_in_the_flags():
    protocol = evaluate.get_protocol("voc21")
    method = evaluate.method_protocol("dslo", "naclip")
    flags = engine_flags(evaluate.build_parser(protocol, method))
    assert flags["dslo.affinity"].default == "sd2" and flags["dense.upsample"].default == "jbu"
    assert flags["score_threshold"].default == 0.1 and flags["model"].default.endswith("quickgelu")


def test_every_renamed_setting_has_its_old_flag_refused():
    for old, new in RENAMED.items():
        if cli_flag(old) != cli_flag(new):  # pnp_layer -> pnp.layer keeps --pnp-layer
            assert RENAMED_FLAGS[cli_flag(old)] == cli_flag(new)
    assert RENAMED_FLAGS["--no-sd-noise"] == "--no-dslo-sd-noise"
    assert not set(RENAMED_FLAGS.values()) - {
        flag for name in NAMES for flag in option_strings(name)
    }  # every new flag exists


@pytest.mark.parametrize("tool", ["segment", "bag"])
def test_an_old_flag_is_named_before_missing_arguments(tool, capsys):
    """``ovss-bag in out --crop 224`` said only which arguments are required."""
    parse = {"segment": segment.parse_args, "bag": bag.parse_args}[tool]
    with pytest.raises(SystemExit) as exit_info:
        parse(["in", "--crop", "224"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--crop was renamed --dense-crop" in lines[0], lines


@pytest.mark.parametrize("tool", ["segment", "bag", "bench", "evaluate"])
@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--crop", "224"], "--crop was renamed --dense-crop"),
        (["--sd-size", "256"], "--sd-size was renamed --dslo-sd-size"),
        (["--proposals", "5"], "--proposals was renamed --deop-proposals"),
        (["--size", "64"], "--size was renamed --short-side"),
        (["--dense-crop", "100000"], "argument --dense-crop: dense.crop must be in [0, 4096]"),
        (["--pnp-layer", "0"], "argument --pnp-layer: pnp.layer must be in [1, 1000], got 0"),
        (["--dslo-sd-noise", "1"], "unrecognized arguments: 1"),  # an on/off flag takes none
    ],
)
def test_each_tool_refuses_old_flags_and_bad_values_naming_the_flag(tool, flags, reason, capsys):
    required = REQUIRED.get(tool, [])
    parse = {
        "segment": segment.parse_args,
        "bag": bag.parse_args,
        "evaluate": evaluate.parse_args,
        "bench": lambda argv: bench.build_parser().parse_args(argv),
    }[tool]
    with pytest.raises(SystemExit) as exit_info:
        parse(required + flags)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], lines


def test_a_list_setting_is_given_separated_by_semicolons():
    args = segment.parse_args(["x.jpg", "--classes", "c", "--background-words", "sky; wall;"])
    assert config_from_args(args).background_words == ("sky", "wall")


def test_train_deop_help_shows_every_training_default(capsys):
    """Issue 20: ``ovss-train-deop --help`` showed no defaults for its training flags."""
    from ovss_ros.cli import train_deop
    from ovss_ros.training.stage_loop import released_defaults
    from ovss_ros.training.training_config import TrainingConfig

    with pytest.raises(SystemExit):
        train_deop.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    base = TrainingConfig()
    for flag, value in (
        ("--steps", base.steps),
        ("--lr", base.lr),
        ("--crop", base.crop),
        ("--batch-size", base.batch_size),
        ("--loss", base.loss),
    ):
        assert f"{flag} " in text and f"(default: head {value}" in text, flag
    released = released_defaults("deop")
    for flag, value in (("--steps", 60000), ("--lr", released["lr"]), ("--batch-size", 16)):
        assert f"{flag} " in text and f"deop {value})" in text, flag
