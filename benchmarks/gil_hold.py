"""How long each method keeps Python's GIL in one piece while it segments a 1920x1080 frame.

    .venv/bin/python benchmarks/gil_hold.py [--frames 2] [--only naclip pnp_ovss_crf]

The node answers its services on one thread while another segments (docs/ros_interface.md);
a call that keeps the GIL for long (a C extension that does not release it: pydensecrf did,
issue 18) makes every answer wait that long. Here the engine segments in the main thread, as
the node's worker does, with the same tiny random models and settings as
benchmarks/service_latency.py, while a watchdog thread wakes every millisecond; its longest
wait is the longest time the segmenting thread kept the GIL (plus scheduling), printed per
method with the frame time. No DDS, no other process: the figure is the engine's alone.
``--baseline`` adds PnP-OVSS with its CRF as it ran before issue 18 (pydensecrf in this process,
at full size), for the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ros_harness  # noqa: E402  (camera_frame, TINY_NODE_PARAMETERS)
import tiny_blip  # noqa: E402
import tiny_diffusion  # noqa: E402
from service_latency import CLASSES, DENSE, HEIGHT, METHODS, WIDTH, in_process_crf  # noqa: E402

from ovss_ros.core import Segmenter  # noqa: E402
from ovss_ros.core.config import LOAD_FIELDS  # noqa: E402
from ovss_ros.core.methods.pnp_ovss import pnp_ovss  # noqa: E402
from ovss_ros.ros import parameters as node_parameters  # noqa: E402

TICK_S = 0.001
DENSE_CRF = pnp_ovss.dense_crf


class Watchdog(threading.Thread):
    """Wakes every TICK_S; ``longest`` is its longest wait beyond that."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()
        self.longest = 0.0

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stopping.is_set():
            time.sleep(TICK_S)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - TICK_S)
            last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2, help="frames per method (after one)")
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="these methods only")
    parser.add_argument(
        "--baseline", action="store_true", help="also pnp_ovss_crf with the CRF as before"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    values = node_parameters.defaults() | ros_harness.TINY_NODE_PARAMETERS
    values |= {
        "short_side": 448,
        "classes": CLASSES,
        "pnp.vlm_pretrained": str(tiny_blip.save_tiny_blip(folder / "blip")),
        "pnp.layer": 2,
        "pnp.head": 3,
        "dslo.sd.model": str(tiny_diffusion.save_tiny_pipeline(folder / "sd")),
        "dslo.sd.size": 256,
        "device": "cpu",
    }
    settings = node_parameters.validate(values)
    segmenter = Segmenter(settings.engine)
    segmenter.set_classes(settings.classes)
    rgb = ros_harness.camera_frame(WIDTH, HEIGHT)
    print(f"{WIDTH}x{HEIGHT}, tiny random models, {args.frames} frames per method after one")
    print(f"{'method':<24} {'s/frame':>8} {'longest GIL hold (ms)':>22}")
    runs = [(name, False) for name in args.only or METHODS]
    runs += [("pnp_ovss_crf", True)] if args.baseline else []
    for name, baseline in runs:
        # Before issue 18: pydensecrf in this process, at full size.
        pnp_ovss.dense_crf = in_process_crf if baseline else DENSE_CRF
        changes = DENSE | METHODS[name]
        engine = node_parameters.validate(values | changes).engine
        segmenter.reconfigure({n: v for n, v in engine.flat().items() if n not in LOAD_FIELDS})
        segmenter.segment(rgb)  # warm-up: loads, caches
        watchdog = Watchdog()
        watchdog.start()
        start = time.perf_counter()
        for _ in range(args.frames):
            segmenter.segment(rgb)
        seconds = (time.perf_counter() - start) / args.frames
        watchdog.stopping.set()
        watchdog.join()
        label = f"{name} (before)" if baseline else name
        print(f"{label:<24} {seconds:>8.2f} {1e3 * watchdog.longest:>22.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
