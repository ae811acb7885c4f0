"""PnP-OVSS on real transformers BLIP ITM and open_clip classes with tiny random weights.

Each step is checked against its formula computed here independently: GradCAM from the
attention and gradient this test captures itself (the released way: a hook and loss.backward()),
salience dropout from the images the vision tower actually receives, word pieces from the
tokenizer, thresholds and background on planted maps, blur against scipy's definition.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from tiny_blip import IMAGE_SIZE, PATCH, save_tiny_blip

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.pnp_ovss import pnp_ovss, steps
from ovss_ros.core.methods.pnp_ovss import settings as pnp_settings
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings
from ovss_ros.core.methods.pnp_ovss.steps import (
    best_classes,
    class_maps,
    gaussian_blur,
    minmax,
    most_salient,
    prompt_tokens,
    threshold_maps,
    with_background,
)
from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm
from ovss_ros.core.vocabulary import VocabularyError

GRID = IMAGE_SIZE // PATCH  # 4x4 patches
FAST = {"image_size": IMAGE_SIZE, "layer": 2, "head": 3, "dropout_patches": 2}
CLASSES = ["person", "dog; puppy", "aeroplane", "tv"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def clip():
    return load_clip(str(TINY_VIT), "none", "cpu")


@pytest.fixture(scope="module")
def vlm(checkpoint):
    return load_vlm("blip_itm", str(checkpoint), "cpu")


@pytest.fixture()
def make(clip, vlm):
    def build(**settings):
        pipeline = PnpOvss(clip, vlm, PnpSettings(**{**FAST, **settings}), templates="single")
        pipeline.set_classes(CLASSES)
        return pipeline

    return build


@pytest.fixture(scope="module")
def rgb(voc_rgb):
    return voc_rgb[0]


def assert_same(actual, expected):
    """Equal up to float rounding, relative to the map's scale (random weights make it ~1e-11)."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def prompt_ids(pipeline, names):
    ids, spans = prompt_tokens(pipeline.vlm.tokenizer, names, pipeline.vlm.enc_token_id)
    return torch.tensor([ids]), spans


def released_gradcam_inputs(model, pixels, input_ids, layer):
    """Attention and its gradient of one layer, captured the released way (hook + backward)."""
    module = model.text_encoder.encoder.layer[layer - 1].crossattention.self
    kept = {}

    def keep(_module, _inputs, output):
        output[1].retain_grad()
        kept["attention"] = output[1]

    handle = module.register_forward_hook(keep)
    model.requires_grad_(True)
    try:
        output = model(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(input_ids),
            interpolate_pos_encoding=True,
        )
        output.itm_score[:, 1].sum().backward()
    finally:
        handle.remove()
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    attention = kept["attention"]
    return attention.detach()[0], attention.grad[0]


# ---- GradCAM, word pieces, [ENC] ----


def test_gradcam_is_attention_times_relu_gradient(make, rgb):
    pipeline = make(layer=2, head=3)
    pixels, _ = pipeline.preprocess(rgb)
    input_ids, _ = prompt_ids(pipeline, ["dog", "aeroplane"])
    cams = pipeline.token_gradcam(pixels, input_ids)
    attention, gradient = released_gradcam_inputs(pipeline.vlm.model, pixels, input_ids, layer=2)
    a, g = attention[2, :, 1:], gradient[2, :, 1:]  # head 3 (1-based), image [CLS] dropped
    assert (g < 0).any() and (g > 0).any()  # relu has something to cut here
    assert cams.shape == (input_ids.shape[1], GRID * GRID)
    assert_same(cams, a * g.clamp(min=0))
    assert (cams[g <= 0] == 0).all()


def test_gradcam_reads_the_configured_layer_and_head_on_a_planted_head(make, vlm, rgb):
    """Zero queries in layer 2 head 3 make that head's attention uniform, 1 / (1 + patches):
    the GradCAM must then be relu(gradient) / 17, which no other head or layer gives."""
    pipeline = make(layer=2, head=3)
    module = vlm.model.text_encoder.encoder.layer[1].crossattention.self
    rows = slice(2 * module.attention_head_size, 3 * module.attention_head_size)
    saved = module.query.weight.detach().clone(), module.query.bias.detach().clone()
    try:
        with torch.no_grad():
            module.query.weight[rows] = 0
            module.query.bias[rows] = 0
        pixels, _ = pipeline.preprocess(rgb)
        input_ids, _ = prompt_ids(pipeline, ["person", "tv"])
        cams = pipeline.token_gradcam(pixels, input_ids)
        attention, gradient = released_gradcam_inputs(vlm.model, pixels, input_ids, layer=2)
    finally:
        with torch.no_grad():
            module.query.weight.copy_(saved[0])
            module.query.bias.copy_(saved[1])
    patches = GRID * GRID
    torch.testing.assert_close(attention[2], torch.full_like(attention[2], 1 / (patches + 1)))
    expected = gradient[2, :, 1:].clamp(min=0) / (patches + 1)
    assert expected.abs().sum() > 0
    assert_same(cams, expected)
    pipeline.reconfigure(head=2)  # another head of the same layer gives another map
    other = pipeline.token_gradcam(pixels, input_ids)
    assert (other - cams).abs().max() > 0.1 * cams.abs().max()


def test_prompt_is_the_released_sentence_with_word_piece_spans(vlm):
    tokenizer = vlm.tokenizer
    names = ["aeroplane", "dog", "pottedplant", "motorbike"]
    ids, spans = prompt_tokens(tokenizer, names)
    whole = tokenizer("A picture of " + " ".join(names))["input_ids"]
    assert ids == list(whole)  # piece by piece = the tokenizer on the whole sentence
    pieces = [tokenizer.convert_ids_to_tokens(ids[span]) for span in spans]
    assert pieces == [
        ["aero", "##plane"],
        ["dog"],
        ["pot", "##ted", "##plant"],
        ["motor", "##bike"],
    ]
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a", "picture", "of"]


def test_enc_token_replaces_cls_as_in_the_original_itm(vlm):
    assert vlm.enc_token_id == vlm.tokenizer.convert_tokens_to_ids("[ENC]")
    ids, _ = prompt_tokens(vlm.tokenizer, ["dog"], vlm.enc_token_id)
    assert ids[0] == vlm.enc_token_id and ids[-1] == vlm.tokenizer.sep_token_id


def test_class_map_is_the_mean_of_its_word_pieces():
    cams = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    spans = [slice(4, 6), slice(6, 7), slice(1, 4)]
    maps = class_maps(cams, spans)
    assert torch.equal(maps[0], (cams[4] + cams[5]) / 2)
    assert torch.equal(maps[1], cams[6])
    assert torch.equal(maps[2], (cams[1] + cams[2] + cams[3]) / 3)


# ---- salience dropout ----


def test_dropout_zeroes_the_most_salient_blocks_and_sums_the_rounds(make, rgb):
    rounds, count = 3, 2
    pipeline = make(dropout_rounds=rounds, dropout_patches=count)
    pixels, _ = pipeline.preprocess(rgb)
    present = [1, 2]  # dog, aeroplane
    input_ids, spans = prompt_ids(pipeline, ["dog", "aeroplane"])
    seen = []
    handle = pipeline.vlm.model.vision_model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["pixel_values"].detach().clone()),
        with_kwargs=True,
    )
    try:
        maps = pipeline.saliency(pixels, present)
    finally:
        handle.remove()
    assert len(seen) == rounds
    assert torch.equal(seen[0], pixels)
    class_rows = torch.cat([torch.arange(s.start, s.stop) for s in spans])
    dropped = torch.zeros(GRID * GRID, dtype=torch.bool)
    total = torch.zeros(input_ids.shape[1], GRID * GRID)
    for index, image in enumerate(seen):
        # the image is the input with exactly the dropped blocks at zero
        blocks = dropped.view(GRID, GRID).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)
        assert torch.equal(image, torch.where(blocks, torch.zeros_like(pixels), pixels))
        cams = pipeline.token_gradcam(image, input_ids)
        cams[:, dropped] = 0  # a round's map is zeroed where patches were dropped
        total += cams
        if index + 1 < rounds:
            salience = cams[class_rows].sum(dim=0)
            salience[dropped] = -1.0
            newly = salience.argsort(descending=True)[:count]
            next_dropped = dropped.clone()
            next_dropped[newly] = True
            changed = (seen[index + 1] != image).any(dim=1)[0]  # (S, S) pixels that changed
            changed_blocks = changed.view(GRID, PATCH, GRID, PATCH).any(dim=(1, 3)).flatten()
            assert int(changed_blocks.sum()) == count  # exactly `count` new blocks per round
            assert torch.equal(changed_blocks, next_dropped & ~dropped)
            dropped = next_dropped
    expected = torch.stack([total[s].mean(dim=0) for s in spans]).view(2, GRID, GRID)
    assert_same(maps, expected)


def test_one_round_is_plain_gradcam(make, rgb):
    pipeline = make(dropout_rounds=1)
    pixels, _ = pipeline.preprocess(rgb)
    input_ids, spans = prompt_ids(pipeline, ["person"])
    maps = pipeline.saliency(pixels, [0])
    cams = pipeline.token_gradcam(pixels, input_ids)
    assert_same(maps[0].flatten(), cams[spans[0]].mean(dim=0))


# ---- thresholds, background, blur, refinement ----


def test_threshold_keeps_raw_values_where_the_normalised_map_reaches_it():
    ramp = torch.arange(16, dtype=torch.float32).view(1, 4, 4) * 0.01 + 0.05  # 0.05 .. 0.20
    flat = torch.full((1, 4, 4), 0.3)  # no contrast: fires nowhere
    maps = torch.cat([ramp, flat])
    kept = threshold_maps(maps, 0.43)
    normalised = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    assert torch.equal(kept[0], torch.where(normalised >= 0.43, ramp, 0.0)[0])
    assert int((kept[0] > 0).sum()) == 9  # 0.12 .. 0.20
    assert (kept[1] == 0).all()
    exactly = threshold_maps(ramp, float(normalised[0, 1, 2]))  # the boundary value is kept
    assert exactly[0, 1, 2] == ramp[0, 1, 2] and exactly[0, 1, 1] == 0
    background = with_background(kept)
    assert torch.equal(background[0], (kept[0] == 0).float())


def test_ties_go_to_the_first_channel_background_first_as_the_releases_argmax():
    """np.argmax (after the CRF) and torch.argmax (otherwise) in the release: the first maximum
    wins; a class equal to background is background; equal classes, the first of them."""
    probs = torch.tensor([
        [0.4, 0.2, 0.3, 0.1],  # background
        [0.4, 0.4, 0.3, 0.3],
        [0.2, 0.4, 0.3, 0.3],
    ]).view(3, 1, 4)  # fmt: skip
    best, confidence, unlabeled = best_classes(probs, background=True)
    assert unlabeled.tolist() == [[True, False, True, False]]
    assert best.tolist() == [[0, 0, 0, 0]] and torch.equal(confidence, probs[1:].amax(0))
    best, confidence, unlabeled = best_classes(probs[1:].flip(0), background=False)
    assert best.tolist() == [[1, 0, 0, 0]] and not unlabeled.any()
    assert torch.equal(confidence, probs[1:].amax(0))
    # each rotation of the same values: its first maximum
    values = torch.tensor([0.5, 0.5, 0.1, 0.5])
    for start in range(4):
        rolled = values.roll(start).view(4, 1, 1)
        best, _, _ = best_classes(rolled, background=False)
        assert int(best) == int((rolled.flatten() == 0.5).nonzero()[0])


def test_equal_salience_drops_the_lower_patches_first():
    """Patches of equal salience (0 where no gradient is positive): the lower index first, on
    every CPU; dropped patches never again; the highest first otherwise."""
    salience = torch.tensor([0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    dropped = torch.zeros(8, dtype=torch.bool)
    assert most_salient(salience, dropped, 4).tolist() == [2, 4, 0, 1]
    dropped[[0, 2]] = True
    assert most_salient(salience, dropped, 4).tolist() == [4, 1, 3, 5]
    assert most_salient(salience, torch.ones(8, dtype=torch.bool), 4).tolist() == []
    big = torch.zeros(441)  # BLIP's 21 x 21 patches at 336 px, all equal
    assert most_salient(big, torch.zeros(441, dtype=torch.bool), 10).tolist() == list(range(10))


def test_postprocess_labels_present_classes_and_background(make, rgb):
    pipeline = make(blur=0.0, refine="none", threshold=0.5)
    ramp = torch.arange(16, dtype=torch.float32).view(4, 4) / 15  # normalised = itself
    other = torch.zeros(4, 4)
    other[0, 3] = 2.0  # beats the ramp at one pixel where both fire
    other[3, 3] = 0.1  # below its own threshold (0.1 / 2 < 0.5): does not fire
    result = pipeline.postprocess(torch.stack([ramp, other]), [3, 1], rgb[:4, :4], (4, 4))
    labels = result.labels
    assert labels.dtype == np.uint8 and labels.shape == (4, 4)
    # map i belongs to vocabulary class present[i]: the ramp to class 3, the other map to 1
    expected = np.where(ramp.numpy() >= 0.5, 3, 255)
    expected[0, 3] = 1
    assert np.array_equal(labels, expected)
    probs = torch.softmax(torch.stack([(ramp < 0.5).float(), ramp * (ramp >= 0.5), other * 0]), 0)
    assert np.allclose(result.confidence[labels == 3], probs[1].numpy()[labels == 3], atol=1e-6)
    assert result.class_names == ["person", "dog", "aeroplane", "tv"]


def test_nothing_fires_means_unlabeled_everywhere(make, rgb):
    pipeline = make(blur=0.0, refine="none")
    result = pipeline.postprocess(torch.zeros(2, 4, 4), [0, 1], rgb[:6, :8], (6, 8))
    assert (result.labels == 255).all() and result.labels.shape == (6, 8)


def scipy_gaussian_filter(image, sigma):
    """scipy.ndimage.gaussian_filter(image, sigma) written out: truncate 4, mode 'reflect'."""
    radius = int(4.0 * sigma + 0.5)
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights /= weights.sum()

    def mirrored(n):  # d c b a | a b c d | d c b a, repeated for radii beyond the size
        index = np.arange(-radius, n + radius) % (2 * n)
        return np.where(index < n, index, 2 * n - 1 - index)

    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.take(out, mirrored(out.shape[axis]), axis=axis)
        out = sum(
            w * np.take(padded, np.arange(k, k + out.shape[axis]), axis=axis)
            for k, w in enumerate(weights)
        )
    return out


@pytest.mark.parametrize("sigma", [0.8, 2.0, 6.5])  # 6.5: radius 26 > the 7x11 image
def test_blur_is_scipys_gaussian_filter(sigma):
    maps = np.random.default_rng(3).random((2, 7, 11)).astype(np.float32)
    blurred = gaussian_blur(maps, sigma)
    for channel in range(2):
        np.testing.assert_allclose(
            blurred[channel], scipy_gaussian_filter(maps[channel], sigma), atol=1e-5
        )


def test_minmax_per_channel_and_flat_channels():
    maps = torch.stack([torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])])
    maps = torch.cat([maps, torch.ones(1, 1, 2)])
    out = minmax(maps)
    assert torch.equal(out[0], torch.tensor([[0.0, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2)) and torch.equal(out[2], torch.ones(1, 2))


def test_dense_crf_snaps_an_uncertain_boundary_to_the_colour_edge():
    pytest.importorskip("pydensecrf.densecrf")
    height, width = 40, 60
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, width // 2 :] = 220
    first = np.full((height, width), 0.4, np.float32)
    first[:, : int(width * 0.7)] = 0.6  # the scores put the boundary at 70 %, the edge is at 50 %
    probs = np.stack([first, 1 - first])
    marginals = pnp_ovss.dense_crf(rgb, probs)
    assert marginals.shape == probs.shape
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)
    labels = marginals.argmax(axis=0)
    edge = np.where(np.arange(width) < width // 2, 0, 1)[None].repeat(height, 0)
    assert (probs.argmax(axis=0) == edge).mean() < 0.85
    assert (labels == edge).mean() > 0.97


def edge_and_probs(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with a colour edge at half the width, scores that put it at 70 %."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, width // 2 :] = 220
    first = np.full((height, width), 0.4, np.float32)
    first[:, : int(width * 0.7)] = 0.6
    return rgb, np.stack([first, 1 - first])


def test_dense_crf_takes_read_only_arrays():
    """Issue 22, item 8: the release's ``dense_crf`` raised "buffer source array is read-only"
    for a read-only image (``np.asarray`` of a PIL image); a node's frames can be read-only
    too. Both inputs read-only, the image also a view of a PIL image."""
    pytest.importorskip("pydensecrf.densecrf")
    from PIL import Image

    rgb, probs = edge_and_probs(40, 60)
    expected = pnp_ovss.dense_crf(rgb, probs)
    frozen = np.asarray(Image.fromarray(rgb))
    probs = probs.copy()
    probs.setflags(write=False)
    assert not frozen.flags.writeable and not probs.flags.writeable
    np.testing.assert_allclose(pnp_ovss.dense_crf(frozen, probs), expected, atol=1e-6)


def test_dense_crf_runs_in_a_process_of_its_own(monkeypatch):
    """pydensecrf holds the GIL throughout (issue 18): it must not run in the caller's
    process. Here this process's pydensecrf cannot run at all, and the CRF still works."""
    densecrf = pytest.importorskip("pydensecrf.densecrf")

    def refuse(*args, **kwargs):
        raise AssertionError("the dense CRF ran in the caller's process")

    monkeypatch.setattr(densecrf, "DenseCRF2D", refuse)
    rgb, probs = edge_and_probs(40, 60)
    labels = pnp_ovss.dense_crf(rgb, probs).argmax(axis=0)
    assert (labels == np.where(np.arange(60) < 30, 0, 1)[None]).mean() > 0.97


def test_dense_crf_of_a_large_frame_is_solved_at_the_bounded_size(monkeypatch):
    pytest.importorskip("pydensecrf.densecrf")
    from ovss_ros.core.methods.pnp_ovss.crf_process import CrfProcess

    solved = []
    marginals = CrfProcess.marginals

    def spy(self, rgb, probs, *args, **kwargs):
        solved.append((rgb.shape, probs.shape, args))
        return marginals(self, rgb, probs, *args, **kwargs)

    monkeypatch.setattr(CrfProcess, "marginals", spy)
    rgb, probs = edge_and_probs(1080, 1920)
    out = pnp_ovss.dense_crf(rgb, probs)
    assert out.shape == probs.shape
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-3)
    ((rgb_shape, probs_shape, (iterations, gaussian, bilateral, _)),) = solved
    height, width = rgb_shape[:2]
    assert height * width <= steps.CRF_MAX_PIXELS and probs_shape == (2, height, width)
    assert abs(width / height - 1920 / 1080) < 0.01
    scale = width / 1920
    assert gaussian["sxy"] == pytest.approx(3 * scale, rel=0.01)
    assert bilateral["sxy"] == pytest.approx(50 * scale, rel=0.01)


def test_dense_crf_stops_when_asked_and_fails_with_the_reason():
    pytest.importorskip("pydensecrf.densecrf")
    import threading

    from ovss_ros.core.methods.pnp_ovss.crf_process import CrfError, CrfProcess
    from ovss_ros.core.stopping import Stopped

    crf = CrfProcess()
    rgb, probs = edge_and_probs(40, 60)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        crf.marginals(rgb, probs, 10, {"sxy": 3, "compat": 7}, {"sxy": 5}, stop)
    with pytest.raises(CrfError, match="addPairwiseBilateral"):  # the child's TypeError
        crf.marginals(rgb, probs, 10, {"sxy": 3, "compat": 7}, {"sxy": 5, "compat": 10})
    out = crf.marginals(
        rgb, probs, 10, {"sxy": 3, "compat": 7}, {"sxy": 50, "srgb": 5, "compat": 10}
    )
    assert out.shape == probs.shape
    crf.close()


def test_refine_auto_uses_crf_when_it_imports_else_pamr(monkeypatch):
    if pnp_settings.crf_available():
        assert PnpSettings(refine="auto").refinement() == "crf"
    monkeypatch.setattr(pnp_settings, "crf_available", lambda: False)
    assert PnpSettings(refine="auto").refinement() == "pamr"
    with pytest.raises(ValueError, match="pydensecrf2"):
        PnpSettings(refine="crf").validate()


@pytest.mark.parametrize("refine", ["crf", "pamr", "none"])
def test_segment_at_input_size_with_each_refinement(make, rgb, refine):
    if refine == "crf":
        pytest.importorskip("pydensecrf.densecrf")
    pipeline = make(refine=refine, presence="all")
    small = rgb[::3, ::3].copy()  # keeps full-resolution CRF/PAMR cheap; odd size on purpose
    result = pipeline.segment(small)
    assert result.labels.shape == small.shape[:2] and result.labels.dtype == np.uint8
    assert result.confidence.shape == small.shape[:2] and result.confidence.dtype == np.float32
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3, 255}
    assert 0.0 <= result.confidence.min() and result.confidence.max() <= 1.0 + 1e-6


# ---- presence, the pipeline surface, transactions ----


def test_presence_is_clip_probability_over_the_vocabulary(make, clip, rgb):
    pipeline = make(presence="clip", presence_threshold=0.2)
    _, clip_pixels = pipeline.preprocess(rgb)
    with torch.inference_mode():
        image = torch.nn.functional.normalize(clip.model.encode_image(clip_pixels), dim=-1)
        text = torch.stack(
            [
                torch.nn.functional.normalize(
                    pipeline.text.embeddings(list(c.synonyms)).mean(0), dim=-1
                )
                for c in pipeline.classes
            ]
        )
        probs = torch.softmax(100.0 * image[0] @ text.T, dim=-1)
    expected = [i for i, p in enumerate(probs.tolist()) if p >= 0.2] or [int(probs.argmax())]
    assert pipeline.present_classes(clip_pixels) == expected
    pipeline.reconfigure(presence_threshold=1.0)  # nothing reaches 1: the best class only
    assert pipeline.present_classes(clip_pixels) == [int(probs.argmax())]
    pipeline.reconfigure(presence="all")
    assert pipeline.present_classes(clip_pixels) == [0, 1, 2, 3]
    result = make(presence="clip", presence_threshold=0.2, refine="none").segment(rgb)
    assert set(np.unique(result.labels)) <= set(expected) | {255}


def test_present_override_and_bad_indices(make, rgb):
    pipeline = make(refine="none", blur=0.0)
    result = pipeline.segment(rgb[:40, :50].copy(), present=[2])
    assert set(np.unique(result.labels)) <= {2, 255}
    for bad in ([], [4], [-1]):
        with pytest.raises(ValueError, match="indices into the 4 classes"):
            pipeline.segment(rgb, present=bad)


def test_more_than_254_classes_give_16_bit_labels(tmp_path, clip, rgb):
    vlm = load_vlm("blip_itm", str(save_tiny_blip(tmp_path, max_positions=512)), "cpu")
    pipeline = PnpOvss(clip, vlm, PnpSettings(**FAST, refine="none"), templates="single")
    pipeline.set_classes([f"t{i}" for i in range(255)])  # one word piece each ([UNK])
    result = pipeline.segment(rgb[:30, :40].copy(), present=[0, 254])
    assert result.labels.dtype == np.uint16 and result.unlabeled == 65535
    assert set(np.unique(result.labels)) <= {0, 254, 65535}


def test_segment_many_matches_segment_and_checks_every_image_first(make, voc_rgb):
    pipeline = make(refine="none")
    images = [image[::4, ::4].copy() for image in voc_rgb[:2]]
    many = pipeline.segment_many(images)
    for one, image in zip(many, images, strict=True):
        single = pipeline.segment(image)
        assert np.array_equal(one.labels, single.labels)
        np.testing.assert_allclose(one.confidence, single.confidence, atol=1e-6)
    calls = []
    handle = pipeline.vlm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            pipeline.segment_many([images[0], images[1].astype(np.float32)])
        with pytest.raises(ValueError, match="empty image"):
            pipeline.segment(np.zeros((0, 4, 3), np.uint8))
    finally:
        handle.remove()
    assert calls == []  # refused before any forward


def test_no_graph_hook_or_gradient_is_left_after_a_frame(make, rgb):
    pipeline = make(refine="none")
    model = pipeline.vlm.model
    pipeline.segment(rgb[:40, :40].copy())
    assert all(
        not layer.crossattention.self._forward_hooks for layer in model.text_encoder.encoder.layer
    )
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_half_precision_runs_the_gradient_pass_under_autocast(make, vlm, rgb):
    """bf16 autocast on the CPU: the same code path a GPU takes with fp16/bf16."""
    pipeline = make()
    pixels, _ = pipeline.preprocess(rgb)
    input_ids, _ = prompt_ids(pipeline, ["dog", "tv"])
    full = pipeline.token_gradcam(pixels, input_ids)
    pipeline.vlm = replace(vlm, autocast=torch.bfloat16)
    half = pipeline.token_gradcam(pixels, input_ids)
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # bf16 rounding shows
    half, full = half.flatten() / half.norm(), full.flatten() / full.norm()
    assert float(half @ full) > 0.99


def test_no_classes_is_a_vocabulary_error(clip, vlm, rgb):
    pipeline = PnpOvss(clip, vlm, PnpSettings(**FAST), templates="single")
    for call in (lambda: pipeline.segment(rgb), lambda: pipeline.segment_many([rgb])):
        with pytest.raises(VocabularyError, match="no classes"):
            call()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 8}, r"image_size must be in \[16"),
        ({"image_size": 36}, "multiple of the VLM's patch 8"),
        ({"image_size": 33.0}, "image_size must be an integer"),
        ({"layer": 0}, r"layer must be in \[1"),
        ({"layer": 4}, "layer 4 > the VLM's 3 text layers"),
        ({"head": 5}, "head 5 > the VLM's 4 heads"),
        ({"head": True}, "head must be an integer"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
        ({"threshold": "0.2"}, "threshold must be a number"),
        ({"presence_threshold": -0.1}, r"presence_threshold must be in \[0, 1\]"),
        ({"blur": 2.0}, r"blur must be in \[0, 1\]"),
        ({"dropout_rounds": 0}, r"dropout_rounds must be in \[1, 50\]"),
        ({"dropout_patches": 0}, r"dropout_patches must be in \[1"),
        ({"presence": "gpt4o"}, "unknown pnp.presence 'gpt4o'"),
        ({"refine": "bilateral"}, "unknown pnp.refine 'bilateral'"),
        ({"templates": "no placeholder"}, "bad template"),
        ({"layr": 3}, r"unknown settings \['layr'\]"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(make, changes, message):
    pipeline = make()
    before, templates = pipeline.settings, pipeline.templates
    with pytest.raises(ValueError, match=message):
        pipeline.reconfigure(**{"dropout_rounds": 2, **changes})  # a good change beside it
    assert pipeline.settings == before and pipeline.templates == templates


def test_bad_settings_are_refused_at_construction(clip, vlm):
    with pytest.raises(ValueError, match="head 9 > the VLM's 4 heads"):
        PnpOvss(clip, vlm, PnpSettings(**{**FAST, "head": 9}), templates="single")


def test_reconfigure_applies_everything_and_templates_re_encode(make):
    pipeline = make()
    before = pipeline.class_text.clone()
    pipeline.reconfigure(layer=3, head=1, threshold=0.3, templates="a photo of a {}.|a {}")
    assert (pipeline.settings.layer, pipeline.settings.head, pipeline.settings.threshold) == (
        3,
        1,
        0.3,
    )
    assert pipeline.templates == "a photo of a {}.|a {}"
    assert not torch.allclose(pipeline.class_text, before)


def test_bad_vocabulary_keeps_the_old_one(make):
    pipeline = make()
    text = pipeline.class_text.clone()
    for bad, message in [
        ([], "empty"),
        (["dog", "Dog"], "duplicate"),
        ([f"word{i}" for i in range(70)], "more than the VLM's 64"),
    ]:
        with pytest.raises(VocabularyError, match=message):
            pipeline.set_classes(bad)
        assert [c.name for c in pipeline.classes] == ["person", "dog", "aeroplane", "tv"]
        assert torch.equal(pipeline.class_text, text)


def test_segment_inside_inference_mode_still_takes_the_gradient(make, rgb):
    """Callers such as the engine's segment_many run under torch.inference_mode."""
    pipeline = make(refine="none")
    small = rgb[:48, :64].copy()
    outside = pipeline.segment(small, present=[0, 1])
    with torch.inference_mode():
        inside = pipeline.segment(small, present=[0, 1])
    assert np.array_equal(inside.labels, outside.labels)
    np.testing.assert_allclose(inside.confidence, outside.confidence, atol=1e-6)
