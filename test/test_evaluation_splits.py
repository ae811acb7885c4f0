"""ovss-eval's ``deop`` protocol and the zero-shot scores (issue 21): DeOP's released evaluation.

The values below are written from the official files of github.com/CongHan0808/DeOP:
``mask_former/data/datasets/register_coco_stuff.py`` (``COCO_CATEGORIES``: every entry's ``id``
and ``name``, in order; ``COCO_NOVEL_CATEGORIES``: ``c["id"] - 1`` in ``OFFICIAL_NOVEL``),
``scripts/deop_verifycoco.sh`` (``INPUT.MIN_SIZE_TEST 512``, ``--eval-only`` on the img512 yaml,
whose test set is ``coco_2017_test_stuff_sem_seg``: val2017, all 171 classes, ignore label 255)
and ``mask_former/evaluation/generalized_sem_seg_evaluation.py`` (``reference_scores`` below:
its ``evaluate`` on a confusion matrix, transcribed).
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, VOC_DIR, voc_image_paths
from PIL import Image

from ovss_ros.cli import evaluate
from ovss_ros.cli.evaluate import class_split, engine_config, parse_args
from ovss_ros.evaluation import ConfusionMatrix, load_vocabulary
from ovss_ros.evaluation.class_splits import COCO_STUFF_156_15, SPLITS
from ovss_ros.evaluation.confusion_metrics import harmonic_mean
from ovss_ros.evaluation.protocol import (
    DEFAULT_PROTOCOL,
    METHOD_PROTOCOLS,
    PROTOCOLS,
    builtin_class_file,
    class_lines,
)

OFFICIAL_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105,
    106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124,
    125, 126, 127, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 138, 139, 140, 141, 142, 143,
    144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162,
    163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173, 174, 175, 176, 177, 178, 179, 180, 181,
    182,
)  # fmt: skip
OFFICIAL_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket",
    "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light",
    "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
OFFICIAL_NOVEL = (20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171)
COCO_STUFF = PROTOCOLS["coco_stuff"]


def test_the_official_lists_as_transcribed():
    assert len(OFFICIAL_IDS) == len(OFFICIAL_NAMES) == len(set(OFFICIAL_NAMES)) == 171
    assert list(OFFICIAL_IDS) == sorted(OFFICIAL_IDS)  # contiguous index = rank of the COCO id
    assert OFFICIAL_NAMES[:3] == ("person", "bicycle", "car") and OFFICIAL_NAMES[-1] == "wood"


def test_the_split_is_the_releases_156_15():
    unseen = {
        index: name
        for index, (coco_id, name) in enumerate(zip(OFFICIAL_IDS, OFFICIAL_NAMES, strict=True))
        if coco_id - 1 in OFFICIAL_NOVEL
    }
    assert dict(COCO_STUFF_156_15.unseen) == unseen and len(unseen) == 15
    assert list(unseen) == [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert len(COCO_STUFF_156_15.seen(171)) == 156
    assert SPLITS == {"coco_stuff": COCO_STUFF_156_15}
    # the shared COCO-Stuff names (ovss-train-deop looks the unseen classes up by name there)
    shared = class_lines(builtin_class_file("coco_stuff.txt"))
    assert all(shared[i] == name for i, name in unseen.items())


def test_method_deop_defaults_to_the_released_evaluation(tmp_path):
    args, dataset, method = parse_args(["coco_stuff", str(tmp_path), "--method", "deop"])
    assert method is METHOD_PROTOCOLS["deop"] and DEFAULT_PROTOCOL["deop"] == "deop"
    config = engine_config(args, ())
    assert (config.method, config.short_side, config.score_threshold) == ("deop", 512, 0.0)
    assert (config.dense.crop, config.dense.stride) == (0, 0)  # the whole image
    assert (config.model, config.pretrained) == ("ViT-B-16", "openai")  # CLIP ViT-B/16
    assert config.background_words == () and config.refinement == "none"
    for official in ("scripts/deop_verifycoco.sh", "register_coco_stuff.py",
                     "generalized_sem_seg_evaluation.py"):  # fmt: skip
        assert official in method.source
    builtin = method.for_dataset(dataset).class_file(dataset)
    vocabulary = load_vocabulary(dataset, builtin=builtin)
    # the names the release passes to CLIP (stuff_classes, stripped), no background word
    assert vocabulary.classes == list(OFFICIAL_NAMES) == vocabulary.label_names
    assert vocabulary.background_words == () and not vocabulary.has_background
    assert class_split(args, dataset, method) is COCO_STUFF_156_15


def test_other_data_sets_get_the_standard_settings_at_512(tmp_path):
    """DeOP's code evaluates COCO-Stuff only: elsewhere the standard protocol's thresholds and
    class names, at the released input size, whole image, no split."""
    deop, standard = METHOD_PROTOCOLS["deop"], METHOD_PROTOCOLS["standard"]
    assert "standard protocol" in deop.source
    for name, dataset in PROTOCOLS.items():
        ours, theirs = deop.for_dataset(dataset), standard.for_dataset(dataset)
        assert (ours.short_side, ours.crop, ours.stride) == (512, 0, 0)
        if name != "coco_stuff":
            assert ours.threshold == theirs.threshold
            assert ours.class_file(dataset) == theirs.class_file(dataset) == f"{name}.txt"
            args, _, method = parse_args([name, str(tmp_path), "--method", "deop"])
            assert class_split(args, dataset, method) is None
    args, _, _ = parse_args(["voc21", str(tmp_path), "--protocol", "deop"])
    assert engine_config(args, ()).score_threshold == 0.1  # standard's, with background words


def test_the_protocol_flag_runs_another_method_on_deops_settings(tmp_path):
    args, dataset, method = parse_args(
        ["coco_stuff", str(tmp_path), "--protocol", "deop", "--method", "naclip"]
    )
    config = engine_config(args, ())
    assert method.name == "deop" and config.method == "naclip" and config.short_side == 512
    assert class_split(args, dataset, method) is COCO_STUFF_156_15
    args, _, _ = parse_args(["coco_stuff", str(tmp_path), "--method", "deop", "--no-seen-unseen"])
    assert class_split(args, dataset, method) is None
    args, _, naclip = parse_args(["coco_stuff", str(tmp_path), "--seen-unseen"])
    assert naclip.name == "naclip" and class_split(args, dataset, naclip) is COCO_STUFF_156_15
    args, _, _ = parse_args(["coco_stuff", str(tmp_path)])
    assert class_split(args, dataset, naclip) is None  # the other protocols: only when asked


def reference_scores(counts: np.ndarray, unseen: list[int]) -> dict[str, float]:
    """GeneralizedSemSegEvaluator.evaluate (DeOP) on our counts[true, predicted]: its matrix is
    [predicted, true] with one more row and column (ignored pixels), ``evaluation_set`` =
    {"base": the seen classes}; returns its mIoU, mIoU-base, mIoU-unbase, hIoU-base."""
    n = counts.shape[0]
    conf = np.zeros((n + 1, n + 1), dtype=np.int64)
    conf[:n, :n] = counts[:, :n].T
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.full(n, np.nan, dtype=float)
        tp = conf.diagonal()[:-1].astype(float)
        pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
        pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
        acc_valid = pos_gt > 0
        iou_valid = (pos_gt + pos_pred) > 0
        union = pos_gt + pos_pred - tp
        iou[acc_valid] = tp[acc_valid] / union[acc_valid]
        res = {"mIoU": 100 * np.sum(iou[acc_valid]) / np.sum(iou_valid)}
        mask = np.zeros(n, dtype=bool)
        mask[[i for i in range(n) if i not in unseen]] = True
        iou_list = []
        for name, part in (("mIoU_seen", mask), ("mIoU_unseen", ~mask)):
            miou = np.sum(iou[part][acc_valid[part]]) / np.sum(iou_valid[part])
            res[name] = 100 * miou
            iou_list.append(miou)
        res["hIoU"] = 100 * len(iou_list) / sum([1 / iou for iou in iou_list])
    return {key: float(value) for key, value in res.items()}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_hand_computed_split_scores():
    """Classes 0-2 seen, 3-4 unseen. Class 2 is predicted but never true (IoU 0, counts), class
    4 neither true nor predicted (left out of the unseen mean)."""
    truth = np.array([[0, 0, 0, 1, 1, 3, 3, 3, 255]])
    prediction = np.array([[0, 0, 1, 1, 2, 3, 3, 0, 4]])  # the last pixel is not scored
    confusion = ConfusionMatrix(5)
    confusion.update(truth, prediction)
    iou = [Fraction(2, 4), Fraction(1, 3), Fraction(0), Fraction(2, 3)]  # 0, 1, 2, 3
    seen, unseen = (iou[0] + iou[1] + iou[2]) / 3, iou[3]  # 5/18, 2/3
    want = {
        "mIoU": 100 * sum(iou) / 4,
        "mIoU_seen": 100 * seen,
        "mIoU_unseen": 100 * unseen,
        "hIoU": 100 * 2 * seen * unseen / (seen + unseen),  # 100 * 20/51
    }
    scores = confusion.split_summary([3, 4])
    assert scores.keys() == want.keys()
    assert all(same(scores[k], float(v)) for k, v in want.items()), (scores, want)
    assert all(same(scores[k], v) for k, v in reference_scores(confusion.counts, [3, 4]).items())


def test_a_zero_or_undefined_side_gives_the_official_hiou():
    confusion = ConfusionMatrix(3)
    confusion.update(np.array([0, 0, 1]), np.array([0, 2, 1]))  # unseen 2: predicted, never true
    scores = confusion.split_summary([2])
    assert scores["mIoU_unseen"] == 0.0 and scores["hIoU"] == 0.0  # 2 / (1/s + 1/0) = 0
    confusion = ConfusionMatrix(3)
    confusion.update(np.array([0, 0, 1]), np.array([0, 1, 1]))  # unseen 2: nowhere
    scores = confusion.split_summary([2])
    assert math.isnan(scores["mIoU_unseen"]) and math.isnan(scores["hIoU"])
    assert math.isnan(harmonic_mean(float("nan"), 0.0)) and harmonic_mean(0.0, 0.0) == 0.0
    no_split = confusion.split_summary([])  # no unseen class: its mean and hIoU undefined
    assert math.isnan(no_split["mIoU_unseen"]) and math.isnan(no_split["hIoU"])
    with pytest.raises(ValueError, match=r"unseen labels \[3\] outside 0..2"):
        confusion.split_summary([1, 3])


@pytest.mark.parametrize("seed", range(5))
def test_split_scores_match_the_official_evaluator(seed):
    """Random labels over 12 classes, a few never true, some of those never predicted."""
    rng = np.random.default_rng(seed)
    truth = rng.choice([0, 1, 2, 3, 5, 6, 8, 10, 255], size=(40, 30))
    prediction = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 9, 10], size=(40, 30))
    confusion = ConfusionMatrix(12)
    confusion.update(truth, prediction)
    unseen = sorted(rng.choice(12, size=4, replace=False).tolist())
    scores = confusion.split_summary(unseen)
    reference = reference_scores(confusion.counts, unseen)
    assert all(same(scores[k], reference[k]) for k in reference), (scores, reference)
    assert same(scores["mIoU"], confusion.summary()["mIoU"])


def write_coco_stuff(root, count=2):
    """The reader's layout with the real VOC photos; labels from their VOC labels: person ->
    person (0, seen), background -> tree (157, unseen), other objects -> cow (19, unseen),
    boundaries -> 255."""
    images, labels = root / "images" / "val2017", root / "annotations" / "val2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    table = np.full(256, 19, np.uint8)
    table[0], table[15], table[255] = 157, 0, 255
    for path in voc_image_paths()[:count]:
        shutil.copy(path, images / path.name)
        voc = np.asarray(Image.open(VOC_DIR / "SegmentationClassPNG" / f"{path.stem}.png"))
        Image.fromarray(table[voc]).save(labels / f"{path.stem}_labelTrainIds.png")
    return root


TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]
FAST = ["--templates", "single", "--short-side", "64", "--no-progress"]


def test_ovss_eval_reports_the_split_with_the_deop_protocol(tmp_path, capsys):
    root = write_coco_stuff(tmp_path / "coco_stuff164k")
    output = tmp_path / "report.json"
    argv = ["coco_stuff", str(root), "--protocol", "deop", "--method", "naclip", *TINY, *FAST]
    assert evaluate.main([*argv, "-o", str(output)]) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    assert "mIoU seen (156) " in printed and " unseen (15) " in printed and "hIoU " in printed
    report = json.loads(output.read_text())
    assert report["protocol"] == "deop" and report["images"] == 2
    engine = report["engine"]
    assert engine["score_threshold"] == 0.0 and engine["background_words"] == []
    names = [row["name"] for row in report["per_class"]]
    assert names == list(OFFICIAL_NAMES)
    split = report["class_split"]
    assert split["name"] == "coco_stuff_156_15" and split["seen"] == 156
    assert {int(k): v for k, v in split["unseen"].items()} == dict(COCO_STUFF_156_15.unseen)
    iou = [row["iou"] for row in report["per_class"]]  # percent, None where undefined
    unseen = [iou[i] for i in COCO_STUFF_156_15.unseen if iou[i] is not None]
    seen = [v for i, v in enumerate(iou) if i not in COCO_STUFF_156_15.unseen and v is not None]
    assert {19, 157} <= {i for i in COCO_STUFF_156_15.unseen if iou[i] is not None}
    assert report["mIoU_unseen"] == pytest.approx(sum(unseen) / len(unseen))
    assert report["mIoU_seen"] == pytest.approx(sum(seen) / len(seen))
    s, u = report["mIoU_seen"], report["mIoU_unseen"]
    assert report["hIoU"] == pytest.approx(2 * s * u / (s + u) if s and u else 0.0)
    assert report["mIoU"] == pytest.approx(sum(seen + unseen) / len(seen + unseen))

    assert evaluate.main([*argv, "--no-seen-unseen", "--limit", "1", "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    assert "hIoU" not in capsys.readouterr().out and "class_split" not in report
    assert "mIoU_seen" not in report


def test_seen_unseen_is_refused_on_a_data_set_without_a_split(tmp_path, capsys):
    for argv in (["voc21", str(tmp_path), "--seen-unseen"],
                 ["ade20k", str(tmp_path), "--protocol", "deop", "--seen-unseen"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*argv, *TINY])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert err[0].startswith(f"ovss-eval: error: --seen-unseen: {argv[0]} has no seen/unseen")
        assert "coco_stuff" in err[0]


def test_the_two_stream_seen_classes_are_the_releases_trainable_flag():
    """The release's ``trainable_flag`` per data set (register_coco_stuff.py: the 156 base
    classes; register_voc_seg.py ``voc_sem_seg_test``: the 20 VOC classes but indices 15-19,
    pottedplant, sheep, sofa, train, tvmonitor); none on the others (every class unseen)."""
    from ovss_ros.evaluation.class_splits import seen_class_names

    pairs = zip(OFFICIAL_IDS, OFFICIAL_NAMES, strict=True)
    novel = {name for coco_id, name in pairs if coco_id - 1 in OFFICIAL_NOVEL}
    for name, dataset in PROTOCOLS.items():
        builtin = METHOD_PROTOCOLS["deop"].for_dataset(dataset).class_file(dataset)
        names = load_vocabulary(dataset, builtin=builtin).label_names
        seen = seen_class_names(name, names, dataset.has_background)
        if name == "coco_stuff":
            assert len(novel) == 15 and set(seen) == set(OFFICIAL_NAMES) - novel
            assert len(seen) == 156
        elif name == "voc20":
            assert seen == tuple(names[:15])
            assert (names[14], names[15]) == ("person", "pottedplant")
        else:
            assert seen == (), name
    voc = load_vocabulary(PROTOCOLS["voc20"]).label_names
    with pytest.raises(ValueError, match=r"\['cat'\] name both a seen and an unseen class"):
        seen_class_names("voc20", [*voc[:19], "cat"])


def test_ovss_eval_gives_two_stream_the_splits_seen_classes(tmp_path, capsys):
    """ovss-eval --method twostream on the release's file and COCO-Stuff: the engine runs with
    the 156 seen names in twostream.seen_classes; a given --twostream-seen-classes wins."""
    from test_deop_released import released_file

    from ovss_ros.core.clip.model_loading import load_clip

    clip = load_clip(str(TINY_VIT), "none", "cpu", "fp32")
    release = tmp_path / "model_final.pth"
    released_file(release, clip.model)
    weights = tmp_path / "clip.pt"  # the release's CLIP: the same random weights
    torch.save(clip.model.state_dict(), weights)
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=1)
    output = tmp_path / "report.json"
    argv = ["coco_stuff", str(root), "--method", "twostream", "--deop-checkpoint", str(release),
            "--model", str(TINY_VIT), "--pretrained", str(weights), "--device", "cpu",
            "--no-progress", "-o", str(output)]  # fmt: skip
    assert evaluate.main(argv) == 0, capsys.readouterr().err[-2000:]
    seen = json.loads(output.read_text())["engine"]["twostream.seen_classes"]
    assert len(seen) == 156 and not set(seen) & set(COCO_STUFF_156_15.unseen.values())
    assert "person" in seen and "tree" not in seen
    assert evaluate.main([*argv, "--twostream-seen-classes", "person;tree"]) == 0
    assert json.loads(output.read_text())["engine"]["twostream.seen_classes"] == ["person", "tree"]
