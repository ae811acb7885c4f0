"""DeOP training on a planted data set with a tiny random CLIP: the loss falls, the trained
modules beat untrained ones on held-out images, resume continues exactly, the zero-shot splits
and the crop sampler; and the ovss-train-deop command end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from planted_shapes import single_thread, write_planted_set  # noqa: F401

from ovss_ros.cli import train_deop
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.checkpoint import load_checkpoint
from ovss_ros.core.methods.deop.deop import Deop
from ovss_ros.training.deop_data import (
    COCO_STUFF_UNSEEN,
    CropDataset,
    coco_stuff_data,
    training_data,
    voc_data,
)
from ovss_ros.training.deop_training import (
    CHECKPOINT_NAME,
    DeopTrainer,
    TrainingConfig,
    create_modules,
    train,
)


def tiny_clip():
    torch.manual_seed(0)  # the same random weights as the command's --seed 0
    return load_clip(str(TINY_VIT), "none", "cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_set(tmp_path_factory.mktemp("planted"), train=48, val=12, size=96)


def small_config(**changes) -> TrainingConfig:
    base = {
        "steps": 150,
        "batch_size": 4,
        "crop": 96,
        "scale_min": 0.8,
        "scale_max": 1.25,
        "proposals": 12,
        "templates": "single",
        "decoder_heads": 4,
        "decoder_feedforward": 64,
        "checkpoint_every": 0,
        "validate_every": 0,
        "log_every": 25,
        "progress": False,
    }
    return TrainingConfig(**{**base, **changes})


def test_trained_modules_beat_untrained_ones_on_held_out_images(planted, tmp_path):
    clip = tiny_clip()
    data = training_data("folder", planted)
    config = small_config(loss="ce", prompt_length=8, lr=1e-3, prompt_lr=2e-2)
    torch.manual_seed(1)
    untrained = DeopTrainer(clip, data, config, create_modules(clip, config)).validate()
    summary = train(clip, data, config, tmp_path)
    history = json.loads((tmp_path / "metrics.json").read_text())
    losses = [entry["loss"] for entry in history["train"]]
    assert losses[-1] < 0.5 * losses[0]
    trained = summary["validation"]
    # measured: 12.7 -> 37.6 mIoU (the random CLIP's text and image spaces only meet through
    # the learned prompt context and the decoder)
    assert trained["mIoU"] > untrained["mIoU"] + 12, (untrained, trained)
    deop = Deop(clip, checkpoint=str(tmp_path / CHECKPOINT_NAME))  # the file serves inference
    assert deop.pooling() == "cal" and deop.modules.prompt is not None


def test_released_loss_falls(planted, tmp_path):
    clip = tiny_clip()
    config = small_config(steps=60, log_every=10, lr=1e-3)
    train(clip, training_data("folder", planted), config, tmp_path)
    losses = [
        entry["focal"] + entry["dice"]
        for entry in json.loads((tmp_path / "metrics.json").read_text())["train"]
    ]
    assert losses[-1] < losses[0]


def test_resume_continues_exactly(planted, tmp_path):
    clip = tiny_clip()
    data = training_data("folder", planted)
    config = small_config(
        steps=8,
        checkpoint_every=4,
        log_every=4,
        proposal_source="learned",
        head_queries=6,
        head_dim=16,
        prompt_length=2,
    )
    train(clip, data, config, tmp_path / "straight")
    train(clip, data, config, tmp_path / "resumed", stop_at=5)  # interrupted after step 5
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME, clip).training["step"] == 5
    train(clip, data, config, tmp_path / "resumed", resume=True)
    straight = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME, clip)
    resumed = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME, clip)
    assert resumed.training["step"] == 8
    for (name, a), (_, b) in zip(
        straight.modules.state_dict().items(), resumed.modules.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.modules.proposal_head is not None
    with pytest.raises(ValueError, match="nothing to resume"):
        train(clip, data, config, tmp_path / "empty", resume=True)


def test_zero_shot_splits(tmp_path):
    coco = tmp_path / "coco_stuff164k"
    for split in ("train2017", "val2017"):
        (coco / "images" / split).mkdir(parents=True)
        (coco / "annotations" / split).mkdir(parents=True)
        (coco / "images" / split / "1.jpg").write_bytes(b"")
        (coco / "annotations" / split / "1_labelTrainIds.png").write_bytes(b"")
    data = coco_stuff_data(tmp_path)
    # ZegFormer / DeOP unseen classes as COCO-Stuff trainIds (0..170)
    expected = [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert data.unseen == expected and len(COCO_STUFF_UNSEEN) == 15
    assert len(data.seen) == 156 and len(data.train) == 1 and len(data.val) == 1
    table = data.training_labels()
    assert table[19] == 255 and table[18] == 18 and table[20] == 19 and table[255] == 255
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    for name, ids in (("train", ["a"]), ("val", ["b"])):
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids))
        for i in ids:
            (voc / "JPEGImages" / f"{i}.jpg").write_bytes(b"")
            (voc / "SegmentationClass" / f"{i}.png").write_bytes(b"")
    data = voc_data(tmp_path)
    assert data.unseen == [15, 16, 17, 18, 19] and len(data.classes) == 20
    assert data.train.label_map[0] == 255 and data.train.label_map[16] == 15
    with pytest.raises(FileNotFoundError):
        training_data("folder", tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown data set"):
        training_data("ade", tmp_path)


def test_crop_sampler_is_deterministic(planted):
    data = training_data("folder", planted)
    dataset = CropDataset(data, 64, seed=3)
    rgb, labels = dataset[5]
    assert rgb.shape == (64, 64, 3) and labels.shape == (64, 64)
    again = CropDataset(data, 64, seed=3)[5]
    assert np.array_equal(rgb, again[0]) and np.array_equal(labels, again[1])
    assert set(np.unique(labels)) <= set(range(5)) | {255}
    order = [dataset.image_index(i) for i in range(len(data.train))]
    assert sorted(order) == list(range(len(data.train)))  # one epoch visits every image once


def test_command_end_to_end(tmp_path):
    root = write_planted_set(tmp_path / "set", train=8, val=4, size=64, unseen=("green diamond",))
    output = tmp_path / "run"
    common = [
        "folder", str(root), "--stage", "head", "--output", str(output), "--model", str(TINY_VIT),
        "--pretrained", "none", "--device", "cpu", "--batch-size", "2", "--crop", "64",
        "--proposals", "8", "--templates", "single", "--no-progress",
    ]  # fmt: skip
    assert train_deop.main([*common, "--steps", "3", "--checkpoint-every", "2"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    final = metrics["validation"][-1]
    assert final["step"] == 3 and {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(final)
    assert train_deop.main([*common, "--steps", "5", "--resume"]) == 0
    clip = tiny_clip()
    checkpoint = load_checkpoint(output / CHECKPOINT_NAME, clip)
    assert checkpoint.training["step"] == 5
    deop = Deop(clip, checkpoint=str(output / CHECKPOINT_NAME))
    deop.set_classes(["red circle", "stripes"])
    assert deop.segment(np.zeros((40, 50, 3), np.uint8)).labels.shape == (40, 50)
    assert train_deop.main([*common, "--steps", "0"]) == 2
    # a new run into the folder of an earlier one would silently replace its checkpoint
    before = (output / CHECKPOINT_NAME).read_bytes()
    assert train_deop.main([*common, "--steps", "3"]) == 2
    assert (output / CHECKPOINT_NAME).read_bytes() == before
    missing = ["folder", str(tmp_path / "missing"), "--stage", "head", "--no-progress"]
    assert train_deop.main(missing) == 2
    fresh = [*common[:5], str(tmp_path / "fresh"), *common[6:]]
    assert train_deop.main([*fresh, "--resume"]) == 2  # nothing to resume
