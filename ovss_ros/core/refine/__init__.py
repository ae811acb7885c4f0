"""Refinements after the dense CLIP forward: plain tensor functions the engine plugs in."""

from ovss_ros.core.refine.dslo import class_distributions, doubly_stochastic, dslo_scores
from ovss_ros.core.refine.freecp import freecp, make_crop_classifier
from ovss_ros.core.refine.jbu import JbuWeights, jbu_weights, joint_bilateral_upsample
from ovss_ros.core.refine.pamr import pamr, pamr_affinity

__all__ = [
    "JbuWeights",
    "class_distributions",
    "doubly_stochastic",
    "dslo_scores",
    "freecp",
    "jbu_weights",
    "joint_bilateral_upsample",
    "make_crop_classifier",
    "pamr",
    "pamr_affinity",
]
