"""Group 'rerun': seconds of a short run in a process that has trained one before (a sweep
worker's next trial, a run's next seed, a notebook's next cell), taking the loaders the earlier
runs left idle (fastres.data.IDLE_LOADERS) against making new ones, as every run did before
(each FFCV Loader compiles its pipeline with numba: about 1 s on a 2-core CPU).

The run is the same in both cases: ResNet-8 for one short epoch, evaluated, with its per-class
results; only the run's fixed costs differ. One run before the timed rounds fills the idle
loaders and compiles what the first run of a process compiles.
"""
import itertools

import pytest

from bench.common import CUDA, MINIMAL


@pytest.mark.benchmark(group="rerun")
@pytest.mark.parametrize("loaders", ["idle", "new"])
def test_next_run(benchmark, bench_data, tmp_path, monkeypatch, loaders):
    import fastres.data as D
    from fastres.config import make_config
    from fastres.train import train

    monkeypatch.setattr(D, "IDLE_LOADERS", D.IdleLoaders(size=16 if loaders == "idle" else 0))
    over = {"depth": 8, "epochs": 1, "train_limit": 6400 if CUDA else 512, "test_limit": 1000 if CUDA else 200,
            "data": str(bench_data)}
    runs = itertools.count()  # each run in a folder of its own

    def run():
        rec = train(make_config("paper", {**over, "out": str(tmp_path / f"r{next(runs)}")}), log=lambda *a, **k: None)
        assert rec["status"] == "finished"
        return rec

    run()
    rec = benchmark.pedantic(run, rounds=1 if MINIMAL else 5, iterations=1)
    benchmark.extra_info.update(loaders=loaders, seconds_per_run=benchmark.stats.stats.median,
                                images=rec["num_train"], device_name=rec["environment"]["device_name"])
