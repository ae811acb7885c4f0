"""Largest gap between the node's published frames while 20 classes x 80 templates are added,
against the largest gap over as long a stretch without a change, measured in one run.

    .venv/bin/python benchmarks/vocabulary_change_gap.py --rounds 3              # ViT-B-16
    .venv/bin/python benchmarks/vocabulary_change_gap.py --model test/data/tiny-vit.json

The node runs in its own process (random weights, CPU unless ``--device``), with the 80 ImageNet
templates and 10 classes; this process streams 640x480 rgb8 frames to it at ``--rate`` Hz and
records when each frame's labels arrive. Each round adds 20 classes never encoded before
(``classes`` set to the 10 + 20: 1600 prompts to encode) and measures the largest gap between
two labels from the request until two frames after the new label_info arrived; then it streams
as long without a change and measures the largest gap there. The order of the two alternates
from round to round (interleaved). Prints each round, the medians, the spread, and the ratio
(goal: <= 1.5: the stream does not wait for the encoding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import rclpy
from rclpy.parameter import Parameter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
import ros_harness  # noqa: E402  (the tests' DDS isolation and node process helpers)

BASE = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle", "sofa", "plant"]
ADDED = 20


class Stream:
    """Publishes frames at a fixed rate and records when their labels arrive."""

    def __init__(self, client: ros_harness.OvssClient, rgb, rate: float) -> None:
        self.client, self.rgb, self.period = client, rgb, 1.0 / rate
        self.arrivals: list[float] = []
        self._next = time.monotonic()

    def spin(self, seconds: float | None = None, until=None) -> None:
        """Keep streaming for ``seconds`` or until ``until()`` is true."""
        end = None if seconds is None else time.monotonic() + seconds
        labels = self.client.messages[self.client.topic("labels")]
        while True:
            now = time.monotonic()
            if now >= self._next:
                header = ros_harness.next_header(self.client.node)
                self.client.image_pub.publish(ros_harness.make_image(self.rgb, "rgb8", header))
                self._next += self.period
                if self._next < now:  # fell behind: never burst
                    self._next = now + self.period
            rclpy.spin_once(self.client.node, timeout_sec=min(0.01, self.period))
            if labels:  # arrival times only: the images are not kept
                self.arrivals.extend([time.monotonic()] * len(labels))
                labels.clear()
            if end is not None and time.monotonic() >= end:
                return
            if until is not None and until():
                return

    def largest_gap(self, since: float) -> float:
        times = [t for t in self.arrivals if t >= since]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return max(gaps) if gaps else float("inf")


def vocabulary(client: ros_harness.OvssClient) -> list[str]:
    messages = client.messages[client.topic("label_info")]
    return [entry.class_name for entry in messages[-1].class_map] if messages else []


def change_round(client, stream: Stream, added: list[str], timeout: float) -> tuple[float, float]:
    """(largest gap, seconds) from the request until two frames after the new vocabulary."""
    wanted = BASE + added
    start = time.monotonic()
    result = client.set_parameters([Parameter("classes", value=wanted)])[0]
    if not result.successful:
        raise SystemExit(f"change refused: {result.reason}")
    stream.spin(until=lambda: vocabulary(client) == wanted or time.monotonic() - start > timeout)
    if vocabulary(client) != wanted:
        raise SystemExit(f"the new vocabulary did not arrive within {timeout} s")
    count = len(stream.arrivals)
    stream.spin(until=lambda: len(stream.arrivals) >= count + 2)
    return stream.largest_gap(start), time.monotonic() - start


def quiet_round(stream: Stream, seconds: float) -> float:
    start = time.monotonic()
    stream.spin(seconds)
    return stream.largest_gap(start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second sent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="per change, seconds")
    args = parser.parse_args()
    parameters = {
        "model": args.model,
        "pretrained": "none",
        "device": args.device,
        "short_side": args.short_side,
        "templates": "imagenet",
        "classes": BASE,
    }
    rgb = ros_harness.camera_frame(640, 480)
    with ros_harness.running_node(parameters, ready_timeout=600.0) as (client, _):
        for topic in ("overlay", "confidence", "camera_info"):
            client.unsubscribe(client.topic(topic))
        stream = Stream(client, rgb, args.rate)
        stream.spin(until=lambda: len(stream.arrivals) >= 3)  # warm up
        changes, quiets = [], []
        print(
            f"model {args.model} ({args.device}, random weights), {args.rate:g} Hz 640x480, "
            f"{len(BASE)} classes + {ADDED} added per change, 80 templates"
        )
        for index in range(args.rounds):
            added = [f"thing {index} {n}" for n in range(ADDED)]
            if index % 2 == 0:
                gap, seconds = change_round(client, stream, added, args.timeout)
                quiet = quiet_round(stream, seconds)
            else:
                # As long as the previous change took: this round's is measured after it.
                quiet = quiet_round(stream, seconds)
                gap, seconds = change_round(client, stream, added, args.timeout)
            changes.append(gap)
            quiets.append(quiet)
            print(
                f"round {index}: change took {seconds:.1f} s, largest gap {gap:.3f} s with "
                f"the change, {quiet:.3f} s without"
            )
    change, quiet = statistics.median(changes), statistics.median(quiets)
    print(
        f"largest gap, median of {args.rounds}: {change:.3f} s with a change "
        f"(spread {min(changes):.3f}-{max(changes):.3f}), {quiet:.3f} s without "
        f"(spread {min(quiets):.3f}-{max(quiets):.3f})"
    )
    print(f"ratio with / without: {change / quiet:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
