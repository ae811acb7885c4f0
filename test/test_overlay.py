"""Overlay colours and legend: distinct colours within a vocabulary, stable per class name while
it stays in the vocabulary, a legend of the classes in the frame that can be switched off.

Colour distances are CIE76 (Euclidean CIELAB) computed with scikit-image, independently of the
OpenCV conversion the palette is built with.
"""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
from conftest import VOC_DIR
from PIL import Image
from skimage.color import rgb2lab

from ovss_ros.core import ClassColours, Segmentation, class_color, overlay, palette

overlay_module = importlib.import_module("ovss_ros.core.drawing")
PALETTE = overlay_module.PALETTE
VOC_NAMES = [line.strip() for line in (VOC_DIR / "class_names.txt").read_text().splitlines()]


def lab(colours: np.ndarray) -> np.ndarray:
    return rgb2lab(np.asarray(colours, dtype=np.uint8).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


def min_distance(colours: np.ndarray) -> float:
    points = lab(colours)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return float(distances[~np.eye(len(points), dtype=bool)].min())


@pytest.mark.parametrize(("size", "at_least"), [(2, 100), (4, 70), (8, 50), (16, 35), (32, 25)])
def test_a_fresh_vocabulary_gets_well_separated_colours(size, at_least):
    names = [f"class {i}" for i in range(size)]
    assert min_distance(palette(names)) >= at_least


def test_the_whole_palette_is_distinct_and_neither_black_nor_white():
    assert len(PALETTE) >= 256
    assert min_distance(PALETTE) >= 10  # CIE76 2.3 is a just-noticeable difference
    lightness = lab(PALETTE)[:, 0]
    assert lightness.min() >= 25 and lightness.max() <= 95  # legend text and box stay readable


def test_readme_example_person_and_door_handle_look_different():
    # The hash colours of before gave (205, 53, 211) and (178, 56, 221): distance 13.
    vocabulary = ["person", "cup", "door handle", "wet floor"]
    person = class_color("person", vocabulary)
    door_handle = class_color("door handle", vocabulary)
    assert min_distance(np.array([person, door_handle])) >= 60
    assert min_distance(np.array([(205, 53, 211), (178, 56, 221)])) < 15  # the old pair
    assert min_distance(palette(vocabulary)) >= 60


def test_colours_stay_with_their_class_while_it_stays_in_the_vocabulary():
    colours = ClassColours()
    entry = {tuple(c): i for i, c in enumerate(PALETTE.tolist())}

    def entries(names: list[str]) -> dict[str, int]:
        table = colours.colours(names).tolist()
        return {name: entry[tuple(c)] for name, c in zip(names, table, strict=True)}

    assert entries(["a", "b", "c"]) == {"a": 0, "b": 1, "c": 2}
    # b leaves, d comes, the order changes: a and c keep theirs, d takes the entry b gave back.
    assert entries(["c", "d", "a"]) == {"c": 2, "d": 1, "a": 0}
    assert entries(["e", "a"]) == {"e": 1, "a": 0}
    # A name that left and came back is a new class: it takes the lowest free entry.
    assert entries(["b", "a", "f"]) == {"b": 1, "a": 0, "f": 2}


def test_random_vocabulary_changes_keep_colours_and_distinctness():
    rng = np.random.default_rng(0)
    pool = [f"name {i}" for i in range(80)]
    colours = ClassColours()
    held: dict[str, tuple[int, ...]] = {}
    for _ in range(300):
        size = int(rng.integers(1, 25))
        vocabulary = [pool[i] for i in rng.choice(len(pool), size, replace=False)]
        table = [tuple(c) for c in colours.colours(vocabulary).tolist()]
        for name, colour in zip(vocabulary, table, strict=True):
            if name in held:
                assert held[name] == colour, name
        assert len(set(table)) == len(table)  # never two classes in one colour
        held = dict(zip(vocabulary, table, strict=True))


def test_a_fresh_vocabulary_is_the_palette_in_order_whatever_came_before():
    names = ["wall", "floor", "door handle"]
    np.testing.assert_array_equal(palette(names), PALETTE[:3])
    used = ClassColours()
    used.colours(["x", "y", "z", "w"])
    # A different object that saw other vocabularies: the same names keep no history there.
    np.testing.assert_array_equal(ClassColours().colours(names), PALETTE[:3])


def voc_segmentation(index: int) -> tuple[np.ndarray, Segmentation]:
    """A VOC sample photo and its ground-truth labels (background and void unlabeled)."""
    stem = sorted(p.stem for p in (VOC_DIR / "JPEGImages").glob("*.jpg"))[index]
    rgb = np.asarray(Image.open(VOC_DIR / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
    truth = np.asarray(Image.open(VOC_DIR / "SegmentationClassPNG" / f"{stem}.png"))
    labels = np.where((truth == 0) | (truth == 255), 255, truth.astype(int) - 1).astype(np.uint8)
    confidence = np.ones(labels.shape, np.float32)
    return rgb, Segmentation(labels=labels, confidence=confidence, class_names=VOC_NAMES[1:])


def plain_blend(rgb: np.ndarray, segmentation: Segmentation, alpha: float) -> np.ndarray:
    colours = palette(segmentation.class_names).astype(np.float64)
    labelled = segmentation.labels != 255
    out = rgb.astype(np.float64)
    out[labelled] = (1 - alpha) * out[labelled] + alpha * colours[segmentation.labels[labelled]]
    return np.rint(out).astype(np.uint8)


def legend_box(with_legend: np.ndarray, without: np.ndarray) -> tuple[int, int]:
    """(height, width) of the region where the two overlays differ; it must start top left."""
    rows, cols = np.nonzero((with_legend != without).any(axis=-1))
    assert rows.size, "no legend pixels"
    assert rows.min() <= 2 and cols.min() <= 2
    return int(rows.max()) + 1, int(cols.max()) + 1


@pytest.mark.parametrize("index", [0, 1, 2])
def test_legend_shows_the_classes_of_the_frame_and_nothing_else(index):
    rgb, segmentation = voc_segmentation(index)
    without = overlay(rgb, segmentation, 0.5, legend=False)
    np.testing.assert_allclose(without, plain_blend(rgb, segmentation, 0.5), atol=1)
    with_legend = overlay(rgb, segmentation, 0.5)
    height, width = legend_box(with_legend, without)
    assert height < rgb.shape[0] // 2 and width < rgb.shape[1] // 2  # a corner, not the image
    np.testing.assert_array_equal(with_legend[height:], without[height:])
    np.testing.assert_array_equal(with_legend[:, width:], without[:, width:])

    box = with_legend[:height, :width].reshape(-1, 3)
    present = set(np.unique(segmentation.labels)) - {255}
    colours = palette(segmentation.class_names)
    for label, colour in enumerate(colours):
        swatch = int((box == colour).all(axis=1).sum())
        if label in present:
            assert swatch >= 25, segmentation.class_names[label]  # a filled square
        else:
            assert swatch < 5, segmentation.class_names[label]
    assert (box.min(axis=1) >= 200).sum() >= 20  # white text (anti-aliased)
    # Outside text and swatches, the box darkens what is behind it: the white text stands out.
    darker = with_legend[:height, :width].astype(int) <= without[:height, :width].astype(int)
    assert darker.all(axis=-1).mean() >= 0.6


def test_legend_rows_that_do_not_fit_are_summarised():
    names = [f"class {i}" for i in range(40)]
    labels = np.repeat(np.arange(40, dtype=np.uint8), 5)[None].repeat(120, axis=0)
    segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), names)
    grey = np.full((120, 200, 3), 128, np.uint8)
    with_legend = overlay(grey, segmentation, 0.5)
    without = overlay(grey, segmentation, 0.5, legend=False)
    height, width = legend_box(with_legend, without)
    assert height <= 120
    box = with_legend[:height, :width].reshape(-1, 3)
    shown = [i for i, c in enumerate(palette(names)) if (box == c).all(axis=1).sum() >= 25]
    assert 1 <= len(shown) < 10 and shown == list(range(len(shown)))  # first ones, then "+N"
    assert height * width <= 120 * 200 / 8 + 20 * 200  # the area cap, one row at least


def relative_luminance(colours: np.ndarray) -> np.ndarray:
    """WCAG 2 relative luminance of sRGB colours (N, 3) uint8."""
    linear = np.asarray(colours, np.float64) / 255.0
    linear = np.where(linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def test_class_colours_are_visible_on_a_dark_scene():
    """Issue 20: class 0 was pure blue (2.4:1 against black); WCAG asks 3:1 for graphics."""
    contrast = (relative_luminance(PALETTE) + 0.05) / 0.05  # against black
    assert contrast[0] >= 3.0
    assert contrast.min() >= 3.0
    # On a dark scene the half-blended overlay of class 0 stands out from the scene more than
    # the old blue did (1.36:1).
    dark = np.full((60, 80, 3), 15, np.uint8)
    labels = np.zeros((60, 80), np.uint8)
    segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), ["thing"])
    blended = overlay(dark, segmentation, 0.5, legend=False)
    assert (relative_luminance(blended.reshape(-1, 3)) + 0.05).min() / (
        relative_luminance(dark[:1, 0]) + 0.05
    )[0] >= 1.5


def striped_voc(index: int) -> tuple[np.ndarray, Segmentation]:
    """A 500x375 VOC sample photo labelled with all 21 VOC classes in vertical stripes."""
    stem = sorted(p.stem for p in (VOC_DIR / "JPEGImages").glob("*.jpg"))[index]
    rgb = np.asarray(Image.open(VOC_DIR / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
    assert rgb.shape == (375, 500, 3)
    labels = (np.arange(500)[None].repeat(375, axis=0) * 21 // 500).astype(np.uint8)
    return rgb, Segmentation(labels, np.ones(labels.shape, np.float32), VOC_NAMES)


@pytest.mark.parametrize("index", [1, 2])
def test_legend_of_21_classes_covers_at_most_an_eighth_of_a_500x375_image(index):
    """Issue 20: the one-column legend covered a fifth of the image (369x109 pixels)."""
    rgb, segmentation = striped_voc(index)
    with_legend = overlay(rgb, segmentation, 0.5)
    without = overlay(rgb, segmentation, 0.5, legend=False)
    height, width = legend_box(with_legend, without)
    assert height * width <= 500 * 375 / 8
    box = with_legend[:height, :width]
    colours = palette(segmentation.class_names)
    shown, columns = [], set()
    for label, colour in enumerate(colours):
        hits = np.argwhere((box == colour).all(axis=-1))
        if len(hits) >= 25:
            shown.append(label)
            columns.add(int(hits[:, 1].min()) // 10)
    assert len(shown) >= 10 and shown == list(range(len(shown)))  # the first ones, in order
    assert len(columns) >= 2  # several columns, not one long one


@pytest.mark.parametrize("shape", [(20, 20), (30, 200), (200, 40)])
def test_images_too_small_for_a_legend_get_none(shape):
    labels = np.zeros(shape, np.uint8)
    segmentation = Segmentation(labels, np.ones(shape, np.float32), ["cat"])
    grey = np.full((*shape, 3), 100, np.uint8)
    np.testing.assert_array_equal(
        overlay(grey, segmentation, 0.5), overlay(grey, segmentation, 0.5, legend=False)
    )


def test_no_labelled_pixel_no_legend():
    labels = np.full((120, 160), 255, np.uint8)
    segmentation = Segmentation(labels, np.zeros(labels.shape, np.float32), ["cat", "dog"])
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(rgb, segmentation, 0.7), rgb)


@pytest.mark.parametrize(
    ("name", "drawn"),
    [("door handle", "door handle"), ("café", "cafe"), ("Straße", "Stra?e"), ("日本", "??")],
)
def test_legend_text_is_ascii(name, drawn):
    assert overlay_module.ascii_label(name) == drawn


def test_sixteen_bit_labels_get_a_legend_too():
    names = [f"class {i}" for i in range(300)]
    labels = np.full((240, 320), 65535, np.uint16)
    labels[100:, :100], labels[100:, 100:] = 299, 7
    segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), names)
    grey = np.full((240, 320, 3), 90, np.uint8)
    with_legend = overlay(grey, segmentation, 0.5)
    height, width = legend_box(with_legend, overlay(grey, segmentation, 0.5, legend=False))
    box = with_legend[:height, :width].reshape(-1, 3)
    colours = palette(names)
    for label in (7, 299):
        assert (box == colours[label]).all(axis=1).sum() >= 25
    assert len({tuple(c) for c in colours[list(itertools.chain(range(256)))]}) == 256
