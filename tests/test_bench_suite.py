"""The benchmark suite imports and each group that applies here runs (one tiny round each)."""
import json

import torch

from conftest import run_cli


def test_every_group_runs_and_reports(small_data, tmp_path):
    out = tmp_path / "out.json"
    r = run_cli("pytest", "bench/", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}",
                env={"FASTRES_BENCH_MINIMAL": "1", "FASTRES_BENCH_DATA": str(small_data)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    by_group = {}
    for b in data["benchmarks"]:
        by_group.setdefault(b["group"], []).append(b)
        assert b["stats"]["median"] > 0 and b["stats"]["rounds"] >= 1
    expected = {"loader", "step", "epoch"} | ({"kernels"} if torch.cuda.is_available() else set())
    assert set(by_group) == expected, set(by_group)
    names = {b["name"] for b in by_group["loader"]}
    assert names == {"test_ffcv_device_aug", "test_torchvision_dataloader"}
    for b in by_group["loader"] + by_group["step"]:
        assert b["extra_info"]["images_per_s"] > 0
    variants = {b["extra_info"]["variant"] for b in by_group["step"]}
    assert {"eager_baseline", "fastres_default"} <= variants
    (epoch,) = by_group["epoch"]
    for key in ("epoch_train_s", "images_per_s", "test_acc", "warmup_s"):
        assert key in epoch["extra_info"]
    assert 0 <= epoch["extra_info"]["test_acc"] <= 1
    if not torch.cuda.is_available():
        assert "Triton kernels need a CUDA GPU" in r.stdout  # the kernels group says why it skipped


def test_gpu_record_script_writes_its_record(small_data, tmp_path):
    """The GPU record's assembly, exercised on CPU with a tiny run (its numbers mean nothing)."""
    r = run_cli("bench.gpu_record", "--allow-cpu", "--minimal-bench", "--preset", "smoke", "--data", small_data,
                "--out", tmp_path, "--depth", "8", "--epochs", "1", "--train-limit", "500", "--test-limit", "100",
                "--batch-size", "100")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec_path,) = tmp_path.glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["gpu"] and rec["torch"] == torch.__version__
    assert len(rec["train"]["epoch_train_s"]) == 1 and 0 <= rec["train"]["final_test_acc"] <= 1
    assert {b["group"] for b in rec["benchmarks"]} >= {"step"}
    assert rec_path.with_suffix(".md").read_text().startswith("# ")
    t = run_cli("bench.gpu_record", "--table", "--out", tmp_path)
    assert t.returncode == 0 and "| " + rec["date"] in t.stdout
