"""How long the node's services wait while it segments 1920x1080 frames, for every method.

    .venv/bin/python benchmarks/service_latency.py                    # every method, 20 s each
    .venv/bin/python benchmarks/service_latency.py --seconds 10 --only pnp_ovss_crf --baseline

The promise (docs/ros_interface.md): parameter and service calls never wait behind a frame. A
worker thread segments, the executor thread answers; that holds as long as nothing the worker
calls keeps Python's GIL for long (OpenCV and torch release it; pydensecrf did not: issue 18).

The node runs in its own process over real DDS (the tests' isolated set-up) with tiny random
models, so that every method runs on this machine: the tiny CLIP (test/data/tiny-vit.json) at
the default short side 448, a tiny BLIP (pnp_ovss, default 336 px input and 4 dropout rounds)
and a tiny Stable Diffusion (the DSLO sd2 affinity). For each method a camera thread sends
1920x1080 frames (a VOC photo) at 10 Hz while the main thread calls ``~/get_parameters`` back
to back; printed per method: frames segmented in the window, the node's median inference time,
the median and slowest get_parameters round trip, and the longest silence of /diagnostics
(published every 1 s).

``--baseline`` adds, in the same run, the node as it was before issue 18 for PnP-OVSS's CRF:
pydensecrf in the node's own process, at full size (this script is the launcher: it patches
``pnp_ovss.dense_crf`` in the node's process), for the ratio. PnP-OVSS configurations are
measured for at least 60 s (a frame takes seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent / "test"))

from ovss_ros.core.methods.dense.settings import LAST_BLOCK_MODES  # noqa: E402

BASELINE_ENV = "OVSS_BENCH_IN_PROCESS_CRF"
WIDTH, HEIGHT = 1920, 1080
RATE_HZ = 10.0
CLASSES = ["person", "dog", "chair", "table", "tv"]
DENSE = {"refinement": "none", "dense.pamr": False, "dense.upsample": "bilinear"}
DENSE |= {"dslo.affinity": "naclip", "method": "naclip", "pnp.presence": "clip"}
METHODS: dict[str, dict] = {name: {"method": name} for name in LAST_BLOCK_MODES}
METHODS |= {
    "naclip_pamr": {"dense.pamr": True},
    "naclip_jbu": {"dense.upsample": "jbu"},
    "naclip_dslo": {"refinement": "dslo"},
    "naclip_dslo_sd2": {"refinement": "dslo", "dslo.affinity": "sd2"},
    "naclip_freecp": {"refinement": "freecp"},
    # Every class in the prompt (presence all): 6 CRF labels whatever the random CLIP says.
    "pnp_ovss_crf": {"method": "pnp_ovss", "pnp.refine": "crf", "pnp.presence": "all"},
    "pnp_ovss_pamr": {"method": "pnp_ovss", "pnp.refine": "pamr", "pnp.presence": "all"},
    "superpixel_clip": {"method": "superpixel_clip"},  # deop needs a checkpoint (issue 21)
    "twostream": {"method": "twostream"},
}


def in_process_crf(rgb, probs, max_pixels=None, stop=None):
    """PnP-OVSS's CRF as it ran before issue 18: pydensecrf in this process, at full size."""
    import numpy as np
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from ovss_ros.core.methods.pnp_ovss.steps import CRF_BILATERAL, CRF_GAUSSIAN, CRF_ITERATIONS

    labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb), **CRF_BILATERAL)
    return np.asarray(crf.inference(CRF_ITERATIONS), dtype=np.float32).reshape(probs.shape)


def serve_baseline(signals=None) -> int:
    """The node, with the CRF patched back into its process (the launcher mode)."""
    from ovss_ros.core.methods.pnp_ovss import pnp_ovss
    from ovss_ros.ros.node import main

    pnp_ovss.dense_crf = in_process_crf
    return main(signals=signals)


def start_node(parameters: dict, baseline: bool):
    """The node in its own process; ``baseline``: through this script's launcher mode."""
    import ros_harness

    if not baseline:
        return ros_harness.NodeProcess(parameters)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), saved]))
    os.environ[BASELINE_ENV] = "1"
    try:
        return ros_harness.NodeProcess(parameters, module="service_latency")
    finally:
        os.environ.pop(BASELINE_ENV)
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


class Camera(threading.Thread):
    def __init__(self, node, publisher, message) -> None:
        super().__init__(daemon=True)
        self.node, self.publisher, self.message = node, publisher, message
        self.stopping = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.stopping.wait(1.0 / RATE_HZ):
            count += 1
            self.message.header.stamp = self.node.get_clock().now().to_msg()
            self.message.header.frame_id = f"bench_{count}"
            self.publisher.publish(self.message)


def measure(client, process, name: str, changes: dict, seconds: float, rgb) -> dict:
    """Apply ``changes`` (atomically, from the dense defaults), then measure for ``seconds``."""
    import ros_harness
    from rcl_interfaces.srv import GetParameters, SetParametersAtomically
    from rclpy.parameter import Parameter

    values = DENSE | changes
    atomic = client.node.create_client(SetParametersAtomically, "/ovss/set_parameters_atomically")
    request = SetParametersAtomically.Request(
        parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
    )
    result = ros_harness.call_service(client.node, atomic, request).result
    if not result.successful:
        return {"name": name, "error": result.reason}
    message = ros_harness.make_image(rgb, "rgb8", ros_harness.next_header(client.node))
    camera = Camera(client.node, client.image_pub, message)
    camera.start()
    try:
        # Two frames segmented after the change: the second one surely with it.
        start = ros_harness.status_values(client.wait_for_status("ovss: image", bool))
        client.wait_for_status(
            "ovss: image",
            lambda v: (
                int(v["frames processed"]) >= int(start["frames processed"]) + 2
                or v["parameter change"] not in ("applied", "none")
            ),
            timeout=600,
        )
        status = ros_harness.status_values(client.wait_for_status("ovss: image", bool))
        if status["parameter change"] not in ("applied", "none"):
            return {"name": name, "error": status["parameter change"]}
        first = int(status["frames processed"])
        getter = client.node.create_client(GetParameters, "/ovss/get_parameters")
        answers, arrivals = [], []
        seen = len(client.messages["/diagnostics"])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sent = time.perf_counter()
            future = getter.call_async(GetParameters.Request(names=["classes"]))
            while not future.done():
                ros_harness.rclpy.spin_once(client.node, timeout_sec=0.01)
                for _ in client.messages["/diagnostics"][seen:]:
                    arrivals.append(time.monotonic())
                seen = len(client.messages["/diagnostics"])
            answers.append(time.perf_counter() - sent)
        status = ros_harness.status_values(client.wait_for_status("ovss: image", bool))
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        client.clear()
        return {
            "name": name,
            "frames": int(status["frames processed"]) - first,
            "inference_ms": status["inference median (ms)"],
            "median_answer_ms": 1e3 * statistics.median(answers),
            "slowest_answer_ms": 1e3 * max(answers),
            "diagnostics_gap_s": max(gaps) if gaps else float("nan"),
            "calls": len(answers),
        }
    finally:
        camera.stopping.set()
        camera.join()


def run(methods: dict[str, dict], seconds: float, baseline: bool, folder: Path) -> list[dict]:
    import rclpy
    import ros_harness
    import tiny_blip
    import tiny_diffusion

    parameters = ros_harness.TINY_NODE_PARAMETERS | {
        "short_side": 448,
        "classes": CLASSES,
        "pnp.vlm_pretrained": str(tiny_blip.save_tiny_blip(folder / "blip")),
        "pnp.layer": 2,
        "pnp.head": 3,
        "dslo.sd.model": str(tiny_diffusion.save_tiny_pipeline(folder / "sd")),
        "dslo.sd.size": 256,
        "max_frame_age": 0.0,
    }
    rgb = ros_harness.camera_frame(WIDTH, HEIGHT)
    rows = []
    ros_harness.isolate_dds()
    rclpy.init()
    try:
        runs = [(False, methods)]
        if baseline:
            runs.append((True, {"pnp_ovss_crf": METHODS["pnp_ovss_crf"]}))
        for is_baseline, chosen in runs:
            process = start_node(parameters, is_baseline)
            client = ros_harness.OvssClient()
            try:
                client.spin_until(
                    lambda p=process, c=client: p.returncode is not None or c.ready(),
                    ros_harness.STARTUP_TIMEOUT_S,
                )
                for name, changes in chosen.items():
                    # PnP-OVSS takes seconds a frame (about 20 with every class in the prompt):
                    # a window that holds a few.
                    window = max(seconds, 60.0) if name.startswith("pnp_ovss") else seconds
                    row = measure(client, process, name, changes, window, rgb)
                    row["name"] += " (before: CRF in the node, full size)" if is_baseline else ""
                    rows.append(row)
                    print_row(row)
            finally:
                client.destroy()
                process.stop()
    finally:
        rclpy.shutdown()
    return rows


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['name']:<44} not run: {row['error']}", flush=True)
        return
    print(
        f"{row['name']:<44} {row['frames']:>6} {row['inference_ms']:>10} "
        f"{row['median_answer_ms']:>9.1f} {row['slowest_answer_ms']:>9.1f} "
        f"{row['diagnostics_gap_s']:>8.2f} {row['calls']:>6}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per method")
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="these methods only")
    parser.add_argument("--baseline", action="store_true", help="also PnP-OVSS as before")
    args = parser.parse_args()
    methods = {name: METHODS[name] for name in (args.only or METHODS)}
    print(
        f"{WIDTH}x{HEIGHT} frames at {RATE_HZ:.0f} Hz, get_parameters back to back, "
        f"{args.seconds:.0f} s per method; tiny random models"
    )
    print(
        f"{'method':<44} {'frames':>6} {'infer ms':>10} {'answer ms':>9} {'slowest':>9} "
        f"{'diag gap':>8} {'calls':>6}"
    )
    with tempfile.TemporaryDirectory() as folder:
        run(methods, args.seconds, args.baseline, Path(folder))
    return 0


if __name__ == "__main__":
    if os.environ.get(BASELINE_ENV):
        from ovss_ros.ros.entry import run_main

        sys.exit(run_main(serve_baseline))
    sys.exit(main())
