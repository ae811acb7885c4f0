"""ovss-bag end to end: real rosbag2 bags (sqlite3 and MCAP) of the VOC photos in, new bags out.

Input bags are written here with rosbags' own typestore, while ovss-bag serializes with rclpy; the
outputs are decoded with rosbags (and label_info also with rclpy and with mcap_ros2 from the schema
stored in the MCAP file), so the tests also check that these readers agree on the bytes.
"""

import io
import json
import logging
import re
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from PIL import Image as PILImage
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import get_types_from_msg
from vision_msgs.msg import LabelInfo

from ovss_ros.cli.bag import main, parse_args
from ovss_ros.cli.engine_args import config_from_args
from ovss_ros.core import Segmentation, Segmenter, palette
from ovss_ros.core import overlay as draw_overlay
from ovss_ros.ros.bag import LABEL_INFO_TYPE, VISION_MSGS_DEFINITIONS, typestore

ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--short-side", "64"]
ENGINE += ["--templates", "single"]
CLASSES = ["person", "cup; mug", "tv; monitor"]
SLUGS = ["person", "cup", "tv"]
STORE = typestore()
T = STORE.types
FIRST_STAMP = 1_700_000_000_000_000_000  # bag time of the first frame, ns
PERIOD = 100_000_000  # 10 Hz
VISION_MSGS_LITE = Path(__file__).parents[1] / "vision_msgs_lite" / "msg"


def _header(index: int) -> object:
    stamp = FIRST_STAMP + index * PERIOD - 5_000_000  # header stamp != bag time, on purpose
    time = T["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9)
    return T["std_msgs/msg/Header"](stamp=time, frame_id="camera_optical")


def _raw_image(index: int, rgb: np.ndarray) -> object:
    height, width = rgb.shape[:2]
    data = np.ascontiguousarray(rgb).reshape(-1)
    return T["sensor_msgs/msg/Image"](
        header=_header(index),
        height=height,
        width=width,
        encoding="rgb8",
        is_bigendian=0,
        step=width * 3,
        data=data,
    )


def _jpeg(index: int, rgb: np.ndarray | None) -> object:
    """A CompressedImage of ``rgb``, or of bytes that are no image when ``rgb`` is None."""
    if rgb is None:
        data = np.frombuffer(b"\xff\xd8 this is not a jpeg" * 10, dtype=np.uint8)
    else:
        data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].reshape(-1)
    return T["sensor_msgs/msg/CompressedImage"](header=_header(index), format="jpeg", data=data)


def write_bag(path: Path, storage: StoragePlugin, topic: str, messages: list[object]) -> None:
    """A bag with ``messages`` on ``topic`` at 10 Hz and a std_msgs/String on /note between."""
    with Writer(path, version=9, storage_plugin=storage) as writer:
        msgtype = messages[0].__msgtype__
        images = writer.add_connection(topic, msgtype, typestore=STORE)
        note = writer.add_connection("/note", "std_msgs/msg/String", typestore=STORE)
        for index, message in enumerate(messages):
            stamp = FIRST_STAMP + index * PERIOD
            writer.write(images, stamp, STORE.serialize_cdr(message, msgtype))
            text = T["std_msgs/msg/String"](data=f"frame {index}")
            writer.write(note, stamp + 1, STORE.serialize_cdr(text, "std_msgs/msg/String"))


def read_bag(path: Path) -> dict[str, list[tuple[int, bytes, str]]]:
    """Topic -> [(bag timestamp, raw CDR bytes, msgtype)] in bag order."""
    topics: dict[str, list[tuple[int, bytes, str]]] = {}
    with Reader(path) as reader:
        for connection, stamp, raw in reader.messages():
            topics.setdefault(connection.topic, []).append((stamp, bytes(raw), connection.msgtype))
    return topics


def storage_of(path: Path) -> str:
    text = (path / "metadata.yaml").read_text()
    return text.split("storage_identifier:")[1].split()[0]


@pytest.fixture(scope="module")
def raw_sqlite3_bag(tmp_path_factory, voc_rgb) -> Path:
    path = tmp_path_factory.mktemp("in") / "raw_bag"
    messages = [_raw_image(i, rgb) for i, rgb in enumerate(voc_rgb)]
    write_bag(path, StoragePlugin.SQLITE3, "/camera/image_raw", messages)
    return path


def _decodable(message: object) -> bool:
    if message.__msgtype__ != "sensor_msgs/msg/CompressedImage":
        return True
    return cv2.imdecode(message.data, cv2.IMREAD_COLOR) is not None


def check_frames(topics, ns: str, image_topic: str, sizes: list[tuple[int, int]]) -> None:
    """labels, label_info, masks: input's size, header and bag time; masks agree with labels."""
    inputs = [(stamp, STORE.deserialize_cdr(raw, t)) for stamp, raw, t in topics[image_topic]]
    decodable = [(stamp, msg) for stamp, msg in inputs if _decodable(msg)]
    labels = topics[f"{ns}/labels"]
    assert len(labels) == len(sizes)
    for frame, (stamp, raw, msgtype) in enumerate(labels):
        assert msgtype == "sensor_msgs/msg/Image"
        image = STORE.deserialize_cdr(raw, msgtype)
        assert image.encoding == "mono8" and (image.height, image.width) == sizes[frame]
        input_stamp, input_msg = decodable[frame]
        assert stamp == input_stamp
        assert image.header == input_msg.header
        values = image.data.reshape(image.height, image.width)
        assert set(np.unique(values)) <= {0, 1, 2, 255}

        info_stamp, info_raw, info_type = topics[f"{ns}/label_info"][frame]
        assert (info_stamp, info_type) == (stamp, LABEL_INFO_TYPE)
        info = STORE.deserialize_cdr(info_raw, info_type)
        assert info.header == input_msg.header
        assert [(c.class_id, c.class_name) for c in info.class_map] == [
            (0, "person"),
            (1, "cup"),
            (2, "tv"),
        ]
        ros_info = deserialize_message(info_raw, LabelInfo)  # rclpy reads the same bytes
        assert [c.class_name for c in ros_info.class_map] == ["person", "cup", "tv"]

        for index, slug in enumerate(SLUGS):
            mask_stamp, mask_raw, _ = topics[f"{ns}/masks/{slug}"][frame]
            mask = STORE.deserialize_cdr(mask_raw, "sensor_msgs/msg/Image")
            assert mask_stamp == stamp and mask.header == input_msg.header
            assert mask.encoding == "mono8"
            pixels = mask.data.reshape(mask.height, mask.width)
            assert set(np.unique(pixels)) <= {0, 255}
            np.testing.assert_array_equal(pixels == 255, values == index)


def test_raw_images_from_sqlite3(tmp_path, raw_sqlite3_bag, voc_rgb):
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--classes"]
    assert main(args + CLASSES + ENGINE) == 0
    assert storage_of(out) == "sqlite3"  # same as the input by default
    topics = read_bag(out)
    mask_topics = {f"/ovss/masks/{s}" for s in SLUGS}
    outputs = {"/ovss/labels", "/ovss/label_info", "/ovss/overlay"} | mask_topics
    assert set(topics) == {"/camera/image_raw", "/note"} | outputs
    assert {topic: len(messages) for topic, messages in topics.items()} == dict.fromkeys(topics, 3)
    # Copied through untouched: same bytes at the same bag times.
    original = read_bag(raw_sqlite3_bag)
    for topic in ("/camera/image_raw", "/note"):
        assert topics[topic] == original[topic]
    check_frames(topics, "/ovss", "/camera/image_raw", [rgb.shape[:2] for rgb in voc_rgb])
    # The overlay is the node's: the same colours (a fresh vocabulary's) and the same legend.
    overlays = zip(topics["/ovss/overlay"], topics["/ovss/labels"], voc_rgb, strict=True)
    for (_, raw, _), (_, labels_raw, _), rgb in overlays:
        overlay = STORE.deserialize_cdr(raw, "sensor_msgs/msg/Image")
        assert overlay.encoding == "rgb8" and (overlay.height, overlay.width) == rgb.shape[:2]
        labels_msg = STORE.deserialize_cdr(labels_raw, "sensor_msgs/msg/Image")
        labels = labels_msg.data.reshape(labels_msg.height, labels_msg.width)
        segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), SLUGS)
        expected = draw_overlay(rgb, segmentation, 0.5)
        assert (expected != draw_overlay(rgb, segmentation, 0.5, legend=False)).any()
        np.testing.assert_array_equal(overlay.data.reshape(expected.shape), expected)


def test_no_legend_overlay_is_the_plain_blend(tmp_path, raw_sqlite3_bag, voc_rgb):
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--no-masks"]
    args += ["--alpha", "0.25", "--no-legend", "--classes"]
    assert main(args + CLASSES + ENGINE) == 0
    topics = read_bag(out)
    overlays = zip(topics["/ovss/overlay"], topics["/ovss/labels"], voc_rgb, strict=True)
    colours = palette(SLUGS).astype(np.float64)
    for (_, raw, _), (_, labels_raw, _), rgb in overlays:
        overlay = STORE.deserialize_cdr(raw, "sensor_msgs/msg/Image")
        labels_msg = STORE.deserialize_cdr(labels_raw, "sensor_msgs/msg/Image")
        labels = labels_msg.data.reshape(labels_msg.height, labels_msg.width)
        blend = 0.75 * rgb + 0.25 * colours[labels]
        drawn = overlay.data.reshape(rgb.shape).astype(np.float64)
        assert np.abs(drawn - blend).max() <= 1.0


def test_compressed_mcap_skips_an_undecodable_frame(tmp_path, voc_rgb, caplog):
    path = tmp_path / "compressed_bag"
    messages = [_jpeg(0, voc_rgb[0]), _jpeg(1, None), _jpeg(2, voc_rgb[1]), _jpeg(3, voc_rgb[2])]
    write_bag(path, StoragePlugin.MCAP, "/camera/image_raw/compressed", messages)
    out = tmp_path / "out"
    args = [str(path), str(out), "--topic", "/camera/image_raw/compressed", "--no-overlay"]
    args += ["--namespace", "front/ovss/", "--classes"]
    with caplog.at_level(logging.INFO):
        assert main(args + CLASSES + ENGINE) == 1  # the bag is written; one frame is missing
    assert (
        "skipping frame at 1700000000100000000 ns (undecodable): undecodable compressed image"
        in caplog.text
    )
    assert "skipped 1 of 4 frames (1 undecodable)" in caplog.text
    assert "finished 4 of 4 frames (3 segmented, 1 skipped)" in caplog.text
    assert f"{out} holds 4 input frames and the outputs of 3" in caplog.text
    assert storage_of(out) == "mcap"
    topics = read_bag(out)
    assert len(topics["/camera/image_raw/compressed"]) == 4  # copied, the bad frame too
    assert "/front/ovss/overlay" not in topics
    for topic in ["/front/ovss/labels", "/front/ovss/label_info"]:
        assert [stamp for stamp, _, _ in topics[topic]] == [
            FIRST_STAMP + i * PERIOD for i in (0, 2, 3)
        ]
    check_frames(
        topics, "/front/ovss", "/camera/image_raw/compressed", [rgb.shape[:2] for rgb in voc_rgb]
    )
    # mcap_ros2 (what Foxglove uses) decodes the outputs from the schemas stored in the file.
    (mcap_file,) = out.glob("*.mcap")
    with mcap_file.open("rb") as stream:
        reader = make_reader(stream, decoder_factories=[DecoderFactory()])
        names = [
            [c.class_name for c in decoded.class_map]
            for *_, decoded in reader.iter_decoded_messages(topics=["/front/ovss/label_info"])
        ]
    assert names == [["person", "cup", "tv"]] * 3


def test_ctrl_c_keeps_the_frames_done(tmp_path, raw_sqlite3_bag, monkeypatch, caplog):
    """Ctrl-C while the second frame is segmented: neither it nor its outputs are written."""
    segment = Segmenter.segment
    calls = []

    def interrupted_on_second_frame(self, rgb):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment(self, rgb)

    monkeypatch.setattr(Segmenter, "segment", interrupted_on_second_frame)
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--classes", "cup"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 130
    assert (
        f"interrupted by SIGINT after 1 of 3 frames (1 segmented, 0 skipped): {out} holds 1 "
        "input frames and the outputs of 1"
    ) in caplog.text
    topics = read_bag(out)  # closed properly: metadata.yaml is there
    assert len(topics["/ovss/labels"]) == 1 and len(topics["/camera/image_raw"]) == 1
    assert topics["/ovss/labels"][0][0] == topics["/camera/image_raw"][0][0]


def test_storage_conversion_and_copy_choice(tmp_path, raw_sqlite3_bag, voc_rgb):
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--storage", "mcap"]
    args += [
        "--copy",
        "none",
        "--no-masks",
        "--score-threshold",
        "1.0",
        "--classes",
        "person",
        "dog",
    ]
    torch.manual_seed(0)  # the random tiny model's weights, again for the reference below
    assert main(args + ENGINE) == 0
    assert storage_of(out) == "mcap"
    topics = read_bag(out)
    assert set(topics) == {"/ovss/labels", "/ovss/label_info", "/ovss/overlay"}
    # The threshold reached the engine: the labels are those of the same engine with
    # score_threshold 1.0, where only a pixel whose probability rounds to exactly 1.0 keeps its
    # label (random weights can saturate the softmax, so "all unlabeled" would be flaky).
    torch.manual_seed(0)
    reference = Segmenter(config_from_args(parse_args(args + ENGINE)))
    assert reference.config.score_threshold == 1.0
    reference.set_classes(["person", "dog"])
    for (_, raw, _), rgb in zip(topics["/ovss/labels"], voc_rgb, strict=True):
        labels = STORE.deserialize_cdr(raw, "sensor_msgs/msg/Image")
        expected = reference.segment(rgb)
        np.testing.assert_array_equal(labels.data.reshape(rgb.shape[:2]), expected.labels)
        assert (expected.confidence[expected.labels != 255] == 1.0).all()
        assert (expected.labels == 255).mean() > 0.5


def test_more_than_254_classes_give_mono16_labels(tmp_path, voc_rgb):
    path = tmp_path / "one_frame"
    write_bag(path, StoragePlugin.SQLITE3, "/image", [_raw_image(0, voc_rgb[0])])
    out = tmp_path / "out"
    classes = [f"thing {i}" for i in range(255)]
    args = [str(path), str(out), "--topic", "/image", "--no-masks", "--no-overlay", "--classes"]
    assert main(args + classes + ENGINE) == 0
    ((_, raw, _),) = read_bag(out)["/ovss/labels"]
    labels = STORE.deserialize_cdr(raw, "sensor_msgs/msg/Image")
    assert labels.encoding == "mono16" and labels.step == labels.width * 2
    values = labels.data.view("<u2")
    assert values.size == voc_rgb[0].shape[0] * voc_rgb[0].shape[1] and values.max() < 255


def test_error_exits(tmp_path, raw_sqlite3_bag, caplog, capsys):
    def run(*args: str) -> str:
        caplog.clear()
        base = ["--classes", "person"] + ENGINE
        assert main([*base, *args]) == 2  # later flags win
        return caplog.text

    out = str(tmp_path / "out")
    bag = str(raw_sqlite3_bag)
    assert "does not exist" in run(str(tmp_path / "nope"), out, "--topic", "/x")
    text = run(bag, out, "--topic", "/camera/color")
    assert "'/camera/color' is not in" in text
    assert "image topics: /camera/image_raw (sensor_msgs/msg/Image)" in text
    assert "reads sensor_msgs/msg/Image or" in run(bag, out, "--topic", "/note")
    assert "exists already" in run(bag, bag, "--topic", "/camera/image_raw")
    assert "not a valid ROS name" in run(
        bag, out, "--topic", "/camera/image_raw", "--namespace", "1x"
    )
    # no crop
    assert "dense.stride" in run(bag, out, "--topic", "/camera/image_raw", "--dense-stride", "8")
    with pytest.raises(SystemExit) as exit_info:  # a parse error: one line on stderr, 2
        main([bag, out, "--classes", "person", "--topic", "/camera/image_raw", "--sd-size", "9"])
    assert exit_info.value.code == 2
    assert "--sd-size was renamed --dslo-sd-size" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pt")
    assert "missing.pt" in run(bag, out, "--topic", "/camera/image_raw", "--pretrained", missing)
    assert not (tmp_path / "out").exists()  # nothing written on a refused run


def test_label_info_type_matches_vision_msgs():
    """The embedded definition is vision_msgs_lite's, so bags carry vision_msgs' type hash."""
    for name, definition in VISION_MSGS_DEFINITIONS.items():
        lite = (VISION_MSGS_LITE / f"{name.rsplit('/', 1)[1]}.msg").read_text()
        assert get_types_from_msg(definition, name) == get_types_from_msg(lite, name)
    built = Path(sys.prefix) / "share" / "vision_msgs" / "msg" / "LabelInfo.json"
    if not built.is_file():
        pytest.skip("vision_msgs' generated type description is not installed here")
    hashes = json.loads(built.read_text())["type_hashes"]
    expected = next(h["hash_string"] for h in hashes if h["type_name"] == LABEL_INFO_TYPE)
    assert STORE.hash_rihs01(LABEL_INFO_TYPE) == expected


def _tagged_jpeg(index: int, rgb: np.ndarray, orientation: int) -> object:
    """A CompressedImage JPEG of ``rgb`` whose EXIF Orientation tag is ``orientation``."""
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    return T["sensor_msgs/msg/CompressedImage"](header=_header(index), format="jpeg", data=data)


def test_exif_orientation_is_ignored_outputs_keep_the_stored_grid(tmp_path, voc_rgb):
    """A 64x48 JPEG tagged Orientation 6 (and 3, 8) gives 64x48 outputs, as camera_info says."""
    crop = np.ascontiguousarray(voc_rgb[0][:48, :64])
    path = tmp_path / "oriented"
    messages = [_tagged_jpeg(i, crop, o) for i, o in enumerate([6, 3, 8])]
    write_bag(path, StoragePlugin.MCAP, "/image/compressed", messages)
    out = tmp_path / "out"
    args = [str(path), str(out), "--topic", "/image/compressed", "--classes", "person", "cup"]
    assert main(args + ENGINE) == 0
    topics = read_bag(out)
    for topic in ["/ovss/labels", "/ovss/masks/person", "/ovss/overlay"]:
        sizes = [STORE.deserialize_cdr(raw, t) for _, raw, t in topics[topic]]
        assert [(m.height, m.width) for m in sizes] == [(48, 64)] * 3, topic


def _jpeg_declaring(index: int, rgb: np.ndarray, width: int, height: int) -> object:
    """A JPEG bomb: a small JPEG whose SOF0 marker declares ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    array = np.frombuffer(bytes(data), dtype=np.uint8)
    return T["sensor_msgs/msg/CompressedImage"](header=_header(index), format="jpeg", data=array)


def test_compressed_bomb_is_skipped_with_its_reason(tmp_path, voc_rgb, caplog):
    path = tmp_path / "bomb_bag"
    crop = voc_rgb[1][:64, :64]
    messages = [_jpeg(0, voc_rgb[0]), _jpeg_declaring(1, crop, 12000, 12000), _jpeg(2, voc_rgb[1])]
    write_bag(path, StoragePlugin.MCAP, "/image/compressed", messages)
    out = tmp_path / "out"
    args = [str(path), str(out), "--topic", "/image/compressed", "--classes", "person"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 1
    assert (
        "skipping frame at 1700000000100000000 ns (over max_input_pixels): compressed image data "
        in caplog.text
    )
    assert "declares 12000x12000 = 144000000 pixels, more than max_input_pixels = 40000000" in (
        caplog.text
    )
    assert "skipped 1 of 3 frames (1 over max_input_pixels)" in caplog.text
    assert f"{out} holds 3 input frames and the outputs of 2" in caplog.text
    topics = read_bag(out)
    assert len(topics["/image/compressed"]) == 3
    assert [s for s, _, _ in topics["/ovss/labels"]] == [FIRST_STAMP, FIRST_STAMP + 2 * PERIOD]


def test_max_input_pixels_flag_bounds_raw_frames(tmp_path, raw_sqlite3_bag, voc_rgb, caplog):
    """The limit is inclusive: only the first VOC frame (500x338) fits 500 * 338 pixels."""
    limit = voc_rgb[0].shape[0] * voc_rgb[0].shape[1]
    assert all(rgb.shape[0] * rgb.shape[1] > limit for rgb in voc_rgb[1:])
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--classes", "cup"]
    args += ["--max-input-pixels", str(limit), "--copy", "none"]
    with caplog.at_level(logging.INFO):
        assert main(args + ENGINE) == 1
    assert "skipped 2 of 3 frames (2 over max_input_pixels)" in caplog.text
    assert (
        f"rgb8 image declares 500x375 = 187500 pixels, more than max_input_pixels = {limit}"
        in (caplog.text)
    )
    assert f"{out} holds the outputs of 1 frames" in caplog.text
    topics = read_bag(out)
    assert "/camera/image_raw" not in topics
    assert [s for s, _, _ in topics["/ovss/labels"]] == [FIRST_STAMP]


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_input_pixels_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["in", "out", "--topic", "/x", "--classes", "a", "--max-input-pixels", value])
    assert exit_info.value.code == 2
    assert "--max-input-pixels: expected a positive integer" in capsys.readouterr().err


def test_progress_bar_counts_frames_done(tmp_path, raw_sqlite3_bag, capsys):
    out = tmp_path / "out"
    args = [str(raw_sqlite3_bag), str(out), "--topic", "/camera/image_raw", "--classes", "cup"]
    assert main(args + ["--progress", "--no-masks", "--no-overlay"] + ENGINE) == 0
    counts = re.findall(r"\| *(\d)/3 \[", capsys.readouterr().err)
    assert counts and counts[-1] == "3"
