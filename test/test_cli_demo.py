"""ovss-demo (issue 20): end to end on a CPU without weights, its refusals, a node that cannot
start, Ctrl-C.

The demo runs as its console script does, in its own process, on this test run's ROS domain
(``ros_harness.isolate_dds``, passed as ``--domain-id``) with HF_HUB_OFFLINE=1: the default
weights are not cached on the test machine, so it must say so and run its shipped random model.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import voc_image_paths
from ros_harness import STARTUP_TIMEOUT_S, STOP_TIMEOUT_S, child_environment, isolate_dds

from ovss_ros.cli import demo

MODEL_LIBRARIES = {"torch", "open_clip", "transformers", "diffusers", "scipy", "skimage"}
RUN_TIMEOUT_S = 3 * STARTUP_TIMEOUT_S  # the whole run: start-up, frames, shutdown
FRAME = re.compile(
    r"^frame (\d+)/(\d+) (\S+) \| vocabulary: (.*?) \| present: (.*?) \| latency (\d+) ms"
    r" \| RANDOM WEIGHTS$"
)


def demo_command(*argv: str, importtime: bool = False) -> list[str]:
    code = "import sys; from ovss_ros.cli.demo import main; sys.exit(main())"
    return [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code, *argv]


def domain() -> str:
    return isolate_dds()["ROS_DOMAIN_ID"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for path in voc_image_paths()[:3]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """One short run: 3 photos at 2 Hz, the vocabulary changed after frame 2."""
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["--images", str(images), "--rate", "2", "--change-after", "2", "--output", str(out)]
    argv += ["--classes", "cat", "dog", "--then-classes", "car", "person; human"]
    result = subprocess.run(
        demo_command(*argv, "--domain-id", domain()),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    return result, out


def frame_lines(text: str) -> list[re.Match]:
    return [m for line in text.splitlines() if (m := FRAME.match(line))]


def test_a_run_without_weights_says_so_and_uses_the_random_model(run):
    result, out = run
    shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, shown
    notes = [line for line in result.stdout.splitlines() if "not in the local cache" in line]
    assert len(notes) == 1 and "RANDOM model" in notes[0], shown
    assert "RANDOM WEIGHTS: the labels are meaningless" in (out / "summary.txt").read_text()
    assert "exit status 0" in result.stdout, shown  # the node shut down cleanly


def test_every_frame_is_in_the_summary_with_the_vocabulary_in_force(run):
    result, out = run
    summary = (out / "summary.txt").read_text()
    frames = frame_lines(summary)
    assert [int(m[1]) for m in frames] == [1, 2, 3], summary
    assert {int(m[2]) for m in frames} == {3}
    assert [m[4] for m in frames] == ["cat, dog", "cat, dog", "car, person"], summary
    assert [m[0] for m in frame_lines(result.stdout)] == [m[0] for m in frames]
    for match in frames:
        known = {"cat", "dog"} if int(match[1]) <= 2 else {"car", "person"}
        pairs = [entry.rsplit(" ", 1) for entry in match[5].split(", ")]
        shares = {name: float(share.rstrip("%")) for name, share in pairs}
        assert shares and set(shares) <= known | {"unlabeled"}, match[0]
        assert sum(shares.values()) == pytest.approx(100.0, abs=0.1 * len(shares)), match[0]


def test_the_overlays_are_written_with_their_summary_line(run, images):
    _, out = run
    sources = sorted(images.iterdir())
    for index, source in enumerate(sources, start=1):
        overlay = cv2.imread(str(out / f"overlay_{index:04d}.png"))
        photo = cv2.imread(str(source))
        assert overlay is not None, f"overlay {index} missing"
        height, width = photo.shape[:2]
        assert overlay.shape[1] == width and overlay.shape[0] > height  # + the summary strip
        blended = overlay[:height].astype(int) - photo.astype(int)
        assert np.abs(blended).mean() > 5, "the overlay shows no class colours"
        strip = overlay[height:]
        red = (strip[..., 2] > 150) & (strip[..., 0] < 80) & (strip[..., 1] < 80)
        assert red.sum() > 50, "no RANDOM WEIGHTS warning on the overlay"


def test_pixel_shares_read_mono16_labels_with_a_padded_step():
    from sensor_msgs.msg import Image

    from ovss_ros.cli.demo_session import label_array, pixel_shares

    labels = np.array([[0, 0, 1, 65535]] * 2, np.uint16)
    padded = np.zeros((2, 6), np.uint16)
    padded[:, :4] = labels
    message = Image(
        height=2, width=4, encoding="mono16", is_bigendian=0, step=12, data=padded.tobytes()
    )
    assert np.array_equal(label_array(message), labels)
    assert pixel_shares(labels, {0: "cup", 1: "door"}) == [
        ("cup", 0.5),
        ("door", 0.25),
        ("unlabeled", 0.25),
    ]


MISSING = "no_such_folder_7b1e"


def _not_an_image(folder: Path) -> list[str]:
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return ["--images", str(folder)]


def _empty(folder: Path) -> list[str]:
    (folder / "empty").mkdir()
    return ["--images", str(folder / "empty")]


def _output_is_a_file(folder: Path) -> list[str]:
    (folder / "file").write_text("x")
    return ["--output", str(folder / "file")]


def _summary_is_a_folder(folder: Path) -> list[str]:
    (folder / "out" / "summary.txt").mkdir(parents=True)
    return ["--output", str(folder / "out")]


def _overlay_is_a_folder(folder: Path) -> list[str]:
    (folder / "out" / "overlay_0002.png").mkdir(parents=True)
    return ["--output", str(folder / "out"), "--frames", "2", "--change-after", "1"]


def _log_is_a_link(folder: Path) -> list[str]:
    (folder / "elsewhere.txt").write_text("not the demo's\n")
    (folder / "out").mkdir()
    (folder / "out" / "node.log").symlink_to(folder / "elsewhere.txt")
    return ["--output", str(folder / "out")]


BAD = [
    ("node.log a link", _log_is_a_link, "node.log there is a link"),
    ("output not writable", lambda d: ["--output", "/proc/self/demo"], "cannot write in"),
    ("change-after the last frame", lambda d: ["--frames", "2", "--change-after", "2"],
     "the vocabulary would never change"),
    ("empty output", lambda d: ["--output", " "], "--output is empty"),
    ("summary.txt a folder", _summary_is_a_folder, "summary.txt there is not a file"),
    ("an overlay a folder", _overlay_is_a_folder, "overlay_0002.png there is not a file"),
    ("rate 0", lambda d: ["--rate", "0"], "--rate"),
    ("rate nan", lambda d: ["--rate", "nan"], "--rate"),
    ("frames 0", lambda d: ["--frames", "0"], "--frames"),
    ("change-after 0", lambda d: ["--change-after", "0"], "--change-after"),
    ("empty class", lambda d: ["--classes", "cup", ""], "--classes"),
    ("duplicate class", lambda d: ["--then-classes", "cup", "Cup"], "--then-classes"),
    ("domain", lambda d: ["--domain-id", "999"], "--domain-id"),
    ("device", lambda d: ["--device", "gpu"], "--device"),
    ("unknown flag", lambda d: ["--bogus"], "--bogus"),
    ("topic without bag", lambda d: ["--topic", "/image"], "--topic"),
    ("missing images folder", lambda d: ["--images", MISSING], MISSING),
    ("empty images folder", _empty, "no images"),
    ("undecodable image", _not_an_image, "broken.jpg"),
    ("missing bag", lambda d: ["--bag", MISSING], MISSING),
    ("not a bag", lambda d: ["--bag", str(d)], "metadata.yaml"),
    ("output is a file", _output_is_a_file, "not a folder"),
    ("images and bag", lambda d: ["--images", str(d), "--bag", str(d)], "not allowed"),
]


@pytest.mark.parametrize(("argv", "text"), [pytest.param(a, t, id=n) for n, a, t in BAD])
def test_bad_input_is_one_line_and_status_2_before_torch(tmp_path, argv, text):
    result = subprocess.run(
        demo_command(*argv(tmp_path), importtime=True),
        cwd=tmp_path,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = result.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}
    own = [line for line in lines if not line.startswith("import time:")]
    shown = f"status {result.returncode}\nstdout: {result.stdout}\nstderr: {own}"
    assert result.returncode == 2, shown
    assert len(own) == 1 and own[0].startswith("ovss-demo: error: ") and text in own[0], shown
    assert "ovss_ros.cli.demo" in imported, shown  # the import log is read
    assert not {name.split(".")[0] for name in imported} & MODEL_LIBRARIES, shown


def test_a_node_that_cannot_start_gives_its_error_line_and_status_1(tmp_path, images):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the node must fail on device cuda)")
    result = subprocess.run(
        demo_command(
            "--images", str(images), "--device", "cuda", "--output", str(tmp_path / "out"),
            "--domain-id", domain(),
        ),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and "CUDA is not available" in errors[0], result.stderr
    assert not frame_lines(result.stdout)


@contextlib.contextmanager
def slow_demo(tmp_path: Path, images: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The demo mid-run: its first frame is in and the next is 100 s away. Killed on the way out
    if still running."""
    out = tmp_path / "out"
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        process = subprocess.Popen(
            demo_command(
                "--images", str(images), "--rate", "0.01", "--output", str(out),
                "--domain-id", domain(),
            ),
            env=child_environment(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not frame_lines(log.read_text()):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield process, out
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_stops_the_node_cleanly(tmp_path, images):
    with slow_demo(tmp_path, images) as (process, out):
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=3 * STOP_TIMEOUT_S)
    text = (tmp_path / "stdout.txt").read_text()
    assert process.returncode == 130, (text, stderr)
    assert "stopped (Ctrl-C)" in stderr and "Traceback" not in stderr, stderr
    assert "node stopped (exit status 0)" in text, text
    node_log = (out / "node.log").read_text()
    assert "SIGINT: shutting down" in node_log, node_log
    assert len(frame_lines(text)) == 1, text  # stopped before the next frame (100 s apart)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_demo_leaves_no_node_behind(tmp_path, images):
    """SIGKILL gives the demo no chance to stop its node: the node ends on its own (SIGTERM from
    the kernel), instead of serving on the demo's domain for ever."""
    with slow_demo(tmp_path, images) as (process, out):
        (node,) = children(process.pid)
        process.kill()
        process.wait()
    deadline = time.monotonic() + 3 * STOP_TIMEOUT_S
    while Path(f"/proc/{node}").exists() and "Z" not in _state(node):
        assert time.monotonic() < deadline, (out / "node.log").read_text()
        time.sleep(0.1)
    assert "SIGTERM: shutting down" in (out / "node.log").read_text()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_without_the_voc_samples_the_shipped_scenes_are_played(monkeypatch):
    """A machine without labelme-examples plays the synthetic scenes in the package (and they
    are installed: setup.py's package_data names them)."""
    from pathlib import PurePosixPath

    from ovss_ros.cli import demo
    from ovss_ros.cli.demo_media import read_images
    from ovss_ros.cli.demo_options import DATA, RANDOM_MODEL

    monkeypatch.setattr(demo, "VOC_IMAGES", Path(MISSING))
    folder = demo.default_images()
    assert folder == demo.SHIPPED_IMAGES
    frames = read_images(demo._image_files(folder), None)
    assert len(frames) >= 2 and all(rgb.ndim == 3 and rgb.dtype == np.uint8 for _, rgb in frames)
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    globs = re.search(r'"ovss_ros": \[([^\]]*)\]', setup)[1]
    patterns = re.findall(r'"([^"]+)"', globs)
    shipped = [path.relative_to(DATA.parent).as_posix() for path in folder.iterdir()]
    shipped.append(RANDOM_MODEL.relative_to(DATA.parent).as_posix())
    for name in shipped:  # setuptools' globs: '*' stays within one folder
        assert any(PurePosixPath(name).match(p) for p in patterns), (name, patterns)


def _compressed_bag(path: Path, photos: list[Path]) -> None:
    """An MCAP bag: JPEG frames of ``photos`` on /cam/image/compressed, one undecodable frame
    second, and a std_msgs/String topic beside them."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from ovss_ros.ros.bag_files import typestore

    store = typestore()
    types = store.types
    kind = "sensor_msgs/msg/CompressedImage"
    payloads = [np.fromfile(photos[0], np.uint8), np.frombuffer(b"not a jpeg", np.uint8)]
    payloads += [np.fromfile(photo, np.uint8) for photo in photos[1:]]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        images = writer.add_connection("/cam/image/compressed", kind, typestore=store)
        note = writer.add_connection("/note", "std_msgs/msg/String", typestore=store)
        for index, data in enumerate(payloads):
            stamp = 1_700_000_000_000_000_000 + index * 100_000_000
            time_msg = types["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=0)
            header = types["std_msgs/msg/Header"](stamp=time_msg, frame_id="cam")
            message = types[kind](header=header, format="jpeg", data=data)
            writer.write(images, stamp, store.serialize_cdr(message, kind))
            text = types["std_msgs/msg/String"](data=f"frame {index}")
            writer.write(note, stamp + 1, store.serialize_cdr(text, "std_msgs/msg/String"))


def test_a_bag_is_played_as_the_camera(tmp_path, images):
    bag = tmp_path / "bag"
    _compressed_bag(bag, sorted(images.iterdir())[:2])
    out = tmp_path / "out"
    argv = ["--bag", str(bag), "--rate", "5", "--output", str(out), "--domain-id", domain()]
    argv += ["--classes", "cat", "--then-classes", "dog", "car"]
    result = subprocess.run(
        demo_command(*argv),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    frames = frame_lines((out / "summary.txt").read_text())
    # the undecodable frame (index 1) is skipped before playing
    names = [m[3] for m in frames]
    assert names == ["/cam/image/compressed@0", "/cam/image/compressed@2"], names
    assert [m[4] for m in frames] == ["cat", "dog, car"]
    assert (out / "overlay_0002.png").is_file()


def test_a_bag_topic_that_is_not_an_image_topic_is_refused(tmp_path, images):
    bag = tmp_path / "bag"
    _compressed_bag(bag, sorted(images.iterdir())[:1])
    result = subprocess.run(
        demo_command("--bag", str(bag), "--topic", "/note"),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "/cam/image/compressed" in lines[0], lines


def test_the_weights_are_the_defaults_when_cached_and_random_otherwise(monkeypatch):
    """The choice the demo makes, with the cache look-up answered both ways (the test machine
    has no weights; HF_HUB_OFFLINE=1 forbids a download)."""
    from ovss_ros.cli import demo_run
    from ovss_ros.core.clip import hub_access
    from ovss_ros.core.config import EngineConfig

    defaults = EngineConfig()
    random_weights = demo_run.choose_weights(download=False)
    assert random_weights.random and random_weights.pretrained == "none"
    assert "--download" in random_weights.note and "RANDOM" in random_weights.note
    offline = demo_run.choose_weights(download=True)
    assert offline.random and "HF_HUB_OFFLINE" in offline.note, offline.note
    asked: list[tuple[str, tuple[str, ...]]] = []

    def cached(repo_id: str, filenames: list[str]) -> str:
        asked.append((repo_id, tuple(filenames)))
        return "/cache/open_clip_model.safetensors"

    monkeypatch.setattr(hub_access, "cached_file", cached)
    found = demo_run.choose_weights(download=False)
    assert not found.random and (found.model, found.pretrained) == (
        defaults.model,
        defaults.pretrained,
    )
    assert asked and "laion" in asked[0][0].lower(), asked


def test_help_shows_every_flag_with_its_default_without_torch(tmp_path):
    result = subprocess.run(
        demo_command("--help", importtime=True),
        cwd=tmp_path,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    imported = {
        ln.rsplit("|", 1)[1].strip() for ln in result.stderr.splitlines() if "import time:" in ln
    }
    assert result.returncode == 0 and "usage: ovss-demo" in result.stdout, result.stderr
    assert not {name.split(".")[0] for name in imported} & MODEL_LIBRARIES
    text = " ".join(result.stdout.split())
    for flag in ("--images", "--bag", "--topic", "--frames", "--rate", "--classes",
                 "--then-classes", "--change-after", "--output", "--domain-id", "--device",
                 "--download", "--frame-timeout", "--startup-timeout"):
        assert flag in text, flag
    for default in ("(default: 1.0)", "(default: ovss_demo_output)", "101..199"):
        assert default in text, default


def test_a_domain_that_has_an_ovss_node_is_refused(tmp_path, images):
    """The demo would send its frames and vocabulary change to that node too (it did)."""
    from ros_harness import TINY_NODE_PARAMETERS, running_node

    domain_id = domain()
    with running_node(TINY_NODE_PARAMETERS | {"classes": ["sofa"]}) as (_, other):
        result = subprocess.run(
            demo_command("--images", str(images), "--output", str(tmp_path / "out"),
                         "--domain-id", domain_id),
            env=child_environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
            check=False,
        )  # fmt: skip
        assert other.returncode is None, other.output()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"ovss-demo: ROS_DOMAIN_ID={domain_id} already has a node /ovss (another ovss node or "
        "ovss-demo): the demo would drive it too; choose another --domain-id"
    )
    assert not frame_lines(result.stdout)


def test_a_random_domain_that_has_an_ovss_node_is_drawn_again(monkeypatch):
    from dataclasses import replace

    from ovss_ros.cli import demo_run

    taken = {150}
    looked = []  # seconds each look lasted: a drawn domain is looked at for DISCOVERY_S

    def ovss_on_domain(domain_id, seconds):
        looked.append(seconds)
        return domain_id in taken

    monkeypatch.setattr(demo_run, "ovss_on_domain", ovss_on_domain)
    args = demo.check_arguments(["--frames", "2"])
    drawn = demo_run.free_domain(replace(args, domain_id=150, domain_chosen=False))
    assert drawn.domain_id != 150 and drawn.domain_id in demo_run.DOMAIN_IDS
    assert looked == [demo_run.DISCOVERY_S] * 2
    looked.clear()
    with pytest.raises(demo_run.DomainTaken, match="ROS_DOMAIN_ID=150 already has"):
        demo_run.free_domain(replace(args, domain_id=150, domain_chosen=True))
    assert looked == [demo_run.GIVEN_DOMAIN_DISCOVERY_S]  # a given domain: looked at longer


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_before_the_node_starts_is_said_and_143(tmp_path, images):
    """The handler is there from the demo's first line (a SIGTERM while torch was imported
    ended it silently)."""
    process = subprocess.Popen(
        demo_command("--images", str(images), "--output", str(tmp_path / "out"),
                     "--domain-id", domain()),
        env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _catches_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("ovss-demo: stopped (SIGTERM)"), err
    assert "Traceback" not in err
