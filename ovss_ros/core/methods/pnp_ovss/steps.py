"""PnP-OVSS's tensor steps, each checked against its formula in test/test_pnp_ovss.py: GradCAM
of a cross-attention map, class maps from word pieces, salience dropout, min-max normalisation,
thresholds and background, Gaussian blur, the dense CRF of the release (``densecrf()`` in
``PnP_OVSS_0514_updated_segmentation.py``, letitiabanana/PnP-OVSS), the prompt's word pieces.

``pnp_ovss.PnpOvss`` runs them in order (Luo et al., CVPR 2024).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.pnp_ovss.crf_process import shared_crf_process
from ovss_ros.core.vocabulary import VocabularyError

PROMPT = "a picture of"  # the released prompt ("A picture of "; BLIP's tokenizer lower-cases)
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter
# Dense CRF of the release (densecrf() in PnP_OVSS_0514_updated_segmentation.py).
CRF_ITERATIONS = 10
CRF_GAUSSIAN = {"sxy": 3, "compat": 7}
CRF_BILATERAL = {"sxy": 50, "srgb": 5, "compat": 10}
# Pixels the CRF is solved at, at most (a 640x480 frame is solved as it is): its cost grows with
# the pixels and a 1920x1080 frame took 23 s (issue 18); bigger frames are solved at this size
# and the marginals upsampled (``dense_crf``).
CRF_MAX_PIXELS = 640 * 480


def gradcam(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """GradCAM of one cross-attention head: ``attention * relu(gradient)``, image [CLS] dropped.

    ``attention``, ``gradient``: (T, 1 + P) softmax attention of T text tokens over BLIP's image
    tokens ([CLS] first, then P patches) and d(match logit)/d(attention). Returns (T, P).
    Source: ``compute_gradcam_ensemble`` in the released ``blip_image_text_matching.py``.
    """
    return attention[:, 1:] * gradient[:, 1:].clamp(min=0)


def class_maps(cams: torch.Tensor, spans: Sequence[slice]) -> torch.Tensor:
    """(T, ...) token maps -> (C, ...) class maps: the mean over each class's word pieces."""
    return torch.stack([cams[span].mean(dim=0) for span in spans])


def most_salient(salience: torch.Tensor, dropped: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest of ``salience`` (P,) among patches not yet ``dropped``.

    Equal salience (e.g. 0 where no gradient is positive) goes to the lower patch index, on
    every CPU (the release's ``np.argsort`` and torch's ``topk`` leave that order open)."""
    available = int((~dropped).sum())
    ranked = salience.masked_fill(dropped, float("-inf"))
    return ranked.sort(descending=True, stable=True).indices[: min(count, available)]


def drop_patches(pixels: torch.Tensor, dropped: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero the ``patch`` x ``patch`` pixel block of every dropped patch.

    ``pixels`` (N, 3, H, W) normalised input, ``dropped`` (H/patch, W/patch) bool. Zero is the
    mean colour after normalisation, as in the release (``imgs_in_for_drop[...] = 0``).
    """
    keep = (~dropped).to(pixels.dtype)
    keep = keep.repeat_interleave(patch, dim=0).repeat_interleave(patch, dim=1)
    return pixels * keep


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-channel (C, H, W) min-max normalisation to [0, 1]; a flat channel keeps its value."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    flat = span <= 0
    return torch.where(flat, maps.clamp(0, 1), (maps - low) / span.masked_fill(flat, 1.0))


def threshold_maps(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep each class map (C, h, w) where its min-max normalised value is >= ``threshold``.

    The kept values are the raw map values (release: ``pred_map * (normalised >= threshold)``);
    a flat map (no gradient reached the class) is kept nowhere.
    """
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    normalised = (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)
    return maps * ((normalised >= threshold) & (span > 0))


def with_background(maps: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (1 + C, H, W): channel 0 is 1 where no class map is above zero."""
    background = (maps.amax(dim=0, keepdim=True) <= 0).to(maps.dtype)
    return torch.cat([background, maps])


def best_classes(
    probs: torch.Tensor, background: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's argmax of the final probabilities: (1 + C, H, W) with ``background`` in
    channel 0, else (C, H, W). Returns the (H, W) best class (0..C-1), its probability and
    where background wins. Ties go to the first channel, background first, as the release's
    ``np.argmax`` (``densecrf``) and ``torch.argmax`` (``postprocess``) break them."""
    classes = probs[1:] if background else probs
    confidence, best = classes.max(dim=0)  # the first maximum (torch.max's documented rule)
    if not background:
        return best, confidence, torch.zeros_like(best, dtype=torch.bool)
    return best, confidence, probs[0] >= confidence


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each (H, W) channel of ``maps`` (C, H, W), float32.

    Equals ``scipy.ndimage.gaussian_filter(map, sigma)`` as the release calls it: kernel radius
    ``int(4 sigma + 0.5)``, edges mirrored (scipy ``mode='reflect'`` = OpenCV
    ``BORDER_REFLECT``). The release blurs with sigma = 0.05 x the long image side.
    """
    if sigma <= 0:
        return maps
    size = 2 * int(BLUR_TRUNCATE * sigma + 0.5) + 1
    return np.stack(
        [
            cv2.GaussianBlur(channel, (size, size), sigma, borderType=cv2.BORDER_REFLECT)
            for channel in maps.astype(np.float32, copy=False)
        ]
    )


def dense_crf(
    rgb: np.ndarray,
    probs: np.ndarray,
    max_pixels: int = CRF_MAX_PIXELS,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl & Koltun) with the release's parameters.

    ``rgb`` HxWx3 uint8, ``probs`` (K, H, W) float probabilities -> (K, H, W) marginals.
    Needs ``pydensecrf2``; runs in a process of its own (``CrfProcess``: pydensecrf holds the
    GIL throughout, which would freeze the node's other threads). A frame of more than
    ``max_pixels`` pixels is solved at that many (aspect kept, image and probabilities
    resized with area averaging, the kernels' pixel widths ``sxy`` scaled alike), and the
    marginals are upsampled bilinearly: the CRF's cost grows with the pixels, 23 s for a
    1920x1080 frame. Label agreement with the full-size CRF: benchmarks/crf_bounded_size.py.
    Raises Stopped (``stop`` set while waiting), CrfError.
    """
    labels, height, width = probs.shape
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    small_rgb, small_probs = rgb, probs.astype(np.float32, copy=False)
    if scale < 1.0:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))  # OpenCV: (w, h)
        small_rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small_probs = np.stack(
            [cv2.resize(channel, size, interpolation=cv2.INTER_AREA) for channel in small_probs]
        )
        small_probs /= np.maximum(small_probs.sum(axis=0, keepdims=True), 1e-12)
    gaussian = {**CRF_GAUSSIAN, "sxy": CRF_GAUSSIAN["sxy"] * scale}
    bilateral = {**CRF_BILATERAL, "sxy": CRF_BILATERAL["sxy"] * scale}
    marginals = shared_crf_process().marginals(
        small_rgb, small_probs, CRF_ITERATIONS, gaussian, bilateral, stop
    )
    if scale < 1.0:
        marginals = np.stack(
            [
                cv2.resize(channel, (width, height), interpolation=cv2.INTER_LINEAR)
                for channel in marginals
            ]
        )
    return marginals


def prompt_tokens(
    tokenizer: object, names: Sequence[str], first_token: int | None = None
) -> tuple[list[int], list[slice]]:
    """Token ids of ``"a picture of <name1> <name2> ..."`` and each name's span of word pieces.

    Built piece by piece, which is what the tokenizer gives for the whole sentence (BERT's
    pre-tokenizer splits at spaces first), so the spans need no decoding. ``first_token``
    replaces [CLS] (BLIP's [ENC]). Raises VocabularyError for a name without tokens.
    """

    def pieces(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = [tokenizer.cls_token_id if first_token is None else first_token, *pieces(PROMPT)]
    spans = []
    for name in names:
        word_pieces = pieces(name)
        if not word_pieces:
            raise VocabularyError(f"class name {name!r} gives no tokens for the VLM")
        spans.append(slice(len(ids), len(ids) + len(word_pieces)))
        ids += word_pieces
    return [*ids, tokenizer.sep_token_id], spans


def square_pil(rgb: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, size, size) in [0, 1] by PIL's bicubic resize: what torchvision's
    ``Resize((size, size), InterpolationMode.BICUBIC)`` then ``ToTensor`` does to a PIL image
    (the release's BLIP input, ``Dataset.py``)."""
    from PIL import Image

    squared = Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(squared).copy()).permute(2, 0, 1)[None].float() / 255.0


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (1, 3, size, size), bicubic with antialiasing."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    squared = F.interpolate(
        image, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    return squared.clamp_(0.0, 1.0)
