"""Class colours and the overlay image (with its legend) that RViz and rqt_image_view show.

Colours come from ``PALETTE``, a fixed sequence of high-contrast colours built once by greedy
farthest-point selection in CIELAB (Glasbey et al. 2007, "Colour displays for categorical
images"): each colour is the candidate farthest (CIE76 distance) from all colours before it and
from black and white, so the first colours of the sequence are the most distinct ones.
``ClassColours`` hands palette entries to class names: a name keeps its entry while it stays in
the vocabulary, and a new name gets the first entry no current class holds. A fresh vocabulary
of N classes therefore gets the first N palette colours, in vocabulary order, in the node, in
``ovss-segment`` and in ``ovss-bag`` alike. Beyond ``len(PALETTE)`` classes, colours repeat.

The legend (``draw_legend``) lists the classes that label at least one pixel of the frame, in
vocabulary order, each as a colour swatch and its name (OpenCV Hershey font, so names are shown
in ASCII: accents dropped, other characters as ``?``), top-left on a dark box, in as many columns
as keep it small; it covers at most ``LEGEND_AREA_FRACTION`` of the image (rows scale with the
image), and the classes beyond that are summarised as ``+N more``.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Sequence

import cv2
import numpy as np

from ovss_ros.core.segmentation import Segmentation

PALETTE_SIZE = 256
_GRID_LEVELS = 18  # RGB candidates per channel for the palette search
# CIELAB L*: no near-white colours, and none dark: L* 45 and up keeps every colour at 3.9:1
# contrast or more against black (WCAG's 3:1 for graphics), visible on a dark scene.
_MIN_LIGHTNESS, _MAX_LIGHTNESS = 45.0, 92.0

LEGEND_BOX = (0, 0, 0)  # legend background (RGB), blended with LEGEND_BOX_ALPHA
LEGEND_BOX_ALPHA = 0.65
LEGEND_TEXT = (255, 255, 255)
LEGEND_AREA_FRACTION = 1 / 8  # the most of the image the legend box covers (one row at least)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (..., 3) float32 CIELAB (L* 0..100), with OpenCV's D65 formulas."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(rgb.shape)


def _build_palette(size: int) -> np.ndarray:
    """(size, 3) uint8: greedy farthest-point selection in CIELAB over an RGB grid."""
    levels = np.linspace(0, 255, _GRID_LEVELS).round().astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = rgb_to_lab(grid).astype(np.float64)
    keep = (lab[:, 0] >= _MIN_LIGHTNESS) & (lab[:, 0] <= _MAX_LIGHTNESS)
    grid, lab = grid[keep], lab[keep]
    seeds = rgb_to_lab(np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)).astype(np.float64)
    nearest = np.linalg.norm(lab[:, None] - seeds[None], axis=-1).min(axis=1)
    chosen = []
    for _ in range(size):
        best = int(np.argmax(nearest))  # ties: the first in grid order, so it is deterministic
        chosen.append(grid[best])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[best], axis=-1))
    return np.array(chosen, dtype=np.uint8)


PALETTE = _build_palette(PALETTE_SIZE)  # (PALETTE_SIZE, 3) uint8 RGB, most distinct first


class ClassColours:
    """Palette entries for class names, each kept while its name stays in the vocabulary.

    ``colours(names)`` is called with the vocabulary of each frame: names no longer in it give
    their entries back, new names take the lowest free entries in order. Thread-safe.
    """

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._lock = threading.Lock()

    def colours(self, class_names: Sequence[str]) -> np.ndarray:
        """(len(class_names), 3) uint8 RGB, row i = colour of class (label value) i."""
        with self._lock:
            current = set(class_names)
            self._slots = {n: s for n, s in self._slots.items() if n in current}
            taken = set(self._slots.values())
            free = (slot for slot in range(len(class_names) + len(taken)) if slot not in taken)
            for name in class_names:
                if name not in self._slots:
                    self._slots[name] = next(free)
            return PALETTE[[self._slots[name] % len(PALETTE) for name in class_names]].reshape(
                -1, 3
            )


def palette(class_names: Sequence[str]) -> np.ndarray:
    """(len(class_names), 3) uint8 colours of a fresh vocabulary: the first palette entries."""
    return ClassColours().colours(class_names)


def class_color(name: str, class_names: Sequence[str]) -> tuple[int, int, int]:
    """The RGB colour of ``name`` in a fresh vocabulary ``class_names`` (as the tools draw it)."""
    return tuple(int(c) for c in palette(class_names)[list(class_names).index(name)])


def ascii_label(name: str) -> str:
    """``name`` as the Hershey font can draw it: accents dropped, other non-ASCII as ``?``."""
    decomposed = unicodedata.normalize("NFKD", name)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in kept)


def _fit(text: str, scale: float, thickness: int, width: int) -> str:
    """``text`` cut (with ``..``) until it is at most ``width`` pixels wide."""
    if cv2.getTextSize(text, _FONT, scale, thickness)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", _FONT, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text + ".." if text else ""


def draw_legend(image: np.ndarray, names: Sequence[str], colours: np.ndarray) -> np.ndarray:
    """Draw a legend of ``names`` with ``colours`` ((N, 3) uint8 RGB) in place, top left.

    Rows are about 1/24 of the image's short side high (16 to 48 pixels), names at most a
    quarter of the image wide. The entries fill as many columns (column by column) as keep the
    box smallest, within LEGEND_AREA_FRACTION of the image area; entries beyond that become
    ``+N more`` (at least one row is always shown). An image under two rows high or 4 rows wide
    gets no legend. Returns ``image`` (HxWx3 uint8 RGB).
    """
    height, width = image.shape[:2]
    row = int(np.clip(round(min(height, width) / 24), 16, 48))
    margin = max(2, row // 4)
    if not names or height < 2 * row or width < 4 * row:
        return image
    thickness = 1 if row < 28 else 2
    scale = cv2.getFontScaleFromHeight(_FONT, int(row * 0.55), thickness)
    swatch = row - 2 * margin
    text_x = margin + swatch + margin  # from a column's left edge
    max_text = max(row, min(width // 4, width - text_x - 3 * margin))
    budget = LEGEND_AREA_FRACTION * height * width
    # No more entries than could fit the budget at the narrowest: text widths for those only.
    most = int(min(len(names), max(1, budget // (row * (text_x + margin)))))
    entries = [
        (_fit(ascii_label(name), scale, thickness, max_text), tuple(int(c) for c in colour))
        for name, colour in zip(names[:most], colours[:most], strict=True)
    ]
    widths = [cv2.getTextSize(text, _FONT, scale, thickness)[0][0] for text, _ in entries]
    layout = _legend_layout(len(names), widths, row, margin, text_x, (height, width), budget)
    shown, columns, rows = layout
    cells = entries[:shown]
    if shown < len(names):
        more = f"+{len(names) - shown} more"
        cells.append((more, None))
        widths = widths[:shown] + [cv2.getTextSize(more, _FONT, scale, thickness)[0][0]]
    column_x, box_w = _column_offsets(widths[: len(cells)], rows, margin, text_x)
    box_w, box_h = min(width, box_w), min(height, rows * row + 2 * margin)
    region = image[:box_h, :box_w]
    region[:] = np.rint(
        (1 - LEGEND_BOX_ALPHA) * region + LEGEND_BOX_ALPHA * np.array(LEGEND_BOX)
    ).astype(np.uint8)
    baseline = (row + cv2.getTextSize("Ag", _FONT, scale, thickness)[0][1]) // 2
    for i, (text, colour) in enumerate(cells):
        left, top = column_x[i // rows], margin + (i % rows) * row
        if colour is not None:
            corner = (left + margin, top + margin)
            far = (left + margin + swatch, top + margin + swatch)
            cv2.rectangle(image, corner, far, colour, cv2.FILLED)
        cv2.putText(
            image, text, (left + text_x, top + baseline), _FONT, scale, LEGEND_TEXT, thickness,
            cv2.LINE_AA,
        )
    return image


def _column_offsets(
    widths: Sequence[int], rows: int, margin: int, text_x: int
) -> tuple[list[int], int]:
    """Left edge of each column of ``rows`` cells (texts ``widths`` pixels wide) and the box
    width."""
    offsets, x = [], margin
    for start in range(0, len(widths), rows):
        offsets.append(x)
        x += text_x + max(widths[start : start + rows]) + margin
    return offsets, x + margin


def _legend_layout(
    total: int,
    widths: Sequence[int],
    row: int,
    margin: int,
    text_x: int,
    shape: tuple[int, int],
    budget: float,
) -> tuple[int, int, int]:
    """(entries shown, columns, rows per column): the most entries of ``total`` (text widths
    ``widths`` of the first ones) whose smallest box fits the image and ``budget`` pixels, a
    ``+N more`` cell added when some are left out; one entry at least. Binary search over the
    count: one more entry never makes the smallest box smaller."""
    height, width = shape
    more_width = widths[0]  # "+N more" is about one short name wide

    def smallest(shown: int) -> tuple[int, int] | None:
        """(columns, rows) of the smallest box of the first ``shown`` entries, None if none
        fits."""
        cells = list(widths[:shown]) + ([more_width] if shown < total else [])
        fitting = []
        for rows in range(1, min(len(cells), (height - 2 * margin) // row) + 1):
            box_h = rows * row + 2 * margin
            box_w = _column_offsets(cells, rows, margin, text_x)[1]
            if box_w <= width and box_w * box_h <= budget:
                fitting.append((box_w * box_h, rows))
        if not fitting:
            return None
        rows = min(fitting)[1]
        return -(-len(cells) // rows), rows

    low, high, found = 1, len(widths), None
    while low <= high:
        middle = (low + high) // 2
        layout = smallest(middle)
        if layout is None:
            high = middle - 1
        else:
            low, found = middle + 1, (middle, *layout)
    if found is None:  # not even one entry within the budget: one anyway
        return 1, 1, 2 if total > 1 else 1
    return found


def overlay(
    rgb: np.ndarray,
    segmentation: Segmentation,
    alpha: float = 0.5,
    colours: ClassColours | None = None,
    legend: bool = True,
) -> np.ndarray:
    """Blend class colours into the image; unlabeled pixels keep the image as it is.

    ``rgb``: HxWx3 uint8; returns a new HxWx3 uint8 array. ``colours``: the assignment to keep
    across frames (the node's); None gives a fresh vocabulary's colours. ``legend``: draw the
    classes present in the frame with their colours and label values (``draw_legend``).
    """
    labels = segmentation.labels
    labelled = labels != segmentation.unlabeled
    table = (colours or ClassColours()).colours(segmentation.class_names)
    out = rgb.copy()
    blend = (1 - alpha) * rgb[labelled] + alpha * table[labels[labelled].astype(np.intp)]
    out[labelled] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if legend:
        present = np.unique(labels[labelled]).astype(np.intp)
        # Each row starts with the class's label value (its id in label_info and ~/labels):
        # the font draws ASCII only, so a name in another script needs the id to be told apart.
        names = [f"{i} {segmentation.class_names[i]}" for i in present]
        draw_legend(out, names, table[present])
    return out
