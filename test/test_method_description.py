"""Issue 20: the method log line names what sets a refinement apart.

``method naclip + dslo`` was logged alike for dslo.mode ot and velocity and for every affinity.
The real DenseMethod on the tiny random open_clip model describes itself; the sd2 variant is
built without loading its SD model (describe reads the config only).
"""

from __future__ import annotations

import pytest
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.method import DenseMethod

TINY = {"model": str(TINY_VIT), "pretrained": "none", "short_side": 64, "templates": "single"}


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(EngineConfig.from_flat({**TINY, "method": "naclip"}))


def described(segmenter, **changes) -> str:
    config = EngineConfig.from_flat({**TINY, "method": "naclip", **changes})
    method = DenseMethod(segmenter.method.clip, segmenter.method.text, config)
    return method.describe()[0]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "naclip"),
        ({"refinement": "dslo"}, "naclip + dslo (velocity, naclip affinity)"),
        (
            {"refinement": "dslo", "dslo.mode": "ot", "dslo.affinity": "sd2"},
            "naclip + dslo (ot, sd2 affinity)",
        ),
        (
            {"refinement": "dslo", "dslo.mode": "ot", "dslo.affinity": "keykey"},
            "naclip + dslo (ot, keykey affinity)",
        ),
        (
            {"refinement": "dslo", "dslo.affinity": "mean"},
            "naclip + dslo (velocity, mean affinity)",
        ),
        ({"refinement": "freecp"}, "naclip + freecp (redundancy 0.15, ambiguity 0.7)"),
        (
            {"refinement": "freecp", "freecp.redundancy": 0.3},
            "naclip + freecp (redundancy 0.3, ambiguity 0.7)",
        ),
    ],
)
def test_description_names_mode_affinity_and_thresholds(segmenter, changes, expected):
    assert described(segmenter, **changes) == expected


def test_every_dslo_variant_is_logged_differently(segmenter):
    from ovss_ros.core.methods.dslo.settings import DSLO_AFFINITIES, DSLO_MODES

    texts = {
        described(segmenter, refinement="dslo", **{"dslo.mode": m, "dslo.affinity": a})
        for m in DSLO_MODES
        for a in DSLO_AFFINITIES
    }
    assert len(texts) == len(DSLO_MODES) * len(DSLO_AFFINITIES)


def test_the_node_notice_follows_a_runtime_change_of_mode(segmenter):
    """What the node logs (Segmenter.method_notice) after a switch from velocity to ot."""
    segmenter.update(changes={"refinement": "dslo"})
    assert segmenter.method_notice() == ("naclip + dslo (velocity, naclip affinity)", False)
    segmenter.update(changes={"dslo.mode": "ot"})
    assert segmenter.method_notice() == ("naclip + dslo (ot, naclip affinity)", False)
