"""FreeCP's window-level algorithm as its official code states it, for the tests to compare with.

Written from chenqi1126/FreeCP ``freecp_segmentor.py`` (``forward_feature``, ``refinement``,
``redundancy_purification``, ``ambiguity_purification``, ``scoremap2bbox``) step by step, in
the official order and layout (background prompts first, (hw, Q) logits, one class at a time,
a depth-first search for the class groups), without any of ovss_ros's code.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def official_boxes(scoremap: np.ndarray, threshold: float = 0.4) -> list[tuple[int, ...]]:
    """``scoremap2bbox(scoremap, threshold, multi_contour_eval=True)``: (x0, y0, x1, y1) each."""
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def _components(adjacency: np.ndarray) -> list[list[int]]:
    seen = [False] * len(adjacency)
    groups = []
    for start in range(len(adjacency)):
        if seen[start]:
            continue
        stack, group = [start], []
        seen[start] = True
        while stack:
            node = stack.pop()
            group.append(node)
            for other in range(len(adjacency)):
                if adjacency[node][other] and not seen[other]:
                    seen[other] = True
                    stack.append(other)
        groups.append(sorted(group))
    return groups


def official_window(
    features: torch.Tensor,
    text: torch.Tensor,
    attention: torch.Tensor,
    rp_thres: float,
    ap_thres: float,
    classify=None,
    background_text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """(``logits_ref`` of the classes (K, h, w), kept classes) of one window.

    ``features`` (h, w, D) and ``text`` (K, D) normalised, ``attention`` (hw, hw) the layer-mean
    attention, ``classify(boxes, classes)`` -> scores (len(boxes), len(classes)) of pixel crops.
    """
    height, width, dim = features.shape
    background = background_text if background_text is not None else text[:0]
    queries = torch.cat([background, text]).double()
    nb = len(background)
    logits = 100 * features.reshape(-1, dim).double() @ queries.T  # (hw, Q)
    probs = logits.softmax(dim=-1).T.reshape(-1, height, width)  # (Q, h, w)
    normalized = (probs - probs.min()) / (probs.max() - probs.min())

    trans = attention.double()
    trans = trans / trans.sum(dim=0, keepdim=True)
    trans = trans / trans.sum(dim=1, keepdim=True)
    for _ in range(2):
        trans = trans / trans.sum(dim=0, keepdim=True)
        trans = trans / trans.sum(dim=1, keepdim=True)
    trans = (trans + trans.T) / 2
    trans = trans @ trans

    num = len(text)
    refined = torch.zeros(num, height, width, dtype=torch.float64)
    for i in range(num):
        cam = normalized[nb + i]
        mask = torch.zeros(height, width, dtype=torch.float64)
        for x0, y0, x1, y1 in official_boxes(cam.numpy()):
            mask[y0:y1, x0:x1] = 1
        out = (trans * mask.flatten()[None, :]) @ cam.flatten()
        out = (out - out.min()) / (out.max() - out.min() + 1e-8)
        refined[i] = out.reshape(height, width)

    scores = (probs[nb:] * refined).sum((1, 2)) / (
        probs[nb:].sum((1, 2)) + refined.sum((1, 2)) + 1e-8
    )
    candidates = [i for i in range(num) if scores[i] > rp_thres]
    if len(candidates) > 1 and classify is not None:
        post = refined[candidates]
        iou = torch.zeros(len(candidates), len(candidates), dtype=torch.float64)
        for a in range(len(candidates)):
            for b in range(len(candidates)):
                iou[a, b] = (
                    torch.minimum(post[a], post[b]).sum() / torch.maximum(post[a], post[b]).sum()
                )
        valid = []
        for group in _components((iou >= ap_thres).numpy()):
            if len(group) == 1:
                valid.append(group[0])
                continue
            fused = post[group].mean(0)
            voted = False
            for x0, y0, x1, y1 in official_boxes(fused.float().numpy()):
                if y0 == y1 or x0 == x1:
                    valid.extend(group)
                    continue
                classes = [candidates[g] for g in group]
                winner = int(torch.as_tensor(classify([(x0, y0, x1, y1)], classes)).argmax())
                valid.append(group[winner])
                voted = True
            if not voted:
                valid.extend(group)
        candidates = [candidates[v] for v in sorted(set(valid))]
    for i in range(num):
        if i not in candidates:
            refined[i] = 0
    return refined.float(), candidates


def official_labels(scores: torch.Tensor, background: bool) -> torch.Tensor:
    """``postprocess_result``: argmax over [1 - max, classes] (background 0, class k is k + 1)
    with background, else over the classes."""
    if background:
        scores = torch.cat([1 - scores.max(dim=0, keepdim=True)[0], scores])
    return scores.argmax(dim=0)
