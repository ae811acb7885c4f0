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
5. per class ``threshold`` on the min-max normalised map; the maps resized and min-max
   normalised (``Scale_0_1``); background where no class fires; Gaussian blur and min-max;
   dense CRF (or PAMR), argmax (ties to the first channel, background first).

Deliberate departures from the released code, each for a reason:
- classes present come from CLIP here (the release reads GPT-4o answers from files; the tools
  read such files with ``--presence-lists``, ``presence_lists.py``);
- a class's text is its first name (``ClassEntry.name``); all word pieces of all its words are
  averaged (the release joins multi-word names, e.g. ``pottedplant``, and averages pieces);
- the maps of the rounds are summed once each by default (the release starts its sum with
  round 0 and then adds every round, so round 0 counts twice: ``round0: release``);
- background is always a channel by default (the release drops it for context data sets with
  three or more classes present: ``background: fewer_than_3``);
- the BLIP input is squashed with torch's antialiased bicubic on the device by default (the
  release: PIL's bicubic, ``resize: pil``);
- a class whose map is flat (no gradient reached it) fires nowhere (the release divides 0/0).
The gradient is taken with ``torch.autograd.grad`` of the match logit with respect to the one
attention map (the same values as ``loss.backward()`` with a hook, without parameter gradients).

The tensor steps are ``steps.py``'s (each tested against its formula); the settings
``settings.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder, check_class_prompts, template_set
from ovss_ros.core.frame_budget import check_vlm_image_size
from ovss_ros.core.methods.dense.pamr import pamr
from ovss_ros.core.methods.pnp_ovss.settings import PnpSettings
from ovss_ros.core.methods.pnp_ovss.steps import (
    best_classes,
    class_maps,
    dense_crf,
    drop_patches,
    gaussian_blur,
    gradcam,
    minmax,
    most_salient,
    prompt_tokens,
    square,
    square_pil,
    threshold_maps,
    with_background,
)
from ovss_ros.core.methods.pnp_ovss.vlm_loading import LoadedVlm
from ovss_ros.core.segmentation import Segmentation, check_rgb, label_dtype
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes

logger = logging.getLogger(__name__)

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained logit scale, fixed so random weights behave the same


class PnpOvss:
    """PnP-OVSS behind the Segmenter surface. Not thread-safe: one caller.

    Built from models the caller loaded (``load_clip`` and ``load_vlm``), so an engine owns
    both and can share its CLIP (and its TextEncoder cache) with the other methods.
    """

    def __init__(
        self,
        clip: LoadedClip,
        vlm: LoadedVlm,
        settings: PnpSettings | None = None,
        templates: str = "imagenet",
        text: TextEncoder | None = None,
    ) -> None:
        self.clip = clip
        self.vlm = vlm
        settings = settings or PnpSettings()
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

    def check(self, settings: PnpSettings) -> None:
        """Settings ranges, then the loaded model's limits; ValueError with the reason."""
        settings.validate()
        vlm = self.vlm
        if settings.layer > vlm.num_layers:
            raise ValueError(
                f"pnp.layer {settings.layer} > the VLM's {vlm.num_layers} text layers"
            )
        if settings.head > vlm.num_heads:
            raise ValueError(f"pnp.head {settings.head} > the VLM's {vlm.num_heads} heads")
        heads = int(vlm.model.config.vision_config.num_attention_heads)
        check_vlm_image_size(settings.image_size, vlm.patch_size, heads, "pnp.image_size")
        if settings.image_size % vlm.patch_size:
            raise ValueError(
                f"pnp.image_size {settings.image_size} must be a multiple of the VLM's patch "
                f"{vlm.patch_size}"
            )

    def reconfigure(self, **changes: object) -> None:
        """Change settings (PnpSettings fields, ``templates``) between frames.

        Validates everything first; raises ValueError and changes nothing when a value is bad.
        """
        known = {f.name for f in fields(PnpSettings)} | {"templates"}
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

        ``present``: vocabulary indices to put in the prompt, in the prompt's order (each once),
        overriding ``settings.presence`` (the tuner fixes them per image, a class-list file per
        image as the release reads them: ``presence_lists``). Raises VocabularyError without
        classes, ValueError for a bad image.
        """
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        size = check_rgb(rgb)
        pixels, clip_pixels = self.preprocess(rgb)
        if present is None:
            present = self.present_classes(clip_pixels)
        present = list(dict.fromkeys(int(i) for i in present))
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

        Both squash the whole frame to a square, as the release does: torch bicubic with
        antialiasing, or for BLIP with ``resize: pil`` PIL's bicubic (what the release's
        torchvision ``Resize((S, S), BICUBIC)`` does to a PIL image).
        """
        rgb = np.require(rgb, requirements=["C", "W"])  # a read-only frame is copied
        image = torch.from_numpy(rgb).to(self.device, non_blocking=True)
        image = image.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        size = self.settings.image_size
        if self.settings.resize == "pil":
            pixels = square_pil(rgb, size).to(self.device)
        else:
            pixels = square(image, size)
        clip_image = square(image.to(self.clip.device), _clip_size(self.clip))
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
        """(C, g, g) class maps of the present classes: GradCAM summed over dropout rounds
        (round 0 twice with ``round0: release``, as the released code sums them)."""
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
            if total is None:  # the release starts its sum with round 0 and adds every round
                total = 2 * cams if settings.round0 == "release" else cams
            else:
                total = total + cams
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

        Background channel: always, or with ``background: fewer_than_3`` only when fewer than 3
        classes are present (otherwise every pixel gets its best class, as the release does on
        context data sets).

        The maps are upsampled on the model's device; blur (OpenCV) and CRF (pydensecrf) run
        on the host, PAMR on the device.

        Confidence is the final probability of the best class (CRF marginals, or the softmax
        over background and class maps after blur, refined by PAMR): PnP-OVSS's own scale.
        """
        settings = self.settings
        background = settings.background == "always" or len(present) < 3
        maps = threshold_maps(maps.float(), settings.threshold)
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=True)[0]
        if settings.blur <= 0:  # the release's Scale_0_1; with blur, the min-max after the
            # (linear) blur gives the same values
            maps = minmax(maps)
        scores = (with_background(maps) if background else maps).cpu()
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
        dtype = label_dtype(len(self.classes))
        # without background, the release's argmax over the classes alone: every pixel gets one
        best, confidence, unlabeled = best_classes(probs, background)
        labels = torch.tensor(list(present))[best].masked_fill(unlabeled, int(np.iinfo(dtype).max))
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
