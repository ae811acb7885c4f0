"""The settings machinery (``core/settings.py``) and the settings tree (``core/config.py``): one
definition per setting, the dotted names, the refusal of the old flat names (issue 19)."""

from __future__ import annotations

import math

import pytest

from ovss_ros.core.config import NAMES, RENAMED, SCHEMA, EngineConfig
from ovss_ros.core.frame_budget import FrameBudgetError
from ovss_ros.core.settings import SettingInfo, check, cli_flag


def test_every_setting_says_what_it_is_and_where_its_default_comes_from():
    assert len(SCHEMA) == len(NAMES)  # no name twice
    for parameter in SCHEMA:
        assert parameter.info.description.strip(), parameter.name
        assert parameter.info.source.strip(), parameter.name
        if parameter.info.choices:
            assert parameter.default in parameter.info.choices, parameter.name
        if parameter.info.minimum is not None:
            check(parameter.name, parameter.type, parameter.info, parameter.default)


def test_names_are_namespaced_by_family_and_flat_gives_them_all():
    config = EngineConfig()
    values = config.flat()
    assert list(values) == [p.name for p in SCHEMA]
    assert values["dslo.sd.size"] == config.dslo.sd.size == 512
    assert values["pnp.layer"] == config.pnp.layer == 8
    assert values["deop.checkpoint"] == "" and values["twostream.crop_batch"] == 32
    tops = {name for name in values if "." not in name}
    assert tops == {
        "model",
        "pretrained",
        "device",
        "precision",
        "method",
        "refinement",
        "templates",
        "background_words",
        "score_threshold",
        "short_side",
        "max_long_side",
    }
    spaces = {name.rsplit(".", 1)[0] for name in values if "." in name}
    assert spaces == {
        "dense", "dslo", "dslo.sd", "freecp", "pnp", "deop", "twostream", "superpixel_clip"
    }


def test_from_flat_and_replace_round_trip():
    changes = {
        "dense.crop": 224,
        "dslo.sd.size": 640,
        "pnp.layer": 3,
        "method": "sclip",
        "background_words": ["sky", "wall"],
    }
    config = EngineConfig.from_flat(changes)
    assert config.dense.crop == 224 and config.dslo.sd.size == 640 and config.pnp.layer == 3
    assert config.background_words == ("sky", "wall")  # lists become tuples
    assert EngineConfig.from_flat(config.flat()) == config
    again = config.replace({"dslo.sd.size": 512})
    assert again.dslo.sd.size == 512 and config.dslo.sd.size == 640  # frozen: a new tree
    assert again.dslo.sd.timestep == config.dslo.sd.timestep


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_every_old_flat_name_is_refused_with_its_new_name(old):
    assert RENAMED[old] in NAMES
    with pytest.raises(ValueError, match=f"^{old} was renamed {RENAMED[old]}$"):
        EngineConfig.from_flat({old: EngineConfig().flat()[RENAMED[old]]})


def test_unknown_names_are_refused():
    for name in ("colour", "dense", "dslo.sd", "pnp.", "dense.crop.x", "sd.size"):
        with pytest.raises(ValueError, match="unknown setting"):
            EngineConfig.from_flat({name: 1})


def test_flags_follow_the_names():
    assert cli_flag("short_side") == "--short-side"
    assert cli_flag("dense.crop") == "--dense-crop"
    assert cli_flag("dslo.sd.size") == "--dslo-sd-size"
    assert cli_flag("twostream.crop_batch") == "--twostream-crop-batch"
    flags = [cli_flag(p.name) for p in SCHEMA]
    assert len(set(flags)) == len(flags)


@pytest.mark.parametrize(
    ("kind", "info", "value", "message"),
    [
        (int, SettingInfo("x", minimum=1, maximum=5), 0, r"^n must be in \[1, 5\], got 0$"),
        (int, SettingInfo("x", minimum=1, maximum=5), 2.0, "^n must be an integer, got 2.0$"),
        (int, SettingInfo("x", minimum=1, maximum=5), True, "^n must be an integer"),
        (float, SettingInfo("x", minimum=0, maximum=1), "0.5", "^n must be a number"),
        (float, SettingInfo("x", minimum=0, maximum=1), math.nan, r"in \[0, 1\], got nan"),
        (float, SettingInfo("x", minimum=0, maximum=9, open_minimum=True), 0.0, r"in \(0, 9\]"),
        (float, SettingInfo("x"), math.inf, "^n must be a finite number"),
        (str, SettingInfo("x", choices=("a", "b")), "c", r"^unknown n 'c': use one of \['a'"),
        (str, SettingInfo("x"), 3, "^n must be a string"),
        (bool, SettingInfo("x"), 1, "^n must be true or false"),
        (tuple, SettingInfo("x"), "sky", "^n must be a list of strings"),
        (tuple, SettingInfo("x"), ("sky", 3), "entry 1 is 3"),
    ],
)
def test_one_values_check_names_the_setting_and_the_limit(kind, info, value, message):
    with pytest.raises(ValueError, match=message):
        check("n", kind, info, value)


def test_a_budget_maximum_is_refused_with_its_cost():
    with pytest.raises(FrameBudgetError, match="dslo.sd.size 2048 needs a 2.15 GB VAE"):
        EngineConfig.from_flat({"dslo.sd.size": 2048}).validate()
    with pytest.raises(FrameBudgetError, match="pnp.image_size 1024 needs a 1.07 GB"):
        EngineConfig.from_flat({"pnp.image_size": 1024}).validate()


def test_every_range_and_choice_of_the_schema_is_enforced():
    """Each setting with a range or choices, set just outside it, is refused naming it."""
    for parameter in SCHEMA:
        info, name = parameter.info, parameter.name
        bad = []
        if info.choices:
            bad.append("no-such-choice")
        if info.minimum is not None:
            low = info.minimum if info.open_minimum else info.minimum - 1
            bad += [low, info.maximum * 4 + 1]
            if parameter.type is int:
                bad = [int(v) if not isinstance(v, str) else v for v in bad]
        for value in bad:
            with pytest.raises(ValueError, match=name.replace(".", r"\.")):
                EngineConfig.from_flat({name: value}).validate()
