"""Vocabulary parsing and every rejection reason."""

import pytest

from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes, slugify


def test_synonyms_and_names():
    classes = parse_classes(["person", "tv; television ;monitor", "Door Handle"])
    assert [c.name for c in classes] == ["person", "tv", "Door Handle"]
    assert classes[1].synonyms == ("tv", "television", "monitor")
    assert [c.slug for c in classes] == ["person", "tv", "door_handle"]


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("wet floor", "wet_floor"),
        ("Traffic-Light!", "traffic_light"),
        ("3d printer", "c_3d_printer"),
    ],
)
def test_slugify(name, slug):
    assert slugify(name) == slug


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([], "empty"),
        ("cup", "list of strings"),
        (["cup", "Cup"], "duplicate"),
        (["wet floor", "wet-floor"], "duplicate"),
        (["cup", 3], "not text"),
        (["cup", ";"], "empty class entry"),
        (["cup", "!!!"], "no letters"),
        (["x" * 201], "too long"),
        (["cup | " + "a mug. " * 300], "too long"),
        ([f"c{i}" for i in range(1001)], "too many"),
    ],
)
def test_rejections(entries, reason):
    with pytest.raises(VocabularyError, match=reason):
        parse_classes(entries)


def test_descriptions_after_bar():
    (entry,) = parse_classes(["tv; monitor | a flat screen showing a picture | a television set"])
    assert entry.name == "tv" and entry.synonyms == ("tv", "monitor")
    assert entry.descriptions == ("a flat screen showing a picture", "a television set")
    assert parse_classes(["cup | " + "a mug for coffee. " * 20])[0].slug == "cup"


def test_entries_may_be_parsed_already():
    entry = ClassEntry("cup", ("cup", "mug"))
    assert parse_classes([entry, "plate"])[0] is entry
