"""Data-set readers on tiny folders in each benchmark layout: pairing and label mapping."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import VOC_DIR, voc_image_paths
from PIL import Image

from ovss_ros.core import parse_classes
from ovss_ros.evaluation import PROTOCOLS, get_protocol, load_vocabulary
from ovss_ros.evaluation import dataset_readers as readers
from ovss_ros.evaluation.protocol import METHOD_PROTOCOLS

SIZE = (3, 4)  # tiny images: 3 rows, 4 columns


def write_image(path: Path, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_labels(path: Path, values: list[int], palette: bool = False) -> np.ndarray:
    """Index PNG holding ``values`` in reading order (cycled over the image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.resize(np.array(values, dtype=np.uint8), SIZE)
    image = Image.fromarray(labels, mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette(list(np.random.default_rng(1).integers(0, 255, 768, dtype=np.uint8)))
    image.save(path)
    return labels


def make_voc_layout(root: Path, image_paths: list[Path] | None = None) -> Path:
    """VOCdevkit/VOC2012 with the real labelme VOC samples (palette PNGs) as its val split."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "SegmentationClass").mkdir()
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    image_paths = image_paths or voc_image_paths()
    for image in image_paths:
        shutil.copy(image, base / "JPEGImages")
        shutil.copy(
            VOC_DIR / "SegmentationClassPNG" / f"{image.stem}.png", base / "SegmentationClass"
        )
    (base / "ImageSets/Segmentation/val.txt").write_text(
        "".join(f"{p.stem}\n" for p in image_paths)
    )
    return base


def indices(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_voc21_reads_real_palette_labels(tmp_path):
    base = make_voc_layout(tmp_path)
    reader = readers.read_voc21(base)
    stems = [p.stem for p in voc_image_paths()]
    assert [image.stem for image, _ in reader.pairs] == stems
    for (image_path, labels), stem in zip(reader, stems, strict=True):
        expected = indices(VOC_DIR / "SegmentationClassPNG" / f"{stem}.png")
        np.testing.assert_array_equal(labels, expected)  # indices, not palette colours
        assert labels.dtype == np.uint8 and image_path.is_file()
    values = set(np.unique(reader.sample(0)[1]))
    assert values == {0, 5, 15, 255}  # background, bottle, person, boundary


def test_voc20_drops_background_and_shifts(tmp_path):
    make_voc_layout(tmp_path)
    voc21 = readers.read_voc21(tmp_path)  # parent folder: finds VOCdevkit/VOC2012
    voc20 = readers.read_voc20(tmp_path)
    for (_, labels21), (_, labels20) in zip(voc21, voc20, strict=True):
        np.testing.assert_array_equal(labels20[labels21 == 0], 255)
        np.testing.assert_array_equal(labels20[labels21 == 255], 255)
        person = labels21 == 15
        np.testing.assert_array_equal(labels20[person], 14)


def make_context(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    write_image(base / "JPEGImages" / "2008_000002.jpg")
    write_labels(base / "SegmentationClassContext" / "2008_000002.png", [0, 1, 59, 30])
    split = base / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n")
    return base


def test_context60_keeps_background_context59_ignores_it(tmp_path):
    base = make_context(tmp_path)
    ((_, labels60),) = readers.read_context60(base)
    ((_, labels59),) = readers.read_context59(tmp_path)
    np.testing.assert_array_equal(labels60.ravel()[:4], [0, 1, 59, 30])
    np.testing.assert_array_equal(labels59.ravel()[:4], [255, 0, 58, 29])


def test_ade20k_zero_is_ignored_and_classes_shift(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for stem in ("ADE_val_00000002", "ADE_val_00000001"):
        write_image(base / "images" / "validation" / f"{stem}.jpg")
        write_labels(base / "annotations" / "validation" / f"{stem}.png", [0, 1, 150, 12])
    reader = readers.read_ade20k(tmp_path)
    assert [p.stem for p, _ in reader.pairs] == ["ADE_val_00000001", "ADE_val_00000002"]
    np.testing.assert_array_equal(reader.sample(0)[1].ravel()[:4], [255, 0, 149, 11])


def make_coco(root: Path, suffix: str, values: list[int]) -> Path:
    base = root / "coco_stuff164k"
    write_image(base / "images" / "val2017" / "000000000139.jpg")
    write_labels(base / "annotations" / "val2017" / f"000000000139{suffix}", values)
    return base


def test_coco_stuff_uses_label_train_ids(tmp_path):
    base = make_coco(tmp_path, "_labelTrainIds.png", [0, 79, 80, 170, 255, 3])
    write_labels(base / "annotations" / "val2017" / "000000000139.png", [7])  # raw ids: unused
    ((image, labels),) = readers.read_coco_stuff(tmp_path)
    assert image.name == "000000000139.jpg"
    np.testing.assert_array_equal(labels.ravel()[:6], [0, 79, 80, 170, 255, 3])


def test_coco_object_prefers_instance_train_ids(tmp_path):
    base = make_coco(tmp_path, "_instanceTrainIds.png", [0, 1, 80, 255])
    write_labels(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png", [9])
    ((_, labels),) = readers.read_coco_object(base)
    np.testing.assert_array_equal(labels.ravel()[:4], [0, 1, 80, 255])


def test_coco_object_converted_from_stuff_labels(tmp_path):
    # things 0..79 -> 1..80; stuff 80..170 -> background 0; unlabeled 255 -> 0 (cvt_coco_object)
    make_coco(tmp_path, "_labelTrainIds.png", [0, 79, 80, 170, 255, 41])
    ((_, labels),) = readers.read_coco_object(tmp_path)
    np.testing.assert_array_equal(labels.ravel()[:6], [1, 80, 0, 0, 0, 42])


def test_cityscapes_pairs_across_city_folders(tmp_path):
    base = tmp_path / "cityscapes"
    for city, name in (
        ("munster", "munster_000000_000019"),
        ("frankfurt", "frankfurt_000000_000294"),
    ):
        write_image(base / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png")
        gt = base / "gtFine" / "val" / city
        write_labels(gt / f"{name}_gtFine_labelTrainIds.png", [0, 18, 255])
        write_labels(gt / f"{name}_gtFine_labelIds.png", [7, 33])  # raw ids: unused
    reader = readers.read_cityscapes(base)
    assert [p.parent.name for p, _ in reader.pairs] == ["frankfurt", "munster"]
    assert all(label.name.endswith("_gtFine_labelTrainIds.png") for _, label in reader.pairs)
    np.testing.assert_array_equal(reader.sample(1)[1].ravel()[:3], [0, 18, 255])


def test_missing_labels_and_layouts_are_reported(tmp_path):
    base = make_coco(tmp_path, "_labelTrainIds.png", [0])
    write_image(base / "images" / "val2017" / "000000000285.jpg")  # no label file
    with pytest.raises(FileNotFoundError, match="1 files missing.*000000000285"):
        readers.read_coco_stuff(base)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        readers.read_voc21(tmp_path)


def test_layout_error_names_the_missing_path(tmp_path):
    base = make_voc_layout(tmp_path)  # VOCdevkit/VOC2012 with all three parts
    split = base / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    with pytest.raises(FileNotFoundError) as error:
        readers.read_voc21(tmp_path)
    message = str(error.value)
    assert message.startswith(f"data set layout not found: missing {split} (")
    assert str(base / "JPEGImages") not in message.split("(")[0]  # only the missing one
    shutil.rmtree(base / "SegmentationClass")
    with pytest.raises(FileNotFoundError, match="missing .*SegmentationClass and .*val.txt"):
        readers.read_voc21(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-folder does not exist"):
        readers.read_voc21(tmp_path / "no-such-folder")


def test_colour_label_images_are_rejected(tmp_path):
    base = make_coco(tmp_path, "_labelTrainIds.png", [0])
    write_image(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png")
    reader = readers.read_coco_stuff(base)
    with pytest.raises(ValueError, match="index PNG"):
        reader.sample(0)


@pytest.mark.parametrize(
    ("name", "labels", "background"),
    [
        ("voc21", 21, True),
        ("context60", 60, True),
        ("coco_object", 81, True),
        ("voc20", 20, False),
        ("context59", 59, False),
        ("coco_stuff", 171, False),
        ("cityscapes", 19, False),
        ("ade20k", 150, False),
    ],
)
def test_protocol_vocabularies(name, labels, background):
    protocol = PROTOCOLS[name]
    vocabulary = load_vocabulary(protocol)
    assert len(vocabulary.label_names) == labels
    assert vocabulary.has_background is background is protocol.has_background
    assert len(parse_classes(vocabulary.classes)) == labels - background  # engine accepts them
    assert all("," not in entry for entry in vocabulary.classes)
    if background:
        assert vocabulary.label_names[0] == "background" and vocabulary.background_words
    else:
        assert vocabulary.background_words == ()
    for method in METHOD_PROTOCOLS.values():  # every method's own class file fits the labels
        own = load_vocabulary(protocol, builtin=method.for_dataset(protocol).class_file(protocol))
        assert len(own.label_names) == labels and own.has_background is background
        assert len(parse_classes(own.classes)) == labels - background


def test_protocol_details():
    voc21 = load_vocabulary(get_protocol("VOC"))
    assert (
        voc21.background_words[:3] == ("sky", "wall", "tree") and len(voc21.background_words) == 26
    )
    assert voc21.label_names[15] == "person" and voc21.classes[14].startswith("person; ")
    assert load_vocabulary(get_protocol("pc60")).background_words == ("background",)
    assert get_protocol("ade").name == "ade20k" and get_protocol("coco-stuff").name == "coco_stuff"
    with pytest.raises(ValueError, match="unknown data set"):
        get_protocol("kitti")


def test_custom_class_file_must_keep_label_count(tmp_path):
    custom = tmp_path / "cityscapes.txt"
    names = [f"class {i}; synonym {i}" for i in range(19)]
    custom.write_text("\n".join(names) + "\n")
    vocabulary = load_vocabulary(PROTOCOLS["cityscapes"], custom)
    assert vocabulary.classes == names and vocabulary.label_names[3] == "class 3"
    custom.write_text("\n".join(names[:18]))
    with pytest.raises(ValueError, match="needs 19"):
        load_vocabulary(PROTOCOLS["cityscapes"], custom)
