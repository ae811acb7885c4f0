"""The dense CRF's own process (run by ``crf_process.CrfProcess``; never imported by the node).

pydensecrf (the ``pydensecrf2`` package) holds Python's GIL for all of its work: 1.4 s on a
500x375 frame, 23 s on a 1920x1080 one, on this project's machines. In the node's process that
would freeze every other thread (the parameter services, /diagnostics) behind a frame. Here it
holds only this process's GIL.

Run as a script by path (``CrfProcess`` starts it): it imports numpy and pydensecrf only, reads
requests from stdin and writes answers to stdout until stdin ends (the parent went away).

A request: one JSON line ``{"height", "width", "labels", "iterations", "gaussian",
"bilateral"}`` (the pairwise terms' keyword arguments), then the image (height x width x 3
uint8) and the probabilities (labels x height x width float32), raw. An answer: one JSON line,
``{"ok": true}`` followed by the marginals (labels x height x width float32), or ``{"ok":
false, "error": "..."}``.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import BinaryIO


def read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def crf_marginals(request: dict, rgb_bytes: bytes, prob_bytes: bytes) -> bytes:
    """The fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) of one request: marginals
    (labels, height, width) float32, as bytes."""
    import numpy as np
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    height, width, labels = request["height"], request["width"], request["labels"]
    # Writable copies: pydensecrf's Cython views refuse read-only buffers.
    rgb = np.frombuffer(rgb_bytes, np.uint8).reshape(height, width, 3).copy()
    probs = np.frombuffer(prob_bytes, np.float32).reshape(labels, height, width).copy()
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(**request["gaussian"])
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb), **request["bilateral"])
    marginals = np.asarray(crf.inference(request["iterations"]), dtype=np.float32)
    return marginals.reshape(labels, height, width).tobytes()


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer requests until stdin ends; 0 then."""
    while True:
        line = stdin.readline()
        if not line:
            return 0
        try:
            request = json.loads(line)
            height, width, labels = request["height"], request["width"], request["labels"]
            rgb = read_exactly(stdin, height * width * 3)
            probs = read_exactly(stdin, labels * height * width * 4)
            if rgb is None or probs is None:
                return 0
            answer = crf_marginals(request, rgb, probs)
        except Exception as error:  # answered: the parent raises it in its own process
            stdout.write(
                (
                    json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}) + "\n"
                ).encode()
            )
            stdout.flush()
            continue
        stdout.write(b'{"ok": true}\n')
        stdout.write(answer)
        stdout.flush()


if __name__ == "__main__":
    # The parent decides when this process ends (it closes stdin); a Ctrl-C meant for the
    # parent's terminal must not print a traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
