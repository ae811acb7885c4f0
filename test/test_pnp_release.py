"""PnP-OVSS as released: round 0 twice, the background rule, the PIL resize, the release's
relabelling, class names and scoring, and ``ovss-eval --protocol pnp_ovss`` end to end.

Expected values come from the release's formulas restated here (github.com/letitiabanana/
PnP-OVSS: ``PnP_OVSS_0514_updated_segmentation.py``: the sum over rounds ~716-721, background
~446-480, ``scores`` / ``_fast_hist`` ~1106-1147, ``Load_GroundTruth`` ~901-927; the COCO script's
``Load_GroundTruth`` ~1095-1125; ``Dataset.py``: torchvision ``Resize((336, 336), BICUBIC)``).
The models are the tiny random BLIP and CLIP (test/tiny_blip.py, test/data/tiny-vit.json).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths
from PIL import Image
from test_evaluation_readers import make_voc_layout
from tiny_blip import IMAGE_SIZE, save_tiny_blip
from torchvision import transforms

from ovss_ros.cli import evaluate
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings
from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm
from ovss_ros.evaluation import ConfusionMatrix, get_protocol, load_vocabulary
from ovss_ros.evaluation.pnp_release import (
    COCO_THING_IDS,
    PNP_PROTOCOL,
    ReleaseLabels,
    release_miou,
    release_relabel,
)

FAST = {"image_size": IMAGE_SIZE, "layer": 2, "head": 3, "dropout_patches": 2}
CLASSES = ["person", "dog", "aeroplane", "tv"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def make(checkpoint):
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    vlm = load_vlm("blip_itm", str(checkpoint), "cpu")

    def build(**settings):
        pipeline = PnpOvss(clip, vlm, PnpSettings(**{**FAST, **settings}), templates="single")
        pipeline.set_classes(CLASSES)
        return pipeline

    return build


@pytest.fixture(scope="module")
def rgb():
    return np.asarray(Image.open(voc_image_paths()[0]).convert("RGB"))


# ---- round 0, background, resize ----


def test_round0_release_counts_the_first_round_twice(make, rgb):
    """gradcam_agg = round 0; for every round: += that round (round 0 again first)."""
    once = make(dropout_rounds=2)
    pixels, _ = once.preprocess(rgb)
    present = [1, 2]
    both_once = once.saliency(pixels, present)
    first = make(dropout_rounds=1).saliency(pixels, present)
    released = make(dropout_rounds=2, round0="release").saliency(pixels, present)
    torch.testing.assert_close(released, both_once + first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make(round0="release", dropout_rounds=1).saliency(pixels, [0]),
                               2 * make(dropout_rounds=1).saliency(pixels, [0]))  # fmt: skip


def release_argmax(maps: torch.Tensor, size, threshold: float, background: bool) -> np.ndarray:
    """The release without blur and CRF: threshold (min-max >= t keeps the raw value),
    bilinear align_corners resize, ``Scale_0_1`` (each map min-max again), background = (max
    map == 0) when added, argmax."""
    normalised = torch.stack([(m - m.min()) / (m.max() - m.min()) for m in maps])
    kept = maps * (normalised >= threshold)
    kept = torch.nn.functional.interpolate(kept[None], size=size, mode="bilinear",
                                           align_corners=True)[0]  # fmt: skip
    kept = torch.stack([(m - m.min()) / (m.max() - m.min()) for m in kept])
    if background:
        kept = torch.cat([(kept.max(dim=0)[0] == 0)[None].float(), kept])
    return torch.argmax(kept, dim=0).numpy()


@pytest.mark.parametrize(
    ("rule", "count", "with_background"),
    [("fewer_than_3", 3, False), ("fewer_than_3", 2, True), ("always", 3, True)],
)
def test_background_rule(make, rgb, rule, count, with_background):
    pipeline = make(background=rule, blur=0.0, refine="none", threshold=0.5)
    generator = torch.Generator().manual_seed(count)
    maps = torch.rand(count, 4, 4, generator=generator) ** 3  # fire in parts only
    present = [3, 0, 2][:count]
    result = pipeline.postprocess(maps, present, rgb[:8, :8], (8, 8))
    channels = release_argmax(maps, (8, 8), 0.5, with_background)
    offset = 1 if with_background else 0
    expected = np.full((8, 8), 255)
    for k, index in enumerate(present):
        expected[channels == k + offset] = index
    np.testing.assert_array_equal(result.labels, expected)
    assert (result.labels == 255).any() == with_background


@pytest.mark.parametrize("refine", ["none", "pamr"])
def test_the_maps_scale_does_not_matter_without_blur(make, rgb, refine):
    """Maps of ~1e-14 (the tiny random BLIP's) label as maps of ~1: the release's Scale_0_1
    after the resize. Without it, softmax made every class equal to background's 0 and the
    first-channel tie rule left every pixel unlabeled."""
    pipeline = make(blur=0.0, refine=refine, threshold=0.5)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5)) ** 3
    present = [3, 0, 2]
    tiny = pipeline.postprocess(maps * 1e-14, present, rgb[:8, :8], (8, 8))
    plain = pipeline.postprocess(maps, present, rgb[:8, :8], (8, 8))
    np.testing.assert_array_equal(tiny.labels, plain.labels)
    assert set(np.unique(plain.labels)) == {0, 2, 3, 255}
    np.testing.assert_allclose(tiny.confidence, plain.confidence, rtol=1e-5)


def test_pil_resize_is_torchvisions_resize_of_the_pil_image(make, rgb):
    pipeline = make(resize="pil")
    pixels, _ = pipeline.preprocess(rgb)
    vlm = pipeline.vlm
    official = transforms.Compose(
        [
            transforms.Resize((IMAGE_SIZE, IMAGE_SIZE), transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(vlm.mean, vlm.std),
        ]
    )(Image.fromarray(rgb))
    torch.testing.assert_close(pixels[0], official, rtol=0, atol=1e-5)
    antialiased, _ = make().preprocess(rgb)
    assert not torch.allclose(antialiased, pixels, atol=1e-3)  # the default differs


# ---- relabelling, labels, scoring ----


def release_loop(channels: np.ndarray, targets: list[int], background: bool) -> np.ndarray:
    """The release's loop, written out: for i from the last to the first, in place."""
    out = channels.copy()
    for i in range(len(targets) - 1, -1, -1):
        out[out == (i + 1 if background else i)] = targets[i]
    return out


@pytest.mark.parametrize(
    ("channels", "targets", "background", "expected"),
    [
        # VOC "[5: bottle, 1: aeroplane]": channel 2 (aeroplane) becomes 1, then 1 -> 5
        ([0, 1, 2], [5, 1], True, [0, 5, 5]),
        # in id order nothing collides
        ([0, 1, 2], [1, 5], True, [0, 1, 5]),
        # context, 3 classes, no background: [11, 3, 1] -> channel 2 -> 1 -> 3
        ([0, 1, 2], [11, 3, 1], False, [11, 3, 3]),
    ],
)
def test_release_relabel_examples(channels, targets, background, expected):
    channels = np.array(channels)
    np.testing.assert_array_equal(release_relabel(channels, targets, background), expected)
    np.testing.assert_array_equal(release_loop(channels, targets, background), expected)


def test_coco_predictions_go_through_category_ids():
    """The COCO script relabels to category ids (person 1, chair 62: position 56 of the 80)."""
    labels = ReleaseLabels("coco_object", 80)
    assert COCO_THING_IDS[0] == 1 and COCO_THING_IDS[56] == 62 and COCO_THING_IDS[60] == 67
    engine = np.array([[255, 0, 56]])  # unlabeled, person, chair
    released = labels.predict(engine, 255, [0, 56], background=True)
    np.testing.assert_array_equal(released, [[0, 1, 57]])  # index + 1 (0 = background)
    # listed chair first: channel 2 (person) -> id 1, then channel 1 -> 62 takes those too
    released = labels.predict(engine, 255, [56, 0], background=True)
    np.testing.assert_array_equal(released, [[0, 57, 57]])
    channels = np.array([[0, 2, 1]])
    np.testing.assert_array_equal(release_loop(channels, [62, 1], True), [[0, 62, 62]])


@pytest.mark.parametrize(
    ("dataset", "has_background", "truth", "expected"),
    [
        ("voc21", True, [0, 5, 255], [0, 5, 0]),  # mask[mask == 255] = 0
        ("context60", True, [0, 59, 255], [0, 59, 255]),  # unchanged: 255 is not scored
        ("ade20k", False, [255, 0, 149], [0, 1, 150]),  # ADE's 0 ("other") kept as class 0
        ("coco_stuff", False, [255, 0, 170], [0, 1, 171]),  # 255 -> 0, k -> k + 1
        ("coco_object", True, [0, 80, 255], [0, 80, 0]),  # every pixel scored
    ],
)
def test_release_ground_truth(dataset, has_background, truth, expected):
    labels = ReleaseLabels(dataset, 150)
    np.testing.assert_array_equal(labels.truth(np.array(truth), has_background), expected)


def release_scores(truths, predictions, n_class):
    """``scores`` of the release: _fast_hist then nanmean IoU over rows with ground truth."""
    hist = np.zeros((n_class, n_class))
    for truth, prediction in zip(truths, predictions, strict=True):
        mask = (truth >= 0) & (truth < n_class)
        hist += np.bincount(
            n_class * truth[mask].astype(int) + prediction[mask], minlength=n_class**2
        ).reshape(n_class, n_class)
    with np.errstate(invalid="ignore", divide="ignore"):
        iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    valid = hist.sum(axis=1) > 0
    return 100 * np.nanmean(iu[valid]), 100 * np.diag(hist).sum() / hist.sum()


def test_release_miou_is_the_releases_scores():
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 6, (5, 7)) for _ in range(3)]
    truths[0][0, :3] = 255  # not scored
    predictions = [rng.integers(0, 8, (5, 7)) for _ in range(3)]  # 6, 7: never true
    confusion = ConfusionMatrix(8)
    for truth, prediction in zip(truths, predictions, strict=True):
        confusion.update(truth, prediction)
    miou, accuracy = release_scores(truths, predictions, 8)
    scores = release_miou(confusion)
    assert scores["mIoU"] == pytest.approx(miou) and scores["aAcc"] == pytest.approx(accuracy)
    assert scores["mIoU"] != pytest.approx(confusion.summary()["mIoU"])  # 6, 7 count there


# ---- class names and the protocol's settings ----

RELEASE_VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow table dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()


def test_the_releases_class_names():
    def names(dataset):
        builtin = PNP_PROTOCOL.for_dataset(get_protocol(dataset)).class_file(get_protocol(dataset))
        return load_vocabulary(get_protocol(dataset), builtin=builtin).label_names

    assert names("voc21") == ["background", *RELEASE_VOC]
    ade = names("ade20k")
    assert len(ade) == 150 and ade[44] == "chestofdrawers" and ade[56] == "billiardtable"
    assert (ade[58], ade[130]) == ("screendoor", "screen")  # the release: "screen" twice
    stuff = names("coco_stuff")
    assert len(stuff) == 171 and stuff[9] == "trafficlight" and stuff[84] == "buildingother"
    assert names("coco_object")[1:] == stuff[:80]
    context = names("context60")
    assert len(context) == 60 and context[40] == "pottedplant" and context[55] == "tvmonitor"
    for name in ("voc21", "context60", "ade20k", "coco_object", "coco_stuff"):
        assert all(" " not in n and "-" not in n for n in names(name))


@pytest.mark.parametrize(
    ("dataset", "background"),
    [
        ("voc21", "always"),
        ("coco_object", "always"),
        ("context60", "fewer_than_3"),
        ("ade20k", "fewer_than_3"),
        ("coco_stuff", "fewer_than_3"),
    ],
)
def test_protocol_settings_per_data_set(dataset, background):
    args, _, method = evaluate.parse_args([dataset, "/nowhere", "--protocol", "pnp_ovss"])
    assert method.name == "pnp_ovss" and args.method == "pnp_ovss"
    config = evaluate.engine_config(args, (), method)
    assert config.pnp.background == background
    assert (config.pnp.round0, config.pnp.resize) == ("release", "pil")
    robot = PnpSettings()  # the node's defaults
    assert (robot.round0, robot.background, robot.resize) == ("once", "always", "antialiased")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["voc20", "/x", "--protocol", "pnp_ovss"], "evaluates voc21, context60"),
        (["cityscapes", "/x", "--protocol", "pnp_ovss"], "not cityscapes"),
        (["voc21", "/x", "--protocol", "pnp_ovss", "--method", "naclip"], "not naclip"),
        (
            ["voc21", "/x", "--protocol", "pnp_ovss", "--score-threshold", "0.3"],
            "--score-threshold 0.3: the pnp_ovss protocol scores as the release",
        ),
    ],
)
def test_protocol_refusals(capsys, argv, reason):
    with pytest.raises(SystemExit) as stop:
        evaluate.parse_args(argv)
    assert stop.value.code == 2 and reason in capsys.readouterr().err


# ---- ovss-eval --protocol pnp_ovss end to end ----

LISTS = {
    "2011_000003": "[15: 'person', 5: bottle], [100, 90]",
    "2011_000006": "[5: bottle, 1: aeroplane, 9: chair], [100, 80, 75]",
    "2011_000025": "[6: bus, 7: car], [90, 50]",
}


@pytest.fixture()
def voc(tmp_path):
    return make_voc_layout(tmp_path / "voc")


def arguments(voc, checkpoint, *extra):
    return [
        "voc21", str(voc), "--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu",
        "--templates", "single", "--no-progress", "--protocol", "pnp_ovss",
        "--pnp-vlm-pretrained", str(checkpoint), "--pnp-image-size", str(IMAGE_SIZE),
        "--pnp-layer", "2", "--pnp-head", "3", "--pnp-dropout-patches", "2",
        "--pnp-refine", "none", *extra,
    ]  # fmt: skip


def test_ovss_eval_pnp_protocol_end_to_end(voc, checkpoint, tmp_path, capsys, monkeypatch):
    """The prompts are the listed classes; both scores are recomputed from what PnP-OVSS gave,
    with the release's loop, ground truth rule and ``scores``."""
    (tmp_path / "voc_classification_noboundary.json").write_text(json.dumps(LISTS))
    seen = []
    segment = PnpOvss.segment

    def spy(self, rgb, present=None):
        result = segment(self, rgb, present)
        seen.append((list(present), result.labels.copy()))
        return result

    monkeypatch.setattr(PnpOvss, "segment", spy)
    output = tmp_path / "r.json"
    argv = arguments(voc, checkpoint, "--presence-lists", str(tmp_path), "-o", str(output))
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    reader = get_protocol("voc21").read(voc)
    assert [p for p, _ in seen] == [[14, 4], [4, 0, 8], [5]]  # the kept ids - 1, in order
    truths, predictions = [], []
    for (present, labels), (_, truth_path) in zip(seen, reader.pairs, strict=True):
        channels = np.zeros(labels.shape, dtype=np.int64)
        for k, index in enumerate(present):
            channels[labels == index] = k + 1
        predictions.append(release_loop(channels, [i + 1 for i in present], True))
        truth = np.asarray(Image.open(truth_path)).astype(np.int64)
        truth[truth == 255] = 0  # the release's VOC ground truth
        truths.append(truth)
    miou, accuracy = release_scores(truths, predictions, 21)
    report = json.loads(output.read_text())
    assert report["release_scoring"]["mIoU"] == pytest.approx(miou)
    assert report["release_scoring"]["aAcc"] == pytest.approx(accuracy)
    assert f"release scoring (background scored, mean over classes with ground truth): mIoU " \
           f"{miou:.2f}" in printed  # fmt: skip
    standard = ConfusionMatrix(21)
    for (_, truth_path), prediction in zip(reader.pairs, predictions, strict=True):
        standard.update(np.asarray(Image.open(truth_path)), prediction)
    assert report["mIoU"] == pytest.approx(standard.summary()["mIoU"])
    assert report["engine"]["pnp.round0"] == "release" and report["presence"] == str(tmp_path)


@pytest.mark.parametrize(
    ("lists", "reason"),
    [
        ({"2011_000003": "[1: a], [90]"}, "no entry for 2 of the 3 images"),
        ({**LISTS, "2011_000025": "[21: x], [90]"}, "class id 21 is not one of the 20"),
        ({**LISTS, "2011_000025": "[6: bus], [9O]"}, "probability '9O' is not an integer"),
    ],
)
def test_ovss_eval_refuses_bad_lists_before_loading(voc, tmp_path, capsys, lists, reason):
    path = tmp_path / "lists.json"
    path.write_text(json.dumps(lists))
    argv = arguments(voc, tmp_path / "no-blip", "--presence-lists", str(path))
    assert evaluate.main(argv) == 2  # no BLIP there: the lists are refused before loading
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1


def test_ovss_eval_presence_lists_with_another_protocol(voc, checkpoint, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    """--method pnp_ovss on the standard protocol: the listed classes, the standard scoring
    only; another method is refused."""
    path = tmp_path / "lists.json"
    path.write_text(json.dumps(LISTS))
    seen = []
    segment = PnpOvss.segment
    monkeypatch.setattr(
        PnpOvss, "segment", lambda self, rgb, present=None: seen.append(present) or
        segment(self, rgb, present)
    )  # fmt: skip
    argv = arguments(voc, checkpoint, "--presence-lists", str(path))
    argv[argv.index("pnp_ovss")] = "standard"  # --protocol standard
    argv += ["--method", "pnp_ovss"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    assert seen == [[14, 4], [4, 0, 8], [5]]
    assert "release scoring" not in capsys.readouterr().out
    argv[-1] = "naclip"
    assert evaluate.main(argv) == 2
    assert "--method naclip does not use it" in capsys.readouterr().err


@pytest.mark.parametrize(("dataset", "release_file"), [("voc20", "voc"), ("voc21", "voc")])
def test_ovss_eval_reads_the_data_sets_file_of_the_release_folder(
    voc, checkpoint, tmp_path, capsys, monkeypatch, dataset, release_file
):
    """The release's GPT4o_classification folder (VOC's and PASCAL Context's files share image
    ids): on voc20 too ovss-eval reads VOC's file, whose ids are voc20's classes."""
    folder = tmp_path / "GPT4o_classification"
    folder.mkdir()
    (folder / f"{release_file}_classification_noboundary.json").write_text(json.dumps(LISTS))
    other = {stem: "[59: wood], [90]" for stem in LISTS}  # the same images in PASCAL Context
    (folder / "psc_classification_noboundary.json").write_text(json.dumps(other))
    seen = []
    segment = PnpOvss.segment
    monkeypatch.setattr(
        PnpOvss, "segment", lambda self, rgb, present=None: seen.append(present) or
        segment(self, rgb, present)
    )  # fmt: skip
    argv = arguments(voc, checkpoint, "--presence-lists", str(folder))
    argv[0] = dataset
    if dataset == "voc20":
        argv[argv.index("pnp_ovss")] = "standard"
        argv += ["--method", "pnp_ovss"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    assert seen == [[14, 4], [4, 0, 8], [5]]


def test_ovss_eval_pnp_protocol_on_ade20k(tmp_path, capsys, monkeypatch):
    """ADE20K: no background channel with 3 or more classes listed (every pixel labelled), one
    with fewer; ADE's 0 ("other") scored as background, classes shifted by one, as released.
    (A BLIP with 256 text positions: the prompt with all 150 names must fit, as in BLIP's 512.)"""
    from test_evaluation_readers import write_image, write_labels

    checkpoint = save_tiny_blip(tmp_path / "blip", max_positions=256)

    base = tmp_path / "ADEChallengeData2016"
    stems = ("ADE_val_00000001", "ADE_val_00000002")
    for stem, values in zip(stems, ([0, 1, 3, 5, 150], [2, 0, 4]), strict=True):
        write_image(base / "images" / "validation" / f"{stem}.jpg")
        write_labels(base / "annotations" / "validation" / f"{stem}.png", values)
    lists = tmp_path / "ade20k_classification_noboundary.json"
    answers = {stems[0]: "[3: sky, 1: wall, 5: tree], [90, 90, 80]", stems[1]: "[2: b], [99]"}
    lists.write_text(json.dumps(answers))
    seen = []
    segment = PnpOvss.segment

    def spy(self, rgb, present=None):
        result = segment(self, rgb, present)
        seen.append((list(present), result.labels.copy()))
        return result

    monkeypatch.setattr(PnpOvss, "segment", spy)
    argv = arguments(tmp_path, checkpoint, "--presence-lists", str(tmp_path), "-o",
                     str(tmp_path / "r.json"))  # fmt: skip
    argv[0] = "ade20k"
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    assert [p for p, _ in seen] == [[2, 0, 4], [1]]
    assert (seen[0][1] != 255).all()  # 3 classes: argmax over the classes alone
    truths, predictions = [], []
    reader = get_protocol("ade20k").read(tmp_path)
    for (present, labels), (_, truth_path) in zip(seen, reader.pairs, strict=True):
        background = len(present) < 3
        channels = np.zeros(labels.shape, dtype=np.int64)
        for k, index in enumerate(present):
            channels[labels == index] = k + (1 if background else 0)
        predictions.append(release_loop(channels, [i + 1 for i in present], background))
        truths.append(np.asarray(Image.open(truth_path)).astype(np.int64))  # 0 kept
    miou, accuracy = release_scores(truths, predictions, 151)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["release_scoring"]["mIoU"] == pytest.approx(miou)
    assert report["release_scoring"]["aAcc"] == pytest.approx(accuracy)
    assert report["engine"]["pnp.background"] == "fewer_than_3"
