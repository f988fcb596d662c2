"""Group 'epoch': a short real training run, epoch time next to accuracy.

CPU: one epoch of the `smoke` preset on 3,000 images, evaluated on 2,000. CUDA: 3 epochs of the
`paper` preset. extra_info holds the per-epoch training time (device-synchronized, evaluation
excluded), images/s and final test accuracy, so a speed-up bought with accuracy shows up here.
"""
import pytest

from bench.common import CUDA, MINIMAL


@pytest.mark.benchmark(group="epoch")
@pytest.mark.parametrize("placement", ["stream", "device"])
def test_epoch(benchmark, bench_data, tmp_path, placement):
    from fastres.config import make_config
    from fastres.train import train

    # CPU: one epoch of the smoke preset on 3,000 images, 2,000 test images (its full 3 x 10,000
    # took ~3 min per case on a 2-core AVX2 CPU)
    preset, over = ("paper", {"epochs": 3}) if CUDA else ("smoke", {"epochs": 1, "train_limit": 3000,
                                                                    "test_limit": 2000})
    if MINIMAL:
        over = {"depth": 8, "epochs": 1, "train_limit": 200, "test_limit": 100, "batch_size": 50}
        preset = "smoke"
    cfg = make_config(preset, {**over, "data": str(bench_data), "out": str(tmp_path / "run"),
                               "data_placement": placement})
    rec = benchmark.pedantic(lambda: train(cfg, log=lambda *a, **k: None), rounds=1, iterations=1)
    ep = rec["epochs"]
    benchmark.extra_info.update(
        preset=preset, overrides=over, placement=placement, epochs=len(ep), epoch_train_s=rec["mean_epoch_train_s"],
        epoch_train_s_each=[e["train_s"] for e in ep], images_per_s=sum(e["images_per_s"] for e in ep) / len(ep),
        eval_s_total=rec["eval_s_total"], warmup_s=rec["warmup_s"], test_acc=rec["final_test_acc"],
        switches=rec["switches"], device_name=rec["environment"]["device_name"])
    assert rec["status"] == "finished"
