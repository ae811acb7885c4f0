"""Label-free tuning: the CLIP reward, the random search and ovss-tune end to end."""

import re

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIT, voc_image_paths
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.cli import tune
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings
from ovss_ros.core.methods.pnp_ovss.tuning import (
    Reward,
    SearchSpace,
    best_of,
    clip_reward_pairs,
    masked_pair,
    random_search,
    reward,
)
from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm
from ovss_ros.core.segmentation import Segmentation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    vlm = load_vlm("blip_itm", str(checkpoint), "cpu")
    settings = PnpSettings(image_size=IMAGE_SIZE, layer=2, head=1, refine="none")
    pipe = PnpOvss(clip, vlm, settings, templates="single")
    pipe.set_classes(["person", "dog", "tv"])
    return pipe


def test_masked_pair_keeps_and_removes_the_region():
    pixels = torch.randn(3, 4, 4)
    mask = torch.zeros(4, 4)
    mask[1:3, :2] = 1
    kept, removed = masked_pair(pixels, mask)
    assert torch.equal(kept, pixels * mask) and torch.equal(removed, pixels * (1 - mask))
    assert torch.equal(kept + removed, pixels)


def test_reward_pairs_are_clip_probabilities_of_kept_and_removed_images(pipeline, voc_rgb):
    rgb = voc_rgb[0]
    _, clip_pixels = pipeline.preprocess(rgb)
    labels = np.full(rgb.shape[:2], 255, np.uint8)
    labels[: rgb.shape[0] // 2] = 1  # planted mask: the top half is "dog"
    segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), ["person", "dog", "tv"])
    pairs = clip_reward_pairs(pipeline, clip_pixels, segmentation, [1, 2])
    size = clip_pixels.shape[-1]
    for index, (kept, removed) in zip([1, 2], pairs, strict=True):
        mask = torch.zeros(size, size)
        if index == 1:  # half of the rows, with one soft row where the boundary falls
            mask = torch.nn.functional.interpolate(
                torch.from_numpy(labels == 1).float()[None, None], size=(size, size), mode="area"
            )[0, 0]
        images = torch.stack([clip_pixels[0] * mask, clip_pixels[0] * (1 - mask)])
        with torch.inference_mode():
            features = pipeline.clip.model.encode_image(images).float()
            features = features / features.norm(dim=-1, keepdim=True)
            probs = torch.softmax(100.0 * features @ pipeline.class_text.T, dim=-1)
        assert kept == pytest.approx(float(probs[0, index]), rel=1e-5)
        assert removed == pytest.approx(float(probs[1, index]), rel=1e-5)
    # class 2 has no pixels: its kept image is all mean colour, its removed image the whole one
    assert pairs[1][1] == pytest.approx(
        float(pipeline.presence_probabilities(clip_pixels)[2]), rel=1e-5
    )


def test_reward_is_the_win_rate_then_the_margin():
    result = reward([(0.6, 0.2), (0.1, 0.3), (0.5, 0.4), (0.2, 0.2)])
    assert result.win_rate == 0.5 and result.pairs == 4
    assert result.margin == pytest.approx((0.4 - 0.2 + 0.1 + 0.0) / 4)
    assert Reward(0.5, -1.0) > Reward(0.25, 1.0) and Reward(0.5, 0.2) > Reward(0.5, 0.1)
    assert reward([]) == Reward(0.0, 0.0)


def test_random_search_tries_distinct_candidates_starting_from_the_first():
    space = SearchSpace(layers=[1, 2, 3], heads=[1, 2], thresholds=[0.1, 0.2], dropout_rounds=[1])
    seen = []

    def objective(candidate):
        seen.append(candidate)
        score = -abs(candidate["layer"] - 2) - abs(candidate["threshold"] - 0.2)
        return Reward(score, 0.0)

    first = {"layer": 3, "head": 2, "threshold": 0.1, "dropout_rounds": 1}
    results = random_search(objective, space, budget=5, seed=7, first=first)
    assert len(results) == 5 and seen[0] == first
    assert len({tuple(c.values()) for c in seen}) == 5
    assert all(c in space.candidates() for c in seen)
    best, best_reward = best_of(results)
    assert best_reward == max(r for _, r in results)
    everything = random_search(objective, space, budget=100, seed=7)
    assert len(everything) == 12  # the budget stops at the size of the space
    assert best_of(everything)[0]["layer"] == 2 and best_of(everything)[0]["threshold"] == 0.2
    other_seed = random_search(objective, space, budget=5, seed=8)
    assert [c for c, _ in other_seed] != [c for c, _ in random_search(objective, space, 5, 7)]
    with pytest.raises(ValueError, match="budget must be >= 1"):
        random_search(objective, space, budget=0)
    with pytest.raises(ValueError, match="search space is empty"):
        random_search(objective, SearchSpace([], [1], [0.1], [1]), budget=3)


def test_int_list_parses_ranges_and_lists():
    assert tune.int_list("1-3,8") == [1, 2, 3, 8] and tune.int_list("") == []
    with pytest.raises(ValueError, match=r"'9-3' runs backwards: write the smaller number first"):
        tune.int_list("9-3", "--layers")  # said "not a range of at most 1000 values" before
    with pytest.raises(ValueError, match="is not a range of at most"):
        tune.int_list("1-100000", "--layers")


def tune_arguments(checkpoint, output):
    folder = voc_image_paths()[0].parent
    return [
        str(folder),
        "--classes", "person", "dog", "tv; monitor", "aeroplane",
        "--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single",
        "--pnp-vlm-pretrained", str(checkpoint), "--device", "cpu",
        "--pnp-image-size", str(IMAGE_SIZE), "--pnp-layer", "2", "--pnp-head", "3",
        "--pnp-dropout-patches", "2", "--pnp-refine", "none",
        "--rounds", "1-2", "--budget", "3", "--seed", "1", "-o", str(output),
        "--procedure", "kept_removed",
    ]  # fmt: skip


def test_ovss_tune_end_to_end_on_the_voc_samples(checkpoint, tmp_path, capsys):
    output = tmp_path / "params" / "pnp.yaml"
    assert tune.main(tune_arguments(checkpoint, output)) == 0
    printed = capsys.readouterr()
    assert "ovss-tune" in printed.err and "3/3" in printed.err  # the progress bar ran
    best_line = next(line for line in printed.out.splitlines() if line.startswith("best"))
    assert f"{len(voc_image_paths())} images" in best_line and "3 trials" in best_line
    parameters = yaml.safe_load(output.read_text())["/**"]["ros__parameters"]
    assert parameters["method"] == "pnp_ovss"
    assert parameters["classes"] == ["person", "dog", "tv; monitor", "aeroplane"]
    pnp = parameters["pnp"]  # nested by namespace: pnp.layer
    assert pnp["vlm_model"] == "blip_itm"
    assert pnp["vlm_pretrained"] == str(checkpoint)
    assert parameters["model"] == str(TINY_VIT) and parameters["pretrained"] == "none"
    assert set(pnp) == set(vars(PnpSettings()))
    assert pnp["layer"] in (1, 2, 3) and pnp["head"] in (1, 2, 3, 4)
    assert pnp["dropout_rounds"] in (1, 2, 4)  # searched 1-2, or the start (4)
    assert pnp["threshold"] in (0.05, 0.15, 0.25, 0.35, 0.45)
    assert pnp["dropout_patches"] == 2 and pnp["refine"] == "none"
    best = {key: pnp[key] for key in ("layer", "head", "threshold")}
    assert all(f"'{key}': {value}" in best_line for key, value in best.items())
    PnpSettings(**pnp).validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--layers", "2-7"], "layer 4 > the VLM's 3 text layers"),
        (["--thresholds", "0.1,3"], r"pnp.threshold must be in \[0, 1\]"),  # a searched value
        (["--pnp-vlm-pretrained", "/nonexistent/blip"], "pnp.vlm_pretrained directory"),
        (["--classes", "dog", "Dog"], "duplicate class"),
    ],
)
def test_ovss_tune_refuses_bad_input_before_any_work(
    checkpoint, tmp_path, caplog, change, message
):
    output = tmp_path / "pnp.yaml"
    assert tune.main(tune_arguments(checkpoint, output) + change) == 2
    assert not output.exists()
    assert any(re.search(message, record.getMessage()) for record in caplog.records)


def test_ovss_tune_reads_images_bounded_before_decoding(checkpoint, tmp_path, caplog):
    """ovss-tune reads its images as every other tool does: a file over --max-input-pixels is
    skipped from its header (a 12000x12000 1-bit PNG of a few KB), never decoded."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    bomb = folder / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 100_000
    arguments = tune_arguments(checkpoint, tmp_path / "pnp.yaml")
    arguments[0] = str(folder)  # only the bomb
    assert tune.main(arguments) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("bomb.png" in m and "144000000" in m.replace(",", "") for m in messages), messages
    assert any("no readable images" in m for m in messages), messages
