"""set_classes and reconfigure are all-or-nothing: faults injected inside the real text tower.

The engine encodes first and swaps its state in only on success. Each test makes a change fail
at a chosen point (the real ``TextEncoder.encode_prompts`` raising after N prompt batches, as a
CUDA out-of-memory would; the stop event; a refused value) and checks that every observable
piece of state, and the labels of the next frame, are bit-identical to before.
"""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

import ovss_ros.core.clip.text_encoding as text_encoding
from ovss_ros.core import (
    EngineConfig,
    Segmenter,
    Stopped,
    VocabularyError,
)
from ovss_ros.core.clip.text_encoding import TextEncoder

CLASSES = ["person", "tv; television; monitor", "dog | a furry pet that barks"]


@pytest.fixture()
def segmenter(monkeypatch):
    monkeypatch.setattr(text_encoding, "PROMPT_BATCH", 4)  # many batches: faults between them
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT),
        pretrained="none",
        device="cpu",
        short_side=64,
        templates="a {}.|a photo of a {}.",
        background_words=("sky",),
    )
    segmenter = Segmenter(config, stop=threading.Event())
    segmenter.set_classes(CLASSES)
    return segmenter


def snapshot(segmenter: Segmenter) -> dict:
    """Every piece of state a change may touch, copied."""
    return {
        "classes": list(segmenter.classes),
        "config": dataclasses.replace(segmenter.config),
        "templates": segmenter.text.templates,
        "embeddings": segmenter.method._text_embeddings.clone(),
        "owner": segmenter.method._query_owner.clone(),
        "class_queries": segmenter.method._class_queries,
        "class_text": segmenter.method._class_text.clone(),
        "descriptions": segmenter.method._descriptions.clone(),
    }


def assert_unchanged(before: dict, segmenter: Segmenter) -> None:
    after = snapshot(segmenter)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def fail_after(monkeypatch, batches: int, error: BaseException) -> list[int]:
    """The real text tower, raising ``error`` on the call after ``batches`` successful ones."""
    real = TextEncoder.encode_prompts
    calls = []

    def encode_prompts(self, prompts):
        calls.append(len(prompts))
        if len(calls) > batches:
            raise error
        return real(self, prompts)

    monkeypatch.setattr(TextEncoder, "encode_prompts", encode_prompts)
    return calls


FAULTS = {
    "out-of-memory": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "value-error": ValueError("bad tokens"),
    "stopped": Stopped("stop requested"),
}
CHANGES = {
    # a new vocabulary: 40 new words x 2 templates = 20 batches of 4
    "classes": lambda s: s.set_classes([f"thing {i}" for i in range(40)]),
    # only the descriptions are new (10 sentences, 3 batches): the failure hits their encoding
    "descriptions": lambda s: s.set_classes(
        [*CLASSES[:2], "dog | " + " | ".join(f"a big loyal hound no. {i}" for i in range(10))]
    ),
    "templates": lambda s: s.reconfigure(templates="a {} in a house.|itap of a {}.|a {}"),
    "background": lambda s: s.reconfigure(background_words=("sky", "wall", "floor", "ceiling")),
    "templates+threshold": lambda s: s.reconfigure(templates="the {}.", score_threshold=0.5),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("batches", [0, 1])
def test_failure_inside_the_text_tower_changes_nothing(
    segmenter, voc_rgb, monkeypatch, change, fault, batches
):
    rgb = voc_rgb[0]
    labels_before = segmenter.segment(rgb)
    before = snapshot(segmenter)
    calls = fail_after(monkeypatch, batches, FAULTS[fault])
    with pytest.raises(type(FAULTS[fault])):
        CHANGES[change](segmenter)
    assert len(calls) == batches + 1  # the fault fired inside the tower, after N batches
    assert_unchanged(before, segmenter)
    after = segmenter.segment(rgb)
    np.testing.assert_array_equal(after.labels, labels_before.labels)
    np.testing.assert_array_equal(after.confidence, labels_before.confidence)
    assert after.class_names == labels_before.class_names


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s.set_classes(["cup", "Cup"]), VocabularyError),
        (lambda s: s.set_classes(["cup\n[ERROR] forged"]), VocabularyError),
        (lambda s: s.set_classes([f"t{i}; u{i}" for i in range(1000)]), VocabularyError),
        (lambda s: s.reconfigure(templates="a photo of a {} in the {room}."), ValueError),
        (lambda s: s.reconfigure(templates="a {} of {}"), ValueError),
        (
            lambda s: s.reconfigure(background_words=tuple(f"w{i}" for i in range(1001))),
            ValueError,
        ),
        (lambda s: s.reconfigure({"dense.crop": 40}, templates="the {}."), ValueError),
        (lambda s: s.reconfigure(max_long_side=8, background_words=()), ValueError),
    ],
    ids=[
        "duplicate",
        "newline",
        "too-many-queries",
        "named-field",
        "two-fields",
        "too-many-background-words",
        "crop-with-templates",
        "long-side-with-background",
    ],
)
def test_refused_change_encodes_nothing_and_changes_nothing(segmenter, voc_rgb, change, error):
    labels_before = segmenter.segment(voc_rgb[1]).labels
    before = snapshot(segmenter)
    prompts = segmenter.text.prompts_encoded
    with pytest.raises(error):
        change(segmenter)
    assert segmenter.text.prompts_encoded == prompts
    assert_unchanged(before, segmenter)
    np.testing.assert_array_equal(segmenter.segment(voc_rgb[1]).labels, labels_before)


def test_query_limit_counts_the_new_background_words(segmenter):
    segmenter.set_classes([f"t{i}; u{i}" for i in range(999)])  # 1998 queries with "sky"
    segmenter.reconfigure(background_words=("sky", "wall"))  # 2000: the limit
    with pytest.raises(VocabularyError, match="too many text queries: 2001"):
        segmenter.reconfigure(background_words=("sky", "wall", "floor"))
    assert segmenter.config.background_words == ("sky", "wall")


def test_after_a_failed_template_change_the_next_vocabulary_uses_the_old_templates(
    segmenter, monkeypatch
):
    """The fault of the issue: a later classes change must not mix old and new settings."""
    fail_after(monkeypatch, 1, RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError):
        segmenter.reconfigure(templates="a {} in a house.|itap of a {}.")
    monkeypatch.undo()
    segmenter.set_classes(["cat", "dog"])
    model, tokenizer = segmenter.clip.model, segmenter.clip.tokenizer
    old = TextEncoder(model, tokenizer, "a {}.|a photo of a {}.").embeddings(["cat", "dog", "sky"])
    new = TextEncoder(model, tokenizer, "a {} in a house.|itap of a {}.").embeddings(["cat"])
    # equal up to float rounding (prompts batched differently), far from the failed templates
    torch.testing.assert_close(segmenter.method._text_embeddings, old, atol=1e-5, rtol=0)
    assert (segmenter.method._text_embeddings[0] - new[0]).abs().max() > 1e-2
    assert segmenter.method._query_owner.tolist() == [0, 1, 2]  # "sky" is background, label 2


def test_a_successful_change_equals_a_fresh_engine_with_those_settings(segmenter, voc_rgb):
    segmenter.reconfigure(templates="itap of a {}.", background_words=("sky", "wall"))
    segmenter.set_classes(["person", "cat; kitten"])
    torch.manual_seed(0)
    fresh = Segmenter(dataclasses.replace(segmenter.config))
    fresh.set_classes(["person", "cat; kitten"])
    torch.testing.assert_close(
        fresh.method._text_embeddings, segmenter.method._text_embeddings, atol=1e-5, rtol=0
    )
    assert torch.equal(fresh.method._query_owner, segmenter.method._query_owner)
    np.testing.assert_array_equal(
        fresh.segment(voc_rgb[0]).labels, segmenter.segment(voc_rgb[0]).labels
    )
    assert [c.name for c in segmenter.classes] == ["person", "cat"]


def test_failed_attempts_do_not_grow_the_text_cache_without_bound(segmenter, monkeypatch):
    """Each attempt caches its new words, then fails on its description: trimmed on failure."""
    monkeypatch.setattr(text_encoding, "CACHE_LIMIT", 10)
    real = TextEncoder.encode_prompts

    def encode_prompts(self, prompts):
        if any("a deep dish" in prompt for prompt in prompts):
            raise RuntimeError("CUDA out of memory")
        return real(self, prompts)

    monkeypatch.setattr(TextEncoder, "encode_prompts", encode_prompts)
    in_use = len(segmenter.text.cache)  # 6 words (5 synonyms + "sky") and 1 description
    assert in_use == 7
    for attempt in range(6):
        with pytest.raises(RuntimeError):
            segmenter.set_classes([f"cup {attempt}", f"bowl {attempt} | a deep dish {attempt}"])
        assert len(segmenter.text.cache) <= 10
    assert [c.name for c in segmenter.classes] == ["person", "tv", "dog"]
    cached = {text for _, text in segmenter.text.cache}
    assert {"person", "television", "sky", "a furry pet that barks"} <= cached
