"""The stop event: text encoding and every inference stage give up once it is set.

Waits are on events with generous limits; nothing asserts on time. "Promptly" is shown by
counting work: after the event is set, no further prompt batch or stage runs.
"""

import threading

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter, Stopped
from ovss_ros.core.clip.text_encoding import PROMPT_BATCH, TextEncoder
from ovss_ros.core.methods.dense import fused

WAIT_S = 120.0  # generous: only reached if the code under test is broken


@pytest.fixture()
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64, templates="single"
    )
    segmenter = Segmenter(config, stop=threading.Event())
    segmenter.set_classes(["person", "tv; monitor", "dog"])
    return segmenter


def state(segmenter):
    return (
        list(segmenter.classes),
        segmenter.config,
        segmenter.text.templates,
        segmenter.method._text_embeddings.clone(),
        segmenter.method._query_owner.clone(),
    )


def assert_same_state(before, segmenter):
    after = state(segmenter)
    assert after[:3] == before[:3]
    assert all(torch.equal(a, b) for a, b in zip(after[3:], before[3:], strict=True))


def stop_from_another_thread(monkeypatch, segmenter):
    """After the first prompt batch, another thread sets the stop event; the batch returns only
    once it is set, so the event is set while encoding is under way. Returns the batch log."""
    real = TextEncoder.encode_prompts
    first_batch_done = threading.Event()
    batches = []

    def encode_prompts(self, prompts):
        batches.append(len(prompts))
        result = real(self, prompts)
        if len(batches) == 1:
            first_batch_done.set()
            assert segmenter.stop.wait(WAIT_S), "the stopping thread never set the event"
        return result

    def stopper():
        if first_batch_done.wait(WAIT_S):
            segmenter.stop.set()

    monkeypatch.setattr(TextEncoder, "encode_prompts", encode_prompts)
    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    return batches, thread


LONG_VOCABULARY = [f"thing number {i}" for i in range(1000)]


def test_stop_interrupts_a_1000_class_vocabulary_with_80_templates(
    segmenter, voc_rgb, monkeypatch
):
    segmenter.reconfigure(templates="imagenet")
    labels = segmenter.segment(voc_rgb[0]).labels
    before = state(segmenter)
    batches, thread = stop_from_another_thread(monkeypatch, segmenter)
    with pytest.raises(Stopped):
        segmenter.set_classes(LONG_VOCABULARY)  # 80000 prompts: 313 batches
    thread.join(WAIT_S)
    assert batches == [PROMPT_BATCH]  # no batch ran after the event was set
    assert_same_state(before, segmenter)
    segmenter.stop.clear()  # the engine never clears it; the test does, to segment again
    np.testing.assert_array_equal(segmenter.segment(voc_rgb[0]).labels, labels)


def test_stop_interrupts_a_template_change(segmenter, voc_rgb, monkeypatch):
    labels = segmenter.segment(voc_rgb[0]).labels
    before = state(segmenter)
    batches, thread = stop_from_another_thread(monkeypatch, segmenter)
    with pytest.raises(Stopped):
        segmenter.reconfigure(templates="imagenet", score_threshold=0.5)  # 4 x 80 prompts
    thread.join(WAIT_S)
    assert batches == [PROMPT_BATCH]
    assert_same_state(before, segmenter)
    segmenter.stop.clear()
    np.testing.assert_array_equal(segmenter.segment(voc_rgb[0]).labels, labels)


STAGES = ["preprocess", "encode", "head", "postprocess"]


def record_stages(monkeypatch, segmenter, stop_after: str | None, calls: list[str]) -> None:
    """Wrap the stage methods on this instance: log each call, set the event after one."""
    for name in STAGES:
        real = getattr(segmenter.method, name)

        def stage(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            result = _real(*args, **kwargs)
            if _name == stop_after:
                segmenter.stop.set()
            return result

        monkeypatch.setattr(segmenter.method, name, stage)


@pytest.mark.parametrize(
    ("stop_after", "ran"),
    [
        (None, []),  # set before the call: nothing runs
        ("preprocess", ["preprocess"]),  # the second image is not even preprocessed
        ("encode", ["preprocess", "preprocess", "encode"]),
        ("head", ["preprocess", "preprocess", "encode", "head"]),
        # first image of the first batch group done: nothing more, not the next group
        ("postprocess", ["preprocess", "preprocess", "encode", "head", "postprocess"]),
    ],
)
def test_each_stage_checks_the_event(segmenter, voc_rgb, monkeypatch, stop_after, ran):
    images = [voc_rgb[0], voc_rgb[1]]  # different sizes: two batch groups
    assert len(segmenter.batch_groups(images)) == 2
    calls: list[str] = []
    record_stages(monkeypatch, segmenter, stop_after, calls)
    if stop_after is None:
        segmenter.stop.set()
    with pytest.raises(Stopped, match="stop requested before"):
        segmenter.segment_many(images)
    assert calls == ran


def test_without_a_stop_event_every_stage_runs(voc_rgb):
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64, templates="single"
    )
    segmenter = Segmenter(config)
    assert segmenter.stop is None and segmenter.text.stop is None
    segmenter.set_classes(["person", "dog"])
    assert len(segmenter.segment_many([voc_rgb[0], voc_rgb[1]])) == 2


def test_postprocess_checks_the_event_between_query_chunks(segmenter, voc_rgb, monkeypatch):
    """The torch path (CUDA, JBU, PAMR; here forced on the CPU): between chunks of queries."""
    monkeypatch.setattr(segmenter.method, "cpu_kernel", False)
    monkeypatch.setattr(segmenter.method, "_chunk", lambda encoded, size: 1)  # one query per chunk
    real = segmenter.method._to_input
    chunks = []

    def to_input(*args, **kwargs):
        chunks.append(1)
        segmenter.stop.set()  # set during the first chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter.method, "_to_input", to_input)
    with pytest.raises(Stopped, match="postprocess of queries 1"):
        segmenter.segment(voc_rgb[0])
    assert len(chunks) == 1 < len(segmenter.method._query_owner)


def test_the_cpu_kernel_checks_the_event_first(segmenter, voc_rgb, monkeypatch):
    """The CPU kernel (one pass, ~0.1 s for 1000 classes) checks once, before it starts."""
    calls = []
    monkeypatch.setattr(fused, "reduce", lambda *args, **kwargs: calls.append(args))
    method = segmenter.method
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(voc_rgb[0]))
        logits, _ = method.head(encoded)
    segmenter.stop.set()
    try:
        with pytest.raises(Stopped, match="stop requested before postprocess"):
            method.postprocess(encoded, logits, None, voc_rgb[0].shape[:2])
    finally:
        segmenter.stop.clear()
    assert not calls
