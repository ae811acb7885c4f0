"""ovss-segment gives every input its own outputs and prints the counts that are on disk.

Inputs are crops of the real VOC photos, each of its own size, so that each output's size shows
which input it was made from; the model is the tiny random ViT.
"""

import csv
import logging
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage
from test_cli_segment import ENGINE
from test_image_bounds import png_1bit

from ovss_ros.cli.segment import _name_key, main, output_names
from ovss_ros.core import Segmenter

# (height, width) of the crop each test image gets: all different
SIZES = [(200, 300), (240, 320), (210, 280), (180, 250), (150, 200)]


def write_image(path: Path, rgb: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb[: size[0], : size[1]], cv2.COLOR_RGB2BGR))
    return size


def labels_sizes(out: Path) -> dict[str, tuple[int, int]]:
    """Output name -> size of its label PNG, for every label PNG in ``out``."""
    sizes = {}
    for path in out.glob("*_labels.png"):
        sizes[path.name.removesuffix("_labels.png")] = cv2.imread(str(path), -1).shape[:2]
    return sizes


def manifest(out: Path) -> list[list[str]]:
    with (out / "images.tsv").open(newline="", encoding="utf-8") as stream:
        return list(csv.reader(stream, dialect="excel-tab"))


def run(args: list[str], caplog) -> int:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        return main(args + ["--classes", "person", "dog"] + ENGINE)


def test_output_names_lengthen_only_the_clashing(tmp_path):
    def names(*relative: str) -> list[str]:
        return output_names([tmp_path / r for r in relative])

    assert names("in/a.jpg", "in/a.png", "in/b.jpg") == ["a_jpg", "a_png", "b"]
    assert names("cam1/0001.png", "cam2/0001.png") == ["cam1_0001_png", "cam2_0001_png"]
    # same file name and same folder name: numbered by position
    assert names("x/imgs/1.png", "y/imgs/1.png") == ["1_png_1", "1_png_2"]
    # names that differ only in case, or only in Unicode normalisation (NFC vs NFD)
    assert names("in/A.jpg", "in/a.jpg") == ["A_jpg_1", "a_jpg_2"]
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert names(f"in/{nfc}.png", f"in/{nfd}.png") == [f"{nfc}_png_1", f"{nfd}_png_2"]
    # a longer name that meets another file's own stem moves on too
    assert names("in/a.jpg", "in/a.png", "in/a_jpg.png") == ["in_a_jpg", "a_png", "a_jpg_png"]
    # the order of the inputs does not change a clash's names (bar the numbered last resort)
    assert names("in/a.png", "in/b.jpg", "in/a.jpg") == ["a_png", "b", "a_jpg"]


def test_output_names_are_always_distinct(tmp_path):
    stems = ["a", "A", "a_jpg", "a_png", "in_a_jpg", "a_jpg_1", "a_jpg_2", "ß", "ss", "SS"]
    paths = [
        tmp_path / folder / f"{stem}{suffix}"
        for folder in ("in", "other/in", "x")
        for stem in stems
        for suffix in (".jpg", ".png", ".JPG")
    ]
    names = output_names(paths)
    assert len({_name_key(n) for n in names}) == len(paths)
    assert output_names(paths) == names  # deterministic


def test_clashing_names_folders_and_repeats_each_get_their_own_outputs(tmp_path, voc_rgb, caplog):
    first, second = tmp_path / "run1", tmp_path / "run2"
    sizes = {
        "run1_a_jpg": write_image(first / "a.jpg", voc_rgb[0], SIZES[0]),
        "a_png": write_image(first / "a.png", voc_rgb[1], SIZES[1]),
        "run2_a_jpg": write_image(second / "a.jpg", voc_rgb[2], SIZES[2]),
        "b": write_image(second / "b.jpg", voc_rgb[0], SIZES[3]),
    }
    out = tmp_path / "out"
    # a folder and a file inside it, the same file twice (once through a "..")
    twice = str(second / ".." / "run1" / "a.jpg")
    args = [str(first), str(second), str(first / "a.jpg"), twice, "-o", str(out)]
    assert run(args, caplog) == 0
    assert f"wrote 4 of 4 images to {out}" in caplog.text
    assert labels_sizes(out) == sizes
    assert len(list(out.glob("*_overlay.jpg"))) == 4
    rows = manifest(out)
    assert rows[0] == ["image", "labels", "overlay"]
    assert sorted(rows[1:]) == sorted(
        [str(path), f"{name}_labels.png", f"{name}_overlay.jpg"]
        for path, name in [
            (first / "a.jpg", "run1_a_jpg"),
            (first / "a.png", "a_png"),
            (second / "a.jpg", "run2_a_jpg"),
            (second / "b.jpg", "b"),
        ]
    )
    assert f"{twice} is the same file as {first / 'a.jpg'}: segmenting it once" in caplog.text


def test_names_differing_only_in_case(tmp_path, voc_rgb, caplog):
    folder = tmp_path / "in"
    write_image(folder / "Photo.jpg", voc_rgb[0], SIZES[0])
    write_image(folder / "photo.jpg", voc_rgb[1], SIZES[1])
    out = tmp_path / "out"
    assert run([str(folder), "-o", str(out)], caplog) == 0
    sizes = labels_sizes(out)
    assert sizes == {"Photo_jpg_1": SIZES[0], "photo_jpg_2": SIZES[1]}
    assert len({_name_key(f"{n}_labels.png") for n in sizes}) == 2  # distinct on macOS too


def test_output_that_would_overwrite_an_input_is_refused_before_the_model_loads(
    tmp_path, voc_rgb, caplog
):
    folder = tmp_path / "in"
    write_image(folder / "a.jpg", voc_rgb[0], SIZES[0])
    write_image(folder / "a_labels.png", voc_rgb[1], SIZES[1])  # an input image with that name
    before = sorted(p.name for p in folder.iterdir())
    # An unknown model: had the model been loaded first, the error would be about the model.
    args = [str(folder), "-o", str(folder), "--classes", "cat", "--model", "ViT-Q-1"]
    assert main(args) == 2
    assert (
        f"output '{folder / 'a_labels.png'}' would overwrite the input image "
        f"'{folder / 'a_labels.png'}'"
    ) in caplog.text
    assert "unknown model" not in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == before

    caplog.clear()
    args = [str(folder), "-o", str(folder / "a.jpg"), "--classes", "cat", "--model", "ViT-Q-1"]
    assert main(args) == 2
    assert f"--output '{folder / 'a.jpg'}' exists and is not a folder" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == before


def test_images_over_the_pixel_limit_are_refused_from_the_header_and_counted(
    tmp_path, voc_rgb, caplog
):
    folder = tmp_path / "in"
    (folder / "bomb.png").parent.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(png_1bit(12000, 12000))
    size = write_image(folder / "small.jpg", voc_rgb[0], SIZES[4])
    write_image(folder / "large.jpg", voc_rgb[1], SIZES[1])
    out = tmp_path / "out"
    limit = size[0] * size[1]  # inclusive: small.jpg is exactly at it
    assert run([str(folder), "-o", str(out), "--max-input-pixels", str(limit)], caplog) == 1
    assert labels_sizes(out) == {"small": size}
    assert f"wrote 1 of 3 images to {out} (2 skipped: 2 over --max-input-pixels)" in caplog.text
    assert "bomb.png: image declares 12000x12000 = 144000000 pixels" in caplog.text
    assert [row[0] for row in manifest(out)[1:]] == [str(folder / "small.jpg")]


def test_exif_orientation_is_not_applied(tmp_path, voc_rgb, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    PILImage.fromarray(voc_rgb[0][:48, :64]).save(folder / "tagged.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    assert run([str(folder), "-o", str(out)], caplog) == 0
    assert labels_sizes(out) == {"tagged": (48, 64)}  # the stored grid, as data set masks are
    assert cv2.imread(str(out / "tagged_overlay.jpg")).shape == (48, 64, 3)


def test_an_image_whose_outputs_cannot_be_written_is_counted_and_leaves_nothing(
    tmp_path, voc_rgb, caplog
):
    folder = tmp_path / "in"
    long_stem = (
        "x" * 244
    )  # 248-byte file name; "_labels.png" fits in 255 bytes, "_overlay.jpg" not
    write_image(folder / f"{long_stem}.jpg", voc_rgb[0], SIZES[0])
    write_image(folder / "ok.jpg", voc_rgb[1], SIZES[1])
    out = tmp_path / "out"
    assert run([str(folder), "-o", str(out)], caplog) == 1
    assert f"wrote 1 of 2 images to {out} (1 skipped: 1 failed)" in caplog.text
    assert "cannot write" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [
        "images.tsv",
        "labels.txt",
        "ok_labels.png",
        "ok_overlay.jpg",
    ]  # the label PNG written before the overlay failed was removed


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (KeyboardInterrupt, 130, "interrupted by SIGINT: wrote 1 of 3 images to {out}"),
        (RuntimeError, 1, "wrote 2 of 3 images to {out} (1 skipped: 1 failed)"),
    ],
    ids=["ctrl-c", "failure"],
)
def test_interrupt_or_failure_on_the_second_image(
    tmp_path, voc_rgb, caplog, monkeypatch, error, status, line
):
    folder = tmp_path / "in"
    for index in range(3):
        write_image(folder / f"{index}.jpg", voc_rgb[index], SIZES[index])
    segment, calls = Segmenter.segment, []

    def second_image_raises(self, rgb):
        calls.append(1)
        if len(calls) == 2:
            raise error("injected")
        return segment(self, rgb)

    monkeypatch.setattr(Segmenter, "segment", second_image_raises)
    out = tmp_path / "out"
    assert run([str(folder), "-o", str(out)], caplog) == status
    assert line.format(out=out) in caplog.text
    written = len(manifest(out)) - 1
    assert len(labels_sizes(out)) == len(list(out.glob("*_overlay.jpg"))) == written
    assert labels_sizes(out) == {
        str(i): SIZES[i] for i in ([0] if error is KeyboardInterrupt else [0, 2])
    }
