"""The evaluation loop and ovss-eval end to end on a VOC folder built from the real samples."""

import json

import numpy as np
import pytest
from conftest import TINY_VIT
from test_evaluation_readers import make_voc_layout

from ovss_ros.cli.evaluate import main
from ovss_ros.core import Segmentation
from ovss_ros.evaluation import dataset_readers, evaluate, load_vocabulary
from ovss_ros.evaluation.protocol import PROTOCOLS


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc_layout(tmp_path_factory.mktemp("voc"))


class ReplaySegmenter:
    """Answers each image with precomputed engine labels, in data-set order."""

    def __init__(self, answers: list[np.ndarray]) -> None:
        self.answers = iter(answers)

    def segment(self, rgb: np.ndarray) -> Segmentation:
        labels = next(self.answers)
        assert labels.shape == rgb.shape[:2]
        return Segmentation(labels, np.ones(labels.shape, np.float32), [])


def engine_answers(reader, has_background: bool) -> list[np.ndarray]:
    """What a perfect engine returns: class k as k - 1 with background unlabeled (VOC21)."""
    answers = []
    for _, truth in reader:
        labels = truth.astype(np.int32) - (1 if has_background else 0)
        labels[truth == 255] = 3  # not scored: any value will do
        if has_background:
            labels[truth == 0] = 255  # unlabeled = background
        answers.append(labels.astype(np.uint8))
    return answers


@pytest.mark.parametrize("name", ["voc21", "voc20"])
def test_perfect_engine_scores_100(voc_root, name):
    protocol = PROTOCOLS[name]
    reader = protocol.read(voc_root)
    vocabulary = load_vocabulary(protocol)
    segmenter = ReplaySegmenter(engine_answers(reader, protocol.has_background))
    result = evaluate(segmenter, reader, vocabulary.label_names, protocol.has_background)
    assert result.images == 3
    assert result.summary() == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}
    rows = {row["name"]: row for row in result.per_class()}
    assert rows["person"]["iou"] == 100.0 and rows["cow"]["iou"] is None
    assert ("background" in rows) is protocol.has_background


def test_limit_and_shifted_background(voc_root):
    reader = dataset_readers.read_voc21(voc_root)
    vocabulary = load_vocabulary(PROTOCOLS["voc21"])
    answers = engine_answers(reader, True)
    answers[0][answers[0] == 255] = 14  # image 1: all background called person (engine 14)
    result = evaluate(
        ReplaySegmenter(answers), reader, vocabulary.label_names, True, limit=1, progress=False
    )
    truth = reader.sample(0)[1]
    background, person = (truth == 0).sum(), (truth == 15).sum()
    assert result.images == 1
    iou = {row["name"]: row["iou"] for row in result.per_class()}
    assert iou["background"] == 0.0
    assert iou["person"] == pytest.approx(100 * person / (person + background))
    assert iou["bottle"] == 100.0 and iou["dog"] is None


def test_cli_end_to_end(voc_root, tmp_path, capsys):
    output = tmp_path / "results.json"
    common = [
        "voc21", str(voc_root), "--model", str(TINY_VIT), "--pretrained", "none",
        "--device", "cpu", "--short-side", "64", "--templates", "single", "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "aAcc" in printed and "person" in printed
    report = json.loads(output.read_text())
    assert {"dataset", "images", "mIoU", "mAcc", "aAcc", "per_class", "engine"} <= set(report)
    assert report["dataset"] == "voc21" and report["images"] == 3
    assert 0.0 <= report["mIoU"] <= 100.0 and 0.0 <= report["aAcc"] <= 100.0
    assert [row["name"] for row in report["per_class"]][:2] == ["background", "aeroplane"]
    engine = report["engine"]  # NACLIP's protocol, except what the flags changed
    assert engine["short_side"] == 64 and engine["dense.crop"] == 0
    assert engine["score_threshold"] == 0.1
    assert engine["dense.pamr"] is True and report["protocol"] == "naclip"
    assert engine["background_words"][:2] == ["sky", "wall"]

    assert main([*common, "--limit", "1", "--output", str(output), "--dense-crop", "32"]) == 0
    report = json.loads(output.read_text())
    assert report["images"] == 1 and report["engine"]["dense.crop"] == 32
    assert "1 images" in capsys.readouterr().out


def test_cli_reports_bad_data_root(tmp_path, capsys):
    assert main(["ade20k", str(tmp_path), "--model", str(TINY_VIT), "--pretrained", "none"]) == 2
    assert "images/validation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["kitti", str(tmp_path)])


@pytest.mark.parametrize(
    ("dataset", "redundancy", "ambiguity"), [("voc21", 0.15, 0.8), ("ade20k", 0.05, 0.7)]
)
def test_freecp_thresholds_default_per_data_set(tmp_path, dataset, redundancy, ambiguity):
    from ovss_ros.cli.evaluate import engine_config, parse_args

    args, _, _ = parse_args([dataset, str(tmp_path), "--refinement", "freecp"])
    config = engine_config(args, ())
    assert (config.freecp.redundancy, config.freecp.ambiguity) == (redundancy, ambiguity)
    args, _, _ = parse_args([dataset, str(tmp_path), "--freecp-redundancy", "0.3"])
    assert engine_config(args, ()).freecp.redundancy == 0.3


def test_the_protocol_knows_freecps_variants_as_the_dense_forward_runs_them():
    """ovss-eval reads FreeCP's base variants from the torch-free settings (the dense modes
    named ``<mode>_freecp``), so it checks its arguments without torch: they must be the ones
    the dense forward runs (variant -> the mode whose attention it takes)."""
    from ovss_ros.core.methods.dense.forward import FREECP_VARIANTS as RUN
    from ovss_ros.evaluation.protocol import FREECP_VARIANTS, METHOD_PROTOCOLS, method_protocol

    assert FREECP_VARIANTS == RUN and len(RUN) == 3
    assert METHOD_PROTOCOLS["freecp"].base_variants == {base: v for v, base in RUN.items()}
    for variant in RUN:
        assert method_protocol(None, variant).name == "freecp"
