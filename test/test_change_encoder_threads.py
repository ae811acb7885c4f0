"""Which thread prepares a change (``ChangeEncoder``): a quick change at the frames' priority, a
slow one (texts to encode) on the low-priority thread.

A thread's nice value cannot be lowered again without privileges, so a quick change prepared on
the nice +10 encoding thread could wait seconds for a core on a loaded machine, and the frame
worker, which waits for a quick change, would give up and segment the next frame without it
(seen under a CPU hog: a frame over a just-lowered ``max_input_pixels`` was served).

A real rclpy node with the node's parameters and transactions, a real Segmenter (tiny CLIP);
the worker's side (take, commit, done) is played by the test thread.
"""

from __future__ import annotations

import os
import threading

import pytest
import rclpy
import torch
from conftest import TINY_VIT
from rclpy.node import Node
from rclpy.parameter import Parameter
from ros_harness import isolate_dds

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.side_encoding import ENCODER_NICE, ENCODER_THREADS
from ovss_ros.ros import parameters
from ovss_ros.ros.change_encoder import ChangeEncoder
from ovss_ros.ros.request_guard import CallbackFaults
from ovss_ros.ros.transactions import ParameterTransactions

WAIT_S = 120.0  # generous: a loaded machine
NAME = "test_change_encoder"


class Harness:
    def __init__(
        self, node: Node, segmenter: Segmenter, seen: list[dict], stop: threading.Event
    ) -> None:
        self.node, self.segmenter, self.seen, self.stop = node, segmenter, seen, stop
        self.handed = threading.Event()
        self.errors: list[BaseException] = []
        self.encoder: ChangeEncoder | None = None
        values = parameters.declare_parameters(node)
        values["classes"] = ["cat", "dog"]
        node.set_parameters([Parameter("classes", value=values["classes"])])
        self.tx = ParameterTransactions(
            node, values, CallbackFaults(print), check=lambda *_: None, wake=self.wake
        )
        self.tx.install()
        self.tx.loaded(dict(values), self.tx.settings)

    def wake(self) -> None:
        if self.encoder is not None:
            self.encoder.wake()

    def start(self) -> ChangeEncoder:
        self.encoder = ChangeEncoder(
            self.tx,
            lambda: self.segmenter,
            hand_over=self.handed.set,
            stop=self.stop,
            on_error=self.errors.append,
            name=NAME,
        )
        self.encoder.start()
        return self.encoder

    def change(self, name: str, value) -> dict:
        """Set one parameter, play the worker until it is in force; what prepared it."""
        count = len(self.seen)
        result = self.node.set_parameters([Parameter(name, value=value)])[0]
        assert result.successful, result.reason
        assert self.handed.wait(WAIT_S), "the change was never handed over"
        self.handed.clear()
        handover = self.encoder.take()
        assert handover is not None
        assert self.tx.commit(self.segmenter, handover) is None
        self.encoder.done()
        assert len(self.seen) == count + 1
        return self.seen[-1]


@pytest.fixture()
def harness():
    isolate_dds()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = Node("ovss", context=context)
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64)
    stop = threading.Event()  # the node's: the segmenter's and the encoder's
    segmenter = Segmenter(config, stop=stop)
    segmenter.set_classes(["cat", "dog"])
    prepare_update = segmenter.prepare_update
    seen: list[dict] = []
    gate, entered, left = threading.Event(), threading.Event(), threading.Event()
    gate.set()

    def recorded(*args, **kwargs):
        seen.append(
            {
                "thread": threading.current_thread().name,
                "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                "threads": torch.get_num_threads(),
            }
        )
        entered.set()
        try:
            assert gate.wait(WAIT_S)
            return prepare_update(*args, **kwargs)
        finally:
            left.set()

    segmenter.prepare_update = recorded
    # The held preparation stops with the node as text encoding does (between batches).
    threading.Thread(target=lambda: (stop.wait(), gate.set()), daemon=True).start()
    h = Harness(node, segmenter, seen, stop)
    h.gate, h.entered, h.left = gate, entered, left
    try:
        yield h
    finally:
        if h.encoder is not None:
            h.encoder.stop()
        gate.set()
        if entered.is_set():  # the preparation ends (Stopped) before the process may exit
            assert left.wait(WAIT_S)
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_quick_changes_run_at_the_frames_priority_and_slow_ones_bounded(harness):
    own_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    harness.start()
    # Before and after the low-priority thread exists (new words: encoded texts stay cached).
    for words in (["bird", "sofa"], ["horse", "train"]):
        quick = harness.change("dense.logit_scale", 50.0)
        assert quick["thread"] == NAME
        assert quick["nice"] == own_nice
        slow = harness.change("classes", [*words, "cat"])
        assert slow["thread"] == f"{NAME}_slow"
        assert slow["nice"] == min(19, own_nice + ENCODER_NICE)
        assert slow["threads"] == min(ENCODER_THREADS, torch.get_num_threads())
        harness.change("classes", ["cat", "dog"])
        harness.change("dense.logit_scale", 40.0)
    assert [entry.name for entry in harness.segmenter.classes] == ["cat", "dog"]
    assert harness.segmenter.config.dense.logit_scale == 40.0
    assert not harness.errors


def test_a_stop_ends_a_slow_preparation_and_waits_for_it(harness):
    encoder = harness.start()
    harness.gate.clear()
    result = harness.node.set_parameters([Parameter("classes", value=["bird", "sofa"])])[0]
    assert result.successful
    # The preparation is held on the slow thread (waiting on the gate) ...
    assert harness.entered.wait(WAIT_S)
    assert harness.seen[-1]["thread"] == f"{NAME}_slow"
    # ... and the stop ends it: the encoding checks the stop event, and the stop waits for the
    # low-priority thread too, so nothing of the change runs on while the process exits.
    assert encoder.stop(timeout=WAIT_S)
    assert not encoder.alive
    assert harness.left.is_set()
    assert not harness.handed.is_set()
    assert not harness.errors
