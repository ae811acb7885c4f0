"""The meaning of the ovss_interfaces requests (ovss_ros/ros/service_requests.py), on the real
generated request types: SetVocabulary as parameter changes, the one image of a Segment
request, and Segment's pixel counts."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import make_compressed, make_image
from std_msgs.msg import Header

from ovss_interfaces.srv import Segment, SetVocabulary
from ovss_ros.ros.service_requests import (
    RequestError,
    pixel_counts,
    segment_image,
    vocabulary_parameters,
)


def test_set_vocabulary_is_the_parameter_changes_it_names():
    classes = ["tv; monitor | a screen", "chair"]
    assert vocabulary_parameters(SetVocabulary.Request(classes=classes)) == {"classes": classes}
    request = SetVocabulary.Request(
        classes=classes,
        templates="a photo of a {}.",
        set_background_words=True,
        background_words=["sky"],
    )
    assert vocabulary_parameters(request) == {
        "classes": classes,
        "templates": "a photo of a {}.",
        "background_words": ["sky"],
    }
    clear = SetVocabulary.Request(classes=classes, set_background_words=True)
    assert vocabulary_parameters(clear) == {"classes": classes, "background_words": []}
    # values are the parameters' business: an empty vocabulary goes on to their check
    assert vocabulary_parameters(SetVocabulary.Request()) == {"classes": []}


def test_background_words_without_the_flag_are_refused():
    request = SetVocabulary.Request(classes=["cup"], background_words=["sky", "wall"])
    with pytest.raises(RequestError, match="2 words but set_background_words is false"):
        vocabulary_parameters(request)


def header() -> Header:
    return Header(frame_id="camera")


def test_segment_takes_the_image_that_has_data():
    raw = make_image(np.zeros((2, 3, 3), np.uint8), "rgb8", header())
    compressed = make_compressed(b"\xff\xd8data", header())
    assert segment_image(Segment.Request(image=raw, words=["a"])) == ("raw", raw)
    kind, image = segment_image(Segment.Request(compressed_image=compressed, words=["a"]))
    assert (kind, image) == ("compressed", compressed)


def test_segment_refuses_both_images_and_none():
    raw = make_image(np.zeros((2, 3, 3), np.uint8), "rgb8", header())
    compressed = make_compressed(b"\xff\xd8data", header())
    with pytest.raises(RequestError, match="give exactly one"):
        segment_image(Segment.Request(image=raw, compressed_image=compressed))
    with pytest.raises(RequestError, match="both empty"):
        segment_image(Segment.Request(words=["a"]))
    sized_but_empty = Segment.Request()
    sized_but_empty.image.width, sized_but_empty.image.height = 640, 480  # no data
    with pytest.raises(RequestError, match="both empty"):
        segment_image(sized_but_empty)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pixel_counts_cover_every_class_and_the_unlabeled(dtype):
    labels = np.full((4, 5), np.iinfo(dtype).max, dtype)
    labels[0, :3] = 0
    labels[1:3, 1:4] = 2
    counts, unlabeled = pixel_counts(labels, 4)
    assert counts == [3, 0, 6, 0] and unlabeled == 11
    assert sum(counts) + unlabeled == labels.size
    response = Segment.Response(pixel_counts=counts, unlabeled_pixels=unlabeled)
    assert list(response.pixel_counts) == counts


def test_pixel_counts_refuse_a_stray_value_and_other_dtypes():
    labels = np.zeros((2, 2), np.uint8)
    labels[1, 1] = 7
    with pytest.raises(ValueError, match="label value 7 is neither one of 3 classes"):
        pixel_counts(labels, 3)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        pixel_counts(labels.astype(np.int32), 3)
