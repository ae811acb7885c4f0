"""ovss-tune's ``--procedure release``: the paper's label-free tuning as its release runs it.

The mask, the reward and the search are checked against the release's formulas restated here
(``Dataset.py``: ``Attmap_resize``, ``blurring``, ``Wsupervised_pn_mask_for_allimgs``; the main
script: ``cal_clip_sim``, ``get_clipsim_for_pnmask``, ``Search``): the tiny random CLIP judges,
the tiny random BLIP segments, the VOC sample photos are the images.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIT, voc_image_paths
from PIL import Image
from scipy import ndimage
from skimage import transform
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.cli import tune
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.pnp_ovss import release_tuning
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
from ovss_ros.core.methods.pnp_ovss.release_tuning import (
    RewardClip,
    random_annealing,
    release_mask,
)
from ovss_ros.core.methods.pnp_ovss.settings import TUNING_MIN_ATT


def released_mask(prediction: np.ndarray, min_att: float, size: int) -> np.ndarray:
    """Wsupervised_pn_mask_for_allimgs for one class map, written out."""
    positive = (prediction > min_att).astype(int).astype(np.float64)
    positive -= positive.min()  # Attmap_resize
    if positive.max() > 0:
        positive = positive / positive.max()
    positive = transform.resize(positive, (size, size), order=3, mode="constant")
    positive = ndimage.gaussian_filter(positive, 0.04 * max((size, size)))  # blurring
    positive = positive - positive.min()
    positive = positive / positive.max()
    return (positive > min_att).astype(int)


@pytest.mark.parametrize("min_att", TUNING_MIN_ATT)
def test_the_mask_is_the_releases(min_att):
    planted = torch.zeros(6, 6)
    planted[1:3, 2:5] = torch.tensor([[0.2, 0.9, 0.5], [0.4, 1.0, 0.1]])
    planted = planted * 3 + 0.5  # the mask reads the min-max normalised map
    normalised = ((planted - planted.min()) / (planted.max() - planted.min())).numpy()
    ours = release_mask(planted, min_att, 48)
    np.testing.assert_array_equal(ours, released_mask(normalised, min_att, 48))
    assert ours[12:20, 24:30].any() and not ours[:, :6].any()  # over the planted region only


def test_a_map_that_fires_nowhere_gives_an_empty_mask():
    assert not release_mask(torch.full((4, 4), 0.3), 0.05, 16).any()


@pytest.fixture(scope="module")
def judge():
    return RewardClip.of(load_clip(str(TINY_VIT), "none", "cpu"))


def test_wins_are_get_clipsim_for_pnmask(judge):
    rgb = np.asarray(Image.open(voc_image_paths()[0]).convert("RGB"))
    pixels = judge.pixels(rgb)
    size = judge.size
    masks = np.zeros((3, size, size))
    masks[0, :20], masks[1, :, 30:], masks[2] = 1, 1, 1
    names = ["person", "dog", "aeroplane"]
    model = judge.clip.model
    with torch.no_grad():  # cal_clip_sim: image x text / 0.01, softmax over the classes
        images = torch.cat([pixels * torch.from_numpy(masks).float()[:, None], pixels * 0])
        image_features = model.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text = model.encode_text(judge.clip.tokenizer(names))
        text = text / text.norm(dim=-1, keepdim=True)
        probs = torch.softmax(image_features @ text.T / 0.01, dim=-1).numpy()
    positive = np.diagonal(probs[:3])
    negative = probs[3]  # the same black image for every class
    expected = sum(int(a > b) for a, b in zip(positive, negative, strict=True))
    assert judge.wins(pixels, masks, names) == expected


def test_random_annealing_evaluates_distinct_points_and_climbs():
    space = {"layer": list(range(1, 9)), "head": list(range(1, 13)), "threshold": TUNING_MIN_ATT}
    peak = {"layer": 6, "head": 9, "threshold": 0.25}

    def objective(candidate):  # one smooth peak
        return -sum(
            (space[n].index(candidate[n]) - space[n].index(peak[n])) ** 2 for n in space
        )

    first = {"layer": 8, "head": 10, "threshold": 0.15}
    results = random_annealing(objective, space, 34, seed=0, first=first)
    assert len(results) == 34 and results[0][0] == first
    points = [tuple(r[0].values()) for r in results]
    assert len(set(points)) == 34
    assert max(score for _, score in results) >= -1  # at or next to the peak
    assert results == random_annealing(objective, space, 34, seed=0, first=first)
    tiny = {"a": [1, 2], "b": [3]}
    assert len(random_annealing(lambda c: 0.0, tiny, 34)) == 2  # the whole space, once each
    with pytest.raises(ValueError, match="trials must be >= 1"):
        random_annealing(objective, space, 0)
    with pytest.raises(ValueError, match="empty"):
        random_annealing(objective, {"a": []}, 3)


# ---- ovss-tune --procedure release, end to end ----


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


CLASSES = ["person", "dog", "tv; monitor", "aeroplane"]


def arguments(blip, output, *extra):
    return [
        str(voc_image_paths()[0].parent), "--classes", *CLASSES,
        "--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single",
        "--pnp-vlm-pretrained", str(blip), "--device", "cpu",
        "--pnp-image-size", str(IMAGE_SIZE), "--pnp-dropout-patches", "2",
        "--pnp-refine", "none", "--reward-model", str(TINY_VIT), "--reward-pretrained", "none",
        "-o", str(output), *extra,
    ]  # fmt: skip


def test_ovss_tune_release_procedure_end_to_end(blip, tmp_path, capsys, monkeypatch):
    images = voc_image_paths()
    labels = {images[0].stem: ["person", "dog"], images[1].stem: [3], images[2].stem: []}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels))
    prompts, rounds = [], []
    saliency = PnpOvss.saliency

    def spy(self, pixels, present):
        prompts.append(list(present))
        rounds.append(self.settings.dropout_rounds)
        return saliency(self, pixels, present)

    monkeypatch.setattr(PnpOvss, "saliency", spy)
    output = tmp_path / "tuned.yaml"
    assert tune.main(arguments(blip, output, "--image-labels", str(path))) == 0
    printed = capsys.readouterr().out
    total = 3 * 4 * len(TUNING_MIN_ATT)  # the tiny BLIP's 3 layers x 4 heads x min_att
    trials = min(34, total)
    assert f"({trials} trials, 3 images" in printed
    # every trial prompts each image with its labels (none: skipped, as released), one round
    assert prompts == [[0, 1], [2]] * trials and set(rounds) == {1}
    pnp = yaml.safe_load(output.read_text())["/**"]["ros__parameters"]["pnp"]
    assert pnp["threshold"] in TUNING_MIN_ATT and pnp["dropout_rounds"] == 4  # the start's
    assert 1 <= pnp["layer"] <= 3 and 1 <= pnp["head"] <= 4
    best_line = next(line for line in printed.splitlines() if line.startswith("best"))
    assert "of 3 classes beat the black image" in best_line


def test_the_default_search_is_the_releases(blip):
    args = tune.parse_args(arguments(blip, "x.yaml"))
    assert args.budget == 34 and args.seed == 0
    args = tune.parse_args(arguments(blip, "x.yaml")[:-6] + ["-o", "x.yaml"])
    assert (args.reward_model, args.reward_pretrained) == ("ViT-L-14-336", "openai")
    assert [float(v) for v in args.thresholds.split(",")] == list(TUNING_MIN_ATT)
    assert release_tuning.TRIALS == 34 and math.isclose(release_tuning.BLUR, 0.04)


@pytest.mark.parametrize(
    ("labels", "extra", "reason"),
    [
        ({"x": ["person"]}, [], "has no entry for 3 of the 3 images"),
        ("ALL:cat", [], "'cat' is neither one of the classes"),
        ("ALL:5", [], "5 is neither one of the classes"),
        ({"x": "person"}, [], "not a list of classes"),
        (None, ["--reward-model", "ViT-L-14-336", "--reward-pretrained", "openai"], "offline"),
        ("ALL:", [], "gives none of the 3 images a class"),
        ("DEEP", [], "nested too deeply"),
        ({"x": ["person"], "y": []}, ["--presence-lists", "lists.json"], "give one"),
    ],
)
def test_release_procedure_refusals(blip, tmp_path, caplog, monkeypatch, labels, extra, reason):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = arguments(blip, tmp_path / "t.yaml") + extra
    if labels is not None:
        path = tmp_path / "labels.json"
        if labels == "DEEP":
            text = '{"a": ' * 100_000 + "1" + "}" * 100_000
        elif isinstance(labels, str):
            value = labels.split(":")[1]
            item = int(value) if value.isdigit() else value
            text = json.dumps({p.stem: [item] if value else [] for p in voc_image_paths()})
        else:
            text = json.dumps(labels)
        path.write_text(text)
        args += ["--image-labels", str(path)]
    assert tune.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and reason.lower() in errors[0].lower(), errors
    assert not (tmp_path / "t.yaml").exists()
