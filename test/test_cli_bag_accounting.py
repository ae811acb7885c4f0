"""ovss-bag never loses results silently: the last line states what the output bag holds, exactly.

Interrupted for real (a child process sent SIGINT, two SIGINTs, SIGTERM once its progress bar shows
frames done), stopped by a real read error (a chunk of the input MCAP whose checksum is wrong),
and with the real segmenter failing on some frames; each time the output bag is read back with
rosbags and compared with the numbers printed. A full disk is the one fault injected (into rosbags'
Writer.write).
"""

import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mcap.reader import make_reader
from rosbags.rosbag2 import StoragePlugin, Writer
from test_cli_bag import ENGINE, _jpeg, _raw_image, read_bag, write_bag

from ovss_ros.cli.bag import main
from ovss_ros.core import Segmenter

REPO = Path(__file__).resolve().parents[1]
TOPIC = "/camera/image_raw/compressed"
OUTPUTS = ["/ovss/labels", "/ovss/label_info", "/ovss/masks/person", "/ovss/overlay"]
SUMMARY = re.compile(
    r"(?P<how>finished|interrupted by (?P<signal>SIG\w+) after|stopped by an error after) "
    r"(?P<done>\d+) of (?P<total>\d+) frames \((?P<segmented>\d+) segmented, "
    r"(?P<skipped>\d+) skipped\).*holds (?P<copied>\d+) input frames and the outputs of "
    r"(?P<outputs>\d+)"
)


def summary(text: str) -> dict[str, str | int]:
    (line,) = [line for line in text.splitlines() if SUMMARY.search(line)]
    fields = SUMMARY.search(line).groupdict()
    return {k: int(v) if v and v.isdigit() else v for k, v in fields.items()}


def check_bag_matches(out: Path, image_topic: str, numbers: dict) -> dict[str, list]:
    """The bag holds exactly the frames and outputs the summary states, each with its frame."""
    topics = read_bag(out)  # metadata.yaml is there: the bag was closed, not aborted
    inputs = [stamp for stamp, _, _ in topics.get(image_topic, [])]
    assert numbers["copied"] == len(inputs) == numbers["done"]
    assert numbers["segmented"] == numbers["outputs"] == numbers["done"] - numbers["skipped"]
    for topic in OUTPUTS:
        stamps = [stamp for stamp, _, _ in topics.get(topic, [])]
        assert len(stamps) == numbers["outputs"], topic
        assert set(stamps) <= set(inputs), f"{topic} has outputs of frames not in the bag"
    return topics


@pytest.fixture(scope="module")
def forty_frames(tmp_path_factory, voc_rgb) -> Path:
    path = tmp_path_factory.mktemp("in") / "forty"
    write_bag(path, StoragePlugin.MCAP, TOPIC, [_jpeg(i, voc_rgb[i % 3]) for i in range(40)])
    return path


class Child:
    """ovss-bag in its own process; stderr collected by a thread as it arrives."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ovss_ros.cli.bag", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.stderr = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.process.stderr.read(1):
            with self.changed:
                self.stderr += chunk
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def frames_done(self) -> int:
        counts = re.findall(r"\| *(\d+)/40 \[", self.stderr)  # tqdm: "| 7/40 [00:02<..."
        return int(counts[-1]) if counts else 0

    def wait_for_frames(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.frames_done() < count and self.process.poll() is None:
                assert self.changed.wait(deadline - time.monotonic()), self.stderr[-2000:]
        assert self.frames_done() >= count, f"child ended early:\n{self.stderr[-3000:]}"


@pytest.mark.parametrize(
    ("signals", "status"),
    [(["SIGINT"], 130), (["SIGINT", "SIGINT"], 130), (["SIGTERM"], 143)],
    ids=["sigint", "double-sigint", "sigterm"],
)
def test_signal_leaves_a_bag_that_matches_the_message(tmp_path, forty_frames, signals, status):
    out = tmp_path / "out"
    child = Child(
        [str(forty_frames), str(out), "--topic", TOPIC, "--classes", "person", "--progress"]
        + ENGINE
    )
    try:
        child.wait_for_frames(5, timeout=600)  # torch import and model load first: generous
        for number, name in enumerate(signals):
            if number:
                time.sleep(0.2)  # a second Ctrl-C 0.2 s later, as a user presses it
            child.process.send_signal(signal.Signals[name])
        assert child.process.wait(timeout=300) == status
    finally:
        if child.process.poll() is None:
            child.process.kill()
    child.process.wait()
    text = child.stderr
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    numbers = summary(text)
    assert numbers["signal"] == signals[0]
    assert numbers["total"] == 40 and 5 <= numbers["done"] < 40
    assert child.frames_done() <= numbers["done"]  # the bar counts frames written, not read
    topics = check_bag_matches(out, TOPIC, numbers)
    assert topics[TOPIC][: numbers["done"]] == read_bag(forty_frames)[TOPIC][: numbers["done"]]


def test_segmentation_failures_are_counted_and_the_rest_written(
    tmp_path, voc_rgb, monkeypatch, caplog
):
    bag = tmp_path / "in"
    messages = [_raw_image(i, rgb) for i, rgb in enumerate(voc_rgb)]
    write_bag(bag, StoragePlugin.SQLITE3, "/camera/image_raw", messages)
    segment = Segmenter.segment
    calls = []

    def fails_on_second_frame(self, rgb):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return segment(self, rgb)

    monkeypatch.setattr(Segmenter, "segment", fails_on_second_frame)
    out = tmp_path / "out"
    args = [str(bag), str(out), "--topic", "/camera/image_raw", "--classes", "person"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 1
    assert "(segmentation failed): RuntimeError: CUDA out of memory (injected)" in caplog.text
    assert "skipped 1 of 3 frames (1 segmentation failed)" in caplog.text
    numbers = summary(caplog.text)
    assert (numbers["how"], numbers["done"], numbers["segmented"]) == ("finished", 3, 2)
    topics = check_bag_matches(out, "/camera/image_raw", numbers)
    inputs = [stamp for stamp, _, _ in topics["/camera/image_raw"]]
    assert [stamp for stamp, _, _ in topics["/ovss/labels"]] == [inputs[0], inputs[2]]


def corrupt_chunk_checksum(bag: Path, chunk: int) -> None:
    """Overwrite the uncompressed-data CRC of one chunk of the bag's MCAP file (bit rot)."""
    (path,) = bag.glob("*.mcap")
    with path.open("rb") as stream:
        offset = make_reader(stream).get_summary().chunk_indexes[chunk].chunk_start_offset
    data = bytearray(path.read_bytes())
    crc = offset + 1 + 8 + 8 + 8 + 8  # opcode, record length, start, end, uncompressed size
    data[crc : crc + 4] = struct.pack("<I", struct.unpack("<I", data[crc : crc + 4])[0] ^ 1)
    path.write_bytes(bytes(data))


def test_read_error_stops_the_run_and_the_bag_holds_what_is_reported(tmp_path, voc_rgb, caplog):
    bag = tmp_path / "in"
    write_bag(bag, StoragePlugin.MCAP, "/image", [_raw_image(i, voc_rgb[i % 3]) for i in range(8)])
    corrupt_chunk_checksum(bag, 2)  # raw VOC frames fill a chunk each ~2 frames
    out = tmp_path / "out"
    args = [str(bag), str(out), "--topic", "/image", "--classes", "person"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 1
    assert "ReaderError: Chunk checksum mismatch" in caplog.text
    numbers = summary(caplog.text)
    assert numbers["how"] == "stopped by an error after" and 0 < numbers["done"] < 8
    check_bag_matches(out, "/image", numbers)


def test_write_error_stops_the_run_and_per_topic_counts_are_exact(
    tmp_path, voc_rgb, monkeypatch, caplog
):
    """A full disk while a frame's outputs are written: the message says so, the counts hold."""
    bag = tmp_path / "in"
    write_bag(bag, StoragePlugin.SQLITE3, "/image", [_raw_image(i, voc_rgb[i]) for i in range(3)])
    write, calls = Writer.write, []

    def disk_full_on_tenth_message(self, connection, timestamp, data):
        calls.append(connection.topic)
        if len(calls) == 10:
            raise OSError(28, "No space left on device (injected)")
        return write(self, connection, timestamp, data)

    monkeypatch.setattr(Writer, "write", disk_full_on_tenth_message)
    out = tmp_path / "out"
    args = [str(bag), str(out), "--topic", "/image", "--classes", "person"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 1
    monkeypatch.undo()
    # per frame: /image, label_info, labels, masks/person, overlay, then /note: the 10th message
    # is the second frame's mask, after its input, label_info and labels went in.
    assert "No space left on device (injected) (while writing the frame at" in caplog.text
    topics = read_bag(out)
    for topic, count in re.findall(r"(/\S+): (\d+) messages", caplog.text):
        assert len(topics.get(topic, [])) == int(count), topic
    assert [len(topics[t]) for t in ("/image", "/ovss/labels", "/ovss/masks/person")] == [2, 2, 1]
