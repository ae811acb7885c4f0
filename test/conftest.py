"""Shared test set-up: no hub access, tiny random open_clip configs, the real VOC sample images."""

import os
from pathlib import Path

# One thread per process in the tests, set before torch is imported: the models are tiny, and on
# a small machine shared with other work, torch's thread team waiting on its slowest member made
# a file of engine tests 3.4x slower (test_engine_postprocess.py beside a load of 5: 58 s with 2
# threads, 17 s with 1). Node processes inherit it (ros_harness.child_environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may try to download

DATA = Path(__file__).parent / "data"
TINY_VIT = DATA / "tiny-vit.json"  # 64 px, patch 16: a 4x4 grid at its native size
TINY_VIT_B32 = DATA / "tiny-vit-b32.json"  # 224 px, patch 32: a 7x7 grid at its native size
VOC_DIR = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")


def voc_image_paths() -> list[Path]:
    paths = sorted((VOC_DIR / "JPEGImages").glob("*.jpg"))
    if not paths:
        pytest.fail(
            f"VOC samples missing under {VOC_DIR}: run scripts/setup.sh (labelme-examples)"
        )
    return paths


@pytest.fixture(scope="session")
def voc_rgb() -> list[np.ndarray]:
    """The real VOC 2012 sample photos as RGB uint8 arrays."""
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in voc_image_paths()]


# Node test modules define a module-scoped ``node`` fixture, (client, process) of a running node;
# these two serve all of them (opt in with pytestmark = usefixtures("node_survives")).
@pytest.fixture(scope="module")
def client(node):
    return node[0]


@pytest.fixture()
def node_survives(node):
    """Every test leaves the node running, with messages of earlier tests forgotten."""
    client, process = node
    client.clear()
    yield
    assert process.returncode is None, f"node died:\n{process.output()}"
