"""Issue 20: a model slower than the diagnostics window is reported as busy, not stuck.

The real node's frame processing on the tiny random open_clip engine, with a forward pass held
open by an event (as a slow pnp_ovss / sd2 on a CPU holds it): the diagnostics read while it
runs say OK "segmenting a frame (N s so far)"; once it ends, the busy state is gone.
"""

from __future__ import annotations

import threading

from test_node_worker import FaultySegmenter, frame, make_node

from ovss_ros.ros.diagnostics import OK, NodeState, camera_report

STATE = NodeState(device="cpu", vocabulary_size=2, enabled=True)
EVENT_TIMEOUT_S = 120.0


def test_worker_marks_the_camera_busy_during_a_forward_pass(monkeypatch):
    nodes = make_node(monkeypatch)
    node = next(nodes)
    entered, release = threading.Event(), threading.Event()
    original = FaultySegmenter.segment_many

    def slow(self, images):
        entered.set()
        assert release.wait(EVENT_TIMEOUT_S)
        return original(self, images)

    monkeypatch.setattr(FaultySegmenter, "segment_many", slow)
    stats = node.cameras[0].stats
    first = frame(node)
    worker = threading.Thread(target=node.processor.process, args=([first],))
    worker.start()
    try:
        assert entered.wait(EVENT_TIMEOUT_S)
        node.frames.settle(frame(node), "dropped_overwritten")  # a newer frame arrived meanwhile
        busy = camera_report(stats.window(), STATE)
    finally:
        release.set()
        worker.join(EVENT_TIMEOUT_S)
    assert busy.level == OK, busy.message
    assert busy.message.startswith("segmenting a frame (") and busy.message.endswith("s so far)")
    after = camera_report(stats.window(), STATE)
    assert after.value("segmenting for (s)") == "n/a"
    assert stats.totals.processed == 1
    next(nodes, None)
