"""The runtime vocabulary: class entries parsed and validated from plain strings.

A robot engineer types classes as strings (``"tv; television; monitor"``): the first word is the
class name that appears in label_info and topic names, the rest are synonyms that only help CLIP
(the class probability is the max over its synonyms). Sentences after ``|`` describe the class
(``"tv; monitor | a flat screen showing a picture"``): FreeCP's ambiguity step compares image
crops with them; they travel with the class so one parameter change stays atomic. Validation
is all-or-nothing so that a rejected parameter change leaves the running vocabulary untouched.

Names are text in any language and reach CLIP as written (``"椅子; chair"``, ``"кошка"``,
``"café"``). Two names are the same class when their keys are equal (:func:`name_key`: Unicode
NFKC, case-folded, whitespace runs as one space: ``"Straße"`` = ``"STRASSE"``, ``"café"`` !=
``"caf"``). Each class gets a mask-topic slug (:func:`slugify`) that is one ASCII ROS name token.
Control, format and similar invisible characters are refused everywhere (:func:`check_text`), so
user text can neither forge a log line nor hide part of itself.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

MAX_CLASSES = 1000
MAX_NAMES_LENGTH = 200  # the class name and its synonyms; also one background word
MAX_ENTRY_LENGTH = 2000  # with descriptions: a few sentences
MAX_DESCRIPTIONS = 10  # sentences per class (encoded once each, without templates)
# Text queries (every synonym of every class + every background word). Every frame computes and
# upsamples one logit map per query, so this bounds per-frame memory; 2000 leaves room for the
# full 1000 classes with a synonym each, or 1000 single-word classes and 1000 background words.
MAX_QUERIES = 2000
SLUG_MAX_LENGTH = 48  # mask topic name token, hash suffix included
SLUG_HASH_LENGTH = 10  # hex digits of SHA-256: 40 bits, no collision expected among 1000 names
# Unicode categories refused in user text: control (Cc: newline, tab, ESC, BEL), format (Cf: bidi
# overrides, zero-width characters), line/paragraph separators, surrogates, private use,
# unassigned (in this Python's Unicode database).
FORBIDDEN_CATEGORIES = {
    "Cc": "control character",
    "Cf": "format character",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "surrogate",
    "Co": "private-use character",
    "Cn": "unassigned code point",
}
_READABLE = re.compile(r"[a-z][a-z0-9]*(?: [a-z0-9]+)*")  # keys whose slug needs no hash
_SLUG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


class VocabularyError(ValueError):
    """A vocabulary was rejected; ``str(error)`` is the reason shown to the user."""


def quoted(value: object) -> str:
    """``repr`` of user text for messages and logs: non-printable characters escaped
    (``'a\\nb'``, ``'\\u202e'``), long text shortened with ``...``."""
    return _REPR.repr(value)


def check_text(text: str, what: str) -> None:
    """Refuse text with a character of FORBIDDEN_CATEGORIES.

    Raises VocabularyError naming ``what`` (e.g. ``"class entry 3"``), the text (quoted) and the
    first offending code point (``U+000A``).
    """
    if text.isprintable():  # fast path: the forbidden categories are all non-printable
        return
    for position, char in enumerate(text):
        category = unicodedata.category(char)
        if category in FORBIDDEN_CATEGORIES:
            kind = unicodedata.name(char, FORBIDDEN_CATEGORIES[category])
            raise VocabularyError(
                f"{what} {quoted(text)} contains U+{ord(char):04X} ({kind}) at position "
                f"{position}: control, format and invisible separator characters are not allowed"
            )


def name_key(name: str) -> str:
    """What makes two names the same class: NFKC, case-folded (``str.casefold``), NFKC again,
    whitespace runs as one space (CLIP's tokenizer treats them alike). Unicode TR15 / TR44."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join(folded.split())


def slugify(name: str) -> str:
    """The mask-topic token of a class name: ASCII letters, digits and single ``_``, starting
    with a letter, at most SLUG_MAX_LENGTH characters.

    A name whose key (:func:`name_key`) is lower-case ASCII words and digits separated by single
    spaces, starting with a letter and short enough, keeps its readable form (``"Door Handle"``
    -> ``door_handle``, ``"Straße"`` -> ``strasse``): that mapping is one-to-one on keys. Any
    other name gets a readable ASCII part (accents dropped, other characters as ``_``, ``c_``
    before a digit or nothing) plus ``_`` and the first SLUG_HASH_LENGTH hex digits of SHA-256 of
    its key (``"door-handle"`` -> ``door_handle_<hash>``, ``"椅子"`` -> ``c_<hash>``), so it
    cannot collide with a readable slug of another name in practice (parse_classes checks).
    """
    key = name_key(name)
    if len(key) <= SLUG_MAX_LENGTH and _READABLE.fullmatch(key):
        return key.replace(" ", "_")
    decomposed = unicodedata.normalize("NFKD", key)
    ascii_part = "".join(
        c if c in _SLUG_CHARS else "_" for c in decomposed if not unicodedata.combining(c)
    )
    ascii_part = re.sub("_+", "_", ascii_part).strip("_")
    if not ascii_part or ascii_part[0].isdigit():
        ascii_part = f"c_{ascii_part}".rstrip("_")  # ROS names may not start with a digit
    ascii_part = ascii_part[: SLUG_MAX_LENGTH - SLUG_HASH_LENGTH - 1].rstrip("_")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{ascii_part}_{digest[:SLUG_HASH_LENGTH]}"


@dataclass(frozen=True)
class ClassEntry:
    """One class of the vocabulary: its name and the texts CLIP is asked about (name first)."""

    name: str
    synonyms: tuple[str, ...]
    descriptions: tuple[str, ...] = ()

    @cached_property
    def slug(self) -> str:
        """Mask-topic token (:func:`slugify`)."""
        return slugify(self.name)

    @classmethod
    def parse(cls, entry: str) -> ClassEntry:
        """``"tv; telly | a screen"`` -> ClassEntry("tv", ("tv", "telly"), ("a screen",)).

        Synonyms that are the same name (:func:`name_key`) are kept once, first spelling first.
        Raises VocabularyError for an entry without a name. Only splits: parse_classes checks.
        """
        names, *descriptions = entry.split("|")
        descriptions = tuple(d.strip() for d in descriptions if d.strip())
        unique: dict[str, str] = {}
        for word in names.split(";"):
            if word.strip():
                unique.setdefault(name_key(word), word.strip())
        if not unique:
            raise VocabularyError(f"empty class entry {quoted(entry)}")
        words = tuple(unique.values())
        return cls(words[0], words, descriptions)


def parse_classes(entries: Sequence[object], max_classes: int = MAX_CLASSES) -> list[ClassEntry]:
    """Parse and validate a whole vocabulary at once; raise VocabularyError with the reason.

    Refused: not a list of text, empty, more than ``max_classes`` entries, an entry longer than
    MAX_NAMES_LENGTH (names) / MAX_ENTRY_LENGTH (with descriptions), more than MAX_DESCRIPTIONS
    descriptions, a character of FORBIDDEN_CATEGORIES, two classes with one name key, two
    classes with one slug. Entries may also be ClassEntry objects (checked the same way).
    """
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise VocabularyError("classes must be a list of strings")
    if len(entries) == 0:
        raise VocabularyError("classes is empty: give at least one class name")
    if len(entries) > max_classes:
        raise VocabularyError(f"too many classes: {len(entries)} > {max_classes}")
    parsed: list[ClassEntry] = []
    seen_keys: dict[str, str] = {}
    seen_slugs: dict[str, str] = {}
    for index, entry in enumerate(entries):
        parsed_entry = _parse_entry(index, entry)
        name, key, slug = parsed_entry.name, name_key(parsed_entry.name), parsed_entry.slug
        if key in seen_keys:
            raise VocabularyError(
                f"duplicate class {quoted(name)} (the same name as {quoted(seen_keys[key])})"
            )
        if slug in seen_slugs:
            raise VocabularyError(
                f"classes {quoted(seen_slugs[slug])} and {quoted(name)} would share the mask "
                f"topic masks/{slug}: rename one"
            )
        seen_keys[key] = seen_slugs[slug] = name
        parsed.append(parsed_entry)
    return parsed


def check_background_words(words: Sequence[object]) -> None:
    """The limits of ``classes`` for background words: a list of at most MAX_CLASSES non-empty
    strings of at most MAX_NAMES_LENGTH characters each, no FORBIDDEN_CATEGORIES character.

    Raises VocabularyError (a ValueError) whose text starts with ``background_words``.
    """
    if isinstance(words, str | bytes) or not isinstance(words, Sequence):
        raise VocabularyError(f"background_words must be a list of strings, got {quoted(words)}")
    if len(words) > MAX_CLASSES:
        raise VocabularyError(f"background_words: too many words: {len(words)} > {MAX_CLASSES}")
    for index, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            raise VocabularyError(
                f"background_words must be non-empty strings: word {index} is {quoted(word)}"
            )
        if len(word) > MAX_NAMES_LENGTH:
            raise VocabularyError(
                f"background_words: word {index} is too long ({len(word)} > {MAX_NAMES_LENGTH} "
                "chars)"
            )
        check_text(word, f"background_words: word {index}")


def check_query_count(classes: Sequence[ClassEntry], background_words: Sequence[str]) -> None:
    """Refuse more than MAX_QUERIES text queries (every synonym of every class, name included,
    plus every background word): each query costs a logit map in every frame.

    Raises VocabularyError with the counts. The engine calls it before encoding any text.
    """
    synonyms = sum(len(entry.synonyms) for entry in classes)
    total = synonyms + len(background_words)
    if total > MAX_QUERIES:
        raise VocabularyError(
            f"too many text queries: {total} ({synonyms} class names and synonyms + "
            f"{len(background_words)} background words) > {MAX_QUERIES}"
        )


def _parse_entry(index: int, entry: object) -> ClassEntry:
    """One entry (text or ClassEntry) checked against every per-entry limit."""
    if isinstance(entry, str):
        _check_length(index, len(entry.split("|", 1)[0]), len(entry))
        check_text(entry, f"class entry {index}")
        parsed = ClassEntry.parse(entry)
    elif isinstance(entry, ClassEntry):
        texts = (entry.name, *entry.synonyms, *entry.descriptions)
        if not entry.synonyms or not all(isinstance(text, str) for text in texts):
            raise VocabularyError(f"class entry {index} {quoted(entry)} is not a text entry")
        if any(not text.strip() for text in texts):
            raise VocabularyError(f"class entry {index} {quoted(entry)} has an empty text")
        names_length = len(";".join(entry.synonyms))
        _check_length(index, names_length, names_length + len("|".join(entry.descriptions)))
        for text in texts:
            check_text(text, f"class entry {index}")
        parsed = entry
    else:
        raise VocabularyError(
            f"class entry {index} is not text: {quoted(entry)} ({type(entry).__name__})"
        )
    if len(parsed.descriptions) > MAX_DESCRIPTIONS:
        raise VocabularyError(
            f"class {quoted(parsed.name)} has too many descriptions: "
            f"{len(parsed.descriptions)} > {MAX_DESCRIPTIONS}"
        )
    return parsed


def _check_length(index: int, names_length: int, total_length: int) -> None:
    if names_length > MAX_NAMES_LENGTH or total_length > MAX_ENTRY_LENGTH:
        raise VocabularyError(
            f"class entry {index} is too long ({names_length} > {MAX_NAMES_LENGTH} chars "
            f"of names, or {total_length} > {MAX_ENTRY_LENGTH} in all)"
        )
