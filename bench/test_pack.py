"""Group 'pack': K paper-preset runs at batch 64 packed in one process (fastres.packed), their
aggregate training images/s next to one run's (K = 1).

Each run's epoch is timed by the run itself (device-synchronized, evaluation excluded) while the
others share the device, so the group's rate is the K runs' images over the mean of their epoch
times. On a CPU, runs advanced in turn share the same cores: the ratio to K = 1 only shows that
packing costs nothing (near 1). On a GPU it is the figure that matters: at batch 64 one run
leaves most multiprocessors idle, and K runs on K CUDA streams overlap their kernels.
"""
import statistics

import pytest

from bench.common import CUDA, MINIMAL

KS = [1, 2, 4, 8] if CUDA else [1, 2, 4]


@pytest.mark.benchmark(group="pack")
@pytest.mark.parametrize("k", KS, ids=lambda k: f"k{k}")
def test_pack(benchmark, bench_data, tmp_path, k):
    from fastres.config import make_config
    from fastres.packed import train_packed

    # one short epoch per run: 100 steps of 64 on a GPU, 3 on a CPU (ResNet-68 there: ~0.7 s a step)
    over = {"epochs": 1, "train_limit": 6400 if CUDA else 192, "test_limit": 1000 if CUDA else 64,
            "eval_batch_size": 1000 if CUDA else 64, "compile_augment": CUDA}
    if MINIMAL:
        over.update(depth=8, train_limit=128, test_limit=50, eval_batch_size=50)
        if k > 2:
            pytest.skip("FASTRES_BENCH_MINIMAL: K = 1 and 2 show the group runs")
    cfgs = [make_config("paper", {**over, "seed": s, "data": str(bench_data), "out": str(tmp_path / f"r{s}")})
            for s in range(k)]
    recs = benchmark.pedantic(lambda: train_packed(cfgs, log=lambda *a, **kw: None), rounds=1, iterations=1)
    assert all(isinstance(r, dict) and r["status"] == "finished" for r in recs), recs
    epoch_s = statistics.fmean(r["epochs"][0]["train_s"] for r in recs)
    images = sum(r["num_train"] // 64 * 64 for r in recs)
    benchmark.extra_info.update(k=k, batch_size=64, runs=k, images_per_s=images / epoch_s, epoch_train_s=epoch_s,
                                per_run_images_per_s=[r["epochs"][0]["images_per_s"] for r in recs],
                                device_name=recs[0]["environment"]["device_name"], switches=recs[0]["switches"])
