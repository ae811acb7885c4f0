"""The real loading paths (checkpoint file, config file, tags) and one clear error per failure."""

import json

import open_clip
import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_B32
from open_clip.transformer import QuickGELU

from ovss_ros.core.clip.model_loading import ModelLoadError, load_clip, needs_quick_gelu

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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


def activations(model: torch.nn.Module) -> set[type]:
    """The activation classes of every MLP in both towers."""
    return {type(block.mlp.gelu) for block in model.modules() if hasattr(block, "mlp")}


@pytest.mark.parametrize(
    ("model", "pretrained", "needed"),
    [
        ("ViT-B-16", "openai", True),  # open_clip would build nn.GELU and only warn
        ("ViT-B-32", "openai", True),
        ("ViT-L-14", "openai", True),
        ("ViT-B-16", "metaclip_fullcc", True),
        ("ViT-B-16", "dfn2b", True),
        ("ViT-B-16-quickgelu", "openai", False),  # the name already builds QuickGELU
        ("ViT-B-16", "laion2b_s34b_b88k", False),  # trained with nn.GELU
        ("ViT-B-16", None, False),  # random weights
    ],
)
def test_quick_gelu_tags(model, pretrained, needed):
    """The decision from open_clip's own registry (no download): tag trained with QuickGELU,
    model config without it."""
    assert needs_quick_gelu(model, pretrained) is needed


@pytest.fixture()
def quick_gelu_tag(tmp_path, monkeypatch):
    """A pretrained tag of tiny-vit-b32 in open_clip's registry, trained with QuickGELU like
    OpenAI's, whose weights are a locally saved file (open_clip's ``file`` entry: no hub)."""
    torch.manual_seed(7)
    state = load_clip(str(TINY_VIT_B32), "none", "cpu").model.state_dict()
    path = tmp_path / "tiny-openai.pt"
    torch.save(state, path)
    entry = {"file": str(path), "quick_gelu": True, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-vit-b32", {"quicktag": entry})
    return state, path


def test_quick_gelu_tag_loads_with_quick_gelu(quick_gelu_tag):
    state, _ = quick_gelu_tag
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):  # the fault, in open_clip
        stock = open_clip.create_model("tiny-vit-b32", pretrained="quicktag")
    assert activations(stock) == {torch.nn.GELU}
    loaded = load_clip(str(TINY_VIT_B32), "quicktag", "cpu")
    assert activations(loaded.model) == {QuickGELU}
    for name, tensor in state.items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # same weights, other activation: another function
        assert (loaded.model.encode_image(pixels) - stock.encode_image(pixels)).abs().max() > 1e-4


def test_checkpoint_file_keeps_the_named_activation(quick_gelu_tag, tmp_path):
    """A file says nothing about its activation: the model name decides (a -quickgelu config
    for OpenAI weights in a file)."""
    _, path = quick_gelu_tag
    assert activations(load_clip(str(TINY_VIT_B32), str(path), "cpu").model) == {torch.nn.GELU}
    config = json.loads(TINY_VIT_B32.read_text())
    quick = tmp_path / "tiny-vit-b32-quickgelu.json"
    quick.write_text(json.dumps({**config, "quick_gelu": True}))
    assert activations(load_clip(str(quick), str(path), "cpu").model) == {QuickGELU}
