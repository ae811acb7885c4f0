"""The text side: templates, the cut forward, and the per-class cache."""

import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.core.engine import EngineConfig, Segmenter
from ovss_ros.core.model_loading import load_clip
from ovss_ros.core.text_encoding import TextEncoder, template_set


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def test_cut_prompts_equal_padded_encode_text(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "single")
    prompts = ["a photo of a cat.", "a photo of a door handle with a very long description."]
    with torch.no_grad():
        padded = clip.model.encode_text(clip.tokenizer(prompts))
    cut = encoder.encode_prompts(prompts)
    assert cut.shape == padded.shape
    assert (cut - padded).abs().max().item() <= 1e-5


def test_embedding_is_normalised_template_mean(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "a {}.|a photo of a {}.")
    with torch.no_grad():
        raw = clip.model.encode_text(clip.tokenizer(["a cup.", "a photo of a cup."]))
    raw = raw / raw.norm(dim=-1, keepdim=True)
    want = raw.mean(0) / raw.mean(0).norm()
    assert torch.allclose(encoder.embeddings(["cup"])[0], want, atol=1e-5)


def test_cache_encodes_only_new_texts(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "imagenet")
    first = encoder.embeddings(["cup", "door handle"])
    assert encoder.prompts_encoded == 2 * 80
    again = encoder.embeddings(["door handle", "wet floor", "cup"])
    assert encoder.prompts_encoded == 3 * 80  # only "wet floor" was new
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    encoder.set_templates("single")  # new templates: every text must be encoded again
    encoder.embeddings(["cup"])
    assert encoder.prompts_encoded == 3 * 80 + 1


def test_segmenter_vocabulary_change_encodes_one_class():
    segmenter = Segmenter(
        EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    )
    segmenter.set_classes(["person", "tv; television; monitor", "dog"])
    assert segmenter.text.prompts_encoded == 5
    segmenter.set_classes(["person", "tv; television; monitor", "cat"])
    assert segmenter.text.prompts_encoded == 6


@pytest.mark.parametrize("bad", ["", "no placeholder", "a {}.|oops"])
def test_bad_templates_rejected(bad):
    with pytest.raises(ValueError, match="templates"):
        template_set(bad)


def test_imagenet_templates_are_the_80_openai_ones():
    templates = template_set("imagenet")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    assert "a photo of a {}." in templates
