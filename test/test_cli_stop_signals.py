"""StopSignals, the batch tools' Ctrl-C / SIGTERM handling, with real signals sent to itself."""

import os
import signal
import time

import pytest

from ovss_ros.ros.signals import StopSignals


def wait_until_received(stop: StopSignals, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stop.received is None:
        assert time.monotonic() < deadline, "the signal never arrived"
        time.sleep(0.01)


def test_signal_outside_work_is_recorded_and_ends_the_next_item():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # while "writing": only recorded
        wait_until_received(stop)
        assert stop.received is signal.SIGTERM and stop.exit_status() == 143
        with pytest.raises(KeyboardInterrupt), stop.interruptible():
            pytest.fail("the next item must not start")
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_signal_during_work_interrupts_it_once():
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt), stop.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            wait_until_received(stop)
            time.sleep(60)  # the handler raises before this ends
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while closing: recorded only
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # give a wrongly raised KeyboardInterrupt the chance to show
        assert stop.received is signal.SIGINT and stop.exit_status() == 130


def test_ignore_further_keeps_a_stopping_process_alive():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StopSignals() as stop:
            stop.ignore_further()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def swallowing(convert_to: type[Exception] | None):
    """Work that receives the handler's KeyboardInterrupt and hides it, as a C extension does
    (rclpy's deserialize_message reports it as a TypeError): returns normally, or raises
    ``convert_to``."""

    def work(stop: StopSignals) -> str:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until_received(stop)
            time.sleep(60)  # the handler raises before this ends
        except KeyboardInterrupt as interrupt:
            if convert_to is not None:
                raise convert_to("Unable to convert function return value") from interrupt
        return "a result the signal cut short"

    return work


@pytest.mark.parametrize("convert_to", [None, TypeError, ValueError])
def test_a_signal_swallowed_or_converted_inside_the_block_still_ends_it(convert_to):
    """ovss-bag counted a good frame as undecodable when the stop signal arrived inside rclpy's
    deserialize_message (its KeyboardInterrupt came back as a TypeError)."""
    work = swallowing(convert_to)
    used = []
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            with stop.interruptible():
                try:
                    result = work(stop)
                except ValueError as error:  # as decode_frame: reported as a broken frame
                    result = error
            used.append(result)  # the caller goes on with the result
        assert used == [], "a result of interrupted work was used"
        assert stop.received is signal.SIGTERM and stop.exit_status() == 143


def test_an_error_of_the_work_itself_passes_through_when_no_signal_came():
    with StopSignals() as stop:
        with pytest.raises(TypeError, match="broken"), stop.interruptible():
            raise TypeError("broken")
        assert stop.received is None
