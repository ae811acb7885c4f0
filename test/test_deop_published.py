"""``method: deop`` on the DeOP release's model file (ovss_ros.core.methods.deop.published).

The release file is the one test_deop_released.py writes (R50 proposals named as detectron2
names them, the tiny random CLIP with learned positions, the decoder, the embeddings). The
pipeline must give the labels of the release's inference (released_scores, itself checked
against the official formulas there), resized as detectron2 resizes, on the real VOC photos,
through the engine as the node and the tools run it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from test_deop_released import released_file

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
from ovss_ros.core.methods.deop.published import PublishedDeop, release_size
from ovss_ros.core.methods.deop.released import released_scores
from ovss_ros.core.methods.deop.released_checkpoint import is_released_file
from ovss_ros.core.methods.deop.run_config import DeopConfig

CLASSES = ["cat", "dog", "person", "sky"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(str(TINY_VIT), "none", "cpu", "fp32")


@pytest.fixture(scope="module")
def release(tmp_path_factory, clip):
    path = tmp_path_factory.mktemp("published") / "model_final.pth"
    released_file(path, clip.model)
    return path


@pytest.fixture(scope="module")
def deop(clip, release):
    deop = PublishedDeop(clip, checkpoint=str(release))
    deop.set_classes(CLASSES)
    return deop


def test_the_release_input_size_is_detectron2s_resize_shortest_edge():
    assert release_size(375, 500, 2048) == (512, 683)  # 500 * 512 / 375 = 682.67 -> 683
    assert release_size(500, 375, 2048) == (683, 512)
    assert release_size(100, 3000, 2048) == (68, 2048)  # the long side bound wins
    assert release_size(100, 6000, 10_000) == (43, 2560)  # MAX_SIZE_TEST 2560


def test_labels_are_the_releases_argmax_on_real_photos(deop, clip, voc_rgb):
    rgb = voc_rgb[0]
    result = deop.segment(rgb)
    assert result.labels.shape == rgb.shape[:2] and result.class_names == CLASSES
    with torch.no_grad():
        pixels = deop.preprocess(rgb)
        assert tuple(pixels.shape[-2:]) == release_size(*rgb.shape[:2], 2048)
        text = deop.class_embeddings(CLASSES)  # the learned prompt context
        scores = released_scores(
            deop.released.proposals, clip.model.visual, deop.released.positions,
            deop.modules.decoder, text, deop.modules.void, pixels,
        )  # fmt: skip
        resized = F.interpolate(scores, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        coverage = deop.prepare([rgb]).proposals.masks.sum(dim=1, keepdim=True)
        coverage = F.interpolate(coverage, size=rgb.shape[:2], mode="bilinear")[0, 0]
    best, expected = resized[0].max(dim=0)
    assert np.mean(result.labels == expected.numpy()) >= 0.9999
    # The confidence: the best score over the masks' sum, a probability that varies per pixel.
    np.testing.assert_allclose(result.confidence, (best / coverage).numpy(), atol=1e-5)
    assert result.confidence.std() > 2e-4 and result.confidence.max() <= 1 + 1e-5


def test_a_batch_gives_what_single_frames_give(deop, voc_rgb):
    frames = voc_rgb[:3]
    batch = deop.segment_many(frames)
    for rgb, result in zip(frames, batch, strict=True):
        alone = deop.segment(rgb)
        assert np.mean(alone.labels == result.labels) >= 0.9999


def test_settings_the_release_fixes_are_refused_with_a_reason(clip, release, deop):
    cases = [
        ({"proposal_source": "superpixels"}, "proposal_source must be auto"),
        ({"pooling": "mean"}, "pooling must be auto or cal"),
        ({"proposals": 50}, "proposals must be 100"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            PublishedDeop(clip, DeopConfig(**changes), released=deop.released)
        with pytest.raises(ValueError, match=message):
            deop.reconfigure(**changes)
    assert deop.settings.proposals == 100  # nothing applied


def test_a_file_that_is_not_a_release_or_another_clip_is_refused(tmp_path, release):
    from conftest import TINY_VIT_B32

    other = load_clip(str(TINY_VIT_B32), "none", "cpu", "fp32")
    with pytest.raises(ProposalWeightsError, match="decoder is 32 wide.*needs 48.*ViT-B-16"):
        PublishedDeop(other, checkpoint=str(release))
    assert is_released_file(release)
    text = tmp_path / "x.pth"
    text.write_text("no")
    assert not is_released_file(text) and not is_released_file(tmp_path / "absent.pth")


def test_two_stream_as_released_on_the_same_proposals(deop, clip, voc_rgb):
    """method twostream on the release file: the proposal network's class probabilities and
    CLIP's crop probabilities in the release's ensemble (every class unseen), then the release's
    semantic inference; computed here from the official ensemble formula."""
    from test_deop_maskformer import official_ensemble

    from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
    from ovss_ros.core.methods.deop.run_config import TwoStreamConfig

    two = PublishedTwoStream(clip, TwoStreamConfig(crop_batch=16), released=deop.released)
    two.set_classes(CLASSES)
    rgb = voc_rgb[1]
    result = two.segment(rgb)
    with torch.no_grad():
        frames = two.prepare([rgb])
        rows = torch.cat([two.class_embeddings(CLASSES), F.normalize(two.modules.void, dim=-1)])
        unit = F.normalize(frames.query_embeddings[0], dim=-1)
        mask_cls = torch.softmax(100 * unit @ rows.T, dim=-1)[..., :-1]
        image = frames.resized[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        masks = frames.proposals.masks[0]
        crops, slots = two.crops(image, masks, torch.ones(len(masks), dtype=torch.bool))
        clip_logits = 100 * F.normalize(clip.model.encode_image(crops), dim=-1) @ rows.T
        valid = torch.zeros(len(masks), dtype=torch.bool)
        valid[slots] = True
        probs = official_ensemble(mask_cls, clip_logits, valid, None, 0.8)
        scores = torch.einsum("qc,qhw->chw", probs, masks)
        resized = F.interpolate(scores[None], size=rgb.shape[:2], mode="bilinear")[0]
        coverage = F.interpolate(masks.sum(0)[None, None], size=rgb.shape[:2], mode="bilinear")
    best, expected = resized.max(dim=0)
    assert 0 < len(slots) <= 100
    assert np.mean(result.labels == expected.numpy()) >= 0.9999
    np.testing.assert_allclose(result.confidence, (best / coverage[0, 0]).numpy(), atol=1e-5)
    deop_confidence = deop.segment(rgb).confidence
    assert not np.allclose(result.confidence, deop_confidence, atol=1e-3)  # another method


def test_two_stream_seen_classes_follow_the_releases_trainable_flag(deop, clip, voc_rgb):
    """``twostream.seen_classes``: the release's ``trainable_flag`` per class (the synonyms of
    a seen entry seen too, background words unseen), against the official ensemble with that
    flag; the labels differ from every class unseen."""
    from test_deop_maskformer import official_ensemble

    from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
    from ovss_ros.core.methods.deop.run_config import TwoStreamConfig

    classes = ["cat; kitten", "dog", "person", "sky"]
    settings = TwoStreamConfig(crop_batch=16, seen_classes=("Cat", "dog"), background_words=(
        "wall",))  # fmt: skip
    two = PublishedTwoStream(clip, settings, released=deop.released)
    two.set_classes(classes)
    assert two.seen_rows().tolist() == [True, True, True, False, False, False]
    rgb = voc_rgb[1]
    result = two.segment(rgb)
    unseen = PublishedTwoStream(
        clip, TwoStreamConfig(crop_batch=16, background_words=("wall",)), released=deop.released
    )
    unseen.set_classes(classes)
    with torch.no_grad():
        frames = two.prepare([rgb])
        texts = ["cat", "kitten", "dog", "person", "sky"]
        rows = torch.cat([
            two.class_embeddings(texts), two.text.embeddings(["wall"]),
            F.normalize(two.modules.void, dim=-1),
        ])  # fmt: skip
        unit = F.normalize(frames.query_embeddings[0], dim=-1)
        mask_cls = torch.softmax(100 * unit @ rows.T, dim=-1)[..., :-1]
        image = frames.resized[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        masks = frames.proposals.masks[0]
        crops, slots = two.crops(image, masks, torch.ones(len(masks), dtype=torch.bool))
        clip_logits = 100 * F.normalize(clip.model.encode_image(crops), dim=-1) @ rows.T
        valid = torch.zeros(len(masks), dtype=torch.bool)
        valid[slots] = True
        flag = [1, 1, 1, 0, 0, 0]  # cat, kitten, dog, person, sky, wall
        probs = official_ensemble(mask_cls, clip_logits, valid, flag, 0.8)
        labels = torch.stack([probs[:, :2].amax(1), probs[:, 2], probs[:, 3], probs[:, 4]], 1)
        scores = torch.einsum("qc,qhw->chw", labels, masks)
        resized = F.interpolate(scores[None], size=rgb.shape[:2], mode="bilinear")[0]
        wall = F.interpolate(
            torch.einsum("q,qhw->hw", probs[:, 5], masks)[None, None], size=rgb.shape[:2],
            mode="bilinear",
        )[0, 0]  # fmt: skip
    best, expected = resized.max(dim=0)
    expected[wall >= best] = 255  # the background word wins (ties too): unlabeled
    assert np.mean(result.labels == expected.numpy()) >= 0.9999
    other = unseen.segment(rgb)  # every class unseen: other scores
    # Relative: random weights give scores of ~1e-4, whichever flag.
    difference = np.abs(result.confidence - other.confidence).max()
    assert difference > 0.1 * np.abs(result.confidence).max()
    with pytest.raises(ValueError, match="seen_classes must be a list of non-empty"):
        TwoStreamConfig(seen_classes=("",)).validate()


def test_the_query_count_is_read_from_the_files_shapes(tmp_path, clip, voc_rgb):
    """A release-layout file with 8 MaskFormer queries runs at the default settings (the count
    comes from its shapes, not deop.proposals); deop.proposals 8 is accepted, another value is
    refused naming the file's count; a file whose decoder slots disagree is refused."""
    from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
    from ovss_ros.core.methods.deop.run_config import TwoStreamConfig

    state = released_file(tmp_path / "full.pth", clip.model)
    state["sem_seg_head.predictor.query_embed.weight"] = state[
        "sem_seg_head.predictor.query_embed.weight"][:8]  # fmt: skip
    state["query_embedding.weight"] = state["query_embedding.weight"][:8]
    path = tmp_path / "eight.pth"
    torch.save({"model": state}, path)
    deop = PublishedDeop(clip, DeopConfig(), checkpoint=str(path))
    assert deop.released.proposals.arch.queries == 8 and "8 queries" in deop.describe()
    deop.set_classes(CLASSES)
    rgb = voc_rgb[0]
    assert deop.prepare([rgb]).proposals.masks.shape[1] == 8
    assert deop.segment(rgb).labels.shape == rgb.shape[:2]
    deop.reconfigure(proposals=8)
    with pytest.raises(ValueError, match=r"deop.proposals must be 8 with the DeOP file .*eight"):
        deop.reconfigure(proposals=50)
    assert deop.settings.proposals == 8  # nothing applied
    two = PublishedTwoStream(clip, TwoStreamConfig(crop_batch=8), released=deop.released)
    two.set_classes(CLASSES)
    assert two.segment(rgb).labels.shape == rgb.shape[:2]
    state["query_embedding.weight"] = state["query_embedding.weight"][:6]
    torch.save({"model": state}, path)
    with pytest.raises(ProposalWeightsError, match="6 slot queries .* proposal network 8"):
        PublishedDeop(clip, DeopConfig(), checkpoint=str(path))


def test_two_stream_says_its_input_size_is_deops_not_the_two_stream_releases(deop, clip):
    """The release's two-stream system (ZeroShotMaskFormer, zero_shot_maskformer_R101c_bs32_60k
    .yaml, INPUT.MIN_SIZE_TEST 640 from Base-COCOStuff164K-171.yaml) tests at short side 640;
    twostream here runs at DeOP's 512 (deop_verifycoco.sh's override) on the same proposals, and
    must not call that the release's."""
    from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
    from ovss_ros.core.methods.deop.run_config import TwoStreamConfig

    text = PublishedTwoStream(clip, TwoStreamConfig(), released=deop.released).describe()
    assert "input short side 512 (DeOP's; the release's two-stream configuration tests" in text
    assert "at 640)" in text and "512 (the release's)" not in text
