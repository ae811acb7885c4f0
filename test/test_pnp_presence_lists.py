"""Per-image class lists in the PnP-OVSS release's JSON layout (``presence_lists``).

Every kept-class value is compared with the release's own reading, restated here from
``Load_predicted_classes`` (``PnP_OVSS_0514_updated_segmentation.py`` ~726-787 and the COCO
script's ~858-963): the string replacements, ``strip("][")``, ``split("], [")``, probability
``> 70``, ``best_class_idx.append(0)`` when none is kept. ovss-segment's ``--presence-lists`` runs
end to end with the tiny random CLIP and BLIP on the VOC sample photos; every refusal is one
line and exit status 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.cli.engine_args import config_from_args
from ovss_ros.cli.segment import main as segment
from ovss_ros.cli.segment import parse_args
from ovss_ros.core import Segmenter
from ovss_ros.core.file_checks import FileCheckError, read_json
from ovss_ros.core.methods.pnp_ovss.presence_lists import (
    PresenceListError,
    PresenceLists,
    parse_answer,
    read_image_labels,
)


def release_kept(answer: str) -> list[int] | None:
    """The release's kept class ids (None: its empty-answer branch, the fallback class)."""
    groups = (
        answer.replace("]\n\n[", "], [")
        .replace("],\n\n[", "], [")
        .replace("], \n[", "], [ ")
        .replace("]\n[", "], [ ")
        .replace("],\n[", "], [ ")
        .strip("][")
        .split("], [")
    )
    classes = groups[0].split(",")
    if len(groups) == 1 and groups[0] == "":
        return None
    if len(groups) == 1:  # the COCO script's "no prob output"
        probabilities = [100] * len(classes)
    else:
        probabilities = [int(p.split(":")[-1].split("%")[0]) for p in groups[1].split(",")]
    return [
        int(classes[i].split(":")[0])
        for i, p in enumerate(probabilities[: len(classes)])
        if p > 70
    ]


def release_indices(answer: str, category_ids: list[int] | None = None) -> list[int]:
    """The release's best_class_idx: id - 1 (VOC, Context, ADE) or the category's position
    (COCO, unknown ids skipped); [0] when none is kept."""
    kept = release_kept(answer) or []
    if category_ids is None:
        indices = [i - 1 for i in kept]
    else:
        indices = [category_ids.index(i) for i in kept if i in category_ids]
    return indices or [0]


ANSWERS = {
    # the release's VOC file's own forms
    "single": "[1: 'aeroplane'], [100%]",
    "two": "[2: 'bicycle', 15: 'person'], [100, 100]",
    "one_low": "[20: 'tvmonitor', 15: 'person'], [90, 10]",
    "at_70": "[18: 'sofa', 11: 'table'], [95, 70]",  # 70 is not above 70
    "at_71": "[18: 'sofa', 11: 'table'], [95, 71%]",
    "order": "[5: 'bottle', 1: 'aeroplane', 3: 'bird'], [80, 90, 75]",
    "none_kept": "[4: 'boat', 7: 'car'], [50%, 70%]",  # fallback: the first class
    "empty": "",
    "empty_brackets": "[]",
    "line_breaks": "[2: 'bicycle', 15: 'person']\n\n[100%, 90%]",
    "line_break_comma": "[2: 'bicycle', 15: 'person'],\n[80, 40]",
    "double_brackets": "[[1: 'aeroplane', 2: 'bicycle'], [90%, 60%]]",
    "fewer_probabilities": "[1: 'aeroplane', 2: 'bicycle', 3: 'bird'], [90, 80]",
    "more_probabilities": "[1: 'aeroplane'], [90, 80, 100]",
    "no_probabilities": "[6: bus, 7: car]",
    "prefixed_probability": "[8: 'cat'], [cat: 90%]",
}


@pytest.mark.parametrize("key", list(ANSWERS))
def test_kept_classes_are_the_releases(key):
    answer = ANSWERS[key]
    assert parse_answer(answer).kept() == (release_kept(answer) or [])
    lists = PresenceLists({"img": parse_answer(answer)}, "test")
    assert lists.vocabulary_indices("img", 20) == release_indices(answer)


def test_the_examples_values():
    """Spelled out: threshold 70 exclusive, the answer's order, the data set's first class."""
    lists = PresenceLists({k: parse_answer(v) for k, v in ANSWERS.items()}, "test")
    assert lists.vocabulary_indices("at_70", 20) == [17]
    assert lists.vocabulary_indices("at_71", 20) == [17, 10]
    assert lists.vocabulary_indices("order", 20) == [4, 0, 2]
    assert lists.vocabulary_indices("none_kept", 20) == [0]
    assert lists.vocabulary_indices("empty", 20) == [0]


COCO_IDS = [1, 2, 3, 5, 62, 92]  # a few category ids, with gaps as COCO's


@pytest.mark.parametrize(
    "answer",
    [
        "[62: chair, 1: person, 5: airplane], [90, 100, 40]",
        "[12: nothing, 3: car], [100, 100]",  # 12 is no category here: skipped as released
        "[12: nothing], [100]",  # nothing left: the first class
        "[92: banner, 92: banner], [90, 90]",  # listed twice: prompted once
    ],
)
def test_coco_category_ids_map_to_their_positions(answer):
    lists = PresenceLists({"img": parse_answer(answer)}, "test")
    expected = list(dict.fromkeys(release_indices(answer, COCO_IDS)))
    assert lists.vocabulary_indices("img", len(COCO_IDS), COCO_IDS) == expected


def test_folder_with_the_release_file_name_and_merged_folder(tmp_path):
    (tmp_path / "voc_classification_noboundary.json").write_text(
        json.dumps({"2007_000033": "[1: 'aeroplane'], [100%]"})
    )
    (tmp_path / "more.json").write_text(json.dumps({"x": "[3: bird], [90]"}))
    assert PresenceLists.load(tmp_path, "voc").vocabulary_indices("2007_000033", 20) == [0]
    merged = PresenceLists.load(tmp_path)
    assert merged.vocabulary_indices("x", 20) == [2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"a": 3}', "the answer is a int, not a string"),
        ('{"a": "[x: cat], [90]"}', "image 'a': class id 'x: cat' is not an integer"),
        ('{"a": "[1: cat], [ninety%]"}', "probability 'ninety%' is not an integer"),
        ('{"a": "[1: cat], [90.5%]"}', "probability '90.5%' is not an integer"),
        ('{"a": "[1: cat], [90], [1]"}', "3 bracketed groups, not 2"),
        ("\xff", "is not UTF-8 text"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, reason):
    path = tmp_path / "lists.json"
    path.write_bytes(content.encode("latin-1") if content == "\xff" else content.encode())
    with pytest.raises(PresenceListError, match=reason):
        PresenceLists.load(path)


DEEP = 100_000  # nesting levels: far over Python's recursion limit, 0.2 MB of text


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[" * DEEP + "]" * DEEP, "nested too deeply"),
        ('{"a":' * DEEP + "1" + "}" * DEEP, "nested too deeply"),
        ('{"img": ' + "[" * DEEP + "]" * DEEP + "}", "nested too deeply"),
        ('{"img": "[1: x], [90]", "img": "[2: y], [90]"}', "image 'img' is in it twice"),
        ('{"a": {"b": 1, "b": 2}}', "image 'b' is in it twice"),
        ('{"img": NaN}', "the answer is a float"),
        ('{"img": "[1: x], [nan%]"}', "probability 'nan%' is not an integer"),
        ('{"img": "[1: x], [inf%]"}', "probability 'inf%' is not an integer"),
        ("\ufeff{}", "is not valid JSON"),
    ],
)
def test_nested_duplicate_and_non_number_content_is_refused(tmp_path, content, reason):
    path = tmp_path / "lists.json"
    path.write_text(content)
    for read in (PresenceLists.load, lambda p: read_image_labels(p, ["x", "y"])):
        with pytest.raises(PresenceListError) as refused:
            read(path)
        message = str(refused.value)
        if "answer" not in reason and "probability" not in reason:  # the shared reading
            assert reason in message
        assert "\n" not in message and len(message) < 400


def test_long_items_are_cut_in_the_message(tmp_path):
    path = tmp_path / "lists.json"
    digits = "9" * 5000  # over Python's int() digit limit: not an integer
    path.write_text(json.dumps({"i" * 3000: f"[1: x], [{digits}%]"}))
    with pytest.raises(PresenceListError, match="probability '9{60}[.][.][.] [(]5001") as error:
        PresenceLists.load(path)
    assert len(str(error.value)) < 400
    path.write_text(json.dumps({"img": f"[{'9' * 4000}: x], [90]"}))
    lists = PresenceLists.load(path)  # a huge id: read, then refused as no class
    with pytest.raises(PresenceListError, match="class id 9{60}[.][.][.]") as error:
        lists.check_ids(20)
    assert len(str(error.value)) < 400
    path.write_text(json.dumps({"img": ["z" * 5000]}))
    with pytest.raises(PresenceListError, match="is neither") as error:
        read_image_labels(path, ["x"] * 500)
    assert len(str(error.value)) < 600


def test_negative_and_huge_probabilities_are_read_as_released(tmp_path):
    path = tmp_path / "lists.json"
    huge = "9" * 100
    answers = {"a": f"[2: x, 3: y], [-90%, {huge}%]", "b": "[2: x], [-1]"}
    path.write_text(json.dumps(answers))
    lists = PresenceLists.load(path)  # int() of each, > 70 kept, as the release does
    assert lists.vocabulary_indices("a", 20) == [2]
    assert lists.vocabulary_indices("b", 20) == [0]  # none kept: the first class


def test_a_folder_too_large_together_is_refused_before_reading(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    for name in ("a.json", "b.json"):  # sparse: 40 MiB each on no disk, not JSON
        with (folder / name).open("wb") as stream:
            stream.truncate(40 << 20)
    with pytest.raises(PresenceListError, match="hold more than 67.1 MB together"):
        PresenceLists.load(folder)
    (folder / "b.json").unlink()
    with pytest.raises(PresenceListError, match="a.json' is not valid JSON"):
        PresenceLists.load(folder)  # one 40 MiB file is within the limit: read, refused


def test_long_whitespace_between_groups_is_read_in_linear_time():
    """``]`` then a million spaces and no ``[``: the group split took quadratic time (about 30
    minutes for one such answer of a 64 MiB file); now well under a second. Run in a child
    process with a generous limit so that a regression fails instead of hanging."""
    code = (
        "from ovss_ros.core.methods.pnp_ovss.presence_lists import parse_answer\n"
        "print(parse_answer('[1: a]' + ' ' * 1_000_000 + 'b, 2: c], [90, 80]'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "ids=(1, 2), probabilities=(90, 80)" in done.stdout


def test_read_json_refuses_deep_nesting_for_every_reader(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(FileCheckError, match="nested too deeply"):
        read_json(path, "model config")


def test_symlink_loops_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "self").symlink_to(".")
    (folder / "loop.json").symlink_to("loop.json")
    with pytest.raises(PresenceListError, match="loop.json.*cannot be read"):
        PresenceLists.load(folder)
    with pytest.raises(PresenceListError, match="cannot be read"):
        PresenceLists.load(folder / "loop.json")
    (folder / "loop.json").unlink()
    (folder / "a.json").write_text(json.dumps({"img": "[1: x], [90]"}))
    assert PresenceLists.load(folder).vocabulary_indices("img", 20) == [0]


def test_missing_files_ids_out_of_range_and_missing_images_are_refused(tmp_path):
    with pytest.raises(PresenceListError, match="does not exist|not found|no such"):
        PresenceLists.load(tmp_path / "absent.json")
    with pytest.raises(PresenceListError, match="holds no .json file"):
        PresenceLists.load(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"img": "[21: x], [90]"}))
    (tmp_path / "b.json").write_text(json.dumps({"img": "[0: x], [90]"}))
    with pytest.raises(PresenceListError, match="image 'img' is in another file"):
        PresenceLists.load(tmp_path)
    for name, bad in (("a.json", 21), ("b.json", 0)):
        lists = PresenceLists.load(tmp_path / name)
        with pytest.raises(PresenceListError, match=f"class id {bad} is not one of the 20"):
            lists.check_ids(20)
        with pytest.raises(PresenceListError, match=f"class id {bad} is not one of the 20"):
            lists.vocabulary_indices("img", 20)
    with pytest.raises(PresenceListError, match="no entry for 1 of the 2 images .*'other'"):
        lists.check_images(["img", "other"])


# ---- ovss-segment --presence-lists, end to end ----

ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"]
PNP = ["--method", "pnp_ovss", "--pnp-image-size", str(IMAGE_SIZE), "--pnp-layer", "2"]
PNP += ["--pnp-head", "3", "--pnp-dropout-rounds", "2", "--pnp-refine", "none"]
CLASSES = ["person", "dog", "tv", "sofa"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_ovss_segment_prompts_with_each_images_listed_classes(tmp_path, blip):
    images = voc_image_paths()[:2]
    lists = tmp_path / "lists.json"
    answers = {images[0].stem: "[4: sofa, 2: dog], [90, 100]", images[1].stem: "[3: tv], [20]"}
    lists.write_text(json.dumps(answers))
    args = [*map(str, images), "--classes", *CLASSES, "-o", str(tmp_path / "out")]
    args += ENGINE + PNP + ["--pnp-vlm-pretrained", str(blip), "--presence-lists", str(lists)]
    torch.manual_seed(0)
    assert segment(args) == 0
    torch.manual_seed(0)  # the same random CLIP as the command's
    segmenter = Segmenter(config_from_args(parse_args(args)))
    segmenter.set_classes(CLASSES)
    for image, present in zip(images, ([3, 1], [0]), strict=True):
        labels = cv2.imread(str(tmp_path / "out" / f"{image.stem}_labels.png"), -1)
        rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        expected = segmenter.pipeline.core.segment(rgb, present).labels
        np.testing.assert_array_equal(labels, expected)
        assert set(np.unique(labels)) <= {*present, 255}


@pytest.mark.parametrize(
    ("answers", "flags", "reason"),
    [
        ({"other": "[1: person], [90]"}, [], "no entry for 1 of the 1 images"),
        ("IMAGE", [], "class id 9 is not one of the 4 classes"),
        ({}, ["--method", "naclip"], "--method naclip does not use it"),
        ("BROKEN", [], "is not valid JSON"),
    ],
)
def test_ovss_segment_refuses_bad_lists_in_one_line(
    tmp_path, blip, caplog, answers, flags, reason
):
    image = voc_image_paths()[0]
    lists = tmp_path / "lists.json"
    if answers == "BROKEN":
        lists.write_text("{")
    else:
        given = {image.stem: "[9: x], [90]"} if answers == "IMAGE" else answers
        lists.write_text(json.dumps(given))
    args = [str(image), "--classes", *CLASSES, "-o", str(tmp_path / "out")]
    args += ENGINE + PNP + ["--pnp-vlm-pretrained", str(blip), "--presence-lists", str(lists)]
    assert segment(args + flags) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and reason in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["ovss-segment", "ovss-eval", "ovss-tune"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_presence_lists_path_is_refused_not_read_as_the_current_folder(
    tmp_path, monkeypatch, capsys, tool, value
):
    from ovss_ros.cli import evaluate, tune

    monkeypatch.chdir(tmp_path)  # a folder with a class-list file: "" used to read it
    image = voc_image_paths()[0]
    (tmp_path / "lists.json").write_text(json.dumps({image.stem: "[1: person], [90]"}))
    main, args = {
        "ovss-segment": (segment, [str(image), "--classes", *CLASSES, "--method", "pnp_ovss"]),
        "ovss-eval": (evaluate.main, ["voc21", str(tmp_path), "--protocol", "pnp_ovss"]),
        "ovss-tune": (tune.main, [str(image), "--classes", *CLASSES]),
    }[tool]
    with pytest.raises(SystemExit) as ended:
        main([*args, "--presence-lists", value])
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("argument --presence-lists: is empty: name a class-list file or "
                        "folder (the current folder is '.')")  # fmt: skip
    assert len(err.splitlines()) == 1 and "Traceback" not in err

