"""The real loading paths (checkpoint file, config file, tags) and one clear error per failure."""

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_B32

from ovss_ros.core.model_loading import ModelLoadError, load_clip


def test_saved_checkpoint_loads_through_local_file(tmp_path):
    torch.manual_seed(4)
    source = load_clip(str(TINY_VIT), "none", "cpu").model
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(5)  # a different random init, so equality proves the file was loaded
    loaded = load_clip(str(TINY_VIT), str(path), "cpu")
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.patch_size == 16 and loaded.device == torch.device("cpu")
    assert loaded.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_loaded_model_is_in_eval_mode_without_grad():
    loaded = load_clip(str(TINY_VIT), "none", "cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize(
    ("model", "pretrained", "kwargs", "message"),
    [
        ("ViT-Q-99", "none", {}, "unknown model 'ViT-Q-99': set model"),
        ("/nonexistent/config.json", "none", {}, "model config file .* not found"),
        (str(TINY_VIT), "/nonexistent/weights.pt", {}, "checkpoint file .* not found"),
        ("ViT-B-16", "no_such_tag", {}, "unknown pretrained tag 'no_such_tag' for ViT-B-16"),
        (str(TINY_VIT), "none", {"precision": "fp16"}, "needs a GPU"),
        (str(TINY_VIT), "none", {"precision": "fp8"}, "unknown precision"),
        (str(TINY_VIT), "none", {"device": "tpu:7"}, "unknown device"),
        ("RN50", "none", {}, "no plain open_clip ViT image tower"),
    ],
)
def test_load_errors_say_what_to_set(model, pretrained, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_clip(model, pretrained, **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="CUDA is not available: set device"):
        load_clip(str(TINY_VIT), "none", "cuda:0")


def test_hub_tag_without_network_is_a_clear_error():
    """HF_HUB_OFFLINE=1 (conftest): a real tag cannot download here, and the message says why."""
    with pytest.raises(ModelLoadError, match="local checkpoint file"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k", "cpu")


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(load_clip(str(TINY_VIT_B32), "none", "cpu").model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="matches the model architecture"):
        load_clip(str(TINY_VIT), str(path), "cpu")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_clip(str(TINY_VIT), str(path), "cpu")
