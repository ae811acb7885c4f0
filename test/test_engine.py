"""The segmenter end to end on real images, with planted text embeddings as known answers."""

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter, VocabularyError, class_color, overlay
from ovss_ros.core.methods.dense.forward import patch_features
from ovss_ros.core.segmenter import resized_size, window_starts


@pytest.fixture()
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64)
    segmenter = Segmenter(config)
    segmenter.reconfigure(templates="single")
    segmenter.set_classes(["person", "tv; television; monitor", "dog"])
    return segmenter


def plant(segmenter, rgb, patches, owner):
    """Make query q equal to the feature of patch ``patches[q]``: that patch must win it."""
    features = patch_features(segmenter.clip.model.visual, segmenter.method.preprocess(rgb))[0]
    segmenter.method._text_embeddings = torch.stack([features[r, c] for r, c in patches])
    segmenter.method._query_owner = torch.tensor(owner)
    segmenter.method._class_queries = sum(label < len(segmenter.classes) for label in owner)


def patch_centre(rgb, segmenter, row, col):
    """Pixel at the centre of patch (row, col) in input coordinates."""
    h, w = segmenter.method.network_size(*rgb.shape[:2])
    p = segmenter.clip.patch_size
    return int((row + 0.5) * p * rgb.shape[0] / h), int((col + 0.5) * p * rgb.shape[1] / w)


def test_real_image_outputs(segmenter, voc_rgb):
    for rgb in voc_rgb:
        seg = segmenter.segment(rgb)
        assert seg.labels.shape == rgb.shape[:2] and seg.labels.dtype == np.uint8
        assert seg.confidence.shape == rgb.shape[:2] and seg.confidence.dtype == np.float32
        assert set(np.unique(seg.labels)) <= {0, 1, 2}
        assert (seg.confidence >= 1 / 5 - 1e-6).all()  # 5 queries and (seg.confidence <= 1).all()
        assert seg.class_names == ["person", "tv", "dog"]
        assert seg.unlabeled == 255
        np.testing.assert_array_equal(seg.mask(1), seg.labels == 1)


def test_planted_queries_win_their_patches(segmenter, voc_rgb):
    rgb = voc_rgb[0]
    patches = [(0, 0), (2, 3), (3, 1)]
    segmenter.reconfigure({"dense.logit_scale": 100.0})  # before planting: reconfigure re-encodes
    plant(segmenter, rgb, patches, [0, 1, 2])
    seg = segmenter.segment(rgb)
    for label, (row, col) in enumerate(patches):
        assert seg.labels[patch_centre(rgb, segmenter, row, col)] == label


def test_class_probability_is_max_over_synonyms(segmenter, voc_rgb):
    rgb = voc_rgb[0]
    # class 1 owns queries 1 and 2; its second synonym is planted at patch (3, 3)
    segmenter.reconfigure({"dense.logit_scale": 100.0})  # before planting: reconfigure re-encodes
    plant(segmenter, rgb, [(0, 0), (1, 1), (3, 3), (3, 0)], [0, 1, 1, 2])
    seg = segmenter.segment(rgb)
    assert seg.labels[patch_centre(rgb, segmenter, 3, 3)] == 1
    assert seg.labels[patch_centre(rgb, segmenter, 1, 1)] == 1


def test_background_word_unlabels_its_region(segmenter, voc_rgb):
    rgb = voc_rgb[0]
    segmenter.reconfigure({"dense.logit_scale": 100.0})  # before planting: reconfigure re-encodes
    plant(segmenter, rgb, [(0, 0), (1, 1), (2, 2), (3, 3)], [0, 1, 2, 3])  # owner 3: background
    seg = segmenter.segment(rgb)
    assert seg.labels[patch_centre(rgb, segmenter, 3, 3)] == 255
    assert seg.labels[patch_centre(rgb, segmenter, 0, 0)] == 0


def test_background_words_are_encoded_queries(segmenter, voc_rgb):
    segmenter.reconfigure(background_words=("sky", "wall"))
    assert segmenter.method._text_embeddings.shape[0] == 5 + 2
    assert segmenter.method._query_owner.tolist() == [0, 1, 1, 1, 2, 3, 3]
    assert segmenter.segment(voc_rgb[0]).labels.shape == voc_rgb[0].shape[:2]


def test_score_threshold(segmenter, voc_rgb):
    segmenter.reconfigure(score_threshold=1.0)
    assert (segmenter.segment(voc_rgb[1]).labels == 255).all()
    segmenter.reconfigure(score_threshold=0.0)
    assert (segmenter.segment(voc_rgb[1]).labels != 255).all()


def test_more_than_254_classes_use_uint16(segmenter, voc_rgb):
    segmenter.set_classes([f"thing {i}" for i in range(300)])
    segmenter.reconfigure(score_threshold=1.0)
    seg = segmenter.segment(voc_rgb[0])
    assert seg.labels.dtype == np.uint16 and seg.unlabeled == 65535
    assert (seg.labels == 65535).all()
    segmenter.reconfigure(score_threshold=0.0)
    assert segmenter.segment(voc_rgb[0]).labels.max() < 300


def test_sliding_window_covering_whole_image_equals_whole_image(segmenter, voc_rgb):
    rgb = cv2.resize(voc_rgb[2], (96, 64))
    segmenter.reconfigure(short_side=0, max_long_side=96)  # keep the size
    whole = segmenter.segment(rgb)
    segmenter.reconfigure({"dense.crop": 96, "dense.stride": 48})
    slid = segmenter.segment(rgb)
    np.testing.assert_array_equal(whole.labels, slid.labels)
    np.testing.assert_allclose(whole.confidence, slid.confidence, atol=1e-5)


def test_sliding_window_averages_overlaps(segmenter, voc_rgb):
    """Two 64x64 windows on a 64x96 image: the overlap is the mean of both windows' logits."""
    rgb = cv2.resize(voc_rgb[0], (96, 64))
    segmenter.reconfigure({"dense.crop": 64, "dense.stride": 32}, short_side=0, max_long_side=96)
    pixels = segmenter.method.preprocess(rgb)
    encoded = segmenter.method.encode(pixels)
    logits = segmenter.method.to_image(segmenter.method.head(encoded)[0], encoded, jbu=False)
    visual, text = segmenter.clip.model.visual, segmenter.method._text_embeddings
    left = torch.einsum("hwd,qd->qhw", patch_features(visual, pixels[..., :64])[0], text)
    right = torch.einsum("hwd,qd->qhw", patch_features(visual, pixels[..., 32:])[0], text)
    up = lambda x: torch.nn.functional.interpolate(x[None], (64, 64), mode="bilinear")[0]  # noqa: E731
    left, right = up(left), up(right)
    torch.testing.assert_close(logits[..., :32], left[..., :32])
    torch.testing.assert_close(logits[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    torch.testing.assert_close(logits[..., 64:], right[..., 32:])


@pytest.mark.parametrize(
    ("length", "crop", "stride", "starts"),
    [
        (100, 224, 112, [0]),
        (224, 224, 112, [0]),
        (336, 224, 112, [0, 112]),
        (400, 224, 112, [0, 112, 176]),
    ],
)
def test_window_starts_cover_the_axis(length, crop, stride, starts):
    assert window_starts(length, crop, stride) == starts


def test_resized_size_is_mmcv_rescale():
    """int(side * scale + 0.5), not whole patches (more in test_engine_bounds.py)."""
    assert resized_size(480, 640, 448, 16, max_long_side=2048) == (448, 597)
    assert resized_size(338, 500, 336, 16, max_long_side=2048) == (336, 497)
    assert resized_size(480, 640, 0, 16, max_long_side=2048) == (480, 640)
    assert resized_size(3, 5, 0, 16, max_long_side=2048) == (16, 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "magic"}, "unknown method"),
        ({"short_side": -1}, r"short_side must be in \[0, 4096\]"),
        ({"dense.crop": 224, "dense.stride": 300}, "dense.stride 300 larger than dense.crop"),
        ({"dense.crop": 40}, "crop 40 must be a multiple of the patch 16"),
        ({"dense.crop": 448, "dense.stride": 1}, "1601 sliding windows"),
        ({"max_long_side": 8}, "below one patch"),
        ({"max_long_side": 0}, "max_long_side must be in"),
        ({"templates": "a {} of {}"}, "templates"),
        ({"background_words": "sky"}, "list of strings"),
        ({"background_words": ("sky\n",)}, "U\\+000A"),
        ({"dense.stride": 8}, "dense.stride needs dense.crop"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"dense.logit_scale": 0.0}, "logit_scale"),
        ({"templates": "nothing"}, "templates"),
        ({"background_words": ("",)}, "background_words"),
        ({"model": "ViT-L-14"}, "need a new Segmenter"),
        ({"colour": "red"}, "unknown setting 'colour'"),
        ({"crop": 224}, "crop was renamed dense.crop"),
    ],
)
def test_reconfigure_rejects_and_changes_nothing(segmenter, changes, message):
    before = segmenter.config
    with pytest.raises(ValueError, match=message):
        segmenter.reconfigure(**changes)
    assert segmenter.config == before


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
        [[1, 2, 3]],
    ],
    ids=["2d", "rgba", "float", "empty", "list"],
)
def test_segment_rejects_bad_images(segmenter, bad):
    with pytest.raises(ValueError):
        segmenter.segment(bad)


def test_segment_needs_classes(voc_rgb):
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64)
    with pytest.raises(VocabularyError, match="no classes"):
        Segmenter(config).segment(voc_rgb[0])


def test_rejected_vocabulary_keeps_the_old_one(segmenter):
    with pytest.raises(VocabularyError):
        segmenter.set_classes(["cup", "cup"])
    assert [c.name for c in segmenter.classes] == ["person", "tv", "dog"]


def test_overlay_blends_labelled_pixels_only(segmenter, voc_rgb):
    rgb = voc_rgb[0]
    seg = segmenter.segment(rgb)
    seg.labels[:10] = 255
    out = overlay(rgb, seg, alpha=0.5, legend=False)
    np.testing.assert_array_equal(out[:10], rgb[:10])
    y, x = 200, 200
    colour = np.array(class_color(seg.class_names[seg.labels[y, x]], seg.class_names))
    np.testing.assert_allclose(out[y, x], np.rint(0.5 * rgb[y, x] + 0.5 * colour), atol=1)


def test_class_colours_are_stable_and_distinct():
    names = ["cup", "door handle", "wet floor", "person", "dog"]
    assert class_color("cup", names) == class_color("cup", list(names))
    assert len({class_color(name, names) for name in names}) == 5


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"dense.crop": 32, "dense.stride": 16},
        {"refinement": "dslo"},
        {"refinement": "freecp", "dense.pamr": True},
    ],
    ids=["whole", "windows", "dslo", "freecp+pamr"],
)
def test_batch_equals_one_by_one_with_one_forward_per_size(segmenter, voc_rgb, changes):
    segmenter.reconfigure(**changes)
    images = [voc_rgb[0], voc_rgb[1], cv2.resize(voc_rgb[2], (500, 375)), voc_rgb[2]]
    single = [segmenter.segment(rgb) for rgb in images]
    forwards = []
    hook = segmenter.clip.model.visual.conv1.register_forward_hook(
        lambda module, args, out: forwards.append(args[0].shape[0])
    )
    try:
        batch = segmenter.segment_many(images)
    finally:
        hook.remove()
    # 500x375 images share one resized size: three of them go through one forward
    assert len(forwards) == 2
    # A batch is another GEMM shape: another CPU may round it differently and flip a label where
    # two classes tie (1 pixel of 187,500 with ATEN_CPU_CAPABILITY=default, FreeCP + PAMR,
    # whose confidence is the label's own class's: 0.46 there, 0.52 alone).
    for one, many in zip(single, batch, strict=True):
        same = one.labels == many.labels
        assert np.mean(~same) <= 1e-4
        np.testing.assert_allclose(one.confidence[same], many.confidence[same], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_matches_cpu(voc_rgb, precision):
    """The GPU path (upload, resize, normalise, forward, one copy back) agrees with the CPU."""
    results = []
    for device, prec in (("cpu", "fp32"), ("cuda", precision)):
        torch.manual_seed(0)
        config = EngineConfig(
            model=str(TINY_VIT),
            pretrained="none",
            device=device,
            precision=prec,
            short_side=64,
            templates="single",
        )
        segmenter = Segmenter(config)
        segmenter.set_classes(["person", "tv; monitor", "dog"])
        results.append(segmenter.segment(voc_rgb[0]))
    cpu, gpu = results
    agreement = (cpu.labels == gpu.labels).mean()
    assert agreement > (0.999 if precision == "fp32" else 0.95)
    np.testing.assert_allclose(
        cpu.confidence, gpu.confidence, atol=1e-4 if precision == "fp32" else 5e-2
    )
