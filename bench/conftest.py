"""Fixtures of the benchmark suite; helpers and environment variables are in bench/common.py."""
import json
import os
import sys
from pathlib import Path

import pytest

from bench.common import REPO


@pytest.fixture(scope="session")
def bench_data() -> Path:
    from fastres.data import has_data

    d = Path(os.environ.get("FASTRES_BENCH_DATA", REPO / "data"))
    if not has_data(d):
        from data_prep.cli import prepare
        prepare(None, str(d), download_dir=str(d / "downloads"), log=lambda *a: print(*a, file=sys.stderr))
    return d


def pytest_addoption(parser):
    parser.addoption("--accuracy-drop-fail", type=float, default=None, metavar="POINTS",
                     help="with --benchmark-compare: fail if an `epoch` case's test accuracy fell by more than "
                          "POINTS percentage points against the saved run (the accuracy check beside "
                          "--benchmark-compare-fail's time check)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """With FASTRES_BENCH_JSONL set, append each case's result to that file as soon as it ran, so
    that a run cut short (a job's time limit) keeps the cases it finished."""
    yield
    path = os.environ.get("FASTRES_BENCH_JSONL")
    b = item.funcargs.get("benchmark") if path else None
    st = getattr(getattr(b, "stats", None), "stats", None)
    if st is None or not st.data:  # the case failed before its first round: nothing to record
        return
    from bench.common import environment

    row = {"group": b.group, "name": item.name, "median_s": st.median, "min_s": st.min, "rounds": st.rounds,
           **b.extra_info, "environment": environment()}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Build the summary (bench/summary.py) and apply the accuracy check once all cases ran."""
    from bench import summary

    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    benches = [b.as_dict(include_data=False) for b in bs.benchmarks if b]
    compared = {}
    for mapping in (bs.compared_mapping or {}).values():
        compared.update(mapping)
    config._fastres_summary = summary.lines(benches, compared) if benches else []
    points = config.getoption("accuracy_drop_fail")
    if points is not None:
        drops = summary.accuracy_drops(benches, compared, points) if compared else \
            ["--accuracy-drop-fail needs --benchmark-compare (a saved run to compare with)"]
        config._fastres_drops = drops
        if drops:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_fastres_summary", None)
    if lines:
        terminalreporter.section("fastres benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
    for line in getattr(config, "_fastres_drops", []):
        terminalreporter.write_line(f"accuracy check failed: {line}", red=True)
