"""PnP-OVSS: open-vocabulary segmentation from a vision-language model's cross-attention.

Luo, Khandelwal, Sigal, Li: "Emergent Open-Vocabulary Semantic Segmentation from Off-the-shelf
Vision-Language Models", CVPR 2024 (arXiv 2311.17095); released code ``letitiabanana/PnP-OVSS``
(``PnP_OVSS_0514_updated_segmentation.py``, ``Files to replace for BLIP/
blip_image_text_matching.py``). Training-free, with BLIP image-text matching (ITM):

1. classes present in the frame: CLIP's image-level zero-shot probabilities (the engine's own
   CLIP and text embeddings) at or above ``presence_threshold``, or every class;
2. text ``"a picture of <class1> <class2> ..."``; the ITM forward; loss = the match logit;
3. GradCAM of one cross-attention layer and head of BLIP's text encoder: attention x
   relu(d loss / d attention), one row per text token; a class's word pieces are averaged;
4. salience dropout: in each of ``dropout_rounds`` rounds the ``dropout_patches`` most salient
   patches not yet dropped are zeroed in the input image, the GradCAM is recomputed, and the
   maps of all rounds (zeroed at the dropped patches) are summed;
5. per class min-max normalisation and ``threshold``; background where no class fires; Gaussian
   blur; dense CRF (or PAMR), argmax.

Deliberate departures from the released code, each for a reason:
- classes present come from CLIP here (the release reads GPT-4o answers from files);
- a class's text is its first name (``ClassEntry.name``); all word pieces of all its words are
  averaged (the release joins multi-word names, e.g. ``pottedplant``, and averages pieces);
- the maps of the rounds are summed once each (the release starts its sum with round 0 and then
  adds every round, so round 0 counts twice);
- background is always a channel (the release drops it for context data sets with three or
  more classes present);
- a class whose map is flat (no gradient reached it) fires nowhere (the release divides 0/0).
The gradient is taken with ``torch.autograd.grad`` of the match logit with respect to the one
attention map (the same values as ``loss.backward()`` with a hook, without parameter gradients).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import fields, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder, check_class_prompts, template_set
from ovss_ros.core.frame_budget import check_vlm_image_size
from ovss_ros.core.methods.dense.pamr import pamr
from ovss_ros.core.methods.pnp_ovss.crf_process import shared_crf_process
from ovss_ros.core.methods.pnp_ovss.settings import PnpOvssSettings
from ovss_ros.core.methods.pnp_ovss.vlm_loading import LoadedVlm
from ovss_ros.core.segmentation import Segmentation, check_rgb, label_dtype
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes

logger = logging.getLogger(__name__)

PROMPT = "a picture of"  # the released prompt ("A picture of "; BLIP's tokenizer lower-cases)
CLIP_LOGIT_SCALE = 100.0  # CLIP's trained logit scale, fixed so random weights behave the same
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter
# Dense CRF of the release (densecrf() in PnP_OVSS_0514_updated_segmentation.py).
CRF_ITERATIONS = 10
CRF_GAUSSIAN = {"sxy": 3, "compat": 7}
CRF_BILATERAL = {"sxy": 50, "srgb": 5, "compat": 10}
# Pixels the CRF is solved at, at most (a 640x480 frame is solved as it is): its cost grows with
# the pixels and a 1920x1080 frame took 23 s (issue 18); bigger frames are solved at this size
# and the marginals upsampled (``dense_crf``).
CRF_MAX_PIXELS = 640 * 480


# ---- the method's tensor steps (each checked against its formula in test_pnp_ovss.py) ----


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
    """Indices of the ``count`` highest of ``salience`` (P,) among patches not yet ``dropped``."""
    available = int((~dropped).sum())
    ranked = salience.masked_fill(dropped, float("-inf"))
    return ranked.topk(min(count, available)).indices


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


# ---- the pipeline ----


class PnpOvss:
    """PnP-OVSS behind the Segmenter surface. Not thread-safe: one caller.

    Built from models the caller loaded (``load_clip`` and ``load_vlm``), so an engine owns
    both and can share its CLIP (and its TextEncoder cache) with the other methods.
    """

    def __init__(
        self,
        clip: LoadedClip,
        vlm: LoadedVlm,
        settings: PnpOvssSettings | None = None,
        templates: str = "imagenet",
        text: TextEncoder | None = None,
    ) -> None:
        self.clip = clip
        self.vlm = vlm
        settings = settings or PnpOvssSettings()
        self.check(settings)
        self.settings = settings
        template_set(templates)
        self.text = text or TextEncoder(clip.model, clip.tokenizer, templates)
        self.text.set_templates(templates)  # a shared encoder (the engine's) follows the setting
        self.templates = templates
        self.classes: list[ClassEntry] = []
        self._class_text: torch.Tensor | None = None  # (classes, D) CLIP, mean over synonyms
        self._clip_mean, self._clip_std = _normaliser(clip.mean, clip.std, clip.device)
        self._vlm_mean, self._vlm_std = _normaliser(vlm.mean, vlm.std, vlm.device)
        self.stop: threading.Event | None = None  # set: saliency raises Stopped between rounds

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def class_text(self) -> torch.Tensor:
        """(classes, D) CLIP text embeddings of the vocabulary (mean over synonyms)."""
        if self._class_text is None:
            raise VocabularyError("no classes set: call set_classes first")
        return self._class_text

    def check(self, settings: PnpOvssSettings) -> None:
        """Settings ranges, then the loaded model's limits; ValueError with the reason."""
        settings.validate()
        vlm = self.vlm
        if settings.layer > vlm.num_layers:
            raise ValueError(f"layer {settings.layer} > the VLM's {vlm.num_layers} text layers")
        if settings.head > vlm.num_heads:
            raise ValueError(f"head {settings.head} > the VLM's {vlm.num_heads} heads")
        heads = int(vlm.model.config.vision_config.num_attention_heads)
        check_vlm_image_size(settings.image_size, vlm.patch_size, heads)
        if settings.image_size % vlm.patch_size:
            raise ValueError(
                f"image_size {settings.image_size} must be a multiple of the VLM's patch "
                f"{vlm.patch_size}"
            )

    def reconfigure(self, **changes: object) -> None:
        """Change settings (PnpOvssSettings fields, ``templates``) between frames.

        Validates everything first; raises ValueError and changes nothing when a value is bad.
        """
        known = {f.name for f in fields(PnpOvssSettings)} | {"templates"}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}: use {sorted(known)}")
        templates = str(changes.pop("templates", self.templates))
        settings = replace(self.settings, **changes)
        self.check(settings)
        template_set(templates)  # raises ValueError for bad templates
        if templates != self.templates:
            self.text.set_templates(templates)
            self.templates = templates
            if self.classes:
                self._class_text = self._encode_classes(self.classes)
        self.settings = settings

    def set_classes(self, entries: Sequence[ClassEntry | str]) -> None:
        """Replace the vocabulary; raises VocabularyError, leaving the old one, when invalid.

        Refused too when the prompt with every class does not fit the VLM's text length.
        """
        classes = parse_classes(entries)
        self.check_classes(classes)
        class_text = self._encode_classes(classes)
        self.classes, self._class_text = classes, class_text

    def check_classes(self, classes: Sequence[ClassEntry]) -> None:
        """Refuse a vocabulary whose prompt with every class (``prompt_tokens``: [CLS], "a
        picture of", each name's word pieces, [SEP]) has more tokens than the VLM has text
        positions (``max_text_tokens``): with presence ``all``, or every class present, it
        could not be segmented; and any CLIP prompt of a class (presence scores) longer than
        CLIP's text context. Raises VocabularyError (a class without tokens, too long)."""
        check_class_prompts(self.text, classes, self.text.templates)
        limit = self.vlm.max_text_tokens
        # Every class has at least one token: a vocabulary that cannot fit needs no tokenizer.
        least = len(prompt_tokens(self.vlm.tokenizer, [])[0]) + len(classes)
        count = least if least > limit else None
        if count is None:
            count = len(prompt_tokens(self.vlm.tokenizer, [c.name for c in classes])[0])
        if count > limit:
            exact = "has" if least <= limit else "has at least"
            raise VocabularyError(
                f"the prompt with all {len(classes)} classes {exact} {count} tokens, more than "
                f"the VLM's {limit}: use fewer or shorter class names"
            )

    def _encode_classes(self, classes: list[ClassEntry]) -> torch.Tensor:
        """(classes, D) CLIP text: the normalised mean of each class's synonym embeddings."""
        embeddings = [self.text.embeddings(c.synonyms).mean(dim=0) for c in classes]
        per_class = [F.normalize(e, dim=-1) for e in embeddings]
        return torch.stack(per_class).to(self.clip.device)

    def segment(self, rgb: np.ndarray, present: Sequence[int] | None = None) -> Segmentation:
        """Segment one HxWx3 uint8 RGB image.

        ``present``: vocabulary indices to put in the prompt, overriding ``settings.presence``
        (the tuner fixes them per image). Raises VocabularyError without classes, ValueError
        for a bad image.
        """
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        size = check_rgb(rgb)
        pixels, clip_pixels = self.preprocess(rgb)
        if present is None:
            present = self.present_classes(clip_pixels)
        present = sorted(set(int(i) for i in present))
        if not present or not all(0 <= i < len(self.classes) for i in present):
            raise ValueError(f"present must be indices into the {len(self.classes)} classes")
        maps = self.saliency(pixels, present)
        return self.postprocess(maps, present, rgb, size)

    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment several images, one after the other (each has its own prompt and gradient)."""
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        for rgb in images:
            check_rgb(rgb)
        return [self.segment(rgb) for rgb in images]

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Upload once; (1, 3, S, S) BLIP input and (1, 3, s, s) CLIP input, normalised.

        Both squash the whole frame to a square, as the release does (bicubic, antialiased).
        """
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        image = image.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        size = self.settings.image_size
        pixels = _square(image, size)
        clip_image = _square(image.to(self.clip.device), _clip_size(self.clip))
        clip_pixels = ((clip_image - self._clip_mean) / self._clip_std).to(self.clip.dtype)
        return (pixels - self._vlm_mean) / self._vlm_std, clip_pixels

    @torch.inference_mode()
    def present_classes(self, clip_pixels: torch.Tensor) -> list[int]:
        """Vocabulary indices whose CLIP probability is >= presence_threshold (at least the best).

        Probability: softmax over the vocabulary of 100 x cosine(image, class text).
        """
        if self.settings.presence == "all":
            return list(range(len(self.classes)))
        probs = self.presence_probabilities(clip_pixels)
        present = (probs >= self.settings.presence_threshold).nonzero().flatten().tolist()
        return present or [int(probs.argmax())]

    @torch.inference_mode()
    def presence_probabilities(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """(classes,) CLIP zero-shot probabilities of a (1, 3, s, s) image."""
        features = F.normalize(self.clip.model.encode_image(clip_pixels).float(), dim=-1)
        return torch.softmax(CLIP_LOGIT_SCALE * features[0] @ self.class_text.T, dim=-1)

    def saliency(self, pixels: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        """(C, g, g) class maps of the present classes: GradCAM summed over dropout rounds."""
        settings, patch = self.settings, self.vlm.patch_size
        ids, spans = prompt_tokens(
            self.vlm.tokenizer, [self.classes[i].name for i in present], self.vlm.enc_token_id
        )
        input_ids = torch.tensor([ids], device=self.device)
        grid = settings.image_size // patch
        class_rows = torch.cat([torch.arange(s.start, s.stop) for s in spans]).to(self.device)
        dropped = torch.zeros(grid * grid, dtype=torch.bool, device=self.device)
        total = None
        for round_index in range(settings.dropout_rounds):
            check_stop(self.stop, f"PnP-OVSS dropout round {round_index + 1}")
            image = drop_patches(pixels, dropped.view(grid, grid), patch)
            cams = self.token_gradcam(image, input_ids).masked_fill(dropped, 0.0)  # (T, P)
            total = cams if total is None else total + cams
            if round_index + 1 < settings.dropout_rounds:
                salience = cams[class_rows].sum(dim=0)
                dropped[most_salient(salience, dropped, settings.dropout_patches)] = True
        return class_maps(total, spans).view(len(spans), grid, grid)

    def token_gradcam(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(T, P) GradCAM of every text token at the configured layer and head.

        One ITM forward (``BlipForImageTextRetrieval.forward`` with ``use_itm_head``, written
        out); loss = the match logit (``itm_score[:, 1]``); its gradient with respect to the
        cross-attention map, captured by a forward hook that is removed again. The vision tower
        runs without a graph (the gradient flows from the match logit to the map through the
        text encoder only): its memory is one layer's attention map (``frame_budget``), not all
        of them kept for a backward pass. The graph is freed before returning; under autocast
        when the VLM asks for half precision.
        """
        model, settings = self.vlm.model, self.settings
        attention_module = model.text_encoder.encoder.layer[settings.layer - 1].crossattention
        captured: list[torch.Tensor] = []
        handle = attention_module.self.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[1])
        )
        autocast = (
            torch.autocast(self.device.type, dtype=self.vlm.autocast)
            if self.vlm.autocast is not None
            else contextlib.nullcontext()
        )
        try:
            # a caller under inference_mode (as the engine's segment_many) still gets a graph;
            # clones turn inference tensors into ones autograd may save
            with torch.inference_mode(False), autocast:
                with torch.no_grad():
                    image_embeds = model.vision_model(
                        pixel_values=pixels.clone(), interpolate_pos_encoding=True
                    ).last_hidden_state
                with torch.enable_grad():
                    # a leaf that requires grad makes the cross-attention differentiable
                    image_embeds = image_embeds.clone().requires_grad_(True)
                    input_ids = input_ids.clone()
                    text = model.text_encoder(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        encoder_hidden_states=image_embeds,
                        encoder_attention_mask=torch.ones(
                            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
                        ),
                    ).last_hidden_state
                    match_logit = model.itm_head(text[:, 0, :])[:, 1].sum()
                    (gradient,) = torch.autograd.grad(match_logit, captured[0])
        finally:
            handle.remove()
        head = settings.head - 1
        attention = captured[0][0, head].detach().float()
        return gradcam(attention, gradient[0, head].float())

    def postprocess(
        self,
        maps: torch.Tensor,
        present: Sequence[int],
        rgb: np.ndarray,
        size: tuple[int, int],
    ) -> Segmentation:
        """Threshold, background, blur, CRF/PAMR and argmax at the input size.

        The maps are upsampled on the model's device; blur (OpenCV) and CRF (pydensecrf) run
        on the host, PAMR on the device.

        Confidence is the final probability of the best class (CRF marginals, or the softmax
        over background and class maps after blur, refined by PAMR): PnP-OVSS's own scale.
        """
        settings = self.settings
        maps = threshold_maps(maps.float(), settings.threshold)
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=True)[0]
        scores = with_background(maps).cpu()
        if settings.blur > 0:
            blurred = gaussian_blur(scores.numpy(), settings.blur * max(size))
            scores = minmax(torch.from_numpy(blurred))
        probs = torch.softmax(scores, dim=0)
        refinement = settings.refinement()
        if refinement == "crf":
            probs = torch.from_numpy(dense_crf(rgb, probs.numpy(), stop=self.stop))
        elif refinement == "pamr":
            guide = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)
            guide = guide.permute(2, 0, 1)[None].float()
            probs = pamr(guide, probs[None].to(self.device))[0].cpu()
        confidence, best = probs[1:].max(dim=0)
        background = probs[0] > confidence
        dtype = label_dtype(len(self.classes))
        labels = torch.tensor(list(present))[best].masked_fill(
            background, int(np.iinfo(dtype).max)
        )
        return Segmentation(
            labels=labels.numpy().astype(dtype),
            confidence=confidence.float().numpy(),
            class_names=[c.name for c in self.classes],
        )


def _normaliser(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1),
        torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1),
    )


def _clip_size(clip: LoadedClip) -> int:
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (1, 3, size, size), bicubic with antialiasing."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    squared = F.interpolate(
        image, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    return squared.clamp_(0.0, 1.0)
