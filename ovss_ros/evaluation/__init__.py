"""Benchmark evaluation of the segmentation core: data-set readers, protocol, metrics, loop.

ROS-free like ``ovss_ros.core``; the ``ovss-eval`` command (``ovss_ros.cli.evaluate``) drives it.
"""

from ovss_ros.evaluation.confusion_metrics import ConfusionMatrix
from ovss_ros.evaluation.dataset_readers import IGNORE, DatasetReader
from ovss_ros.evaluation.evaluation_loop import EvaluationResult, dataset_labels, evaluate
from ovss_ros.evaluation.pnp_release import PNP_PROTOCOL  # registers --protocol pnp_ovss
from ovss_ros.evaluation.protocol import (
    PROTOCOLS,
    DatasetProtocol,
    EvaluationVocabulary,
    get_protocol,
    load_vocabulary,
)

__all__ = [
    "IGNORE",
    "PNP_PROTOCOL",
    "PROTOCOLS",
    "ConfusionMatrix",
    "DatasetProtocol",
    "DatasetReader",
    "EvaluationResult",
    "EvaluationVocabulary",
    "dataset_labels",
    "evaluate",
    "get_protocol",
    "load_vocabulary",
]
