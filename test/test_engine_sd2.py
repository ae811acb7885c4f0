"""DSLO on every affinity source through the Segmenter, and the life of the Stable Diffusion model.

Real parts: the tiny random open_clip ViT (test/data/tiny-vit.json) and the tiny random
SD2-shaped diffusers pipeline written with ``save_pretrained`` (test/tiny_diffusion.py), loaded
through the engine's own path. The planted problems of test/planted_dslo.py give the patch
logits (planted in the features the engine's head reads); the affinity is what the engine makes
of a planted image with each source, checked against the same source computed here
independently (``dense_forward`` for CLIP's, a separately loaded ``Sd2Attention`` for sd2).
"""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from planted_dslo import GRID, accuracy, planted_logits, planted_truth
from tiny_diffusion import save_tiny_pipeline

import ovss_ros.core.methods.dense.method as engine_module
from ovss_ros.core import EngineConfig, ModelLoadError, Segmenter, Stopped
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.methods.dense.encoded import Encoded
from ovss_ros.core.methods.dense.forward import dense_forward
from ovss_ros.core.methods.dslo.dslo import dslo_scores
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention

CLASSES = ["wall", "floor", "chair", "lamp"]  # the fourth is planted absent
SOURCES = ("naclip", "keykey", "mean", "sd2")
SD_SIZE = 64  # tiny SD input: 64x64 pixels, an 8x8 latent grid


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2-other"), seed=1)


def config(pipeline, **changes) -> EngineConfig:
    settings = {
        "model": str(TINY_VIT),
        "pretrained": "none",
        "device": "cpu",
        "short_side": 16 * GRID,  # the planted 16x16 patch grid
        "templates": "single",
        "method": "vanilla",
        "refinement": "dslo",
        "dslo.affinity": "sd2",
        "dslo.sd.model": str(pipeline),
        "dslo.sd.size": SD_SIZE,
    }
    return EngineConfig.from_flat({**settings, **changes})


def make_segmenter(pipeline, stop=None, **changes) -> Segmenter:
    torch.manual_seed(0)
    segmenter = Segmenter(config(pipeline, **changes), stop=stop)
    segmenter.set_classes(CLASSES)
    return segmenter


def planted_image(seed: int = 0) -> np.ndarray:
    """The planted regions (``thirds``) as flat colours with pixel noise, 256x256 RGB."""
    colours = np.array([[200, 60, 40], [40, 160, 70], [50, 70, 210]], dtype=np.float64)
    truth = planted_truth("thirds").numpy()
    image = colours[truth].repeat(16, axis=0).repeat(16, axis=1)
    noise = np.random.default_rng(seed).normal(0, 12, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def plant_logits(segmenter: Segmenter, encoded: Encoded, logits: torch.Tensor) -> Encoded:
    """``encoded`` with features whose patch-text logits under the engine's text embeddings are
    ``logits`` (N, classes, h, w): F = L (T T^T)^-1 T (one query per class here)."""
    text = segmenter.method._text_embeddings.double()  # (classes, D), linearly independent
    flat = logits.double().permute(0, 2, 3, 1)  # (N, h, w, classes)
    features = flat @ torch.linalg.solve(text @ text.T, text)
    dense = dataclasses.replace(encoded.dense, features=features.float())
    return Encoded(encoded.windows, encoded.boxes, dense, encoded.size)


def independent_affinity(segmenter: Segmenter, source: str, pixels, grid) -> torch.Tensor:
    """The source's affinity computed without the engine's encode."""
    if source != "sd2":
        visual = segmenter.clip.model.visual
        return dense_forward(visual, pixels, "vanilla", source).affinity
    cfg = segmenter.config
    sd2 = Sd2Attention.load(cfg.dslo.sd.model, device="cpu", **cfg.sd2_settings())
    mean = torch.tensor(segmenter.clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(segmenter.clip.std).view(1, 3, 1, 1)
    return sd2.affinity((pixels.float() * std + mean).clamp(0, 1), grid)


# ------------------------------------------------------------ DSLO on every affinity source


@pytest.mark.parametrize("mode", ["velocity", "ot"])
@pytest.mark.parametrize("source", SOURCES)
def test_dslo_on_every_affinity_source_through_the_engine(pipeline, source, mode):
    segmenter = make_segmenter(
        pipeline,
        **{"dslo.affinity": source, "dslo.mode": mode},
    )
    assert (segmenter.sd2 is not None) == (source == "sd2")  # SD only for sd2
    rgb = planted_image()
    with torch.inference_mode():
        pixels = segmenter.method.preprocess(rgb)
        encoded = segmenter.method.encode(pixels)
    grid = tuple(encoded.dense.features.shape[1:3])
    assert grid == (GRID, GRID)
    expected = independent_affinity(segmenter, source, pixels, grid)
    torch.testing.assert_close(encoded.dense.affinity, expected, rtol=1e-4, atol=1e-6)

    truth = planted_truth("thirds")[None]
    generator = torch.Generator().manual_seed(1)
    logits = planted_logits(truth, len(CLASSES), 0.05, generator)
    planted = plant_logits(segmenter, encoded, logits)
    with torch.inference_mode():
        query_logits, scores = segmenter.method.head(planted)
    torch.testing.assert_close(query_logits, logits, rtol=1e-4, atol=1e-5)
    reference = dslo_scores(logits, expected, mode=mode)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    assert (scores[:, 3] == -1).all()  # the absent class never wins
    dslo = accuracy(scores, truth)
    raw = accuracy(logits, truth)
    print(f"{source} {mode}: DSLO {dslo:.2f}, raw argmax {raw:.2f} (random weights)")

    with torch.inference_mode():
        labels = segmenter.method.postprocess(planted, query_logits, scores, rgb.shape[:2]).labels
    assert labels.shape == rgb.shape[:2] and labels.max() < len(CLASSES)
    result = segmenter.segment(rgb)  # and the whole path from the image
    assert result.labels.shape == rgb.shape[:2]


def test_sd2_affinity_is_the_frames_own_and_differs_from_clips(pipeline):
    segmenter = make_segmenter(pipeline)
    with torch.inference_mode():
        first = segmenter.method.encode(
            segmenter.method.preprocess(planted_image(0))
        ).dense.affinity
        again = segmenter.method.encode(
            segmenter.method.preprocess(planted_image(0))
        ).dense.affinity
        other = segmenter.method.encode(segmenter.method.preprocess(planted_image(1)[::-1].copy()))
        segmenter.reconfigure({"dslo.affinity": "naclip"})
        clip = segmenter.method.encode(
            segmenter.method.preprocess(planted_image(0))
        ).dense.affinity
    torch.testing.assert_close(first, again)  # the same frame: the same affinity
    assert not torch.allclose(first, other.dense.affinity, atol=1e-4)  # computed per frame
    assert not torch.allclose(first, clip, atol=1e-4)  # not CLIP's
    torch.testing.assert_close(first.sum(-1), torch.ones(first.shape[:2]))


def test_sliding_windows_get_one_sd_affinity_each(pipeline):
    segmenter = make_segmenter(
        pipeline,
        short_side=128,
        **{"dense.crop": 64, "dense.stride": 32},
    )
    rgb = planted_image()
    with torch.inference_mode():
        pixels = segmenter.method.preprocess(rgb)
        encoded = segmenter.method.encode(pixels)
    assert encoded.dense.affinity.shape == (len(encoded.boxes), 16, 16)
    y, x, h, w = encoded.boxes[1]
    window = pixels[..., y : y + h, x : x + w]
    expected = independent_affinity(segmenter, "sd2", window, (4, 4))
    torch.testing.assert_close(encoded.dense.affinity[1:2], expected, rtol=1e-4, atol=1e-6)
    assert segmenter.segment(rgb).labels.shape == rgb.shape[:2]


# ------------------------------------------------------------ loading, reuse and release


def test_sd_model_is_loaded_only_while_dslo_uses_sd2(pipeline):
    segmenter = make_segmenter(pipeline, **{"dslo.affinity": "naclip"})
    assert segmenter.sd2 is None
    segmenter.reconfigure({"dslo.affinity": "sd2"})
    loaded = segmenter.sd2
    assert loaded is not None and loaded.unet is not None
    segmenter.reconfigure(refinement="none")  # sd2 still named, but DSLO is off
    assert segmenter.sd2 is None and loaded.unet is None  # released
    segmenter.reconfigure(refinement="dslo")
    assert segmenter.sd2 is not None and segmenter.sd2 is not loaded
    segmenter.reconfigure({"dslo.affinity": "keykey"})
    assert segmenter.sd2 is None


def test_sd_settings_change_without_reloading(pipeline, voc_rgb):
    segmenter = make_segmenter(pipeline)
    loaded = segmenter.sd2
    segmenter.reconfigure(
        {"dslo.sd.timestep": 400, "dslo.sd.noise": True, "dslo.sd.seed": 3, "dslo.sd.layers": "up"}
    )
    assert segmenter.sd2 is loaded
    settings = (loaded.timestep, loaded.noise, loaded.seed, loaded.layers)
    assert settings == (400, True, 3, "up")
    fresh = make_segmenter(
        pipeline,
        **{
            "dslo.sd.timestep": 400,
            "dslo.sd.noise": True,
            "dslo.sd.seed": 3,
            "dslo.sd.layers": "up",
        },
    )
    rgb = voc_rgb[0]
    np.testing.assert_array_equal(segmenter.segment(rgb).labels, fresh.segment(rgb).labels)


def test_a_new_sd_model_replaces_and_releases_the_old(pipeline, other_pipeline):
    segmenter = make_segmenter(pipeline)
    old = segmenter.sd2
    segmenter.reconfigure({"dslo.sd.model": str(other_pipeline)})
    assert segmenter.sd2 is not old and old.unet is None
    assert segmenter.config.dslo.sd.model == str(other_pipeline)
    fresh = Sd2Attention.load(str(other_pipeline), device="cpu", size=SD_SIZE)
    pixels = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        segmenter.sd2.affinity(pixels, (4, 4)), fresh.affinity(pixels, (4, 4))
    )


# ------------------------------------------------------------ refusals: old state kept


def snapshot(segmenter: Segmenter) -> dict:
    sd2 = segmenter.sd2
    return {
        "config": dataclasses.replace(segmenter.config),
        "classes": list(segmenter.classes),
        "embeddings": segmenter.method._text_embeddings.clone(),
        "sd2": sd2,
        "sd2_settings": None if sd2 is None else (sd2.size, sd2.timestep, sd2.layers),
        "sd2_alive": None if sd2 is None else sd2.unet is not None,
    }


def assert_unchanged(before: dict, segmenter: Segmenter) -> None:
    after = snapshot(segmenter)
    assert torch.equal(after.pop("embeddings"), before["embeddings"])
    assert after == {k: v for k, v in before.items() if k != "embeddings"}


BAD_SETTINGS = [
    ({"dslo.sd.timestep": 1000}, ValueError, "dslo.sd.timestep must be in"),
    ({"dslo.sd.timestep": -1}, ValueError, "dslo.sd.timestep must be in"),
    ({"dslo.sd.size": 32}, ValueError, r"dslo.sd.size must be in \[64, 1448\] pixels, got 32"),
    (
        {"dslo.sd.size": 100000},
        ValueError,
        "dslo.sd.size 100000 needs a 5120.0 GB VAE",
    ),  # 120 GB a frame
    ({"dslo.sd.temperature": float("nan")}, ValueError, "dslo.sd.temperature must be in"),
    ({"dslo.sd.temperature": float("inf")}, ValueError, "dslo.sd.temperature must be in"),
    ({"dslo.sd.temperature": 0.0}, ValueError, "dslo.sd.temperature must be in"),
    ({"dslo.sd.layers": "middle"}, ValueError, "unknown dslo.sd.layers"),
    ({"dslo.sd.precision": "fp8"}, ValueError, "unknown dslo.sd.precision"),
    ({"dslo.sd.model": " "}, ValueError, "dslo.sd.model must name"),
    ({"dslo.sd.seed": -1}, ValueError, "dslo.sd.seed must be in"),
    ({"dslo.affinity": "dino"}, ValueError, "unknown dslo.affinity"),
    # the model cannot be loaded: refused by loading, within seconds
    ({"dslo.sd.model": "ovss-test/not-cached-sd2"}, ModelLoadError, "HF_HUB_OFFLINE"),
    ({"dslo.sd.model": "/no/such/sd2"}, ModelLoadError, "neither a directory nor a hub id"),
    ({"dslo.sd.precision": "fp16"}, ModelLoadError, "needs a GPU"),
]


@pytest.mark.parametrize("start", ["sd2", "naclip"])
@pytest.mark.parametrize("change, error, reason", BAD_SETTINGS)
def test_refused_change_keeps_the_old_state(pipeline, voc_rgb, start, change, error, reason):
    segmenter = make_segmenter(pipeline, **{"dslo.affinity": start})
    rgb = voc_rgb[1]
    labels = segmenter.segment(rgb).labels
    before = snapshot(segmenter)
    began = time.monotonic()
    with pytest.raises(error, match=reason):
        segmenter.reconfigure(**{"dslo.affinity": "sd2", **change})
    assert time.monotonic() - began < 60  # a liveness bound: no download, no retry loop
    assert_unchanged(before, segmenter)
    np.testing.assert_array_equal(segmenter.segment(rgb).labels, labels)


def test_model_missing_offline_refuses_the_segmenter_at_once(pipeline):
    began = time.monotonic()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE.*set dslo.sd.model to a local"):
        Segmenter(config(pipeline, **{"dslo.sd.model": "ovss-test/not-cached-sd2"}))
    assert time.monotonic() - began < 60


def test_failed_text_encoding_releases_the_newly_loaded_sd_model(pipeline, voc_rgb, monkeypatch):
    segmenter = make_segmenter(pipeline, **{"dslo.affinity": "naclip"})
    before = snapshot(segmenter)
    loaded = []
    real_load = Sd2Attention.load.__func__
    monkeypatch.setattr(
        Sd2Attention,
        "load",
        classmethod(lambda cls, *a, **k: loaded.append(real_load(cls, *a, **k)) or loaded[-1]),
    )

    def out_of_memory(self, prompts):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(TextEncoder, "encode_prompts", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        segmenter.reconfigure({"dslo.affinity": "sd2"}, templates="a picture of a {}.")
    assert len(loaded) == 1 and loaded[0].unet is None  # loaded, then released
    assert_unchanged(before, segmenter)


def test_failed_text_encoding_keeps_the_sd_settings_in_use(pipeline, monkeypatch):
    segmenter = make_segmenter(pipeline)
    before = snapshot(segmenter)

    def out_of_memory(self, prompts):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(TextEncoder, "encode_prompts", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        segmenter.reconfigure({"dslo.sd.timestep": 300}, templates="a picture of a {}.")
    assert_unchanged(before, segmenter)


def test_stop_event_ends_the_load_and_loads_nothing(pipeline, monkeypatch):
    stop = threading.Event()
    segmenter = make_segmenter(pipeline, stop=stop, **{"dslo.affinity": "naclip"})
    before = snapshot(segmenter)
    loads = []
    monkeypatch.setattr(Sd2Attention, "load", lambda *a, **k: loads.append(1))
    stop.set()
    with pytest.raises(Stopped):
        segmenter.reconfigure({"dslo.affinity": "sd2"})
    assert loads == [] and segmenter.sd2 is None
    assert_unchanged(before, segmenter)
    with pytest.raises(Stopped):
        Segmenter(config(pipeline), stop=stop)


def test_stop_set_during_the_load_releases_what_was_loaded(pipeline, monkeypatch):
    stop = threading.Event()
    segmenter = make_segmenter(pipeline, stop=stop, **{"dslo.affinity": "naclip"})
    loaded = []
    real_load = Sd2Attention.load.__func__

    def load_then_stop(cls, *args, **kwargs):
        loaded.append(real_load(cls, *args, **kwargs))
        stop.set()  # the node shuts down while the model loads
        return loaded[-1]

    monkeypatch.setattr(Sd2Attention, "load", classmethod(load_then_stop))
    with pytest.raises(Stopped):
        segmenter.reconfigure({"dslo.affinity": "sd2"})
    assert loaded[0].unet is None and segmenter.sd2 is None
    assert segmenter.config.dslo.affinity == "naclip"


def test_stop_event_ends_a_frame_before_the_sd_forward(pipeline, monkeypatch):
    stop = threading.Event()
    segmenter = make_segmenter(pipeline, stop=stop)
    calls = []
    real = engine_module.dense_forward

    def forward_then_stop(*args, **kwargs):
        calls.append(1)
        stop.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "dense_forward", forward_then_stop)
    forwards = []
    monkeypatch.setattr(Sd2Attention, "affinity", lambda *a: forwards.append(1))
    with pytest.raises(Stopped, match="Stable Diffusion"):
        segmenter.segment(planted_image())
    assert calls == [1] and forwards == []
