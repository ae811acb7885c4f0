"""Where a change's text encoding runs beside the frames, and how it leaves them the machine.

A vocabulary or settings change is prepared (its texts encoded, a model loaded) on a thread of
its own while another thread keeps segmenting frames with the vocabulary in force
(``Segmenter.prepare_update``). The two share the device; the frames come first:

- CUDA: text encoding runs on its own stream, at the lowest priority CUDA offers, and the frames
  on a stream of the highest priority, so the GPU's scheduler runs the frames' kernels first
  whenever both wait (CUDA stream priorities: ``cudaStreamCreateWithPriority``; torch maps a
  priority outside the device's range to the nearest end). The encoding stream is synchronised
  before its embeddings are handed over, so the frames' stream never reads them unfinished.
  Streams are made only when the device is CUDA and CUDA is available.
- CPU: ``torch.set_num_threads`` sets the calling thread's OpenMP team size (its ICV: each
  thread keeps its own once set; a thread that never set one takes the last value set in the
  process, ``at::init_num_threads``, read at the thread's first parallel region). So the frame
  thread initialises and pins its own count (``frame_thread``: the count the process had), and
  the encoding thread takes ENCODER_THREADS
  intra-op threads and, on Linux, a lower scheduling priority (nice ENCODER_NICE: Linux
  schedules threads, and a thread's nice value is its own): the frame thread keeps its cores
  and the encoding runs in the time the frames leave (a change takes longer while frames
  stream; ``benchmarks/vocabulary_change_gap.py`` measures the frames' gap).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

ENCODER_THREADS = 1  # intra-op threads of the encoding thread on a CPU
ENCODER_NICE = 10  # added to the encoding thread's nice value (Linux): CFS weight 110 vs 1024
FRAME_PRIORITY = -100  # CUDA: the highest priority the device has (torch clamps)
ENCODER_PRIORITY = 0  # CUDA: the lowest (CUDA's least priority is 0)


class SideEncoding:
    """The streams (CUDA) and thread settings (CPU) that keep an encoding from slowing frames.

    ``device``: the model's. ``frames()`` / ``encoding()``: contexts for the frame thread's
    segmenting and the encoding thread's work; ``frame_thread()`` / ``encoding_thread()``:
    called once at the start of each thread (CPU thread counts, niceness).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.frame_stream: torch.cuda.Stream | None = None
        self.encode_stream: torch.cuda.Stream | None = None
        if device.type == "cuda" and torch.cuda.is_available():
            # What was loaded on the default stream (the weights) is complete before another
            # stream reads it: torch's streams do not wait for the default one.
            torch.cuda.synchronize(device)
            self.frame_stream = torch.cuda.Stream(device, priority=FRAME_PRIORITY)
            self.encode_stream = torch.cuda.Stream(device, priority=ENCODER_PRIORITY)
        self.frame_threads = torch.get_num_threads()  # the process's count, at load

    @contextlib.contextmanager
    def frames(self) -> Iterator[None]:
        """Run the enclosed frame work on the high-priority stream (CUDA; nothing on a CPU)."""
        if self.frame_stream is None:
            yield
            return
        with torch.cuda.stream(self.frame_stream):
            yield

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """Run the enclosed encoding on the low-priority stream and wait for it at the end, so
        what it made is complete before another stream reads it (CUDA; nothing on a CPU)."""
        if self.encode_stream is None:
            yield
            return
        with torch.cuda.stream(self.encode_stream):
            yield
        self.encode_stream.synchronize()

    def frame_thread(self) -> None:
        """Pin the calling (frame) thread's intra-op threads to the process's count at load."""
        _own_threads(self.frame_threads)

    def encoding_thread(self) -> None:
        """Bound the calling (encoding) thread: ENCODER_THREADS intra-op threads, and nice
        ENCODER_NICE more than the process (Linux; elsewhere, or refused: left as it is).
        The process's count, which threads not started yet take, stays ``frame_threads``."""
        if self.device.type == "cpu":
            _own_threads(min(ENCODER_THREADS, self.frame_threads))
            # torch.set_num_threads also sets the process's count: a throwaway thread sets it
            # back, so that no other thread (a later frame thread) takes the encoder's bound.
            restore = threading.Thread(target=torch.set_num_threads, args=(self.frame_threads,))
            restore.start()
            restore.join()
        with contextlib.suppress(AttributeError, OSError):
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + ENCODER_NICE))


def _own_threads(count: int) -> None:
    """Set the calling thread's intra-op thread count to ``count``, for good.

    torch initialises a thread's count at its first parallel region from the process's last
    ``set_num_threads`` (``at::internal::lazy_init_num_threads``), which would override a count
    set before it from another thread's later call: initialise first (``get_num_threads``),
    then set.
    """
    torch.get_num_threads()
    torch.set_num_threads(count)
