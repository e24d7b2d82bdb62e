"""bench/large_adapter.py: its figures turn into the goals' verdicts as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "large_adapter.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("large_adapter", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["large_adapter"] = module
    spec.loader.exec_module(module)
    return module


MIB = 2**20


def _run(peaks: dict[str, int], overhead_s: float = 10.0, **row: Any) -> dict:
    per_round = [
        {
            "round": r,
            "wall_s": 20.0,
            "slowest_train_s": 20.0 - overhead_s,
            "slowest_eval_s": 1.0,
            "overhead_s": overhead_s,
            "loopback_bytes": 1_000_000_000,
            "sites_trained": 3,
            "failures": 0,
            **row,
        }
        for r in (1, 2)
    ]
    processes = [
        {"process": label, "pid": i, "before_launch_rss": 100 * MIB, "peak_rss": peak}
        for i, (label, peak) in enumerate(peaks.items())
    ]
    return {"per_round": per_round, "processes": processes, "log_errors": []}


def _figures(bench: Any, large: dict, small: dict, speed: float) -> dict:
    figures = {
        "rank": 200,
        "small_rank": 8,
        "loopback_bytes_per_s": speed,
        "runs": {"plain-r200": large, "plain-r8": small},
    }
    delta = 100 * MIB
    figures["plain_memory_slopes"] = bench.memory_slopes(large, small, delta)
    return figures


def test_memory_slope_is_peak_difference_over_adapter_difference(bench: Any) -> None:
    large = _run({"site-01/site-daemon": 900 * MIB, "site-02/site-daemon": 700 * MIB})
    small = _run({"site-01/site-daemon": 500 * MIB, "site-02/site-daemon": 500 * MIB})
    slopes = bench.memory_slopes(large, small, 100 * MIB)
    # the largest over the sites of one role
    assert slopes == {"site/site-daemon": pytest.approx(4.0)}


def test_a_process_only_one_run_had_gets_no_slope(bench: Any) -> None:
    large = _run({"coordinator/serverapp": 900 * MIB})
    small = _run({"coordinator/superlink": 500 * MIB})
    assert bench.memory_slopes(large, small, 100 * MIB) == {}


def test_time_goal_compares_overhead_with_the_bytes_loopback_time(bench: Any) -> None:
    # 1 GB at 1 GB/s is 1 s; 1.5 s beyond training is 1.5x: met
    fast = _run({"coordinator/superlink": 150 * MIB}, overhead_s=1.5)
    slow = _run({"coordinator/superlink": 150 * MIB}, overhead_s=2.5)
    small = _run({"coordinator/superlink": 100 * MIB})
    met = bench.goals(_figures(bench, fast, small, 1e9))
    missed = bench.goals(_figures(bench, slow, small, 1e9))
    assert met[0]["verdict"] == "met" and met[0]["measured"] == "1.5 x"
    assert missed[0]["verdict"] == "missed"
    # 50 MiB more over a 100 MiB bigger adapter: 0.5x, within 3x
    assert met[1]["verdict"] == "met"


def test_memory_goal_missed_names_the_worst_process(bench: Any) -> None:
    large = _run({"coordinator/serverapp": 900 * MIB, "site-01/supernode": 200 * MIB})
    small = _run({"coordinator/serverapp": 100 * MIB, "site-01/supernode": 100 * MIB})
    memory = bench.goals(_figures(bench, large, small, 1e9))[1]
    assert memory["verdict"] == "missed"
    assert "coordinator/serverapp" in memory["measured"]


def test_a_round_without_every_site_misses_the_completion_goal(bench: Any) -> None:
    large = _run({"coordinator/superlink": 100 * MIB}, sites_trained=2)
    small = _run({"coordinator/superlink": 100 * MIB})
    assert bench.goals(_figures(bench, large, small, 1e9))[-1]["verdict"] == "missed"
    large["per_round"][0]["sites_trained"] = 3
    large["per_round"][1]["sites_trained"] = 3
    large["log_errors"] = ["ERROR message larger than max"]
    assert bench.goals(_figures(bench, large, small, 1e9))[-1]["verdict"] == "missed"


def test_docs_section_states_every_goal(bench: Any) -> None:
    large = _run({"coordinator/serverapp": 900 * MIB})
    small = _run({"coordinator/serverapp": 100 * MIB})
    figures = _figures(bench, large, small, 1e9)
    size = {
        "adapter_parameters": 10,
        "adapter_bytes": 40,
        "base_parameters": 100,
        "base_bytes": 400,
    }
    figures.update(
        command="python bench/large_adapter.py",
        machine={"cpus": 2, "cpu_model": "x", "memory_gib": 1.0, "os": "Linux"},
        load_average_start=0.0,
        load_average_end=0.0,
        sizes={"200": size, "8": size},
        goals=bench.goals(figures),
    )
    text = bench.docs_section(figures)
    for goal in figures["goals"]:
        assert (
            f"| {goal['goal']} | {goal['measured']} | **{goal['verdict']}** |" in text
        )
    assert "| plain-r200 | coordinator/serverapp | 100 | 900 | 8.0 |" in text


def test_loopback_counter_reads_the_loopback_interface(bench: Any) -> None:
    if not Path("/proc/net/dev").is_file():
        pytest.skip("no /proc/net/dev on this platform")
    assert bench.loopback_counter() >= 0
