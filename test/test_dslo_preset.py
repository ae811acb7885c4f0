"""config/dslo_paper.yaml: a node params file that states DSLO's published configuration, in the
namespaced parameter names (nested YAML, as rcl reads ``dslo.sd.size``)."""

from pathlib import Path

import yaml

from ovss_ros.core.config import RENAMED, EngineConfig
from ovss_ros.ros.launch_plan import flatten_parameters

PRESET = Path(__file__).resolve().parents[1] / "config" / "dslo_paper.yaml"


def preset() -> dict:
    document = yaml.safe_load(PRESET.read_text())
    assert list(document) == ["/**"] and list(document["/**"]) == ["ros__parameters"]
    return flatten_parameters(document["/**"]["ros__parameters"])


def test_preset_is_the_papers_headline_configuration():
    values = preset()
    assert values["method"] == "vanilla"  # vanilla CLIP logits
    assert values["refinement"] == "dslo" and values["dslo.mode"] == "velocity"
    assert values["dslo.affinity"] == "sd2" and values["dense.upsample"] == "jbu"
    assert (values["dslo.ipf_rounds"], values["dslo.velocity_tau"]) == (15, 0.3)
    assert (values["dslo.sinkhorn_iterations"], values["dslo.sinkhorn_epsilon"]) == (50, 0.1)


def test_preset_values_are_valid_settings():
    values = preset()
    assert isinstance(values["dslo.sd.noise"], bool)
    assert len(values) >= 18
    config = EngineConfig.from_flat(values)  # every name a setting: ValueError otherwise
    config.validate()  # each value's type, range and choices (dslo.sd.*: Sd2Settings)
    config.dslo.sd.validate()
    assert config.dslo.sd.size == 512 and config.dense.upsample == "jbu"


def test_preset_uses_no_name_of_an_earlier_release():
    assert not set(preset()) & set(RENAMED)
