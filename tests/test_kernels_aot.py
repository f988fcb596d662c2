"""The GPU (compiled) path of the fused BN kernels, checked without a GPU: `python -m kernels.aot`
compiles every launch the ResNet-68's shapes make for an H100 (sm_90a) with Triton's compiler and
ptxas. The interpreter tests (test_kernels.py) check the arithmetic; this checks that the same
kernels compile for the card, as launched, and that the training path keeps its registers."""
import json

from conftest import run_cli

KERNELS = {"_stats_kernel", "_finalize_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel"}


def test_every_launch_compiles_for_h100(tmp_path):
    out = tmp_path / "aot.json"
    r = run_cli("kernels.aot", "--arch", "90", "--json", out, env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert [row for row in rows if row["error"]] == []
    assert all(row["arch"] == "sm_90a" and 0 < row["registers"] <= 255 for row in rows)
    # both settings the launchers are asked for, each with and without residual / training
    assert {(row["dtype"], row["constants"].get("CHANNELS_LAST")) for row in rows if row["kernel"] == "_apply_kernel"} \
        == {("bf16", 1), ("fp32", 0)}
    assert {(row["constants"]["TRAINING"], row["constants"]["HAS_RES"]) for row in rows
            if row["kernel"] == "_bwd_dx_kernel"} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # G == 1 (one tile per channel block) is specialized to a constant on a GPU; it compiles too
    assert any(row["constants"].get("G") == 1 for row in rows if row["kernel"] == "_finalize_kernel")
    training_path = [row for row in rows if row["dtype"] == "bf16" and row["constants"].get("CHANNELS_LAST") == 1]
    assert training_path and all(row["spill_bytes"] == 0 for row in training_path), training_path


def test_refuses_to_run_under_the_interpreter():
    r = run_cli("kernels.aot", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "unset TRITON_INTERPRET" in r.stderr
