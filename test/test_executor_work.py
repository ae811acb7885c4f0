"""ExecutorWork: entity operations asked for by a worker thread run on the executor's thread
(issue 18, item 1), a few at a time, with the other callbacks served in between."""

from __future__ import annotations

import threading
import time

import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from ros_harness import isolate_dds

from ovss_ros.ros.executor_work import ExecutorWork


@pytest.fixture
def node():
    isolate_dds()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = Node("executor_work_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.test_executor = executor
    yield node
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def spin_until(node: Node, predicate, turns: int = 10000) -> None:
    for _ in range(turns):
        if predicate():
            return
        node.test_executor.spin_once(timeout_sec=0.05)
    raise AssertionError("condition not reached")


def in_thread(function):
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function()))
    thread.start()
    return thread, result


def test_steps_run_on_the_executor_thread_a_few_per_callback(node):
    work = ExecutorWork(node, steps_per_call=3)
    threads: list[int] = []
    batches: list[int] = []  # steps done when another callback ran
    other = node.create_guard_condition(lambda: batches.append(len(threads)))

    def steps():
        for _ in range(10):
            threads.append(threading.get_ident())
            other.trigger()  # another callback becomes ready between steps
            yield

    stop = threading.Event()
    thread, result = in_thread(lambda: work.run(steps(), stop))
    spin_until(node, lambda: not thread.is_alive())
    thread.join()
    assert result["value"] is True
    assert threads == [threading.get_ident()] * 10  # the spinning (this) thread
    assert batches and batches[0] < 10  # served before the job was done
    assert work.pending == 0


def test_a_stop_or_a_cancel_releases_the_waiting_thread(node):
    work = ExecutorWork(node)
    stop = threading.Event()
    thread, result = in_thread(lambda: work.run(iter([None]), stop))
    stop.set()  # nobody spins: only the stop can end the wait
    thread.join(timeout=30)
    assert not thread.is_alive() and result["value"] is False
    thread, result = in_thread(lambda: work.run(iter([None]), threading.Event()))
    deadline = time.monotonic() + 30
    while work.pending < 2:  # both jobs queued, none run: nobody spins
        assert time.monotonic() < deadline
        time.sleep(0.01)
    work.cancel()
    thread.join(timeout=30)
    assert not thread.is_alive() and result["value"] is False
    assert work.pending == 0


def test_a_step_that_raises_ends_its_job_and_is_reported(node):
    errors: list[BaseException] = []
    work = ExecutorWork(node, on_error=errors.append)

    def steps():
        yield
        raise RuntimeError("rcl could not create the publisher")

    thread, result = in_thread(lambda: work.run(steps(), threading.Event()))
    spin_until(node, lambda: not thread.is_alive())
    assert result["value"] is True
    assert [str(error) for error in errors] == ["rcl could not create the publisher"]
