"""Issue 20: failure reasons reach the log and /diagnostics whole, not cut mid-word.

The reason a Stable Diffusion pipeline cannot be loaded (the real loader's ModelLoadError, which
names what to set) was cut at 400 characters ("such as st..."). Reasons are now whole up to
ERROR_LIMIT; a longer text is cut at a word boundary and says how much was left off.
"""

from __future__ import annotations

import re

import pytest

from ovss_ros.core.methods.dslo import sd2_loading
from ovss_ros.ros.diagnostics import OK, WARN, CameraStats, NodeState, camera_report
from ovss_ros.ros.log_text import ERROR_LIMIT, REASON_LIMIT, cut, describe, one_line


def sd_load_failure() -> Exception:
    with pytest.raises(Exception) as caught:
        sd2_loading.local_directory("no such pipeline here")
    return caught.value


def test_sd_load_failure_reason_is_whole_in_the_log_text():
    error = sd_load_failure()
    text = describe(error)
    assert len(f"{type(error).__name__}: {error}") > REASON_LIMIT  # what was cut before
    assert text == f"{type(error).__name__}: {error}"
    assert text.endswith("(downloaded once, then cached)")
    assert sd2_loading.DEFAULT_MODEL in text


def test_sd_load_failure_reason_is_whole_in_diagnostics():
    reason = describe(sd_load_failure())
    failed = NodeState(
        device="cpu",
        vocabulary_size=3,
        enabled=True,
        parameter_change=reason,
        parameter_change_failed=True,
    )
    report = camera_report(CameraStats().window(), failed)
    assert report.level == WARN
    assert report.message == f"parameter change failed: {reason}"
    assert report.value("parameter change") == reason
    paused = NodeState(device="cpu", vocabulary_size=3, enabled=False, not_enabled_reason=reason)
    report = camera_report(CameraStats().window(), paused)
    assert report.level == OK and report.message == reason


@pytest.mark.parametrize("length", [ERROR_LIMIT + 1, ERROR_LIMIT + 9, 3 * ERROR_LIMIT, 10**5])
def test_a_reason_longer_than_the_limit_is_cut_at_a_word_and_says_how_much(length):
    words = " ".join(f"word{i}" for i in range(length))[:length].strip()
    error = RuntimeError(words)
    text = describe(error)
    full = f"RuntimeError: {words}"
    assert len(text) <= ERROR_LIMIT
    match = re.fullmatch(r"(.*) \.\.\. \((\d+) more characters\)", text)
    assert match is not None, text[-60:]
    kept, left_off = match.group(1), int(match.group(2))
    assert full.startswith(kept) and full[len(kept)] == " "  # ends at a word boundary
    assert len(kept) + left_off == len(full)
    assert len(kept) > ERROR_LIMIT * 3 // 4


def test_a_text_without_spaces_is_cut_at_the_limit_with_the_count():
    text = one_line("x" * 1000)
    assert len(text) == REASON_LIMIT
    assert text.endswith(f" ... ({1000 - text.index(' ')} more characters)")
    assert cut("short", 10) == "short"


def test_kind_throttle_lets_each_kind_through_once_a_period(monkeypatch):
    from ovss_ros.ros import log_text

    now = [100.0]
    monkeypatch.setattr(log_text.time, "monotonic", lambda: now[0])
    throttle = log_text.KindThrottle(5.0)
    assert throttle.due(("front", "rejected"))
    assert not throttle.due(("front", "rejected"))  # the same kind within the period
    assert throttle.due(("front", "stamp"))  # a new kind shows at once
    now[0] += 4.9
    assert not throttle.due(("front", "rejected"))
    now[0] += 0.1
    assert throttle.due(("front", "rejected"))  # the period is over
    assert not throttle.due(("front", "rejected"))
