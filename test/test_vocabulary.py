"""Vocabulary parsing, names in any language, mask-topic slugs, and every rejection reason."""

import hashlib
import re

import pytest
from rclpy.validate_full_topic_name import validate_full_topic_name

from ovss_ros.core.vocabulary import (
    MAX_CLASSES,
    MAX_QUERIES,
    SLUG_MAX_LENGTH,
    ClassEntry,
    VocabularyError,
    check_background_words,
    check_query_count,
    check_text,
    name_key,
    parse_classes,
    quoted,
    slugify,
)

# One ROS name token, stricter than rcl: letters, digits, single '_', no leading digit or '_',
# no trailing '_'.
ROS_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]


def test_synonyms_and_names():
    classes = parse_classes(["person", "tv; television ;monitor", "Door Handle"])
    assert [c.name for c in classes] == ["person", "tv", "Door Handle"]
    assert classes[1].synonyms == ("tv", "television", "monitor")
    assert [c.slug for c in classes] == ["person", "tv", "door_handle"]


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("wet floor", "wet_floor"),
        ("Door Handle", "door_handle"),
        ("door  handle", "door_handle"),  # whitespace runs are one space (CLIP's tokenizer too)
        ("door\u00a0handle", "door_handle"),  # NO-BREAK SPACE is a space after NFKC
        ("caf", "caf"),
        ("Straße", "strasse"),  # case-folded: ß -> ss, the same class as STRASSE
        ("ｃｕｐ", "cup"),  # full-width letters: NFKC
        ("x" * SLUG_MAX_LENGTH, "x" * SLUG_MAX_LENGTH),
    ],
)
def test_readable_slugs_where_lossless(name, slug):
    assert slugify(name) == slug


@pytest.mark.parametrize(
    ("name", "key", "readable"),
    [
        ("Traffic-Light!", "traffic-light!", "traffic_light"),
        ("door-handle", "door-handle", "door_handle"),
        ("door_handle", "door_handle", "door_handle"),
        ("3d printer", "3d printer", "c_3d_printer"),  # ROS tokens may not start with a digit
        ("café", "café", "cafe"),  # accents dropped from the readable part only
        ("椅子", "椅子", "c"),
        ("кошка", "кошка", "c"),
        ("!!!", "!!!", "c"),
        ("a" * 193, "a" * 193, "a" * 37),  # long names are cut: 37 + 1 + 10 = 48
        ("x" * (SLUG_MAX_LENGTH + 1), "x" * (SLUG_MAX_LENGTH + 1), "x" * 37),
    ],
)
def test_hashed_slugs_where_not_lossless(name, key, readable):
    """SHA-256 of the key, computed here independently: the same in every process and run."""
    assert slugify(name) == f"{readable}_{sha(key)}"


def test_slug_values_are_stable_across_releases():
    """Topic names are an interface: these literal values must never change."""
    assert slugify("café") == "cafe_850f7dc439"
    assert slugify("椅子") == "c_e57f49ca9c"
    assert slugify("door-handle") == "door_handle_b47802db06"


NAMES = [
    "café", "caf", "椅子", "кошка", "Straße", "door handle", "door-handle", "3d printer",
    "a" * 193, "!!!", "_x_", "x__y", "9", "🐱 cat", "ﷺ", "İstanbul", "e\u0301", "مرحبا بك",
    "x" + "-" * 150 + "y", "Ǆ", "ﬁsh", "ℌ", "x" * 60 + "é",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_slug_is_one_bounded_ascii_ros_name_token(name):
    slug = slugify(name)
    assert ROS_TOKEN.fullmatch(slug) and "__" not in slug, slug
    assert slug.isascii() and len(slug) <= SLUG_MAX_LENGTH
    assert validate_full_topic_name(f"/ns/ovss/front/masks/{slug}")


def test_names_in_any_language_reach_clip_as_written():
    names = ["椅子", "кошка", "café", "caf", "door handle", "door-handle"]
    classes = parse_classes(["椅子; chair", *names[1:]])
    assert [c.name for c in classes] == names
    assert classes[0].synonyms == ("椅子", "chair")
    assert len({c.slug for c in classes}) == len(classes)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("cup", "Cup"),
        ("Straße", "STRASSE"),
        ("café", "cafe\u0301"),  # composed and decomposed é
        ("ｃｕｐ", "cup"),
        ("door  handle", "door handle"),
        ("ǆ", "Ǆ"),
    ],
)
def test_duplicates_are_judged_on_normalised_case_folded_names(first, second):
    assert name_key(first) == name_key(second)
    with pytest.raises(VocabularyError, match="duplicate class"):
        parse_classes([first, second])


@pytest.mark.parametrize(
    ("first", "second"),
    [("café", "caf"), ("door handle", "door-handle"), ("wet floor", "wet_floor"), ("c", "с")],
)
def test_different_names_are_different_classes(first, second):
    assert [c.name for c in parse_classes([first, second])] == [first, second]


def test_synonyms_are_kept_once_per_name():
    (entry,) = parse_classes(["tv; TV; television; Television ; tv"])
    assert entry.synonyms == ("tv", "television")


def test_slug_collisions_are_refused():
    """The hashed slug of one name equals the readable slug of another: refused, not merged."""
    forged = f"door handle {sha('door-handle')}"
    assert slugify(forged) == slugify("door-handle")
    with pytest.raises(VocabularyError, match="would share the mask topic"):
        parse_classes(["door-handle", forged])


CONTROL = [
    ("\n", "U+000A"),
    ("\r", "U+000D"),
    ("\t", "U+0009"),
    ("\x1b[31m", "U+001B"),
    ("\x07", "U+0007"),
    ("\x00", "U+0000"),
    ("\x85", "U+0085"),
    ("\u202e", "U+202E"),
    ("\u2066", "U+2066"),
    ("\u200b", "U+200B"),
    ("\ufeff", "U+FEFF"),
    ("\u2028", "U+2028"),
    ("\u2029", "U+2029"),
    ("\ud800", "U+D800"),
    ("\ue000", "U+E000"),
    ("\U000e0041", "U+E0041"),
    ("\u0378", "U+0378"),
]


@pytest.mark.parametrize(("char", "code"), CONTROL, ids=[code for _, code in CONTROL])
@pytest.mark.parametrize(
    "template",
    ["cup{}", "{} cup", "cup; mug{}", "cup | a mug{} for coffee"],
    ids=["name-end", "name-start", "synonym", "description"],
)
def test_control_and_format_characters_are_refused(char, code, template):
    with pytest.raises(VocabularyError, match=re.escape(f"contains {code} (")) as raised:
        parse_classes(["plate", template.format(char)])
    reason = str(raised.value)
    assert "class entry 1" in reason
    assert reason.isprintable()  # the reason itself shows the character escaped


@pytest.mark.parametrize("char", [c for c, _ in CONTROL])
def test_prebuilt_entries_are_checked_too(char):
    with pytest.raises(VocabularyError, match="U\\+"):
        parse_classes([ClassEntry("cup", ("cup", f"mug{char}"))])


def test_printable_non_ascii_text_passes_the_check():
    for text in ["椅子", "кошка", "café", "🐱", "مرحبا", "door\u00a0handle", "x\u3000y"]:
        check_text(text, "class")


def test_quoted_escapes_and_shortens():
    assert quoted("a\nb\u202e") == "'a\\nb\\u202e'"
    long = quoted("x" * 1000)
    assert len(long) < 100 and "..." in long


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([], "empty"),
        ("cup", "list of strings"),
        (["cup", "Cup"], "duplicate"),
        (["cup", 3], "not text"),
        (["cup", ";"], "empty class entry"),
        (["cup", " ; ;"], "empty class entry"),
        (["x" * 201], "too long"),
        (["cup | " + "a mug. " * 300], "too long"),
        (["cup | " + " | ".join(["a mug"] * 11)], "too many descriptions"),
        ([f"c{i}" for i in range(1001)], "too many classes"),
        ([ClassEntry("cup", ())], "not a text entry"),
        ([ClassEntry("cup", ("cup", " "))], "empty text"),
        ([ClassEntry("cup", ("x" * 201,))], "too long"),
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
    assert len(parse_classes(["cup | " + " | ".join(["a mug"] * 10)])[0].descriptions) == 10


def test_entries_may_be_parsed_already():
    entry = ClassEntry("cup", ("cup", "mug"))
    assert parse_classes([entry, "plate"])[0] is entry


def test_the_full_vocabulary_fits():
    classes = parse_classes([f"thing {i}; item {i}" for i in range(MAX_CLASSES)])
    check_query_count(classes, ())
    assert sum(len(c.synonyms) for c in classes) == MAX_QUERIES == 2000


@pytest.mark.parametrize(
    ("synonyms", "background", "refused"),
    [(1, 1000, False), (1, 1001, True), (2, 0, False), (2, 1, True)],
)
def test_query_count_limit(synonyms, background, refused):
    classes = [
        ClassEntry(f"t{i}", tuple(f"t{i} {s}" for s in range(synonyms)))
        for i in range(MAX_CLASSES)
    ]
    words = [f"bg {i}" for i in range(background)]
    if refused:
        with pytest.raises(VocabularyError, match=f"too many text queries: {MAX_QUERIES + 1}"):
            check_query_count(classes, words)
    else:
        check_query_count(classes, words)


@pytest.mark.parametrize(
    ("words", "reason"),
    [
        ("sky", "list of strings"),
        (["sky", ""], "non-empty strings"),
        (["sky", "  "], "non-empty strings"),
        (["sky", 1.5], "non-empty strings"),
        ([f"w{i}" for i in range(1001)], "too many words"),
        (["x" * 201], "too long"),
        (["sky\nwall"], "U\\+000A"),
        (["sky\u202e"], "U\\+202E"),
    ],
)
def test_background_word_rejections(words, reason):
    with pytest.raises(VocabularyError, match=f"background_words.*{reason}"):
        check_background_words(words)


def test_background_words_within_the_limits():
    check_background_words([f"w{i}" for i in range(MAX_CLASSES)])
    check_background_words(["x" * 200, "椅子", "ciel bleu"])
