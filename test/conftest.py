"""Shared test set-up: no hub access, tiny random open_clip configs, the real VOC sample images."""

import os
from pathlib import Path

# One thread per process in the tests, set before torch is imported: the models are tiny, and on
# a small machine shared with other work, torch's thread team waiting on its slowest member made
# a file of engine tests 3.4x slower (test_engine_postprocess.py beside a load of 5: 58 s with 2
# threads, 17 s with 1). Node processes inherit it (ros_harness.child_environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402

# Ctrl-C as at a terminal for every process the tests start. A shell starts a background job
# (`bash scripts/test.sh &`, a CI runner's step) with SIGINT ignored; an ignored signal stays
# ignored across exec, and Python then installs no KeyboardInterrupt handler: a tool child that
# relies on Python's (ovss-eval, ovss-tune, ovss-bench, ovss-train-deop) would never see the
# tests' Ctrl-C. A handled signal is reset to its default on exec, so the children start as
# from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import cv2
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may try to download

# The files that take longest on a loaded 2-core machine (per-file totals of `--durations=0`, CI
# machine under a CPU hog, 2026-12-06), slowest first. scripts/test.sh gives each worker a whole
# file at a time in collection order, so these go first: a long file started last would leave the
# other workers idle at the end (longest-first scheduling). Only the order changes; a file missing
# here runs after them in its usual place.
SLOW_FILES = (
    "test_node_shutdown.py",
    "test_cli_demo.py",
    "test_tiny_model_recipes.py",
    "test_node_vocabulary_stress.py",
    "test_node_startup_parameters.py",
    "test_node_accounting.py",
    "test_node_operator_warnings.py",
    "test_engine_postprocess_wide.py",
    "test_node_startup.py",
    "test_cli_bag_accounting.py",
    "test_node_departure.py",
    "test_node_dslo_sd2.py",
    "test_engine_sd2.py",
    "test_offline_loading.py",
    "test_soak.py",
    "test_node_malformed_requests.py",
    "test_colcon_build.py",
    "test_node_lifecycle.py",
    "test_node_lifecycle_requests.py",
    "test_node_topics.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable


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
