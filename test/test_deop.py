"""DeOP inference: patch severance (and its residual defaults), the CAL decoder, semantic
inference, the pipeline's surface and its refusals (training-free: SuperpixelClip), the
two-stream baseline, and the checkpoint file with each of its errors."""

import logging
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, TINY_VIT_B32
from planted_shapes import single_thread  # noqa: F401

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ovss_ros.core.methods.deop.deop import (
    Deop,
    DeopConfig,
    SuperpixelClip,
    severed_last_block,
    token_weights,
    tokens_before_last_block,
)
from ovss_ros.core.methods.deop.heads import AnchorDecoder, DeopModules, mean_pool
from ovss_ros.core.methods.deop.proposal_segmentation import VOID, semantic_scores
from ovss_ros.core.methods.deop.proposals import Proposals
from ovss_ros.core.methods.deop.twostream import TwoStream, TwoStreamConfig
from ovss_ros.core.vocabulary import VocabularyError

CLASSES = ["person", "cat; kitty", "sky"]


def tiny_clip(seed: int = 0, config=TINY_VIT):
    torch.manual_seed(seed)  # the same random weights every time for one seed
    return load_clip(str(config), "none", "cpu")


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def trained_modules(clip, head: bool = True, prompt: bool = True) -> DeopModules:
    torch.manual_seed(3)
    visual = clip.model.visual
    return DeopModules.create(
        int(visual.output_dim),
        decoder={"heads": 4, "feedforward": 32},
        void=True,
        prompt={"width": 64, "length": 4} if prompt else None,
        proposal_head=(
            {"width": 64, "queries": 12, "dim": 16, "heads": 4, "cells": 4} if head else None
        ),
    ).eval()


def settings(**changes) -> DeopConfig:
    return DeopConfig(**{"short_side": 96, "templates": "single", "proposals": 16, **changes})


# --- patch severance ---------------------------------------------------------------------------


def test_severance_leaves_tokens_unmixed(clip, voc_rgb):
    deop = SuperpixelClip(clip, settings())
    pixels = deop.preprocess(voc_rgb[0])
    tokens, grid = tokens_before_last_block(clip.model.visual, pixels)
    block = clip.model.visual.transformer.resblocks[-1]
    one_proposal = torch.ones(1, 1, *grid)  # a single proposal covering everything
    weights = token_weights(one_proposal, torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(weights[0, 1:], torch.ones(grid[0] * grid[1]))
    before = severed_last_block(block, tokens, weights)
    changed = tokens.clone()
    patch = 1 + grid[1] + 2  # row 1, column 2
    changed[0, patch] += torch.randn(tokens.shape[-1])
    after = severed_last_block(block, changed, weights)
    moved = (after - before).abs().amax(dim=-1)[0]
    assert moved[patch] > 1e-3
    moved[patch] = 0
    assert float(moved.max()) == 0.0  # every other token is exactly as it was
    # control: CLIP's own last block mixes the perturbation into every token
    mixed = (block(changed) - block(tokens)).abs().amax(dim=-1)[0]
    assert int((mixed > 1e-6).sum()) == tokens.shape[1]


def test_severance_matches_identity_attention_reference(clip):
    torch.manual_seed(1)
    block = clip.model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 10, 64)
    weights = torch.rand(2, 10) * 3
    h = block.ln_1(x)
    eye = torch.full((10, 10), float("-inf")).fill_diagonal_(0.0)
    attended = block.attn(h, h, h, need_weights=False, attn_mask=eye)[0]  # softmax(-inf) = I
    bias = block.attn.out_proj.bias
    expected = 0.2 * x + (weights[..., None] * (attended - bias) + bias)  # out_proj is affine
    expected = expected + block.mlp(block.ln_2(expected))
    got = severed_last_block(block, x, weights, residual=0.2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_severed_block_residual_defaults(clip):
    """DeOP's default is the released configuration (the learned-position block the scripts run
    keeps the residual at 1.0); superpixel_clip, ovss_ros's training-free method, keeps 0.2."""
    from ovss_ros.core.config import EngineConfig
    from ovss_ros.training.training_config import TrainingConfig

    assert DeopConfig().severance_residual == 1.0
    assert EngineConfig().deop.severance_residual == 1.0
    assert TrainingConfig().severance_residual == 1.0
    assert EngineConfig().superpixel_clip.severance_residual == 0.2
    assert SuperpixelClip(clip).settings.severance_residual == 0.2
    torch.manual_seed(2)
    block = clip.model.visual.transformer.resblocks[-1]
    x, weights = torch.randn(1, 5, 64), torch.rand(1, 5)
    released = severed_last_block(block, x, weights, residual=1.0)
    assert torch.equal(severed_last_block(block, x, weights), released)
    assert not torch.allclose(severed_last_block(block, x, weights, residual=0.2), released)


def test_token_weights_sum_proposal_shares():
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 0, :, 0] = 1.0
    masks[0, 1, :, 1] = 0.5
    masks[0, 2] = 7.0  # padding: must not count
    valid = torch.tensor([[True, True, False]])
    weights = token_weights(masks, valid)
    assert weights.tolist() == [[2.0, 1.0, 0.5, 1.0, 0.5]]  # class token: 2 proposals


# --- CAL decoder, pooling, semantic inference ----------------------------------------------


@torch.no_grad()
def test_anchor_heat_maps_stay_inside_each_proposal():
    torch.manual_seed(0)
    decoder = AnchorDecoder(32, heads=4, feedforward=16).eval()
    features = F.normalize(torch.randn(1, 4, 4, 32), dim=-1)
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, 0, :2] = 1.0  # two patches
    masks[0, 1, 2:] = 1.0
    valid = torch.ones(1, 2, dtype=torch.bool)
    heat = decoder.heat_maps(features, masks, valid).reshape(1, 2, 4, 4, 4)
    outside = heat[0, 0].clone()
    outside[:, 0, :2] = 0
    assert float(outside.abs().max()) == 0.0 and float(heat[0, 0].sum()) > 0
    assert float(heat[0, 1, :, :2].abs().max()) == 0.0
    embeddings = decoder(features, masks, valid)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(1, 2), atol=1e-5)
    # values are not projected: each head's slice of the embedding is a combination of the
    # same slice of the proposal's own two features
    inside = features[0, 0, :2]
    for head in range(4):
        part = slice(8 * head, 8 * head + 8)
        basis, target = inside[:, part].T, embeddings[0, 0, part]
        solution = torch.linalg.lstsq(basis, target).solution
        assert torch.allclose(basis @ solution, target, atol=1e-5)


def test_mean_pool_and_semantic_scores_against_loops():
    torch.manual_seed(0)
    features = torch.randn(1, 3, 3, 8)
    masks = torch.rand(1, 2, 3, 3)
    pooled = mean_pool(features, masks)
    manual = F.normalize((masks[0, 0, ..., None] * features[0]).sum(dim=(0, 1)), dim=0)
    assert torch.allclose(pooled[0, 0], manual, atol=1e-6)
    probs = torch.rand(1, 2, 4)
    scores = semantic_scores(probs, Proposals(masks, torch.ones(1, 2, dtype=torch.bool)))
    y, x, label = 1, 2, 3
    expected = (
        sum(probs[0, k, label] * masks[0, k, y, x] for k in range(2)) / masks[0, :, y, x].sum()
    )
    assert float(scores[0, label, y, x]) == pytest.approx(float(expected), rel=1e-5)


def test_label_probabilities_take_synonym_max_and_drop_void(clip):
    deop = Deop(clip, settings(background_words=("wall",)), modules=trained_modules(clip))
    deop.set_classes(CLASSES)
    assert deop._owner.tolist() == [0, 1, 1, 2, 3, VOID]  # cat has two names; wall; void
    probs = torch.tensor([[[0.1, 0.2, 0.05, 0.3, 0.05, 0.3]]])
    labels = deop.label_probabilities(probs)[0, 0].tolist()
    assert labels == pytest.approx([0.1, 0.2, 0.3, 0.05])


# --- the pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["superpixels", "clusters"])
def test_superpixel_clip_segments_real_images(clip, voc_rgb, caplog, source):
    caplog.set_level(logging.INFO, logger="ovss_ros.core.methods.deop.deop")
    deop = SuperpixelClip(clip, settings(proposal_source=source))
    assert f"superpixel_clip (training-free): {source} proposals" in caplog.text
    assert "mean pooling" in caplog.text and "WARNING" not in caplog.text
    assert deop.pooling() == "mean"
    deop.set_classes(CLASSES)
    results = deop.segment_many(voc_rgb)
    for rgb, result in zip(voc_rgb, results, strict=True):
        assert result.labels.shape == rgb.shape[:2] and result.labels.dtype == np.uint8
        assert set(np.unique(result.labels)) <= {0, 1, 2}
        assert result.confidence.shape == rgb.shape[:2]
        assert 0.0 <= result.confidence.min() and result.confidence.max() <= 1.0 + 1e-5
        assert result.class_names == ["person", "cat", "sky"]
    alone = deop.segment(voc_rgb[1])
    assert np.array_equal(alone.labels, results[1].labels)


def test_background_wins_ties_only_with_background_words(clip):
    """Pixels no proposal covers score 0 for every class and for the (empty) background
    channel: without words they get the first class, as the official argmax over the classes;
    with words a word equal to the best class wins (SCLIP's argmax, background first)."""
    scores = torch.zeros(len(CLASSES) + 1, 4, 6)
    scores[1, :2] = 0.5  # class 1 on the top rows; below, nothing covers
    plain = SuperpixelClip(clip, settings())
    plain.set_classes(CLASSES)
    labels = plain.postprocess(scores, (4, 6)).labels
    assert (labels[:2] == 1).all() and (labels[2:] == 0).all()
    words = SuperpixelClip(clip, settings(background_words=["wall"]))
    words.set_classes(CLASSES)
    tied = scores.clone()
    tied[-1, :2] = 0.5  # the word ties class 1 on the top rows
    labels = words.postprocess(tied, (4, 6)).labels
    assert (labels == 255).all()  # the top rows tie; below, 0 = 0 ties too
    tied[-1, :2] = 0.4
    assert (words.postprocess(tied, (4, 6)).labels[:2] == 1).all()


def test_threshold_background_words_and_wide_vocabulary(clip, voc_rgb):
    deop = SuperpixelClip(clip, settings(score_threshold=1.0))
    deop.set_classes(CLASSES)
    assert np.all(deop.segment(voc_rgb[0]).labels == 255)  # nothing is certain
    deop.reconfigure(score_threshold=0.0, background_words=["person"])
    deop.set_classes(["cat", "sky"])
    labels = deop.segment(voc_rgb[0]).labels
    plain = SuperpixelClip(clip, settings())
    plain.set_classes(["person", "cat", "sky"])
    person = plain.segment(voc_rgb[0]).labels == 0
    assert np.all(labels[person] == 255)  # where "person" wins, the pixel is unlabeled now
    wide = SuperpixelClip(clip, settings(proposals=4))
    wide.set_classes([f"thing {i}" for i in range(300)])
    result = wide.segment(voc_rgb[0][:64, :64])
    assert result.labels.dtype == np.uint16 and result.labels.max() < 300


def test_trained_modules_use_cal_learned_proposals_and_prompt(clip, voc_rgb):
    modules = trained_modules(clip)
    deop = Deop(clip, settings(), modules=modules)
    assert deop.pooling() == "cal" and deop.proposal_source() == "learned"
    deop.set_classes(CLASSES)
    result = deop.segment(voc_rgb[0])
    assert result.labels.shape == voc_rgb[0].shape[:2]
    frames = deop.prepare([voc_rgb[0]])
    assert frames.proposals.masks.shape[1] == 12  # the head's queries, fewer than asked
    expected = modules.prompt.encode(clip.model, clip.tokenizer, ["person"])
    # unit vectors (entries ~0.1) from another batch of prompts: float32 rounding, ~1e-7
    assert torch.allclose(deop.class_embeddings(["person"]), expected, atol=1e-6)
    deop.reconfigure(pooling="mean", proposal_source="superpixels")
    features = deop.encode(frames)
    assert torch.allclose(
        deop.embed(frames), mean_pool(features, frames.proposals.on_patches(4)), atol=1e-6
    )


BAD_SETTINGS = [
    ({"proposals": 0}, "proposals"),
    ({"proposals": 1001}, "proposals"),
    ({"proposals": 2.5}, "proposals"),
    ({"proposal_source": "sam"}, "proposal_source"),
    ({"proposal_source": "learned"}, "proposal head"),
    ({"pooling": "cal"}, "CAL decoder"),
    ({"pooling": "max"}, "pooling"),
    ({"severance_residual": 1.5}, "severance_residual"),
    ({"score_threshold": -0.1}, "score_threshold"),
    ({"logit_scale": 0}, "logit_scale"),
    ({"logit_scale": float("nan")}, "logit_scale"),
    ({"mask_cells": 0}, "mask_cells"),
    ({"superpixel_compactness": -1.0}, "superpixel_compactness"),
    ({"cluster_iterations": 0}, "cluster_iterations"),
    ({"short_side": -1}, "short_side"),
    ({"templates": "no placeholder"}, "templates"),
    ({"background_words": "wall"}, "background_words"),
    ({"background_words": [""]}, "background_words"),
    ({"colour": "red"}, "unknown"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_SETTINGS)
def test_reconfigure_refuses_bad_settings_and_changes_nothing(clip, voc_rgb, change, reason):
    deop = SuperpixelClip(clip, settings())
    deop.set_classes(CLASSES)
    before = asdict(deop.settings)
    queries = deop._queries.clone()
    with pytest.raises(ValueError, match=reason):
        deop.reconfigure(**{"short_side": 64, "score_threshold": 0.5, **change})
    assert asdict(deop.settings) == before
    assert torch.equal(deop._queries, queries)


def test_constructor_and_input_refusals(clip, voc_rgb):
    with pytest.raises(ValueError, match="CAL decoder"):
        SuperpixelClip(clip, settings(pooling="cal"))
    with pytest.raises(ValueError, match="mask_cells"):
        Deop(clip, settings(mask_cells=2), modules=trained_modules(clip))  # head predicts 4
    deop = SuperpixelClip(clip, settings())
    with pytest.raises(VocabularyError):
        deop.segment(voc_rgb[0])
    deop.set_classes(CLASSES)
    with pytest.raises(VocabularyError):
        deop.set_classes([])
    assert [c.name for c in deop.classes] == ["person", "cat", "sky"]
    for bad in (voc_rgb[0][..., 0], voc_rgb[0].astype(np.float32), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError):
            deop.segment(bad)


# --- two-stream baseline ------------------------------------------------------------------


def test_twostream_classifies_masked_crops(clip, voc_rgb):
    two = TwoStream(clip, TwoStreamConfig(short_side=96, templates="single", proposals=6))
    two.set_classes(CLASSES)
    rgb = voc_rgb[0]
    result = two.segment(rgb)
    assert result.labels.shape == rgb.shape[:2] and set(np.unique(result.labels)) <= {0, 1, 2}
    frames = two.prepare([rgb])
    embeddings = two.embed(frames)
    # proposal 0 by hand: threshold, box, mean-colour fill, resize, encode_image
    mask = F.interpolate(frames.proposals.masks[:, :1], size=rgb.shape[:2], mode="bilinear")
    mask = mask[0, 0] > 0.5
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    mean = torch.tensor(clip.mean).view(3, 1, 1)
    std = torch.tensor(clip.std).view(3, 1, 1)
    keep = mask[box].float()
    crop = image[:, box[0], box[1]] * keep + (1 - keep) * mean
    crop = F.interpolate(crop[None], size=(64, 64), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = F.normalize(clip.model.encode_image((crop - mean) / std), dim=-1)[0]
    assert torch.allclose(embeddings[0, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="crop_batch"):
        two.reconfigure(crop_batch=0)


# --- checkpoint ----------------------------------------------------------------------------


def test_checkpoint_round_trip_and_settings(clip, voc_rgb, tmp_path):
    modules = trained_modules(clip)
    path = save_checkpoint(tmp_path / "deop.pt", modules, clip, asdict(settings(proposals=9)))
    loaded = load_checkpoint(path, clip)
    for (name, a), (_, b) in zip(
        modules.state_dict().items(), loaded.modules.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    deop = Deop(clip, checkpoint=str(path))
    assert deop.settings.proposals == 9 and deop.pooling() == "cal"
    deop.set_classes(CLASSES)
    memory = Deop(clip, settings(proposals=9), modules=modules)
    memory.set_classes(CLASSES)
    assert np.array_equal(deop.segment(voc_rgb[0]).labels, memory.segment(voc_rgb[0]).labels)


def test_checkpoint_errors(clip, tmp_path):
    path = save_checkpoint(tmp_path / "deop.pt", trained_modules(clip), clip, asdict(settings()))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", clip)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(truncated, clip)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(garbage, clip)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an ovss_ros DeOP checkpoint"):
        load_checkpoint(other, clip)
    content = torch.load(path, weights_only=True)
    content["version"] = 99
    torch.save(content, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "newer.pt", clip)
    for bad in (float("nan"), float("inf")):  # a diverged run: refused, not run to NaN scores
        content = torch.load(path, weights_only=True)
        name = next(k for k, v in content["weights"].items() if v.is_floating_point())
        content["weights"][name] = content["weights"][name].clone().fill_(bad)
        torch.save(content, tmp_path / "diverged.pt")
        with pytest.raises(CheckpointError, match=f"weights '{name}' holds NaN or infinite"):
            load_checkpoint(tmp_path / "diverged.pt", clip)
    with pytest.raises(CheckpointError, match="tiny-vit-b32"):
        load_checkpoint(path, tiny_clip(config=TINY_VIT_B32))
    with pytest.raises(CheckpointError, match="other weights"):
        load_checkpoint(path, tiny_clip(seed=5))  # same architecture, other weights
    assert load_checkpoint(path, tiny_clip(seed=0)).modules is not None  # same weights: fine


def test_failed_checkpoint_switch_changes_nothing(clip, voc_rgb, tmp_path):
    path = save_checkpoint(tmp_path / "deop.pt", trained_modules(clip), clip, asdict(settings()))
    deop = Deop(clip, settings(), checkpoint=str(path))
    deop.set_classes(CLASSES)
    before = deop.segment(voc_rgb[0]).labels
    with pytest.raises(CheckpointError):
        deop.load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="proposal head"):
        deop.reconfigure(proposal_source="learned")
        deop.load_checkpoint(None)  # would drop the head the settings need
    assert deop.checkpoint.path == path
    assert np.array_equal(deop.segment(voc_rgb[0]).labels, before)
    deop.reconfigure(proposal_source="superpixels", pooling="auto")
    deop.load_checkpoint(None)
    assert deop.modules is None and deop.pooling() == "mean"


def test_a_checkpoint_trained_at_another_residual_is_named_at_load(clip, tmp_path, caplog):
    """Checkpoints made while 0.2 was the default were trained at 0.2; the default is now the
    released 1.0: loading one says so and names the setting (once it matches, nothing)."""
    trained = asdict(settings(severance_residual=0.2))
    path = save_checkpoint(tmp_path / "old.pt", trained_modules(clip), clip, trained)
    with caplog.at_level(logging.WARNING):
        Deop(clip, settings(), checkpoint=str(path))
    assert "was trained with severance_residual 0.2 but deop.severance_residual is 1" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Deop(clip, settings(severance_residual=0.2), checkpoint=str(path))
    assert "severance_residual" not in caplog.text
