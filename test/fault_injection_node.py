"""Test-only launcher: the real ovss node (``ovss_ros.ros.node.main``) with faults on trigger
inputs.

What a DDS test cannot provoke from outside, injected into the node's own process at the lowest
level, so that everything above it (engine, node, worker, diagnostics) runs as shipped:

- the real ``TextEncoder`` raises (as CUDA out of memory would) when a prompt holds
  ``TRIGGER_WORD``: a class, template or background word with it fails while being encoded;
- the real ``Segmenter.segment_many`` raises for a batch with a frame ``FAIL_WIDTH`` pixels wide;
- for a frame ``GATE_WIDTH`` wide it first creates ``$OVSS_FAULT_DIR/held`` and waits until
  ``$OVSS_FAULT_DIR/release`` exists (a worker kept busy on demand: frames that arrive meanwhile
  wait in their camera's slot), then removes both;
- the real ``TextEncoder`` holds a batch of prompts with ``HOLD_WORD`` (a change's encoding kept
  going on demand): it creates ``$OVSS_FAULT_DIR/encoding_held`` and waits until
  ``$OVSS_FAULT_DIR/encoding_release`` exists, then removes both (each hold adds a character to
  ``$OVSS_FAULT_DIR/encoding_holds``); its stop (the node's shutdown,
  or a newer change superseding this one) ends the wait with Stopped, as between two batches.

Tests start it with ``running_fault_node`` (test/ on the child's PYTHONPATH).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TRIGGER_WORD = "oom_trigger"
HOLD_WORD = "hold_encoding"
FAIL_WIDTH = 13
GATE_WIDTH = 17
GATE_TIMEOUT_S = 300.0
MODULE = "fault_injection_node"


def install_faults(fault_dir: Path) -> None:
    """Wrap the real text encoder and engine of this process."""
    from ovss_ros.core import segmenter as engine
    from ovss_ros.core.clip import text_encoding

    encode_prompts = text_encoding.TextEncoder.encode_prompts

    def faulty_encode_prompts(self, prompts: list[str]):
        if any(HOLD_WORD in prompt for prompt in prompts):
            hold_encoding(fault_dir, self.stop)
        if any(TRIGGER_WORD in prompt for prompt in prompts):
            raise RuntimeError(f"CUDA out of memory (injected: a prompt holds {TRIGGER_WORD})")
        return encode_prompts(self, prompts)

    segment_many = engine.Segmenter.segment_many

    def faulty_segment_many(self, images):
        widths = {rgb.shape[1] for rgb in images}
        if FAIL_WIDTH in widths:
            raise RuntimeError(f"CUDA out of memory (injected: a frame {FAIL_WIDTH} px wide)")
        if GATE_WIDTH in widths:
            held, release = fault_dir / "held", fault_dir / "release"
            held.touch()
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            release.unlink(missing_ok=True)
            held.unlink(missing_ok=True)
        return segment_many(self, images)

    text_encoding.TextEncoder.encode_prompts = faulty_encode_prompts
    engine.Segmenter.segment_many = faulty_segment_many


def hold_encoding(fault_dir: Path, stop) -> None:
    """The node's side of the encoding gate (see the module docstring)."""
    from ovss_ros.core.stopping import check_stop

    held, release = fault_dir / "encoding_held", fault_dir / "encoding_release"
    with (fault_dir / "encoding_holds").open("a") as holds:  # one character per hold
        holds.write(".")
    held.touch()
    try:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not release.exists() and time.monotonic() < deadline:
            check_stop(stop, "the held text prompts")
            time.sleep(0.02)
        release.unlink(missing_ok=True)
    finally:
        held.unlink(missing_ok=True)


class Gate:
    """The test's side of the gate: wait until the worker is held, then release it."""

    def __init__(self, fault_dir: Path) -> None:
        self.held = fault_dir / "held"
        self.release_file = fault_dir / "release"

    def wait_held(self, client: Any, timeout: float = 60.0) -> None:
        client.spin_until(self.held.exists, timeout, message="worker held at the gate")

    def release(self, client: Any, timeout: float = 60.0) -> None:
        self.release_file.touch()
        client.spin_until(lambda: not self.held.exists(), timeout, message="gate released")


@contextmanager
def running_fault_node(
    parameters: Mapping[str, Any],
    fault_dir: Path,
    extra_ros_args: Sequence[str] = (),
    node_namespace: str = "/ovss",
    input_namespace: str = "",
    cameras: Sequence[str] = (),
    reliable_input: bool = False,
    ready_timeout: float = 120.0,
) -> Iterator[tuple[Any, Any]]:
    """``ros_harness.running_node`` for this launcher: yields (OvssClient, NodeProcess) once
    the node is ready; on the way out it must exit with status 0."""
    import rclpy
    from ros_harness import NodeProcess, OvssClient, isolate_dds

    isolate_dds()
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "OVSS_FAULT_DIR")}
    test_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [test_dir, saved["PYTHONPATH"]]))
    os.environ["OVSS_FAULT_DIR"] = str(fault_dir)
    try:
        process = NodeProcess(parameters, extra_ros_args, module=MODULE)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    rclpy.init()
    client = OvssClient(
        node_namespace, input_namespace, reliable_input=reliable_input, cameras=cameras
    )
    try:
        client.spin_until(
            lambda: process.returncode is not None or client.ready(),
            ready_timeout,
            message=lambda: (
                f"node start-up; its output:\n{process.output()}\nthe client:\n{client.describe()}"
            ),
        )
        if process.returncode is not None:
            raise AssertionError(f"node exited with {process.returncode}:\n{process.output()}")
        yield client, process
    finally:
        client.destroy()
        rclpy.shutdown()
        Path(fault_dir, "release").touch()  # never leave the worker held at shutdown
        returncode = process.stop()
    if returncode != 0:
        raise AssertionError(f"node did not shut down cleanly ({returncode}):\n{process.output()}")
    process.log_path.unlink(missing_ok=True)


def main() -> int:
    """The node with the faults; the managed (lifecycle) node when $OVSS_FAULT_LIFECYCLE is 1."""
    install_faults(Path(os.environ["OVSS_FAULT_DIR"]))
    if os.environ.get("OVSS_FAULT_LIFECYCLE") == "1":
        from ovss_ros.ros.lifecycle_node import main as node_main
    else:
        from ovss_ros.ros.node import main as node_main

    return node_main()


if __name__ == "__main__":
    sys.exit(main())
