"""The dense family's last stage: window maps -> labels and confidence at the input size.

Upsampling as NACLIP (``forward_feature``, ``predict``) and SCLIP: bilinear to each window (or
JBU, guided by the window), windows averaged into the resized image, bilinear to the input size,
then PAMR there; softmax over all text queries with ``logit_scale``, max over a class's synonyms,
background words, ``score_threshold``, SCLIP's ``area_threshold``; a refinement's (DSLO, FreeCP)
label where one is configured. The maps are reduced a chunk of queries at a time
(``POSTPROCESS_ELEMENTS``), so the peak memory does not grow with the vocabulary.

One window without a refinement (the default): on the CPU with bilinear upsampling and no PAMR,
one pass of a kernel over the pixels (``fused.py``; maps and labels as the resized maps' up to
float32 rounding). Otherwise ``_reduce_pruned``: the argmax at full resolution only over the
queries that can win somewhere (patch-grid bounds, ``candidates.py``; exact, the same bits as
the whole softmax's labels), the others only in the softmax's denominator (two matrix products
per chunk where separable, ``separable.py``). Sliding windows and refinements keep ``_reduce``:
a pixel's value is then a mean over windows.

``DensePostprocess`` is the part of ``DenseMethod`` that does this; it reads the method's
``config``, ``classes``, text queries (``_query_owner``, ``_class_queries``) and ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.frame_budget import POSTPROCESS_ELEMENTS
from ovss_ros.core.methods.dense import fused
from ovss_ros.core.methods.dense.candidates import candidate_queries, support_radius
from ovss_ros.core.methods.dense.encoded import Encoded
from ovss_ros.core.methods.dense.jbu import jbu_weights, joint_bilateral_upsample
from ovss_ros.core.methods.dense.pamr import pamr_affinity, pamr_propagate
from ovss_ros.core.methods.dense.reduction import Reduced, fold, take_better
from ovss_ros.core.methods.dense.separable import add_denominator
from ovss_ros.core.methods.freecp.freecp import background_wins
from ovss_ros.core.segmentation import Segmentation, label_dtype
from ovss_ros.core.stopping import check_stop


class DensePostprocess:
    """Post-processing of the dense family (mixed into ``DenseMethod``)."""

    cpu_kernel = True  # the CPU kernel where it applies (``fused.py``); False: the torch path

    def _freecp_background(self, best: torch.Tensor) -> torch.Tensor:
        """(H, W) bool: pixels FreeCP leaves unlabeled, from the best window-averaged class
        score ``best``. With background words: FreeCP's background = 1 - best wins (ties too).
        Without: pixels where every class scores 0, i.e. no class survived purification in any
        window over them; the official code labels those with its first class (argmax of
        zeros), ovss_ros calls them unlabeled (``ovss-eval --protocol freecp`` scores them as
        the official does)."""
        if self.config.background_words:
            return background_wins(best)
        return best <= 0

    def postprocess(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        scores: torch.Tensor | None,
        size: tuple[int, int],
    ) -> Segmentation:
        """Upsample, PAMR, softmax, synonyms, background; copy labels/confidence back once.

        ``logits``: (n, Q, h, w) query logits of the image's n windows; ``scores``: (n, L, h, w)
        refined label scores or None; ``size``: the input (H, W). Pixel p gets the class whose
        best synonym has the largest ``softmax(logit_scale * logits)`` over all Q queries
        (docs/methods.md), unlabeled where a background word wins or ties (SCLIP's argmax has
        background first) or the probability is below ``score_threshold``. ``area_threshold``
        (SCLIP's ``area_thd``) drops classes that label at most that share of the labelled
        pixels; theirs go to the best remaining class (or background), as ``postprocess_result``.

        The maps are reduced on the fly (module docstring), so the peak memory does not grow
        with the number of queries; the result is the whole softmax's up to float rounding.
        """
        num_classes = len(self.classes)
        step = self._chunk(encoded, size)
        affinity = self._pamr_affinity(encoded, size) if self.config.dense.pamr else None
        labels = best = None
        if scores is not None:
            best, labels = self._best_label(encoded, scores, size, step, affinity)
        if labels is None and len(encoded.boxes) == 1:
            reduced = self._reduce_pruned(encoded, logits, size, step, affinity)
        else:
            reduced = self._reduce(encoded, logits, size, step, affinity, labels)
        if labels is None and self.config.dense.area_threshold and len(encoded.boxes) > 1:
            dropped = self._small_classes(reduced)
            if dropped is not None:
                reduced = self._reduce(encoded, logits, size, step, affinity, None, dropped)
        confidence = reduced.confidence()
        dtype = label_dtype(num_classes)
        torch_dtype = torch.uint8 if dtype == np.uint8 else torch.int32
        background = None  # passes skipped where they cannot reject (no words, threshold 0)
        if labels is None:
            labels = self._query_owner.to(torch_dtype)[reduced.best_query]
            if logits.shape[1] > self._class_queries:  # background words
                background = reduced.background_probability() >= confidence
        elif self.config.refinement == "freecp":
            background = self._freecp_background(best)
        else:
            background = labels == num_classes  # the refinement's background channel
            labels = labels.clamp(max=num_classes - 1)
        rejected = background
        if self.config.score_threshold > 0:  # confidence >= 0: a threshold <= 0 rejects none
            low = confidence < self.config.score_threshold
            rejected = low if rejected is None else rejected | low
        if rejected is not None:
            labels = labels.masked_fill(rejected, int(np.iinfo(dtype).max))
        labels_host, confidence_host = _to_host(labels.to(torch_dtype), confidence)
        return Segmentation(
            labels=labels_host.astype(dtype, copy=False),
            confidence=confidence_host,
            class_names=[c.name for c in self.classes],
        )

    def _reduce(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        size: tuple[int, int],
        step: int,
        affinity: torch.Tensor | None,
        labels: torch.Tensor | None,
        dropped: torch.Tensor | None = None,
    ) -> Reduced:
        """One pass over the query maps, ``step`` queries at a time (see ``Reduced``).

        ``labels`` (H, W): a refinement's choice; the best logit is then that class's best
        synonym. ``dropped`` (classes,) bool: classes that may not win (area threshold); they
        still count in the softmax's denominator, as SCLIP multiplies their probability by 0.
        """
        num_classes, class_queries = len(self.classes), self._class_queries
        device = logits.device
        peak = torch.full(size, float("-inf"), device=device)  # max of scaled logits
        total = torch.zeros(size, device=device)  # sum of exp(scaled logit - peak)
        best = torch.full(size, float("-inf"), device=device)  # best class logit
        best_query = torch.zeros(size, dtype=torch.long, device=device)
        background = torch.full(size, float("-inf"), device=device)
        owner = self._query_owner
        for start in range(0, logits.shape[1], step):
            if start:
                check_stop(self.stop, f"postprocess of queries {start}..")
            stop = min(start + step, logits.shape[1])
            maps = self._to_input(logits[:, start:stop], encoded, size, labels is None, affinity)
            maps = maps * self.config.dense.logit_scale
            new_peak = torch.maximum(peak, maps.amax(dim=0))
            total = total * torch.exp(peak - new_peak) + torch.exp(maps - new_peak).sum(dim=0)
            peak = new_peak
            if labels is not None:  # the refinement chose: its class's best synonym
                target = labels.clamp(max=num_classes - 1)
                mine = owner[start:stop].view(-1, 1, 1) == target
                best = torch.maximum(best, maps.masked_fill(~mine, float("-inf")).amax(dim=0))
                continue
            split = min(max(class_queries - start, 0), stop - start)
            if split:  # first maximum wins ties, as argmax over the whole softmax would
                candidates = maps[:split]
                if dropped is not None:
                    banned = dropped[owner[start : start + split]].view(-1, 1, 1)
                    candidates = candidates.masked_fill(banned, float("-inf"))
                value, index = candidates.max(dim=0)
                better = value > best
                best = torch.where(better, value, best)
                best_query = torch.where(better, index + start, best_query)
            if split < stop - start:
                background = torch.maximum(background, maps[split:].amax(dim=0))
        return Reduced(peak, total, best, best_query, background)

    def _reduce_pruned(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        size: tuple[int, int],
        step: int,
        affinity: torch.Tensor | None,
    ) -> Reduced:
        """``_reduce`` (and the area threshold's second pass) for one window without a
        refinement; on the CPU with bilinear upsampling and no PAMR by ``_reduce_fused``.

        1. ``candidate_queries`` on the patch grid: the class queries that can be the argmax
           somewhere (exact, ``candidates.py``). Their maps and the background words' are
           brought to the input size as ``_reduce`` does (same ops, same values) and folded
           (``reduction.fold``): best class query (first maximum wins), best background word,
           running log-sum-exp. The peak is then final: every other query is below the best
           candidate at every pixel.
        2. The other class queries only add ``sum exp(scaled - peak)`` to the denominator, by
           ``separable.add_denominator`` (GEMMs) where the upsampling is bilinear without PAMR.
        3. ``area_threshold``: the dropped classes from 1, then the best of the candidates
           with them banned (their probabilities still count in the denominator).
        """
        owner, class_queries = self._query_owner, self._class_queries
        config, device = self.config.dense, logits.device
        if self.cpu_kernel and device.type == "cpu" and affinity is None:
            if config.upsample == "bilinear":  # the kernel's linear resizes
                return self._reduce_fused(encoded, logits, size)
        radius = support_radius(
            size, tuple(logits.shape[-2:]), config.upsample == "jbu", affinity is not None
        )
        scaled = logits[0, :class_queries].float() * config.logit_scale
        chosen = candidate_queries(scaled, radius)
        reduced = Reduced(
            peak=torch.full(size, float("-inf"), device=device),
            total=torch.zeros(size, device=device),
            best=torch.full(size, float("-inf"), device=device),
            best_query=torch.zeros(size, dtype=torch.int32, device=device),  # < 2^31 queries
            background=torch.full(size, float("-inf"), device=device),
        )
        words = torch.arange(class_queries, logits.shape[1], device=device)
        for queries, is_class in ((chosen, True), (words, False)):
            for start in range(0, len(queries), step):
                check_stop(self.stop, f"postprocess of queries {start}..")
                part = queries[start : start + step]
                chunk = logits.index_select(1, part.to(logits.device))
                maps = self._to_input(chunk, encoded, size, True, affinity)
                fold(reduced, maps, part, config.logit_scale, is_class)
        rest = torch.ones(class_queries, dtype=torch.bool, device=device)
        rest[chosen] = False
        rest = rest.nonzero().flatten()
        separable = config.upsample != "jbu" and affinity is None  # linear, separable: GEMMs
        if separable and len(rest):
            check_stop(self.stop, f"postprocess of {len(rest)} other queries")
            middle = encoded.windows.shape[-2:]  # the window: one covers the resized image
            add_denominator(logits[0], rest, middle, size, config.logit_scale, reduced)
        for start in range(0, 0 if separable else len(rest), step):
            check_stop(self.stop, f"postprocess of other queries {start}..")
            maps = self._scaled_maps(encoded, logits, rest[start : start + step], size, affinity)
            reduced.total += maps.sub_(reduced.peak).exp_().sum(dim=0)
        if config.area_threshold:
            dropped = self._small_classes(reduced)
            if dropped is not None:
                chosen = candidate_queries(scaled, radius, dropped[owner[:class_queries]])
                reduced.best = torch.full(size, float("-inf"), device=device)
                reduced.best_query = torch.zeros(size, dtype=torch.int32, device=device)
                for start in range(0, len(chosen), step):
                    check_stop(self.stop, f"postprocess of candidate queries {start}..")
                    part = chosen[start : start + step]
                    maps = self._scaled_maps(encoded, logits, part, size, affinity)
                    take_better(reduced, maps, part)
        return reduced

    def _reduce_fused(
        self, encoded: Encoded, logits: torch.Tensor, size: tuple[int, int]
    ) -> Reduced:
        """``_reduce_pruned`` by the CPU kernel (``fused.reduce``), the area threshold's
        second pass included (the dropped classes' queries may not win)."""
        check_stop(self.stop, "postprocess")
        middle, scale = tuple(encoded.windows.shape[-2:]), self.config.dense.logit_scale
        queries = self._class_queries
        reduced = fused.reduce(logits[0], queries, middle, size, scale, stop=self.stop)
        dropped = self._small_classes(reduced) if self.config.dense.area_threshold else None
        if dropped is not None:
            allowed = ~dropped[self._query_owner[:queries]]
            fused.reduce(logits[0], queries, middle, size, scale, allowed, reduced, self.stop)
        return reduced

    def _scaled_maps(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        queries: torch.Tensor,
        size: tuple[int, int],
        affinity: torch.Tensor | None,
    ) -> torch.Tensor:
        """(len(queries), H, W) ``logit_scale`` x the queries' maps at the input size, by the
        same ops as ``_reduce`` (each map's values do not depend on which others come along)."""
        chunk = logits.index_select(1, queries.to(logits.device))
        maps = self._to_input(chunk, encoded, size, True, affinity)
        return maps.mul_(self.config.dense.logit_scale)  # a new tensor: same values as maps * s

    def _small_classes(self, reduced: Reduced) -> torch.Tensor | None:
        """Classes (bool, (classes,)) to drop under ``area_threshold``, or None if none labels
        any pixel: a class is kept iff its pixels are more than ``area_threshold`` times all
        class-labelled pixels (background-word pixels excluded; SCLIP's ``area_pred``)."""
        confidence = reduced.confidence()
        labelled = reduced.background_probability() < confidence
        labels = self._query_owner[reduced.best_query][labelled]
        counts = torch.bincount(labels, minlength=len(self.classes))
        dropped = counts <= self.config.dense.area_threshold * counts.sum()
        return dropped if bool((dropped & (counts > 0)).any()) else None

    def _chunk(self, encoded: Encoded, size: tuple[int, int]) -> int:
        """Maps per chunk so that one chunk's largest buffer holds about POSTPROCESS_ELEMENTS."""
        windows = encoded.windows
        pixels = max(
            size[0] * size[1],
            encoded.size[0] * encoded.size[1],
            windows.shape[0] * windows.shape[-2] * windows.shape[-1],
        )
        return max(1, POSTPROCESS_ELEMENTS // pixels)

    def _to_input(
        self,
        maps: torch.Tensor,
        encoded: Encoded,
        size: tuple[int, int],
        refine: bool,
        affinity: torch.Tensor | None,
    ) -> torch.Tensor:
        """Window maps (n, K, h, w) -> (K, H, W) float32 at the input size.

        As NACLIP (``forward_feature``, ``predict``) and SCLIP: bilinear to each window, windows
        averaged into the resized image (H', W'), bilinear to the input size (two steps also
        for the whole image), then PAMR there (``affinity``, when configured). JBU, when
        configured, replaces the first step. Both only when ``refine``: they refine whichever
        maps decide the label.
        """
        jbu = refine and self.config.dense.upsample == "jbu"
        maps = _resize(self.to_image(maps, encoded, jbu), size)
        if refine and affinity is not None:
            maps = pamr_propagate(affinity, maps[None].float())[0]
        return maps.float()

    def _pamr_affinity(self, encoded: Encoded, size: tuple[int, int]) -> torch.Tensor:
        """PAMR's affinity (1, 16, H, W) at the input size, guided by the normalised network
        input upsampled bilinearly to the input size (NACLIP's ``predict``); once per image."""
        guide = F.interpolate(
            self._full_resolution(encoded), size=size, mode="bilinear", align_corners=False
        )
        return pamr_affinity(guide)

    def _best_label(
        self,
        encoded: Encoded,
        scores: torch.Tensor,
        size: tuple[int, int],
        step: int,
        affinity: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W) max and argmax over the refined label scores (n, L, h, w) at the input size,
        taken a chunk of labels at a time (the first maximum wins, as ``argmax``)."""
        best = label = None
        for start in range(0, scores.shape[1], step):
            maps = self._to_input(scores[:, start : start + step], encoded, size, True, affinity)
            value, index = maps.max(dim=0)
            if best is None:
                best, label = value, index + start
            else:
                better = value > best
                best = torch.where(better, value, best)
                label = torch.where(better, index + start, label)
        return best, label

    def to_image(self, maps: torch.Tensor, encoded: Encoded, jbu: bool) -> torch.Tensor:
        """Window maps (n, K, h, w) -> one map of the resized image (K, H', W').

        Each window's patch map is upsampled to the window (bilinear, or JBU guided by the
        window), overlapping windows are averaged (NACLIP's ``forward_slide``). A window whose
        side is not whole patches had its remainder dropped by the patch embedding: its map is
        stretched over the whole window, as in the official code.
        """
        if jbu:
            guide = (encoded.windows.float() * self._std + self._mean).clamp(0, 1)
            weights = _per_frame(encoded, "jbu", lambda: jbu_weights(guide, maps.shape[-2:]))
            maps = joint_bilateral_upsample(maps.float(), guide, weights=weights)
        else:
            maps = F.interpolate(
                maps.float(), size=encoded.windows.shape[-2:], mode="bilinear", align_corners=False
            )
        if len(encoded.boxes) == 1:
            return maps[0]
        total = maps.new_zeros((maps.shape[1], *encoded.size))
        count = maps.new_zeros((1, *encoded.size))
        for (top, left, height, width), window in zip(encoded.boxes, maps, strict=True):
            total[:, top : top + height, left : left + width] += window
            count[:, top : top + height, left : left + width] += 1
        return total / count

    def _full_resolution(self, encoded: Encoded) -> torch.Tensor:
        """The resized input image (1, 3, H', W') reassembled from the windows (PAMR's guide)."""
        image = encoded.windows.new_zeros((1, 3, *encoded.size))
        for (top, left, height, width), window in zip(encoded.boxes, encoded.windows, strict=True):
            image[0, :, top : top + height, left : left + width] = window
        return image.float()


def _per_frame(encoded: Encoded, key: str, compute: Callable[[], object]) -> object:
    """``compute()`` once per frame: guide-dependent weights (JBU, PAMR) that every chunk of
    classes in postprocess reuses instead of recomputing them."""
    if key not in encoded.guides:
        encoded.guides[key] = compute()
    return encoded.guides[key]


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Copy results to the host with one synchronisation (pinned buffers on CUDA)."""
    if tensors[0].device.type != "cuda":
        return [t.numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors, strict=True):
        host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
