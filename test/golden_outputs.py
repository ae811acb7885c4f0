"""Golden outputs: labels and confidence of the three VOC samples for every method and refinement.

Written once from the code before the restructuring of issue 19 and kept under
``test/data/golden/``; ``test_golden_outputs.py`` segments the same images with the same random
weights (fixed seeds, tiny models) and compares. Regenerate only on purpose (a change of results
that is meant), with ``python test/golden_outputs.py --write`` from the repository root, and say
why in the commit.

Each case is a set of flat settings (the names of the node parameters of the time) over a tiny
random CLIP; ``segmenter(case, models)`` builds its engine, the one place that knows the engine's
API. Stored per image: the labels (whole map) and, of the confidence, its sum and its values at
SAMPLES fixed pixels (the whole map would make the files large for nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import TINY_VIT, voc_image_paths  # noqa: E402
from tiny_blip import IMAGE_SIZE, save_tiny_blip  # noqa: E402
from tiny_diffusion import save_tiny_pipeline  # noqa: E402

GOLDEN_DIR = HERE / "data" / "golden"
SAMPLES = 2048
CLASSES = ["person", "dog; puppy", "cat", "chair", "sofa | a soft seat for several people", "tv"]
BASE = {
    "model": str(TINY_VIT),
    "pretrained": "none",
    "device": "cpu",
    "short_side": 64,
    "templates": "single",
}
PNP = {"pnp_image_size": IMAGE_SIZE, "pnp_layer": 2, "pnp_head": 3, "pnp_dropout_patches": 2}
PROPOSALS = {"proposals": 12, "mask_cells": 2}
CASES: dict[str, dict] = {
    **{mode: {"method": mode} for mode in (
        "naclip", "sclip", "clearclip", "maskclip", "maskclip_reduced", "vanilla",
        "sclip_freecp", "maskclip_freecp", "vanilla_freecp",
    )},  # fmt: skip
    "naclip_windows": {"crop": 32, "stride": 16, "short_side": 96, "max_long_side": 512},
    "naclip_background": {"background_words": ["sky", "wall"], "score_threshold": 0.3},
    "sclip_area": {"method": "sclip", "area_threshold": 0.1},
    "naclip_exact_positions": {"pos_interpolation": "exact"},
    "naclip_pamr": {"pamr": True},
    "naclip_jbu": {"upsample": "jbu"},
    "dslo_velocity": {"refinement": "dslo"},
    "dslo_ot": {"refinement": "dslo", "dslo_mode": "ot"},
    "dslo_keykey_jbu": {"refinement": "dslo", "affinity": "keykey", "upsample": "jbu"},
    "dslo_sd2": {"refinement": "dslo", "affinity": "sd2", "sd_size": 64},
    "freecp": {"refinement": "freecp"},
    "sclip_freecp_background": {
        "method": "sclip_freecp", "refinement": "freecp", "background_words": ["sky"],
    },  # fmt: skip
    "pnp_ovss_crf": {"method": "pnp_ovss", "pnp_refine": "crf", **PNP},
    "pnp_ovss_pamr": {"method": "pnp_ovss", "pnp_refine": "pamr", **PNP},
    "pnp_ovss_all": {"method": "pnp_ovss", "pnp_presence": "all", "pnp_refine": "none", **PNP},
    # issue 21: the training-free mode (stored as method deop without a checkpoint) is
    # superpixel_clip, with the same outputs (its residual 0.2 is the one they were stored with)
    "superpixel_clip_superpixels": {"method": "superpixel_clip", **PROPOSALS},
    "superpixel_clip_clusters": {
        "method": "superpixel_clip", "proposal_source": "clusters", **PROPOSALS,
    },  # fmt: skip
    # deop's severed-block residual default became the released 1.0 (issue 21): rewritten then
    "deop_checkpoint": {"method": "deop", "deop_checkpoint": "<deop>", "proposals": 12},
    "twostream": {"method": "twostream", "proposal_source": "clusters", **PROPOSALS},
}


def images() -> list[np.ndarray]:
    """The three VOC sample photos, RGB uint8, at their stored size."""
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in voc_image_paths()]


def write_models(folder: Path) -> dict[str, str]:
    """The second models the cases need, written under ``folder`` with fixed seeds."""
    from ovss_ros.core.clip.model_loading import load_clip
    from ovss_ros.core.methods.deop.checkpoint import save_checkpoint
    from ovss_ros.core.methods.deop.heads import DeopModules

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu", "fp32")
    torch.manual_seed(3)
    modules = DeopModules.create(
        int(clip.model.visual.output_dim),
        decoder={"heads": 4, "feedforward": 32},
        void=True,
        prompt={"width": 64, "length": 4},
        proposal_head={"width": 64, "queries": 12, "dim": 16, "heads": 4, "cells": 4},
    ).eval()
    settings = {"short_side": 64, "templates": "single", "proposals": 12}
    deop = save_checkpoint(folder / "deop.pt", modules, clip, settings)
    return {
        "<deop>": str(deop),
        "vlm_pretrained": str(save_tiny_blip(folder / "blip")),
        "sd_model": str(save_tiny_pipeline(folder / "sd")),
    }


def segmenter(case: dict, models: dict[str, str]):
    """The engine of ``case`` (random weights from seed 0) with CLASSES set."""
    from ovss_ros.core import EngineConfig, Segmenter
    from ovss_ros.core.config import RENAMED

    values = BASE | {"vlm_pretrained": models["vlm_pretrained"], "sd_model": models["sd_model"]}
    for name, value in case.items():
        values[name] = models.get(value, value) if isinstance(value, str) else value
    # the cases keep the flat names they were stored with (before issue 19's namespaces)
    values = {RENAMED.get(name, name): value for name, value in values.items()}
    torch.manual_seed(0)
    engine = Segmenter(EngineConfig.from_flat(values))
    engine.set_classes(CLASSES)
    return engine


def sample_pixels(shape: tuple[int, int]) -> np.ndarray:
    """SAMPLES fixed flat pixel indices of a map of ``shape``."""
    return np.random.default_rng(0).choice(shape[0] * shape[1], SAMPLES, replace=False)


def outputs(case: dict, models: dict[str, str]) -> dict[str, np.ndarray]:
    """What is stored of one case: per image i, ``labels_i``, ``confidence_sum_i`` (float64)
    and ``confidence_i`` (float32 at ``sample_pixels``)."""
    engine = segmenter(case, models)
    stored = {}
    for index, rgb in enumerate(images()):
        torch.manual_seed(0)
        result = engine.segment(rgb)
        stored[f"labels_{index}"] = result.labels
        stored[f"confidence_sum_{index}"] = np.float64(result.confidence.astype(np.float64).sum())
        flat = result.confidence.reshape(-1)
        stored[f"confidence_{index}"] = flat[sample_pixels(result.labels.shape)]
    stored["class_names"] = np.array(result.class_names)
    return stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write test/data/golden/*.npz")
    parser.add_argument("cases", nargs="*", help="default: every case")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        models = write_models(Path(folder))
        for name in args.cases or CASES:
            stored = outputs(CASES[name], models)
            labels = np.concatenate([stored[f"labels_{i}"].ravel() for i in range(3)])
            print(f"{name}: {len(np.unique(labels))} distinct labels", flush=True)
            if args.write:
                GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(GOLDEN_DIR / f"{name}.npz", **stored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
