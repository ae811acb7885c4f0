"""Per-frame cost of the whole node (DDS in, decode, segment, publish, DDS out) against the bare
engine (``Segmenter.segment``) on the same frame and settings, measured in one run.

    .venv/bin/python benchmarks/node_vs_engine.py --frames 10   # ViT-B-16, random weights, CPU

The node runs in its own process and is fed one 640x480 rgb8 frame at a time (the next is sent
when the labels of the previous one arrived), so each figure is one frame's full round trip. The
client subscribes to ``~/labels`` only: masks, overlay and confidence are lazy and not computed.
The engine is timed afterwards in this process, when the node is gone, so both get the same CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
import ros_harness  # noqa: E402  (the tests' DDS isolation and node process helpers)

CLASSES = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (100 Hz)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--templates", default="single")
    args = parser.parse_args()
    rgb = ros_harness.camera_frame(640, 480)
    parameters = {
        "model": args.model,
        "pretrained": "none",
        "device": "cpu",
        "short_side": args.short_side,
        "templates": args.templates,
        "classes": CLASSES,
    }
    node_wall, node_cpu = [], []
    with ros_harness.running_node(parameters, ready_timeout=300.0) as (client, process):
        for topic in ("overlay", "confidence", "camera_info"):
            client.unsubscribe(client.topic(topic))
        for index in range(args.frames + 1):  # the first frame warms up
            header = ros_harness.next_header(client.node)
            message = ros_harness.make_image(rgb, "rgb8", header)
            cpu_before = process_cpu_seconds(process.process.pid)
            start = time.perf_counter()
            client.wait_for_output(message, timeout=120.0, resend_every=60.0 if index else 2.0)
            wall = time.perf_counter() - start
            cpu = process_cpu_seconds(process.process.pid) - cpu_before
            if index:
                node_wall.append(wall)
                node_cpu.append(cpu)
            client.clear()

    from ovss_ros.core import EngineConfig, Segmenter

    settings = {name: value for name, value in parameters.items() if name != "classes"}
    segmenter = Segmenter(EngineConfig.from_flat(settings))
    segmenter.set_classes(CLASSES)
    engine_wall, engine_cpu = [], []
    for index in range(args.frames + 1):
        cpu_before, start = time.process_time(), time.perf_counter()
        segmenter.segment(np.ascontiguousarray(rgb))
        if index:
            engine_wall.append(time.perf_counter() - start)
            engine_cpu.append(time.process_time() - cpu_before)

    def ms(samples: list[float]) -> str:
        median, worst = 1000 * statistics.median(samples), 1000 * max(samples)
        return f"median {median:7.1f} ms, max {worst:7.1f} ms"

    print(
        f"{args.model}, random weights, CPU, 640x480 rgb8, whole image, short side "
        f"{args.short_side}, {len(CLASSES)} classes, {args.frames} frames"
    )
    print(f"node round trip (wall): {ms(node_wall)}")
    print(f"node process CPU time : {ms(node_cpu)}")
    print(f"engine segment (wall) : {ms(engine_wall)}")
    print(f"engine CPU time       : {ms(engine_cpu)}")
    ratio = statistics.median(node_wall) / statistics.median(engine_wall)
    print(f"node / engine (median wall): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
