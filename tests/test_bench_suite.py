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
    expected = {"loader", "step", "epoch", "kernel_host"} | ({"kernels"} if torch.cuda.is_available() else set())
    assert set(by_group) == expected, set(by_group)
    names = {b["name"] for b in by_group["loader"]}
    assert names == {"test_ffcv_device_aug", "test_torchvision_dataloader"}
    for b in by_group["loader"] + by_group["step"]:
        assert b["extra_info"]["images_per_s"] > 0
    variants = {b["extra_info"]["variant"] for b in by_group["step"]}
    assert {"eager_baseline", "fastres_default"} <= variants
    assert {b["extra_info"]["path"] for b in by_group["kernel_host"]} == {"launcher_direct", "custom_op"}
    (epoch,) = by_group["epoch"]
    for key in ("epoch_train_s", "images_per_s", "test_acc", "warmup_s"):
        assert key in epoch["extra_info"]
    assert 0 <= epoch["extra_info"]["test_acc"] <= 1
    if not torch.cuda.is_available():
        assert "Triton kernels need a CUDA GPU" in r.stdout  # the kernels group says why it skipped


def test_gpu_record_phases_resume_and_write_the_record(small_data, tmp_path):
    """The GPU record's phases, exercised on CPU with a tiny run (its numbers mean nothing)."""
    work, out = tmp_path / "work", tmp_path / "results"
    common = ("--allow-cpu", "--work", work, "--out", out, "--preset", "smoke", "--data", small_data)
    tiny = ("--depth", "8", "--epochs", "1", "--train-limit", "500", "--test-limit", "100", "--batch-size", "100")
    r = run_cli("bench.gpu_record", "write", *common)
    assert r.returncode != 0 and "run the `train` phase first" in r.stderr
    r = run_cli("bench.gpu_record", "train", *common, *tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    # a second `train` resumes from the checkpoint: this run is finished, so nothing is retrained
    r = run_cli("bench.gpu_record", "train", *common, *tiny)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = run_cli("bench.gpu_record", "bench", *common, "--groups", "step", "--minimal-bench")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("bench.gpu_record", "write", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec_path,) = out.glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["gpu"] and rec["torch"] == torch.__version__
    assert rec["train"]["sessions"] == 2 and rec["train"]["resumed_at_epoch"] == 1
    assert len(rec["train"]["epoch_train_s"]) == 1 and 0 <= rec["train"]["final_test_acc"] <= 1
    assert rec["benchmark_groups"] == ["step"] and all(b["group"] == "step" for b in rec["benchmarks"])
    assert rec_path.with_suffix(".md").read_text().startswith("# ")
    t = run_cli("bench.gpu_record", "table", "--out", out)
    assert t.returncode == 0 and "| " + rec["date"] in t.stdout


def test_kernel_goals_table_compares_fused_with_compile():
    from bench.gpu_record import kernel_goals

    def row(impl, per_call_s, pass_="fwd"):
        return {"group": "kernels", "shape": [64, 16, 32, 32], "pass_": pass_, "timing": "graph", "impl": impl,
                "per_call_s": per_call_s, "fraction_of_dram": 0.25}

    bench = [row("fused_triton", 2e-6), row("torch_compile", 3e-6), row("eager", 8e-6),
             row("fused_triton", 1e-6, "fwd_bwd")]  # no counterpart: left out
    lines = kernel_goals(bench).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| 64x16x32x32 | fwd | graph | 2.0 | 3.0 | 8.0 | 1.50x | 25% |"
