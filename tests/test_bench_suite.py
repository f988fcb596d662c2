"""The benchmark suite imports and each group that applies here runs (one tiny round each)."""
import json

import pytest
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
    expected = {"loader", "step", "epoch", "kernel_host", "baseline", "pack", "startup", "rerun"} | ({"kernels"} if torch.cuda.is_available() else set())
    assert set(by_group) == expected, set(by_group)
    names = {b["name"] for b in by_group["loader"]}
    assert names == {"test_ffcv_device_aug[stream]", "test_ffcv_device_aug[device]", "test_torchvision_dataloader"}
    for b in by_group["loader"] + by_group["step"]:
        assert b["extra_info"]["images_per_s"] > 0
    variants = {b["extra_info"].get("variant") for b in by_group["step"]}
    assert {"eager_baseline", "fastres_default"} <= variants
    assert {b["extra_info"].get("design") for b in by_group["step"]} >= {"four_stages_4.8M"}
    assert {b["extra_info"]["path"] for b in by_group["kernel_host"]} == {"launcher_direct", "custom_op"}
    assert {b["extra_info"]["placement"] for b in by_group["epoch"]} == {"stream", "device"}
    assert {b["extra_info"]["k"] for b in by_group["pack"]} == {1, 2}  # the minimal run: K = 1 and 2
    assert all(b["extra_info"]["images_per_s"] > 0 for b in by_group["pack"])
    base = {b["name"]: b["extra_info"] for b in by_group["baseline"]}
    assert set(base) == {"test_torchvision_style", "test_fastres_default"}
    assert all(e["epoch_train_s"] > 0 and e["images_per_s"] > 0 for e in base.values())
    epoch = by_group["epoch"][0]
    for key in ("epoch_train_s", "images_per_s", "test_acc", "warmup_s"):
        assert key in epoch["extra_info"]
    assert 0 <= epoch["extra_info"]["test_acc"] <= 1
    if not torch.cuda.is_available():
        assert "Triton kernels need a CUDA GPU" in r.stdout  # the kernels group says why it skipped
    # The closing summary: a line per case, ratios to each group's baseline, epoch time and accuracy.
    summary = r.stdout.split("fastres benchmark summary", 1)[1]
    assert "[loader]" in summary and "[step]" in summary and "[epoch]" in summary
    ffcv = next(b for b in by_group["loader"] if b["name"] == "test_ffcv_device_aug[stream]")
    tv = next(b for b in by_group["loader"] if b["name"] == "test_torchvision_dataloader")
    ratio = ffcv["extra_info"]["images_per_s"] / tv["extra_info"]["images_per_s"]
    assert f"{ratio:5.2f}x baseline" in summary
    assert f"test acc {epoch['extra_info']['test_acc']:.2%}" in summary
    assert summary.count("x baseline") >= 3  # stream loader, fastres_default step, resident epoch


def _bench(name, group, rate, rounds=(1.0, 1.0, 1.0), acc=None, batch=None):
    info = {"images_per_s": rate, "batch_size": batch}
    if acc is not None:
        info.update(test_acc=acc, epoch_train_s=2.0)
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": group, "extra_info": info,
            "stats": {"median": sorted(rounds)[len(rounds) // 2], "min": min(rounds), "max": max(rounds),
                      "rounds": len(rounds)}}


def test_summary_ratios_noise_changes_and_accuracy_check():
    from bench.summary import accuracy_drops, lines

    now = [_bench("test_train_step[eager_baseline-64]", "step", 100.0, batch=64),
           _bench("test_train_step[fastres_default-64]", "step", 250.0, (1.0, 1.1, 2.0), batch=64),
           _bench("test_train_step[fastres_default-512]", "step", 900.0, batch=512),
           _bench("test_epoch", "epoch", 1000.0, acc=0.40)]
    out = "\n".join(lines(now))
    assert "test_train_step[fastres_default-64]" in out and " 2.50x baseline" in out
    assert "(noisy: rounds spread 91% of the median)" in out  # (2.0 - 1.0) / 1.1
    assert out.count("x baseline") == 1  # batch 512 has no baseline of its own here
    assert "epoch 2.00 s, test acc 40.00%" in out
    saved = {b["fullname"]: b for b in [_bench("test_train_step[fastres_default-64]", "step", 200.0, batch=64),
                                        _bench("test_epoch", "epoch", 1000.0, acc=0.45)]}
    out = "\n".join(lines(now, saved))
    assert "img/s 200.0 -> 250.0 (+25.0%)" in out and "test acc 45.00% -> 40.00% (-5.00 points)" in out
    assert accuracy_drops(now, saved, 6.0) == []
    (drop,) = accuracy_drops(now, saved, 2.0)
    assert drop.startswith("test_epoch: test accuracy 45.00% -> 40.00%")


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores (about 1.5 min on a 2-core AVX2 CPU)
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
    assert rec_path.name == f"{rec['date']}-cpu-smoke.json"  # the preset named: another's is another file
    assert rec["gpu"] and rec["torch"] == torch.__version__
    assert rec["train"]["processes"] == 2 and rec["train"]["resumed_at_epoch"] == 1
    assert len(rec["train"]["epoch_train_s"]) == 1 and 0 <= rec["train"]["final_test_acc"] <= 1
    assert rec["benchmark_groups"] == ["step"] and all(b["group"] == "step" for b in rec["benchmarks"])
    assert rec_path.with_suffix(".md").read_text().startswith("# ")
    t = run_cli("bench.gpu_record", "table", "--out", out)
    assert t.returncode == 0 and "| " + rec["date"] in t.stdout
    # the benchmarks alone (a GPU slot too short for the training run), each row naming its machine;
    # `table` passes over the other JSON files kept beside the records (a profile's)
    (out / f"{rec['date']}-cpu-profile.json").write_text(json.dumps([{"mode": "default"}]))
    r = run_cli("bench.gpu_record", "write", *common, "--bench-only", "--note", "step group only")
    assert r.returncode == 0, r.stderr[-3000:]
    brec = json.loads((out / f"{rec['date']}-cpu-bench.json").read_text())
    assert brec["train"] is None and brec["note"] == "step group only" and brec["benchmark_groups"] == ["step"]
    assert brec["gpu"] == "cpu" and brec["torch"] == torch.__version__
    assert all(b["environment"]["torch"] == torch.__version__ for b in brec["benchmarks"])
    t = run_cli("bench.gpu_record", "table", "--out", out)
    assert t.returncode == 0, t.stderr[-2000:]
    assert "no training run (benchmarks: step)" in t.stdout and t.stdout.count("| " + rec["date"]) == 2
    # rows of another machine in the same folder are refused, not written under one GPU's name
    row = {**brec["benchmarks"][0], "name": "other", "environment": {"gpu": "Other GPU", "torch": "0.0"}}
    with open(work / "bench.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    r = run_cli("bench.gpu_record", "write", *common, "--bench-only")
    assert r.returncode != 0 and "different GPUs or torch versions" in r.stderr, r.stderr[-2000:]


def test_gpu_record_trains_seeds_packed_and_records_each_with_their_mean(small_data, tmp_path):
    """The seeds form of the GPU record (the paper's three seeds, packed), on CPU with tiny runs in
    this process; the expected figures are computed here from each seed's own record.json."""
    import statistics

    from bench.gpu_record import main, table

    work, out = tmp_path / "work", tmp_path / "results"
    common = ["--allow-cpu", "--work", str(work), "--out", str(out), "--preset", "smoke", "--data", str(small_data)]
    tiny = ["--depth", "8", "--epochs", "2", "--train-limit", "500", "--test-limit", "100", "--batch-size", "100"]
    assert main(["train", *common, *tiny, "--seeds", "0", "1", "--pack", "2"]) == 0
    assert main(["write", *common]) == 0
    (rec_path,) = out.glob("*.json")
    assert rec_path.name.endswith("-cpu-smoke-2seeds.json")
    t = json.loads(rec_path.read_text())["train"]
    runs = [json.loads((work / "train-smoke" / f"seed{s}" / "record.json").read_text()) for s in (0, 1)]
    acc = [r["final_test_acc"] for r in runs]
    assert t["seeds"] == [0, 1] and t["pack"] == 2 and [b["seed"] for b in t["per_seed"]] == [0, 1]
    assert [b["final_test_acc"] for b in t["per_seed"]] == acc
    assert runs[0]["epochs"][0]["train_loss"] != runs[1]["epochs"][0]["train_loss"]  # two different runs
    assert t["final_test_acc"] == pytest.approx(statistics.fmean(acc))
    assert t["final_test_acc_std"] == pytest.approx(statistics.stdev(acc))
    assert t["mean_epoch_train_s"] == pytest.approx(statistics.fmean(r["mean_epoch_train_s"] for r in runs))
    assert t["status"] == "finished" and t["processes"] == 1 and t["wall_s"] > max(r["train_s_total"] for r in runs)
    row = table([json.loads(rec_path.read_text())]).splitlines()[-1]
    assert "2 seeds packed 2 at a time" in row and f"{100 * statistics.fmean(acc):.2f} ± " in row


def test_gpu_record_writes_a_seeds_group_stopped_by_a_time_limit(small_data, tmp_path):
    """A job's time limit (`timeout -s INT`) stops a packed group of seeds mid-way: `write
    --allow-unfinished` records each seed as far as it got, marked interrupted, with the wall time
    the stopped process spent. In this process: SIGINT is sent to it once both seeds have an epoch."""
    import os
    import signal
    import threading
    import time

    from bench.gpu_record import main
    from fastres.errors import Interrupted

    work, out = tmp_path / "work", tmp_path / "results"
    common = ["--allow-cpu", "--work", str(work), "--out", str(out), "--preset", "smoke", "--data", str(small_data)]
    tiny = ["--depth", "8", "--epochs", "30", "--train-limit", "500", "--test-limit", "100", "--batch-size", "100"]
    records = [work / "train-smoke" / f"seed{s}" / "record.json" for s in (0, 1)]

    def epochs(path):
        try:
            return len(json.loads(path.read_text())["epochs"])
        except (OSError, ValueError):
            return 0

    def stop_after_first_epochs():
        deadline = time.monotonic() + 300
        while min(epochs(r) for r in records) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # the training's handler takes it: stop at the next step

    t = threading.Thread(target=stop_after_first_epochs, daemon=True)
    t.start()
    with pytest.raises(Interrupted):
        main(["train", *common, *tiny, "--seeds", "0", "1", "--pack", "2"])
    t.join()
    runs = [json.loads(r.read_text()) for r in records]
    assert all(r["status"] == "interrupted" and 1 <= len(r["epochs"]) < 30 for r in runs), [r["status"] for r in runs]
    with pytest.raises(SystemExit, match="interrupted after"):  # unfinished: refused unless asked for
        main(["write", *common])
    assert main(["write", *common, "--allow-unfinished"]) == 0
    (rec_path,) = out.glob("*.json")
    rec = json.loads(rec_path.read_text())["train"]
    assert rec["seeds"] == [0, 1] and rec["status"] == "interrupted" and rec["processes"] == 1
    assert [b["epochs_done"] for b in rec["per_seed"]] == [len(r["epochs"]) for r in runs]
    assert rec["epochs_done"] == min(len(r["epochs"]) for r in runs)
    assert rec["wall_s"] > max(r["train_s_total"] for r in runs)


def test_gpu_record_write_refuses_a_run_stopped_before_its_first_epoch(tmp_path):
    """A job's time limit can stop the training run inside its first epoch: the run's record then has
    no epochs (no time, no accuracy), and `write --allow-unfinished` says so instead of a KeyError,
    writing nothing."""
    from bench.gpu_record import main

    run = tmp_path / "work" / "train-tuned"
    run.mkdir(parents=True)
    # what fastres.train writes when stopped in epoch 1: status, config, switches, no epochs yet
    (run / "record.json").write_text(json.dumps({
        "config": {"epochs": 50}, "switches": {"compile": "default"}, "environment": {"torch": "2.11"},
        "warmup_s": 20.3, "status": "interrupted", "epochs": [], "resumed_at_epoch": 0,
        "train_s_total": 0, "eval_s_total": 0}))
    out = tmp_path / "results"
    with pytest.raises(SystemExit, match="interrupted before its first epoch ended.*--bench-only"):
        main(["write", "--preset", "tuned", "--allow-unfinished", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())


def test_record_table_names_the_whole_step_and_resident_data():
    """The README's table says how each run stepped and where its data lived, not only the compile
    mode (records written before the switches named the placement carry it in their config)."""
    from bench.gpu_record import table

    def rec(gpu, switches, placement):
        train = {"preset": "paper", "switches": switches, "config": {"data_placement": placement},
                 "mean_epoch_train_s": 3.0, "train_s_total": 150.0, "eval_s_total": 3.0, "final_test_acc": 0.9}
        return {"date": "2026-01-01", "gpu": gpu, "torch": "2.11", "train": train, "benchmarks": []}

    rows = table([rec("A", {"compile": "default", "whole_step": "one CUDA graph per step"}, "device"),
                  rec("B", {"compile": "reduce-overhead", "whole_step": "off", "data_placement": "stream"}, "auto"),
                  rec("C", {"compile": "default"}, "stream")]).splitlines()
    assert "| A | 2.11 | paper | default + whole step + resident data | 3.00 | 153 | 90.00% |" in rows[2]
    assert "| B | 2.11 | paper | reduce-overhead | " in rows[3] and "| C | 2.11 | paper | default | " in rows[4]


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


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores (about 1.5 min on a 2-core AVX2 CPU)
def test_accuracy_drop_against_the_saved_run_fails_the_bench(small_data, tmp_path):
    """--accuracy-drop-fail: the epoch case is saved, its saved accuracy raised by 10 points, and the
    comparison run fails naming the drop (exit 1); with a looser limit it passes."""
    env = {"FASTRES_BENCH_MINIMAL": "1", "FASTRES_BENCH_DATA": str(small_data)}
    common = ("pytest", "bench/", "-q", "-p", "no:cacheprovider", "-k", "test_epoch and stream",
              f"--benchmark-storage={tmp_path}")
    r = run_cli(*common, "--benchmark-save=base", env=env)
    assert r.returncode == 0, r.stdout[-3000:]
    (saved,) = tmp_path.glob("*/*base.json")
    data = json.loads(saved.read_text())
    for case in data["benchmarks"]:
        case["extra_info"]["test_acc"] += 0.10
    saved.write_text(json.dumps(data))
    r = run_cli(*common, "--benchmark-compare=0001", "--accuracy-drop-fail", "2", env=env)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "accuracy check failed: test_epoch[stream]: test accuracy" in r.stdout and "allowed 2)" in r.stdout
    r = run_cli(*common, "--benchmark-compare=0001", "--accuracy-drop-fail", "50", env=env)
    assert r.returncode == 0 and "[change against the saved run]" in r.stdout, r.stdout[-3000:]


def test_gpu_record_bench_stopped_by_sigterm_leaves_no_process_behind(small_data, tmp_path):
    """A job's time limit (SIGTERM to the script) ends pytest and the DataLoader workers it started
    too; left running, they held the GPU and kept the job's output pipe open after the limit."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    # the baseline group on CPU: a ResNet-68 epoch with 2 DataLoader workers, far longer than this test waits
    cmd = [sys.executable, "-m", "bench.gpu_record", "bench", "--allow-cpu", "--groups", "baseline",
           "--work", str(tmp_path / "work"), "--data", str(small_data)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300
        while len(kids := me.children(recursive=True)) < 3:  # pytest and its 2 workers
            assert proc.poll() is None and time.monotonic() < deadline, "the baseline's workers never started"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        gone, alive = psutil.wait_procs(kids, timeout=20)
        assert not alive, [p.cmdline()[:3] for p in alive]
        assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal" in err, err[-2000:]
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()


def test_gpu_record_names_a_variant_of_a_preset(small_data, tmp_path):
    """--name: a variant of a preset (fp16 where the card would pick bf16) trains in a folder and
    writes a record of its own, beside the preset's, with the loss scaling it ran under."""
    from bench.gpu_record import main

    work, out = tmp_path / "work", tmp_path / "results"
    common = ["--allow-cpu", "--work", str(work), "--out", str(out), "--preset", "smoke", "--data", str(small_data)]
    tiny = ["--depth", "8", "--epochs", "1", "--train-limit", "300", "--test-limit", "100", "--batch-size", "100"]
    assert main(["train", *common, "--name", "smoke-fp16", *tiny, "--amp", "fp16"]) == 0
    assert main(["write", *common, "--name", "smoke-fp16"]) == 0
    (rec_path,) = out.glob("*.json")
    assert rec_path.name.endswith("-cpu-smoke-fp16.json") and (work / "train-smoke-fp16" / "last.pt").is_file()
    train = json.loads(rec_path.read_text())["train"]
    run = json.loads((work / "train-smoke-fp16" / "record.json").read_text())
    assert train["preset"] == "smoke" and train["switches"]["amp"] == "fp16 (loss scaling)"
    assert train["loss_scaling"] == run["loss_scaling"] and train["loss_scaling"]["final_scale"] > 0
    assert train["train_loss_per_epoch"] == [e["train_loss"] for e in run["epochs"]]
