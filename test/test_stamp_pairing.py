"""Colour and depth frames paired by stamp (ovss_ros/ros/stamp_pairing.py): exact and
approximate time, the closest partner within the slop, arrival in either order, bounded queues,
and refused settings."""

from __future__ import annotations

import pytest
from std_msgs.msg import Header

from ovss_ros.ros.stamp_pairing import StampPairer, stamp_ns

MS = 1_000_000  # nanoseconds


def test_stamp_ns_is_exact():
    header = Header()
    header.stamp.sec, header.stamp.nanosec = 1_700_000_000, 999_999_999
    assert stamp_ns(header) == 1_700_000_000_999_999_999  # a float would round this


def test_exact_time_pairs_equal_stamps_only():
    pairer = StampPairer(slop=0.0)
    assert pairer.add_first(100 * MS, "c100") is None
    assert pairer.add_second(101 * MS, "d101") is None  # 1 ms apart: not exact
    assert pairer.add_second(100 * MS, "d100") == ("c100", "d100")
    assert pairer.pending() == (0, 1)
    assert pairer.add_first(101 * MS, "c101") == ("c101", "d101")
    assert pairer.pending() == (0, 0)


def test_approximate_time_takes_the_closest_partner_within_the_slop():
    pairer = StampPairer(slop=0.010)
    for stamp in (0, 33, 66):
        assert pairer.add_first(stamp * MS, f"c{stamp}") is None
    # depth at 40 ms: colour 33 (7 ms) is closer than 66 (26 ms, over the slop too)
    assert pairer.add_second(40 * MS, "d40") == ("c33", "d40")
    assert pairer.add_second(90 * MS, "d90") is None  # 24 ms from c66: over the slop
    assert pairer.add_second(75 * MS, "d75") == ("c66", "d75")  # 9 ms
    assert pairer.add_second(10 * MS, "d10") == ("c0", "d10")  # exactly the slop: paired
    assert pairer.pending() == (0, 1)


def test_a_tie_goes_to_the_older_partner_and_pairs_are_always_colour_first():
    pairer = StampPairer(slop=0.010)
    pairer.add_second(10 * MS, "d10")
    pairer.add_second(30 * MS, "d30")
    assert pairer.add_first(20 * MS, "c20") == ("c20", "d10")
    assert pairer.add_first(30 * MS, "c30") == ("c30", "d30")


def test_queues_keep_only_the_newest_items():
    pairer = StampPairer(slop=0.0, queue_size=2)
    for stamp in (1, 2, 3):
        pairer.add_first(stamp * MS, f"c{stamp}")
    assert pairer.pending() == (2, 0)
    assert pairer.add_second(1 * MS, "d1") is None  # c1 was pushed out
    assert pairer.add_second(3 * MS, "d3") == ("c3", "d3")
    pairer.add_second(5 * MS, "d5")
    pairer.add_second(6 * MS, "d6")  # d1, d5, d6: d1 leaves
    assert pairer.add_second(0, "d0") is None  # older than every queued item of a full queue
    assert pairer.pending() == (1, 2)
    pairer.clear()
    assert pairer.pending() == (0, 0)


@pytest.mark.parametrize(("slop", "size"), [(-0.001, 5), (float("nan"), 5), (0.0, 0)])
def test_bad_settings_are_refused(slop, size):
    with pytest.raises(ValueError, match="slop|queue_size"):
        StampPairer(slop=slop, queue_size=size)


def test_the_oldest_stamp_leaves_a_full_queue_whatever_the_arrival_order():
    pairer = StampPairer(slop=0.0, queue_size=2)
    for stamp in (3, 1, 2):  # out of order: 1 is the oldest, not 3 (the first to arrive)
        pairer.add_first(stamp * MS, f"c{stamp}")
    assert pairer.add_second(3 * MS, "d3") == ("c3", "d3")
    assert pairer.add_second(1 * MS, "d1") is None
    # a depth frame older than a full depth queue's items is not kept, even with a partner
    single = StampPairer(slop=0.0, queue_size=1)
    single.add_first(1 * MS, "c1")
    single.add_second(5 * MS, "d5")
    assert single.add_second(1 * MS, "d1") is None
    assert single.pending() == (1, 1)


def test_match_first_takes_the_closest_depth_without_queueing_the_colour():
    pairer = StampPairer(slop=0.005, queue_size=5)
    for stamp in (96, 101, 110):
        assert pairer.add_second(stamp * MS, f"d{stamp}") is None
    assert pairer.match_first(100 * MS) == "d101"  # 1 ms away beats 4 ms away
    assert pairer.pending() == (0, 2)  # the colour item was not queued; d101 left
    assert pairer.match_first(100 * MS) == "d96"
    assert pairer.match_first(100 * MS) is None  # d110 is 10 ms away
    assert pairer.pending() == (0, 1)


def test_set_slop_changes_the_rule_and_keeps_the_queues():
    pairer = StampPairer(slop=0.0)
    pairer.add_second(103 * MS, "d103")
    assert pairer.match_first(100 * MS) is None
    pairer.set_slop(0.005)
    assert pairer.match_first(100 * MS) == "d103"
    with pytest.raises(ValueError, match="slop"):
        pairer.set_slop(float("nan"))
