"""The rosbag2 side of ovss-bag: message types, storage, the input's index and the output bag.

rosbags does the bag files (sqlite3 and MCAP) and, through its typestore, supplies the message
definitions and type hashes each new topic's connection records; vision_msgs is not in its
stores, so LabelInfo's definition is registered here. The output bag's new topics are recorded
with the node's publisher QoS as their offered profiles, so that ``ros2 bag play`` republishes
them the way the node does; copied topics keep their recorded definitions and QoS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rosbags.interfaces import (
    Connection,
    ConnectionExtRosbag2,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore
from ruamel.yaml import YAML

from ovss_ros.core.file_checks import FileCheckError, check_folder_files, read_text

logger = logging.getLogger("ovss_ros.ros.bag")

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
LABEL_INFO_TYPE = "vision_msgs/msg/LabelInfo"
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
COPY_CHOICES = ("all", "image", "none")

# vision_msgs is not in rosbags' stores; these are the fields of vision_msgs_lite/msg (identical
# to ros-perception/vision_msgs, so the type hash matches a real vision_msgs install). Kept here
# rather than read from vision_msgs_lite/ because an installed ovss_ros has no source tree.
VISION_MSGS_DEFINITIONS = {
    "vision_msgs/msg/VisionClass": "uint16 class_id\nstring class_name\n",
    LABEL_INFO_TYPE: (
        "std_msgs/Header header\nvision_msgs/VisionClass[] class_map\nfloat32 threshold\n"
    ),
}


def _qos(depth: int, durability: QosDurability) -> Qos:
    unspecified = QosTime(0, 0)  # rmw's "use the default" (infinite) for the time limits
    return Qos(
        QosHistory.KEEP_LAST,
        depth,
        QosReliability.RELIABLE,
        durability,
        unspecified,
        unspecified,
        QosLiveliness.AUTOMATIC,
        unspecified,
        False,
    )


# The node's publisher QoS, recorded as the offered profiles so that `ros2 bag play` republishes
# the outputs the way the node does: label_info latched, so a late subscriber can decode labels.
OUTPUT_QOS = _qos(5, QosDurability.VOLATILE)
LABEL_INFO_QOS = _qos(1, QosDurability.TRANSIENT_LOCAL)


class BagError(Exception):
    """A problem with the bags, topic or options the user gave; ``str(error)`` says what."""


def typestore() -> Typestore:
    """rosbags' message types of this ROS release (Kilted), plus vision_msgs/LabelInfo."""
    store = get_typestore(Stores.ROS2_KILTED if hasattr(Stores, "ROS2_KILTED") else Stores.LATEST)
    types: dict[str, Any] = {}
    for name, definition in VISION_MSGS_DEFINITIONS.items():
        types.update(get_types_from_msg(definition, name))
    store.register(types)
    return store


def bag_storage(path: Path) -> str:
    """The storage plugin (``sqlite3`` or ``mcap``) named in a bag folder's metadata.yaml.

    A bare ``.mcap`` or ``.db3`` file (which rosbags also reads) is named by its suffix. Raises
    BagError for anything else, a folder without metadata.yaml, or one holding an entry that is
    not a regular file (a FIFO named like its storage file would block the reader for ever).
    """
    if path.is_file():
        by_suffix = {".mcap": "mcap", ".db3": "sqlite3"}
        if path.suffix not in by_suffix:
            raise BagError(f"{path} is not a rosbag2 folder, .mcap or .db3 file")
        return by_suffix[path.suffix]
    if path.exists() and not path.is_dir():
        raise BagError(f"input bag {str(path)!r} is not a regular file or folder")
    metadata = path / "metadata.yaml"
    if not os.path.lexists(metadata):
        what = "does not exist" if not path.exists() else "has no metadata.yaml"
        raise BagError(f"input bag {str(path)!r} {what}")
    try:  # a FIFO or device among its files would block or never end the reader
        check_folder_files(path, "input bag")
    except FileCheckError as error:
        raise BagError(str(error)) from None
    try:
        text = read_text(metadata, "bag metadata", 16 << 20)  # a regular file, bounded
        info = YAML(typ="safe").load(text)["rosbag2_bagfile_information"]
        storage = info["storage_identifier"]
    except Exception as error:  # unreadable YAML or missing keys: the same answer for the user
        raise BagError(f"cannot read {metadata}: {error}") from error
    if storage not in STORAGES:
        raise BagError(f"{metadata} names storage {storage!r}; supported: {', '.join(STORAGES)}")
    return storage


def read_topics(path: Path) -> dict[str, set[str]]:
    """Topic -> message types, from the bag's index (no messages are read)."""
    try:
        with Reader(path) as reader:
            topics: dict[str, set[str]] = {}
            for connection in reader.connections:
                topics.setdefault(connection.topic, set()).add(connection.msgtype)
            return topics
    except Exception as error:  # rosbags' ReaderError, sqlite3 or MCAP errors: a broken bag
        raise BagError(f"cannot open input bag {path}: {error}") from error


def count_messages(path: Path, topic: str) -> int:
    with Reader(path) as reader:
        return sum(c.msgcount for c in reader.connections if c.topic == topic)


class OutputBag:
    """The rosbags Writer, its connections by topic, and a count of what went to each."""

    def __init__(self, writer: Writer, store: Typestore) -> None:
        self.writer = writer
        self.store = store
        self.connections: dict[str, Connection] = {}
        self.counts: dict[str, int] = {}

    def add_topic(self, topic: str, msgtype: str, qos: Qos) -> None:
        self.connections[topic] = self.writer.add_connection(
            topic, msgtype, typestore=self.store, offered_qos_profiles=[qos]
        )
        self.counts[topic] = 0

    def write(self, topic: str, timestamp: int, data: bytes) -> None:
        self.writer.write(self.connections[topic], timestamp, data)
        self.counts[topic] += 1


def copy_connections(
    reader: Reader, writer: Writer, store: Typestore, topics: set[str]
) -> dict[int, Connection]:
    """Input connection id -> output connection, keeping the recorded definitions and QoS."""
    copies: dict[int, Connection] = {}
    by_key: dict[tuple[object, ...], Connection] = {}
    for connection in reader.connections:
        if connection.topic not in topics:
            continue
        ext = connection.ext
        assert isinstance(ext, ConnectionExtRosbag2)
        key = (connection.topic, connection.msgtype, ext.serialization_format)
        if key in by_key:  # the same topic recorded twice (e.g. split files): one output
            copies[connection.id] = by_key[key]
            continue
        definition = {"msgdef": connection.msgdef.data, "rihs01": connection.digest}
        if not (connection.msgdef.data and connection.digest):  # older bags store neither
            if connection.msgtype not in store.fielddefs:
                logger.warning(
                    "not copying %s: the bag has no definition of %s and rosbags does not know it",
                    connection.topic,
                    connection.msgtype,
                )
                continue
            definition = {"typestore": store}
        by_key[key] = copies[connection.id] = writer.add_connection(
            connection.topic,
            connection.msgtype,
            serialization_format=ext.serialization_format,
            offered_qos_profiles=ext.offered_qos_profiles,
            **definition,
        )
    return copies
