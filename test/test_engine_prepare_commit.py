"""A change prepared on one thread while another segments, then committed between two frames.

``Segmenter.prepare_update`` encodes and loads for the end state without changing anything in
force (frames segmented meanwhile, from another thread, use the old vocabulary); ``commit`` swaps
it in; a commit against a state that changed since is refused; ``cancel`` stops the encoding and
the texts finished by then stay cached. ``side_encoding``: the CUDA streams are made only where
CUDA is, and on a CPU the encoding thread's thread count and niceness are its own.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

import ovss_ros.core.clip.text_encoding as text_encoding
from ovss_ros.core import EngineConfig, Segmenter, Stopped, side_encoding
from ovss_ros.core.side_encoding import ENCODER_NICE, ENCODER_THREADS, SideEncoding

CLASSES = ["person", "tv; television", "dog | a furry pet that barks"]


@pytest.fixture()
def segmenter(monkeypatch):
    monkeypatch.setattr(text_encoding, "PROMPT_BATCH", 4)  # many batches: stops between them
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


@pytest.fixture()
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[0][:80, :96])


def test_frames_segmented_while_a_change_is_prepared_use_the_vocabulary_in_force(
    segmenter, rgb, monkeypatch
):
    before = segmenter.segment(rgb)
    encode = text_encoding.TextEncoder.encode_prompts
    inside, release = threading.Event(), threading.Event()

    def held(self, prompts):  # the encoding waits, mid-way, until frames were segmented
        inside.set()
        assert release.wait(60)
        return encode(self, prompts)

    monkeypatch.setattr(text_encoding.TextEncoder, "encode_prompts", held)
    prepared = []
    thread = threading.Thread(
        target=lambda: prepared.append(segmenter.prepare_update(["cat", "sofa", "plant"]))
    )
    thread.start()
    assert inside.wait(60)
    during = segmenter.segment(rgb)  # the frame thread, while the other encodes
    release.set()
    thread.join(60)
    np.testing.assert_array_equal(during.labels, before.labels)
    np.testing.assert_array_equal(during.confidence, before.confidence)
    assert (
        during.class_names
        == before.class_names
        == [c.split(";")[0].split("|")[0].strip() for c in CLASSES]
    )
    # Prepared, not in force: the state is the old one until the commit.
    assert [c.name for c in segmenter.classes] == ["person", "tv", "dog"]
    np.testing.assert_array_equal(segmenter.segment(rgb).labels, before.labels)
    monkeypatch.setattr(text_encoding.TextEncoder, "encode_prompts", encode)
    segmenter.commit(prepared[0])
    assert [c.name for c in segmenter.classes] == ["cat", "sofa", "plant"]
    # The same result as the one-step update on a fresh engine state.
    after = segmenter.segment(rgb)
    segmenter.update(classes=CLASSES)
    segmenter.update(classes=["cat", "sofa", "plant"])
    np.testing.assert_array_equal(segmenter.segment(rgb).labels, after.labels)


def test_a_change_prepared_against_an_older_state_is_refused(segmenter):
    first = segmenter.prepare_update(["cat"])
    second = segmenter.prepare_update(["bird"])
    segmenter.commit(first)
    with pytest.raises(RuntimeError, match="older state"):
        segmenter.commit(second)
    assert [c.name for c in segmenter.classes] == ["cat"]


def test_cancel_stops_the_encoding_and_keeps_the_texts_it_finished(segmenter, monkeypatch):
    cancel = threading.Event()
    encode = text_encoding.TextEncoder.encode_prompts
    batches = []

    def counted(self, prompts):
        batches.append(len(prompts))
        if len(batches) == 3:  # 12 prompts in: 6 texts of 2 templates finished
            cancel.set()
        return encode(self, prompts)

    monkeypatch.setattr(text_encoding.TextEncoder, "encode_prompts", counted)
    names = [f"thing {n}" for n in range(10)]
    with pytest.raises(Stopped):
        segmenter.prepare_update(names, cancel=cancel)
    assert [c.name for c in segmenter.classes] == ["person", "tv", "dog"]
    templates = segmenter.text.templates
    cached = [name for name in names if (templates, name) in segmenter.text.cache]
    assert cached == names[:6]
    # The change that supersedes it encodes only the rest; its embeddings equal a fresh run's.
    batches.clear()
    segmenter.commit(segmenter.prepare_update(names))
    assert sum(batches) == 4 * 2
    fresh = text_encoding.TextEncoder(
        segmenter.clip.model, segmenter.clip.tokenizer, "a {}.|a photo of a {}."
    )
    torch.testing.assert_close(
        segmenter.text.embeddings(names), fresh.embeddings(names), rtol=0, atol=0
    )


def test_the_node_stop_still_stops_a_prepare_with_a_cancel_event(segmenter):
    segmenter.stop.set()
    with pytest.raises(Stopped):
        segmenter.prepare_update(["cat", "bird"], cancel=threading.Event())
    assert segmenter.text.stop is segmenter.stop  # put back after the prepare


def test_texts_to_encode_counts_what_is_not_cached(segmenter):
    assert segmenter.texts_to_encode(None, {"score_threshold": 0.5}) == 0
    # person cached; cat new; bird new with a description (a sentence of its own)
    assert segmenter.texts_to_encode(["person", "cat", "bird | a bird in the sky"]) == 3
    # new templates: every query text again (3 classes' 4 synonyms + 1 background word;
    # the description is a sentence, encoded without templates: cached).
    assert segmenter.texts_to_encode(None, {"templates": "single"}) == 5


def test_on_a_cpu_no_stream_is_made_and_the_encoding_thread_alone_is_bounded():
    side = SideEncoding(torch.device("cpu"))
    assert side.frame_stream is None and side.encode_stream is None
    with side.frames(), side.encoding():
        pass
    own_threads = torch.get_num_threads()
    own_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def encoding_thread():
        side.encoding_thread()
        seen["threads"] = torch.get_num_threads()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def frame_thread():  # started after the encoding thread set its count
        side.frame_thread()
        seen["frame threads"] = torch.get_num_threads()

    for target in (encoding_thread, frame_thread):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen["threads"] == min(ENCODER_THREADS, side.frame_threads)
    assert seen["nice"] == min(19, own_nice + ENCODER_NICE)
    assert seen["frame threads"] == side.frame_threads == own_threads
    assert torch.get_num_threads() == own_threads
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own_nice


def test_the_encoding_threads_bound_leaks_to_no_other_thread():
    """The node starts the frame thread first: it pins its count, then the encoding thread
    bounds its own. torch's thread count is set per thread only once a thread has initialised
    it (its first parallel region reads the process's last count): the frame thread, and a
    thread started afterwards, keep the process's count."""
    own_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's count, also on a 1-core machine
    side = SideEncoding(torch.device("cpu"))
    pinned, bounded, checked = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def frame_thread():
        side.frame_thread()
        pinned.set()
        bounded.wait(60)
        seen["frame threads"] = torch.get_num_threads()
        checked.set()

    def encoding_thread():
        pinned.wait(60)
        side.encoding_thread()
        bounded.set()
        checked.wait(60)
        seen["encoding threads"] = torch.get_num_threads()

    def later_thread():
        seen["later threads"] = torch.get_num_threads()

    threads = [threading.Thread(target=t) for t in (frame_thread, encoding_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    later = threading.Thread(target=later_thread)
    later.start()
    later.join(60)
    torch.set_num_threads(own_threads)
    assert seen == {
        "frame threads": 2,
        "encoding threads": min(ENCODER_THREADS, 2),
        "later threads": 2,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda_makes_no_stream():
    side = SideEncoding(torch.device("cuda"))
    assert side.frame_stream is None and side.encode_stream is None


def test_on_cuda_frames_get_the_high_priority_stream_and_encoding_the_low_one(monkeypatch):
    """CUDA's calls replaced by recorders (no GPU here): which streams are made, with which
    priorities, which is current where, and that the encoding stream is waited for."""
    made, current, synced = [], [], []

    class Stream:
        def __init__(self, device, priority):
            self.priority = priority
            made.append(self)

        def synchronize(self):
            synced.append(self.priority)

    @contextlib.contextmanager
    def stream(chosen):
        current.append(chosen.priority)
        yield

    monkeypatch.setattr(side_encoding.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(side_encoding.torch.cuda, "Stream", Stream)
    monkeypatch.setattr(side_encoding.torch.cuda, "stream", stream)
    monkeypatch.setattr(side_encoding.torch.cuda, "synchronize", lambda device: synced.append(-1))
    side = SideEncoding(torch.device("cuda"))
    assert [s.priority for s in made] == [side_encoding.FRAME_PRIORITY, 0]
    assert synced == [-1]  # the default stream's work (the weights) done before
    with side.frames():
        pass
    with side.encoding():
        assert synced == [-1]  # not yet: the encoding is still running
    assert current == [side_encoding.FRAME_PRIORITY, 0]
    assert synced == [-1, 0]


def test_a_pipeline_methods_vocabulary_change_counts_every_text(segmenter):
    """A pipeline method (DeOP's family, PnP-OVSS) gets a new pipeline on a vocabulary change,
    which encodes every text itself (DeOP's learned prompt bypasses the engine's cache): the
    change is slow (prepared beside the frames) even when every text is in the cache."""
    segmenter.update(None, {"method": "superpixel_clip"})
    # Removing a class: every text is cached, yet the new pipeline encodes the rest itself.
    assert segmenter.texts_to_encode(["person", "tv; television"], {}) == 3 + 1
    assert segmenter.texts_to_encode(None, {"score_threshold": 0.5}) == 0
