"""ovss-tune end to end: its params file, its refusals, its bounded image reading.

The release's reward and search are tested in test_pnp_release_tuning.py.
"""

import re

import pytest
import yaml
from conftest import TINY_VIT, voc_image_paths
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.cli import tune
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpSettings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


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
        "--budget", "3", "--seed", "1", "-o", str(output),
        "--reward-model", str(TINY_VIT), "--reward-pretrained", "none",
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
    assert pnp["dropout_rounds"] == 4  # not searched: the start's
    assert pnp["threshold"] in (0.05, 0.15, 0.25, 0.35, 0.45)
    assert pnp["dropout_patches"] == 2 and pnp["refine"] == "none"
    best = {key: pnp[key] for key in ("layer", "head", "threshold")}
    assert all(f"'{key}': {value}" in best_line for key, value in best.items())
    PnpSettings(**pnp).validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--layers", "2-7"], "layer 4 > the VLM's 3 text layers"),
        (["--thresholds", "0.1,3"], r"--thresholds '0.1,3': 3.0 is not in \[0, 1\]"),
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


@pytest.mark.parametrize("thresholds", ["0.1,3", "nan", "inf", "0.2,-0.5", "1.5"])
def test_thresholds_outside_0_1_are_refused_before_the_models_load(
    checkpoint, tmp_path, caplog, monkeypatch, thresholds
):
    from ovss_ros.core.clip import model_loading

    def loaded(*_args, **_kwargs):
        raise AssertionError("a model loaded before the arguments were checked")

    monkeypatch.setattr(model_loading, "load_clip", loaded)
    output = tmp_path / "pnp.yaml"
    assert tune.main(tune_arguments(checkpoint, output) + [f"--thresholds={thresholds}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "is not in [0, 1]" in errors[0], errors
    assert errors[0].startswith(f"--thresholds {thresholds!r}") and not output.exists()


def test_values_listed_twice_are_searched_once():
    args = tune.parse_args(["x", "--classes", "a", "--layers", "1-2,2,1", "--heads", "3,3",
                            "--thresholds", "0.15,0.05,0.15"])  # fmt: skip
    assert tune.space_values(args) == {
        "layers": [1, 2], "heads": [3], "thresholds": [0.15, 0.05]
    }  # fmt: skip


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
