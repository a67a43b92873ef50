"""The suite holds on a loaded machine: no test asserts a wall-clock margin, and the tools that replace them work."""

from __future__ import annotations

import re
import socket
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# An upper bound on elapsed time: `took < 30`, `elapsed < 30`, `time.perf_counter() - t0 < 30`, ...
WALL_CLOCK_BOUND = re.compile(r"(\btook|\belapsed|(perf_counter|monotonic|time)\(\) - \w+)\s*<")


def test_no_test_asserts_an_upper_bound_on_wall_clock_time():
    """A busy laptop or a CI box next to other jobs runs everything several times slower: a hang is the per-test
    timeout's to catch (pytest-timeout), and speed is for benchmarks, not tests."""
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(TESTS.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "assert" in line and WALL_CLOCK_BOUND.search(line)
    ]
    assert not found, "\n".join(found)


def test_network_attempts_records_what_a_test_tries_to_reach(network_attempts):
    socket.getaddrinfo("192.0.2.1", 443)  # a numeric documentation address: no lookup leaves the machine
    socket.getaddrinfo("localhost", 443)
    assert network_attempts == ["name lookup of 192.0.2.1"]


def test_fixture_budget_stops_a_fixture_that_overruns():
    import time

    import pytest
    from conftest import fixture_budget

    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="building a slow fixture took over its 1 s budget"):
        with fixture_budget("a slow fixture", seconds=1):
            time.sleep(600)
    assert time.monotonic() - t0 >= 1  # stopped by the budget (a hang would be the suite's timeout's)
    with fixture_budget("a quick fixture", seconds=1):
        pass
    time.sleep(1.5)  # the timer was cancelled: nothing fires after the block
