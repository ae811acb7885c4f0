"""vision_msgs/LabelInfo for the label images: which class each label value stands for.

The node publishes it latched (TRANSIENT_LOCAL) on every vocabulary change, and again with the
header of every labels frame, so that a consumer can always decode a frame by matching stamps, even
when the vocabulary changes between two frames.
"""

from __future__ import annotations

from collections.abc import Sequence

from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo, VisionClass


def label_info(header: Header, class_names: Sequence[str], threshold: float) -> LabelInfo:
    """LabelInfo with class_id = label value (index into ``class_names``)."""
    return LabelInfo(
        header=header,
        class_map=[
            VisionClass(class_id=index, class_name=name) for index, name in enumerate(class_names)
        ],
        threshold=float(threshold),
    )


def class_names(message: LabelInfo) -> dict[int, str]:
    """Label value -> class name, as a consumer reads it back."""
    return {entry.class_id: entry.class_name for entry in message.class_map}
