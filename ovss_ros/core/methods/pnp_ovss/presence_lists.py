"""Per-image class lists in the PnP-OVSS release's JSON layout (the classes put in the prompt).

The release (github.com/letitiabanana/PnP-OVSS) does not find the classes of an image itself: it
reads answers a large multimodal model gave offline (``gpt_rewrite_label.py`` wrote
``GPT4o_classification/<set>_classification_noboundary.json``) and keeps the classes whose
probability is above 70 (``Load_predicted_classes``, ``PnP_OVSS_0514_updated_segmentation.py``
~726-787, and the same function of ``PnP_OVSS_0514_updated_segmentation_coco.py`` ~858-963).

The layout: one JSON object, image id -> the model's answer, a string of two bracketed groups,
the class ids with their names and the probabilities in percent, e.g.
``"[2: 'bicycle', 15: 'person'], [100, 60%]"``. Read as the release reads it:

- the groups may be separated by line breaks; a class is ``<id>: <name>``, the id an integer;
  a probability is the integer before ``%`` after the last ``:`` of its item;
- a class is kept when its probability is above ``RELEASE_THRESHOLD`` (70), in the answer's
  order; classes without a probability (fewer probabilities than classes) are dropped, extra
  probabilities ignored (the COCO-Stuff script's rule);
- an answer without a probability group keeps every class (the COCO script's rule); an empty
  answer, or none kept, gives the data set's first class (the release's fallback:
  ``best_class_idx.append(0)``, e.g. VOC's aeroplane, ADE's wall, COCO's person);
- the ids are the data set's class ids: 1-based positions in the class list for VOC, PASCAL
  Context and ADE20K (and for ovss-segment's ``--classes``), COCO category ids for the COCO sets
  (an id that is no category of the set is skipped, as the release's COCO script does).

Anything else (not a JSON object of strings, an id or probability that is not an integer, more
than two groups, an id outside the class list, an image without an answer) is refused with
``PresenceListError`` naming the file and the entry. The image id is the image file's name
without its extension (the release's keys: ``2007_000033``, ``ADE_val_00000001``,
``000000397133``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ovss_ros.core.file_checks import (
    MAX_TEXT_FILE_BYTES,
    FileCheckError,
    read_text,
    regular_file,
)
from ovss_ros.core.frame_budget import gigabytes

RELEASE_THRESHOLD = 70  # percent; a class is kept when its probability is above it
WITHOUT_PROBABILITY = 100  # the COCO script's probability for an answer without one
# The release's file names in GPT4o_classification/, by its --data_type.
RELEASE_FILES = {
    "voc": "voc_classification_noboundary.json",
    "psc": "psc_classification_noboundary.json",
    "ade20k": "ade20k_classification_noboundary.json",
    "coco_object": "coco_object_classification_noboundary.json",
    "coco_stuff": "coco_stuff_classification_noboundary.json",
}
_GROUP_BREAK = re.compile(r"\]\s*(?:,\s*)?\[")  # one \s* before the comma: linear time


class PresenceListError(ValueError):
    """A class-list file or entry that cannot be read as the release reads it."""


@dataclass(frozen=True)
class Answer:
    """One image's answer: class ids in the answer's order and their probabilities (percent;
    None where the answer has no probability group)."""

    ids: tuple[int, ...]
    probabilities: tuple[int, ...] | None

    def kept(self, threshold: int = RELEASE_THRESHOLD) -> list[int]:
        """Class ids whose probability is above ``threshold``, in the answer's order (every id
        without a probability group; only ids that have a probability otherwise)."""
        if self.probabilities is None:
            return list(self.ids)
        return [i for i, p in zip(self.ids, self.probabilities, strict=False) if p > threshold]


def parse_answer(text: str) -> Answer:
    """The release's reading of one answer string; PresenceListError saying what is wrong."""
    body = text.strip().strip("[]").strip()  # the release strips every outer bracket
    if not body:
        return Answer((), None)
    groups = _GROUP_BREAK.split(body)
    if len(groups) > 2:
        raise PresenceListError(f"{len(groups)} bracketed groups, not 2 (classes, probabilities)")
    ids = tuple(_integer(item.split(":")[0], "class id", item) for item in groups[0].split(","))
    if len(groups) == 1:
        return Answer(ids, None)
    probabilities = tuple(
        _integer(item.split(":")[-1].split("%")[0], "probability", item)
        for item in groups[1].split(",")
    )
    return Answer(ids, probabilities[: len(ids)])


def _integer(text: str, what: str, item: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise PresenceListError(f"{what} {_short(item.strip())!r} is not an integer") from None


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for a one-line message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook: a key given twice is refused (json keeps the last silently)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateKey(twice)
    return data


class _DuplicateKey(Exception):
    """A JSON object with a key twice (raised through json.loads by ``_unique_keys``)."""


def _read_object(path: Path, what: str, layout: str) -> dict[str, object]:
    """A JSON object of at most MAX_TEXT_FILE_BYTES with each key once; PresenceListError
    naming the file otherwise (not UTF-8, not JSON, nested too deeply, a key twice, not an
    object)."""
    try:
        data = json.loads(read_text(path, what), object_pairs_hook=_unique_keys)
    except FileCheckError as error:
        raise PresenceListError(str(error)) from None
    except _DuplicateKey as key:
        raise PresenceListError(
            f"{what} {str(path)!r}: image {_short(str(key))!r} is in it twice (JSON keeps only "
            "the last: give each image once)"
        ) from None
    except ValueError as error:
        raise PresenceListError(f"{what} {str(path)!r} is not valid JSON ({error})") from None
    except RecursionError:
        raise PresenceListError(f"{what} {str(path)!r} is nested too deeply: {layout}") from None
    if not isinstance(data, dict):
        raise PresenceListError(f"{what} {str(path)!r} is not a JSON object ({layout})")
    return data


class PresenceLists:
    """Every image's answer of one class-list file (or several merged), checked on load.

    ``vocabulary_indices`` turns an image's kept ids into indices of the vocabulary the
    segmenter holds: ``category_ids`` gives the data set's id of each vocabulary index (the
    COCO category ids); without it an id is its 1-based position.
    """

    def __init__(self, answers: Mapping[str, Answer], source: str) -> None:
        self.answers = dict(answers)
        self.source = source

    @classmethod
    def load(cls, path: str | Path, release_set: str | None = None) -> PresenceLists:
        """A JSON file, or a folder: the release's file of ``release_set`` in it when given
        (``RELEASE_FILES``), else every ``*.json`` in it merged (an image in two of them is
        refused). Raises PresenceListError with the file and the reason."""
        path = Path(path).expanduser()
        if not path.is_dir():
            return cls(_read_answers(path), str(path))
        if release_set is not None:
            name = RELEASE_FILES[release_set]
            return cls(_read_answers(path / name), str(path / name))
        files = sorted(path.glob("*.json"))
        if not files:
            raise PresenceListError(f"class-list folder {str(path)!r} holds no .json file")
        _check_folder_size(path, files)
        merged: dict[str, Answer] = {}
        for file in files:
            answers = _read_answers(file)
            twice = sorted(set(merged) & set(answers))
            if twice:
                raise PresenceListError(
                    f"class-list file {str(file)!r}: image {twice[0]!r} is in another file of "
                    f"{str(path)!r} too"
                )
            merged |= answers
        return cls(merged, str(path))

    def check_images(self, image_ids: Sequence[str]) -> None:
        """Refuse up front (PresenceListError) when an image has no answer."""
        missing = [i for i in image_ids if i not in self.answers]
        if missing:
            raise PresenceListError(
                f"class lists {self.source!r} have no entry for {len(missing)} of the "
                f"{len(image_ids)} images (first: {missing[0]!r}; the key is the image file's "
                "name without extension)"
            )

    def check_ids(self, num_classes: int, category_ids: Sequence[int] | None = None) -> None:
        """Refuse (PresenceListError) a position id outside 1..num_classes; category ids that
        name no class are skipped as released and not checked."""
        if category_ids is not None:
            return
        for image, answer in self.answers.items():
            bad = [i for i in answer.ids if not 1 <= i <= num_classes]
            if bad:
                raise PresenceListError(
                    f"class lists {self.source!r}, image {_short(image)!r}: class id "
                    f"{_short(str(bad[0]))} is not "
                    f"one of the {num_classes} classes (1..{num_classes})"
                )

    def vocabulary_indices(
        self,
        image_id: str,
        num_classes: int,
        category_ids: Sequence[int] | None = None,
        threshold: int = RELEASE_THRESHOLD,
    ) -> list[int]:
        """Vocabulary indices to prompt with for ``image_id``, in the answer's order, each once;
        ``[0]`` (the first class) when none is kept. PresenceListError without an entry."""
        if image_id not in self.answers:
            self.check_images([image_id])
        kept = self.answers[image_id].kept(threshold)
        if category_ids is None:
            if any(not 1 <= i <= num_classes for i in kept):
                self.check_ids(num_classes)
            indices = [i - 1 for i in kept]
        else:
            position = {c: k for k, c in enumerate(category_ids)}
            indices = [position[i] for i in kept if i in position]
        return list(dict.fromkeys(indices)) or [0]


def _check_folder_size(folder: Path, files: Sequence[Path]) -> None:
    """Refuse (PresenceListError) a folder whose .json files hold more than
    MAX_TEXT_FILE_BYTES together, from their sizes alone (nothing is read); the release's five
    files hold 1.8 MB."""
    total = 0
    for file in files:
        try:
            total += regular_file(file, "class-list file").stat().st_size
        except (FileCheckError, OSError) as error:
            raise PresenceListError(str(error)) from None
        if total > MAX_TEXT_FILE_BYTES:
            raise PresenceListError(
                f"class-list folder {str(folder)!r}: its .json files hold more than "
                f"{gigabytes(MAX_TEXT_FILE_BYTES)} together (the release's five hold 1.8 MB): "
                "name the file to read"
            )


def _read_answers(path: Path) -> dict[str, Answer]:
    data = _read_object(path, "class-list file", "image id -> answer")
    answers = {}
    for image, text in data.items():
        if not isinstance(text, str):
            raise PresenceListError(
                f"class-list file {str(path)!r}, image {_short(image)!r}: the answer is a "
                f"{type(text).__name__}, not a string like \"[2: 'bicycle'], [90%]\""
            )
        try:
            answers[image] = parse_answer(text)
        except PresenceListError as error:
            raise PresenceListError(
                f"class-list file {str(path)!r}, image {_short(image)!r}: {error}"
            ) from None
    return answers


def lists_argument(text: str) -> Path:
    """argparse type of ``--presence-lists``: the path; an empty one is refused
    (argparse.ArgumentTypeError) instead of becoming ``.``, whose .json files would be read
    (an unset shell variable in ``--presence-lists "$LISTS"``)."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty: name a class-list file or folder (the current folder is '.')"
        )
    return Path(text)


def load_for_method(
    path: str | Path | None, method: str, release_set: str | None = None
) -> PresenceLists | None:
    """The class lists a tool's ``--presence-lists`` names (None without one); ValueError when
    the method is not pnp_ovss (only it prompts with the classes of each image), else
    PresenceListError as ``PresenceLists.load``."""
    if path is None:
        return None
    if method != "pnp_ovss":
        raise ValueError(
            f"--presence-lists gives PnP-OVSS the classes of each image: --method {method} does "
            "not use it (use --method pnp_ovss)"
        )
    return PresenceLists.load(path, release_set)


def read_image_labels(path: str | Path, class_names: Sequence[str]) -> dict[str, list[int]]:
    """Image-level labels for tuning: a JSON object, image id (the file's stem) -> the classes
    in it, each a name of ``class_names`` or a 1-based position; vocabulary indices, in order.
    PresenceListError naming the file and entry for anything else (an empty list is allowed:
    the release skips an image without classes)."""
    path = Path(path).expanduser()
    data = _read_object(path, "image-labels file", "image id -> class list")
    position = {name: i for i, name in enumerate(class_names)}
    labels = {}
    for image, classes in data.items():
        where = f"image-labels file {str(path)!r}, image {_short(image)!r}"
        if not isinstance(classes, list):
            raise PresenceListError(f"{where}: not a list of classes")
        indices = []
        for item in classes:
            if isinstance(item, str) and item in position:
                indices.append(position[item])
            elif type(item) is int and 1 <= item <= len(class_names):
                indices.append(item - 1)
            else:
                raise PresenceListError(
                    f"{where}: {_short(repr(item))} is neither one of the classes "
                    f"{_short(str(list(class_names)), 200)} nor "
                    f"a position 1..{len(class_names)}"
                )
        labels[image] = list(dict.fromkeys(indices))
    return labels
