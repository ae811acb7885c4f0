"""Soak the node: a camera at 30 Hz for a while, the vocabulary changing every second, broken
frames mixed in. Reports what happened to every frame, latency percentiles and memory growth.

    .venv/bin/python benchmarks/soak.py --duration 600                  # ViT-B-16, random, CPU
    .venv/bin/python benchmarks/soak.py --duration 20 --model test/data/tiny-vit.json --size 64

The node runs in its own process over real DDS (the tests' isolated set-up). At the end the
node's own counters (from /diagnostics) must account for every frame it received: processed,
dropped (paused, stale or overwritten by a newer one), rejected (broken) or failed, with none
left in progress; every status along the way must add up too (received = the outcomes + in
progress); the client must have received labels for every processed frame; and the node's
resident memory must not keep growing.
Exit status 0 when all checks hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rclpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
import ros_harness  # noqa: E402  (the tests' DDS isolation and node process helpers)

VOCABULARIES = (
    ["person", "chair", "table", "floor"],
    ["person", "cup; mug", "bottle", "door handle", "wet floor"],
    ["dog", "cat", "sofa; couch"],
)
COUNTER_KEYS = {
    "received": "frames received",
    "processed": "frames processed",
    "dropped_paused": "frames dropped (paused)",
    "dropped_stale": "frames dropped (stale)",
    "dropped_overwritten": "frames dropped (overwritten)",
    "rejected": "frames rejected",
    "failed": "frames failed",
    "in_progress": "frames in progress",
}
OUTCOMES = ("processed", "dropped_paused", "dropped_stale", "dropped_overwritten", "rejected")
OUTCOMES += ("failed",)


@dataclass
class SoakReport:
    duration_s: float
    sent_valid: int = 0
    sent_broken: int = 0
    answered: int = 0  # labels frames the client received
    statuses: int = 0  # /diagnostics statuses of the node received
    statuses_not_adding_up: int = 0  # ... whose counters did not add up
    vocabulary_changes: int = 0
    vocabulary_accepted: int = 0
    node: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def broken_frame(index: int, header):
    """One of the ways a camera driver can get a frame wrong, in turn."""
    kind = index % 3
    if kind == 0:
        return ros_harness.make_image(np.zeros((4, 4, 3), "uint8"), "yuv9", header)
    message = ros_harness.make_image(np.zeros((48, 64, 3), "uint8"), "rgb8", header)
    if kind == 1:
        message.data = message.data[: len(message.data) // 2]  # truncated
    else:
        message.width = 0  # zero size
    return message


def node_counters(statuses: list, index: int = -1) -> dict[str, int]:
    values = {kv.key: kv.value for kv in statuses[index].values}
    return {name: int(values[key]) for name, key in COUNTER_KEYS.items()}


def adds_up(counters: dict[str, int]) -> bool:
    """received = processed + dropped (each reason) + rejected + failed + in progress."""
    outcomes = sum(counters[name] for name in OUTCOMES)
    return counters["received"] == outcomes + counters["in_progress"]


def soak(args: argparse.Namespace) -> SoakReport:
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    rgb = ros_harness.camera_frame(640, 480)
    parameters = {
        "model": args.model,
        "pretrained": "none",
        "device": args.device,
        "short_side": args.size,
        "templates": "single",
        "classes": VOCABULARIES[0],
        "max_frame_age": args.max_frame_age,
    }
    if args.reliable:
        # The node's input QoS override (a parameter): no frame is lost in transport, so every
        # frame sent must show up in the node's counters.
        parameters["qos_overrides./image.subscription.reliability"] = "reliable"
        # A reader history of one sample would let DDS replace a frame the node's executor has
        # not taken yet (a busy machine): uncounted, as lost in transport. Deep enough for 3 s.
        parameters["qos_overrides./image.subscription.depth"] = 100
        # and a labels history deep enough (3 s at 30 Hz) that a briefly busy client still
        # acknowledges every frame before the node's writer overwrites it.
        parameters["qos_overrides./ovss/labels.publisher.depth"] = 100
    report = SoakReport(duration_s=args.duration)
    latencies: list[float] = []
    sent_stamps: dict[tuple, float] = {}
    with ros_harness.running_node(
        parameters, ready_timeout=300.0, reliable_input=args.reliable
    ) as (client, process):
        for topic in ("overlay", "confidence", "camera_info"):
            client.unsubscribe(client.topic(topic))
        statuses: list = []

        def on_diagnostics(message: DiagnosticArray) -> None:
            statuses.extend(s for s in message.status if s.name.startswith("ovss"))

        client.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        labels = client.messages[client.topic("labels")]
        period, start = 1.0 / args.rate, time.monotonic()
        next_frame, next_vocabulary, next_sample, frame = start, start + 1.0, start, 0
        futures, samples = [], []
        while (now := time.monotonic()) < start + args.duration:
            if now >= next_frame:
                header = ros_harness.next_header(client.node)
                if args.broken_every and frame % args.broken_every == args.broken_every - 1:
                    client.image_pub.publish(broken_frame(report.sent_broken, header))
                    report.sent_broken += 1
                else:
                    client.image_pub.publish(ros_harness.make_image(rgb, "rgb8", header))
                    sent_stamps[ros_harness.stamp_key(header)] = time.monotonic()
                    report.sent_valid += 1
                frame += 1
                next_frame += period
            if now >= next_vocabulary:
                vocabulary = VOCABULARIES[(report.vocabulary_changes + 1) % len(VOCABULARIES)]
                request = SetParameters.Request(
                    parameters=[Parameter("classes", value=vocabulary).to_parameter_msg()]
                )
                futures.append(client.set_client.call_async(request))
                report.vocabulary_changes += 1
                next_vocabulary += 1.0
            if now >= next_sample:
                samples.append((now - start, resident_mib(process.process.pid)))
                next_sample += 1.0
            while labels:  # latency: send to receipt of the labels, matched by header
                key = ros_harness.stamp_key(labels.pop().header)
                report.answered += 1
                if key in sent_stamps:
                    sent = sent_stamps.pop(key)
                    latencies.append((sent - start, time.monotonic() - sent))
            rclpy.spin_once(client.node, timeout_sec=max(0.0, min(0.005, next_frame - now)))
        # Drain: the last frame may still be in flight; then wait for counters that add up.
        settle = time.monotonic() + 15.0
        while time.monotonic() < settle:
            rclpy.spin_once(client.node, timeout_sec=0.05)
            while labels:
                key = ros_harness.stamp_key(labels.pop().header)
                report.answered += 1
                if key in sent_stamps:
                    sent = sent_stamps.pop(key)
                    latencies.append((sent - start, time.monotonic() - sent))
            if statuses and all(f.done() for f in futures):
                counters = node_counters(statuses)
                if counters["received"] == report.sent_valid + report.sent_broken and (
                    adds_up(counters)
                    and counters["in_progress"] == 0
                    and counters["processed"] == report.answered
                ):
                    break
        report.node = node_counters(statuses) if statuses else {}
        report.statuses = len(statuses)
        report.statuses_not_adding_up = sum(
            1 for index in range(len(statuses)) if not adds_up(node_counters(statuses, index))
        )
        report.vocabulary_accepted = sum(
            1 for f in futures if f.done() and f.result().results[0].successful
        )
        if process.returncode is not None:
            report.failures.append(f"node exited with {process.returncode}")
    check(report, latencies, samples, args)
    return report


def check(report: SoakReport, latencies: list[tuple[float, float]], samples: list, args) -> None:
    """Fill in the figures and list every check that fails. ``latencies``: (sent at, latency)."""
    ms = sorted(1000 * latency for _, latency in latencies)
    first = [1000 * lat for at, lat in latencies if at < args.duration / 3]
    last = [1000 * lat for at, lat in latencies if at >= 2 * args.duration / 3]
    if ms:
        report.latency_ms = {
            f"p{p}": ms[min(len(ms) - 1, round(p / 100 * (len(ms) - 1)))] for p in (50, 90, 99)
        } | {"max": ms[-1], "mean": statistics.fmean(ms)}
    if first and last:
        report.latency_ms |= {
            "first_third_p50": statistics.median(first),
            "last_third_p50": statistics.median(last),
        }
        # Newest-frame buffering: latency must not pile up (a queue would grow it without end).
        if statistics.median(last) > 2 * statistics.median(first) + 100:
            report.failures.append(
                f"latency grew from {statistics.median(first):.0f} to "
                f"{statistics.median(last):.0f} ms (median, first vs last third)"
            )
    # Memory: compare the settled part of the run (after its first third) with its end.
    settled = [rss for t, rss in samples if t >= args.duration / 3] or [s[1] for s in samples]
    report.rss_mib = {"start": samples[0][1], "settled": settled[0], "end": samples[-1][1]}
    growth = report.rss_mib["end"] - report.rss_mib["settled"]
    failures, node = report.failures, report.node
    if not node:
        failures.append("no /diagnostics from the node")
        return
    if not adds_up(node) or node["in_progress"]:
        failures.append(f"node counters do not add up: {node}")
    if report.statuses_not_adding_up:
        failures.append(
            f"{report.statuses_not_adding_up} of {report.statuses} statuses did not add up"
        )
    sent = report.sent_valid + report.sent_broken
    if node["received"] > sent or (args.reliable and node["received"] != sent):
        failures.append(f"node received {node['received']} of {sent} frames sent")
    if node["rejected"] > report.sent_broken:
        failures.append(f"{node['rejected']} rejected but only {report.sent_broken} broken sent")
    if report.answered != node["processed"]:
        failures.append(f"{node['processed']} processed but {report.answered} labels received")
    if node["failed"]:
        failures.append(f"{node['failed']} frames failed in inference")
    if growth > args.max_growth_mib:
        failures.append(f"memory grew {growth:.1f} MiB after settling (> {args.max_growth_mib})")
    if report.vocabulary_accepted != report.vocabulary_changes:
        failures.append(
            f"{report.vocabulary_accepted}/{report.vocabulary_changes} vocabulary changes accepted"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of camera")
    parser.add_argument("--rate", type=float, default=30.0, help="camera frames per second")
    parser.add_argument("--broken-every", type=int, default=10, help="every Nth frame is broken")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448, help="short side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-frame-age", type=float, default=0.5)
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    parser.add_argument(
        "--best-effort",
        dest="reliable",
        action="store_false",
        help="keep the sensor-data input QoS (frames may then be lost in transport, uncounted)",
    )
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    for failure in report.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
