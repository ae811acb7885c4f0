"""config/dslo_paper.yaml: a node params file that states DSLO's published configuration."""

from dataclasses import fields
from pathlib import Path

import yaml

from ovss_ros.core.config import EngineConfig
from ovss_ros.core.methods.dslo.sd2_attention import SD_PRECISIONS, check_settings

PRESET = Path(__file__).resolve().parents[1] / "config" / "dslo_paper.yaml"


def preset() -> dict:
    document = yaml.safe_load(PRESET.read_text())
    assert list(document) == ["/**"] and list(document["/**"]) == ["ros__parameters"]
    return document["/**"]["ros__parameters"]


def test_preset_is_the_papers_headline_configuration():
    values = preset()
    assert values["method"] == "vanilla"  # vanilla CLIP logits
    assert values["refinement"] == "dslo" and values["dslo_mode"] == "velocity"
    assert values["affinity"] == "sd2" and values["upsample"] == "jbu"
    assert (values["ipf_rounds"], values["velocity_tau"]) == (15, 0.3)
    assert (values["sinkhorn_iterations"], values["sinkhorn_epsilon"]) == (50, 0.1)


def test_preset_values_are_valid_settings():
    values = preset()
    check_settings(
        values["sd_size"], values["sd_timestep"], values["sd_temperature"], values["sd_layers"]
    )
    assert values["sd_precision"] in SD_PRECISIONS and isinstance(values["sd_noise"], bool)
    engine = {f.name for f in fields(EngineConfig)}
    clip_side = {k: v for k, v in values.items() if k in engine and k != "affinity"}
    assert len(clip_side) >= 10
    EngineConfig(**clip_side).validate()
