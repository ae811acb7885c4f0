"""The dense CRF in a process of its own, so that it never holds this process's GIL.

pydensecrf holds the GIL for its whole inference (1.4 s for a 500x375 frame, 23 s for a
1920x1080 one on this project's machines; issue 18, item 5): in the node's process every other
thread waits that long (parameter services, /diagnostics). ``CrfProcess`` runs it in a child
process (``crf_child.py``, run by path: numpy and pydensecrf only) and waits for the answer on a
pipe, which releases the GIL; the stop event ends the wait (the child is then ended too, its
answer would no longer be read).

The child starts on first use, in a session of its own (a Ctrl-C at the terminal reaches the
node only; the node decides), and ends when its stdin closes: when ``close`` is called, this
object is collected, or this process ends in any way.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np

from ovss_ros.core.stopping import check_stop

CHILD = Path(__file__).resolve().with_name("crf_child.py")
# Runs the child script by path without putting its folder (or the working directory) on
# sys.path: it must not import this package (torch) nor shadow a module with a file of ours.
BOOTSTRAP = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"
POLL_S = 0.05  # how soon a wait notices the stop event
CLOSE_TIMEOUT_S = 2.0


class CrfError(RuntimeError):
    """The CRF failed (in the child, or the child ended); the frame fails, the node goes on."""


class CrfProcess:
    """A child process that runs pydensecrf's dense CRF. Thread-safe (one request at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def marginals(
        self,
        rgb: np.ndarray,
        probs: np.ndarray,
        iterations: int,
        gaussian: dict[str, float],
        bilateral: dict[str, float],
        stop: threading.Event | None = None,
    ) -> np.ndarray:
        """pydensecrf's ``DenseCRF2D`` with a softmax unary from ``probs`` (K, H, W), the
        Gaussian and bilateral (``rgb`` H x W x 3 uint8) pairwise terms with these keyword
        arguments, ``iterations`` of mean field; returns the marginals (K, H, W) float32.

        Raises Stopped once ``stop`` is set (checked while waiting), CrfError if the CRF
        raised in the child or the child ended (the next call starts a new one).
        """
        labels, height, width = probs.shape
        if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be {height}x{width}x3 uint8, got {rgb.shape} {rgb.dtype}")
        header = {
            "height": height,
            "width": width,
            "labels": labels,
            "iterations": int(iterations),
            "gaussian": gaussian,
            "bilateral": bilateral,
        }
        payload = (json.dumps(header) + "\n").encode()
        payload += np.ascontiguousarray(rgb).tobytes()
        payload += np.ascontiguousarray(probs, dtype=np.float32).tobytes()
        with self._lock:
            process = self._started()
            try:
                process.stdin.write(payload)
                process.stdin.flush()
                answer = json.loads(self._read(process, None, stop))
                if not answer.get("ok"):
                    raise CrfError(f"dense CRF: {answer.get('error', 'failed')}")
                data = self._read(process, labels * height * width * 4, stop)
            except CrfError:
                raise
            except (OSError, ValueError) as error:  # a broken pipe, a garbled answer
                self._end(kill=True)
                raise CrfError(f"dense CRF process: {type(error).__name__}: {error}") from None
            except BaseException:  # Stopped: the answer will not be read, the child must go
                self._end(kill=True)
                raise
        return np.frombuffer(data, np.float32).reshape(labels, height, width).copy()

    def close(self) -> None:
        """End the child (it is started again when needed)."""
        with self._lock:
            self._end()

    def _started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._end()
        self._process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            bufsize=0,
        )
        self._finalizer = weakref.finalize(self, _end_process, self._process)
        return self._process

    def _end(self, kill: bool = False) -> None:
        """End the child: at once (``kill``: it may be busy), or once it read the end of its
        input (it is idle)."""
        if kill and self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._finalizer is not None:
            self._finalizer()  # closes the pipes and reaps the process, once
        self._process = self._finalizer = None

    @staticmethod
    def _read(process: subprocess.Popen, size: int | None, stop: threading.Event | None) -> bytes:
        """``size`` bytes of the child's answer (None: one line), waiting on the pipe (no GIL
        held) and checking ``stop`` every POLL_S. Raises CrfError at the end of the stream."""
        fd = process.stdout.fileno()
        buffer = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if size is None and b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    if rest:
                        raise ValueError("unexpected data after the answer line")
                    return line
                if size is not None and len(buffer) >= size:
                    return bytes(buffer)
                check_stop(stop, "dense CRF")
                if not selector.select(POLL_S):
                    continue
                want = (size - len(buffer)) if size is not None else 1
                chunk = os.read(fd, max(1, min(want, 1 << 20)))
                if not chunk:
                    status = process.poll()
                    raise CrfError(f"the dense CRF process ended (status {status})")
                buffer += chunk


def _end_process(process: subprocess.Popen) -> None:
    """Close the child's stdin (it ends by itself), then make sure it is gone."""
    try:
        process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    finally:
        process.stdout.close()


_shared: CrfProcess | None = None
_shared_lock = threading.Lock()


def shared_crf_process() -> CrfProcess:
    """The one CrfProcess of this process (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CrfProcess()
        return _shared
