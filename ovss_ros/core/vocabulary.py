"""The runtime vocabulary: class entries parsed and validated from plain strings.

A robot engineer types classes as strings (``"tv; television; monitor"``): the first word is the
class name that appears in label_info and topic names, the rest are synonyms that only help CLIP
(the class probability is the max over its synonyms). Sentences after ``|`` describe the class
(``"tv; monitor | a flat screen showing a picture"``): FreeCP's ambiguity step compares image
crops with them; they travel with the class so one parameter change stays atomic. Validation
is all-or-nothing so that a rejected parameter change leaves the running vocabulary untouched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_NAMES_LENGTH = 200  # the class name and its synonyms
MAX_ENTRY_LENGTH = 2000  # with descriptions: a few sentences


class VocabularyError(ValueError):
    """A vocabulary was rejected; ``str(error)`` is the reason shown to the user."""


def slugify(name: str) -> str:
    """Topic-safe form of a class name: lower case, every non-alphanumeric run becomes ``_``."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if slug and slug[0].isdigit():
        slug = "c_" + slug  # ROS names may not start with a digit
    return slug


@dataclass(frozen=True)
class ClassEntry:
    """One class of the vocabulary: its name and the texts CLIP is asked about (name first)."""

    name: str
    synonyms: tuple[str, ...]
    descriptions: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @classmethod
    def parse(cls, entry: str) -> ClassEntry:
        """``"tv; telly | a screen"`` -> ClassEntry("tv", ("tv", "telly"), ("a screen",))."""
        names, *descriptions = entry.split("|")
        descriptions = tuple(d.strip() for d in descriptions if d.strip())
        words = [word.strip() for word in names.split(";")]
        words = [word for word in words if word]
        if not words:
            raise VocabularyError(f"empty class entry {entry!r}")
        return cls(words[0], tuple(dict.fromkeys(words)), descriptions)


def parse_classes(entries: Sequence[object], max_classes: int = 1000) -> list[ClassEntry]:
    """Parse and validate a whole vocabulary at once; raise VocabularyError with the reason."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise VocabularyError("classes must be a list of strings")
    if len(entries) == 0:
        raise VocabularyError("classes is empty: give at least one class name")
    if len(entries) > max_classes:
        raise VocabularyError(f"too many classes: {len(entries)} > {max_classes}")
    parsed: list[ClassEntry] = []
    seen_names: dict[str, str] = {}
    for index, entry in enumerate(entries):
        if isinstance(entry, ClassEntry):
            parsed_entry = entry
        elif isinstance(entry, str):
            names_length = len(entry.split("|", 1)[0])
            if names_length > MAX_NAMES_LENGTH or len(entry) > MAX_ENTRY_LENGTH:
                raise VocabularyError(
                    f"class entry {index} is too long ({names_length} > {MAX_NAMES_LENGTH} chars "
                    f"of names, or {len(entry)} > {MAX_ENTRY_LENGTH} in all)"
                )
            parsed_entry = ClassEntry.parse(entry)
        else:
            raise VocabularyError(
                f"class entry {index} is not text: {entry!r} ({type(entry).__name__})"
            )
        if not parsed_entry.slug:
            raise VocabularyError(f"class name {parsed_entry.name!r} has no letters or digits")
        for key in (parsed_entry.name.lower(), parsed_entry.slug):
            if key in seen_names:
                raise VocabularyError(
                    f"duplicate class {parsed_entry.name!r} (clashes with {seen_names[key]!r})"
                )
        seen_names[parsed_entry.name.lower()] = parsed_entry.name
        seen_names[parsed_entry.slug] = parsed_entry.name
        parsed.append(parsed_entry)
    return parsed
