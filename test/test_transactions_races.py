"""Races between the threads that carry a parameter change (``ParameterTransactions``).

A failed change's parameters are put back, but never over a newer acceptance of the same name;
a change encoder of an earlier configure that ends late leaves the running one's change alone.

``ParameterTransactions`` on a real rclpy node with the node's parameters, and a real Segmenter
(tiny CLIP) whose first ``prepare_update`` fails as out of memory would. The steps run in the
order the node's threads may run them (executor: accept, revert; change encoder: prepare;
worker: commit): a retry of the failed value accepted after the failed change was taken, then
prepared (and put in force) before the executor runs the revert the failure asked for. The
parameter must say what is in force: the retry's value.
"""

from __future__ import annotations

import threading

import pytest
import rclpy
from conftest import TINY_VIT
from rclpy.node import Node
from rclpy.parameter import Parameter
from ros_harness import isolate_dds

from ovss_ros.core import EngineConfig, Segmenter, Stopped
from ovss_ros.ros import parameters
from ovss_ros.ros.request_guard import CallbackFaults
from ovss_ros.ros.transactions import ParameterTransactions

OLD = ["cat", "dog"]
NEW = ["bird", "sofa"]


@pytest.fixture()
def transactions():
    isolate_dds()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = Node("ovss", context=context)
    try:
        values = parameters.declare_parameters(node)
        values["classes"] = OLD
        node.set_parameters([Parameter("classes", value=OLD)])
        transactions = ParameterTransactions(
            node, values, CallbackFaults(print), check=lambda *_: None, wake=lambda: None
        )
        transactions.install()
        transactions.loaded(dict(values), transactions.settings)
        yield node, transactions
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.fixture()
def segmenter(monkeypatch):
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=64)
    segmenter = Segmenter(config, stop=threading.Event())
    segmenter.set_classes(OLD)
    prepare_update = segmenter.prepare_update
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return prepare_update(*args, **kwargs)

    monkeypatch.setattr(segmenter, "prepare_update", out_of_memory_once)
    return segmenter


def set_classes(node, classes) -> None:
    result = node.set_parameters([Parameter("classes", value=classes)])[0]
    assert result.successful, result.reason


@pytest.mark.parametrize("revert_runs", ["while the retry is prepared", "after the retry"])
def test_a_retry_of_the_failed_value_is_not_put_back(transactions, segmenter, revert_runs):
    node, tx = transactions
    stop = threading.Event()
    set_classes(node, NEW)
    failed = tx.prepare(segmenter, stop)
    assert failed.failure and "out of memory" in failed.failure
    set_classes(node, NEW)  # the retry, accepted before the worker settled the failure
    assert tx.commit(segmenter, failed) == failed.failure
    assert [e.name for e in segmenter.classes] == OLD
    retry = tx.prepare(segmenter, stop)  # taken: no longer pending
    assert retry.failure is None
    if revert_runs == "while the retry is prepared":
        tx.revert()
    assert tx.commit(segmenter, retry) is None
    if revert_runs == "after the retry":
        tx.revert()
    assert [e.name for e in segmenter.classes] == NEW
    assert tx.applied["classes"] == NEW
    assert node.get_parameter("classes").value == NEW


def test_a_failed_value_not_accepted_again_is_put_back(transactions, segmenter):
    node, tx = transactions
    set_classes(node, NEW)
    failed = tx.prepare(segmenter, threading.Event())
    assert tx.commit(segmenter, failed) == failed.failure
    tx.revert()
    assert node.get_parameter("classes").value == OLD
    assert tx.applied["classes"] == OLD and tx.values["classes"] == OLD


def test_a_change_encoder_ending_late_leaves_the_next_configures_change_alone(
    transactions, segmenter
):
    """Cleanup stops a change encoder busy loading a model (which cannot stop half-way): it
    ends late, after the next configure's encoder began preparing a change. Its end must not
    take away that change's cancel event (a newer change must still supersede it) nor
    overwrite its diagnostics."""
    node, tx = transactions
    old_stop, new_stop = threading.Event(), threading.Event()
    loading, finish_loading, preparing, finish_preparing = (threading.Event() for _ in range(4))
    cancels = []

    def slow_load(*args, cancel=None, **kwargs):
        loading.set()
        finish_loading.wait(60)
        raise Stopped("stop requested before the text prompts")  # the load over, then a batch

    def encode(*args, cancel=None, **kwargs):
        cancels.append(cancel)
        preparing.set()
        finish_preparing.wait(60)
        raise Stopped("superseded")

    set_classes(node, NEW)
    old = threading.Thread(target=lambda: run_prepare(tx, slow_load, segmenter, old_stop))
    old.start()
    assert loading.wait(60)
    old_stop.set()  # cleanup: the old encoder is not waited for
    set_classes(node, ["cow"])  # accepted after the next configure
    new = threading.Thread(target=lambda: run_prepare(tx, encode, segmenter, new_stop))
    new.start()
    assert preparing.wait(60)
    change = tx.change
    finish_loading.set()
    old.join(60)
    assert tx.change == change
    set_classes(node, ["horse"])  # supersedes the change being prepared
    assert cancels[0].is_set()
    finish_preparing.set()
    new.join(60)


def run_prepare(tx, prepare_update, segmenter, stop) -> None:
    segmenter.prepare_update = prepare_update
    try:
        tx.prepare(segmenter, stop)
    except Stopped:
        pass
