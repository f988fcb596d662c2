"""The design space as settings (fastres/design.py, fastres/model.py): parameter counts against a
second, independent implementation and a closed formula; shapes and gradients at many points;
the paper's model unchanged; `fastres summary` and the parameter budget."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli, run_here
from fastres.config import make_config
from fastres.design import check_budget, model_from_config, summarize
from fastres.model import count_params


# --- a second implementation, written from the description of the common public CIFAR ResNet code
class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride, k, ks):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, k, 1, k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, ks, stride, ks // 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class RefResNet(nn.Module):
    def __init__(self, blocks, widths, kernels, stem, shortcuts, pool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], stem, 1, stem // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, self.names = widths[0], []
        for i in range(len(blocks)):
            layers = []
            for j in range(blocks[i]):
                layers.append(RefBlock(cin, widths[i], 2 if i > 0 and j == 0 else 1, kernels[i], shortcuts[i]))
                cin = widths[i]
            self.names.append(f"layer{i + 1}")
            setattr(self, self.names[-1], nn.Sequential(*layers))
        side = 32 // 2 ** (len(blocks) - 1)
        self.pool = pool
        self.fc = nn.Linear(widths[-1] * ((side // pool) ** 2 if pool else 1), 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for n in self.names:
            out = getattr(self, n)(out)
        out = F.avg_pool2d(out, self.pool if self.pool else out.shape[-1])
        return self.fc(out.flatten(1))


def formula(blocks, widths, kernels, stem, shortcuts, pool):
    """Trainable parameters by counting weights: k*k*cin*cout per conv, 2 per BN channel."""
    total = 3 * widths[0] * stem ** 2 + 2 * widths[0]
    cin = widths[0]
    for i, (b, w) in enumerate(zip(blocks, widths)):
        for j in range(b):
            total += cin * w * kernels[i] ** 2 + w * w * kernels[i] ** 2 + 4 * w
            if j == 0 and (i > 0 or cin != w):
                total += cin * w * shortcuts[i] ** 2 + 2 * w
            cin = w
    side = 32 // 2 ** (len(blocks) - 1)
    features = widths[-1] * ((side // pool) ** 2 if pool else 1)
    return total + features * 10 + 10


def per_stage(v, n):
    return v * n if len(v) == 1 else v


POINTS = {  # settings -> (blocks, widths, kernels, stem, shortcuts, pool) as the references take them
    "two_stages": ({"blocks": "3,3", "widths": "16,32"}, None),
    "four_stages_unequal": ({"blocks": "1,2,3,1", "widths": "8,16,24,32"}, None),
    "kernel_1": ({"blocks": "2,2,2", "widths": "8,16,32", "kernel": "1"}, None),
    "kernel_5_stem_5": ({"blocks": "1,1,1", "widths": "8,16,32", "kernel": "5", "stem_kernel": "5"}, None),
    "kernel_per_stage_7_5_3": ({"blocks": "1,1,1", "widths": "8,12,16", "kernel": "7,5,3"}, None),
    "shortcut_3": ({"blocks": "2,1,1", "widths": "8,16,32", "shortcut_kernel": "3"}, None),
    "narrower_middle_stage": ({"blocks": "1,1,1", "widths": "16,8,32", "shortcut_kernel": "3,1,3"}, None),
    "pool_2": ({"blocks": "1,1,1", "widths": "8,16,32", "pool": "2"}, None),
    "pool_4": ({"blocks": "1,1,1", "widths": "8,16,32", "pool": "4"}, None),
    "pool_8_is_global": ({"blocks": "1,1,1", "widths": "8,16,32", "pool": "8"}, None),
    "five_stages_pool_2": ({"blocks": "1,1,1,1,1", "widths": "4,8,8,16,16", "pool": "2"}, None),
    "one_stage": ({"blocks": "2", "widths": "8", "pool": "16"}, None),
}


def ref_args(cfg):
    n = len(cfg.blocks)
    return (cfg.blocks, cfg.widths, per_stage(cfg.kernel, n), cfg.stem_kernel, per_stage(cfg.shortcut_kernel, n),
            cfg.pool)


@pytest.mark.parametrize("point", list(POINTS))
def test_design_point_counts_shape_and_gradients(point):
    cfg = make_config("paper", POINTS[point][0])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    ref = RefResNet(*ref_args(cfg))
    assert count_params(model) == count_params(ref) == formula(*ref_args(cfg)), point
    # the same layers under the same names, so the reference takes the model's weights and agrees
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, ref(x))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert cfg.depth == 2 * sum(cfg.blocks) + 2


def test_the_papers_model_is_unchanged():
    """1,050,202 parameters and the state_dict keys and shapes of the reference implementation
    (so checkpoints of earlier versions load), with depth 68 and with explicit blocks."""
    paper = make_config("paper")
    explicit = make_config("smoke", {"blocks": "11,11,11", "widths": "16,32,64", "kernel": "3", "shortcut_kernel": "1",
                                     "stem_kernel": "3", "pool": "0"})
    assert explicit.depth == 68 and explicit.blocks == paper.blocks == (11, 11, 11)
    for cfg in (paper, explicit):
        model, ref = model_from_config(cfg), RefResNet((11, 11, 11), (16, 32, 64), (3, 3, 3), 3, (1, 1, 1), 0)
        assert count_params(model) == 1_050_202 == count_params(ref)
        assert [(k, v.shape) for k, v in model.state_dict().items()] == \
               [(k, v.shape) for k, v in ref.state_dict().items()]


def test_a_published_model_has_its_published_count():
    """The common public CIFAR ResNet-18 (four stages of two blocks, 64-512 channels, a 4x4 pool
    on the last 4x4 map) is known to have 11,173,962 parameters."""
    cfg = make_config("paper", {"blocks": "2,2,2,2", "widths": "64,128,256,512", "pool": "4"})
    assert check_budget(cfg) == 11_173_962 and cfg.depth == 18


def test_summary_totals_equal_the_model():
    cfg = make_config("paper", {"blocks": "2,1,3,1", "widths": "8,16,24,40", "kernel": "3,5,3,3", "pool": "2"})
    s = summarize(cfg)
    assert s["trainable_parameters"] == s["parameters"] == count_params(model_from_config(cfg))
    assert s["macs"] > 0 and s["forward_backward_mb"] > 0
    assert s["params_mb"] == pytest.approx(4 * s["parameters"] / 1e6)  # float32
    # multiply-adds of the first convolution alone, at full resolution: a lower bound
    assert s["macs"] > 32 * 32 * 3 * 8 * 9


def test_summary_command_prints_the_papers_count():
    r = run_here("fastres", "summary", "--preset", "paper")
    assert r.returncode == 0, r.stderr
    assert "Total params: 1,050,202" in r.stdout and "Trainable params: 1,050,202" in r.stdout
    assert "BasicBlock" in r.stdout and "[1, 64, 8, 8]" in r.stdout and "Mult-adds per image:" in r.stdout


@pytest.mark.parametrize("limit,status", [("1050202", 0), ("1.05e6", 2), ("5M", 0), ("1M", 2)])
def test_summary_budget_exit_status(capsys, limit, status):
    from fastres.cli import main
    assert main(["summary", "--preset", "paper", "--max-params", limit]) == status
    err = capsys.readouterr().err
    if status:
        over = 1_050_202 - int(float(limit.replace("M", "e6")))
        assert f"{over:,} " in err and "over --max-params" in err and err.count("\n") == 1
    else:
        assert err == ""


def test_train_refuses_an_over_budget_model_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = run_cli("fastres", "train", "--data", tmp_path / "no-data", "--out", out, "--blocks", "2,2,2,2",
                "--widths", "64,128,256,512", "--max-params", "5M")
    assert r.returncode == 2 and "11,173,962 trainable parameters" in r.stderr
    assert not out.exists() and not (tmp_path / "no-data").exists()


@pytest.mark.parametrize("args,msg", [
    (["--kernel", "4"], "--kernel: sizes must be odd"),
    (["--kernel", "0"], "--kernel: sizes must be odd"),
    (["--shortcut-kernel", "2"], "--shortcut-kernel: sizes must be odd"),
    (["--stem-kernel", "-3"], "--stem-kernel: must be odd and positive"),
    (["--pool", "16"], "--pool: the last stage's map is 8x8"),
    (["--pool", "3"], "--pool: the last stage's map is 8x8"),
    (["--blocks", "2,2,2,2"], "--widths: one width per stage"),
    (["--blocks", "2,0,2"], "--blocks: every stage needs at least one block"),
    (["--widths", "16,0,64"], "--widths: must be positive"),
    (["--blocks", "1,1,1,1,1,1", "--widths", "1,1,1,1,1,1"], "--blocks: 6 stages: 1 to 5"),
    (["--depth", "20", "--blocks", "2,2,2"], "--depth: 20 disagrees with --blocks 2,2,2"),
    (["--kernel", "3,5"], "--kernel: one size for all stages or one per stage"),
    (["--optimizer", "lamb"], "--optimizer: must be one of sgd, adam, adamw"),
    (["--optimizer", "adam", "--betas", "0.9,1.0"], "--betas: two decay rates in \\[0, 1\\)"),
    (["--betas", "-0.1,0.9"], "--betas: two decay rates"),
    (["--eps", "0"], "--eps: must be > 0"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov: is SGD's"),
    (["--cutout", "-1"], "--cutout: a square side"),
    (["--mixup", "-0.2"], "--mixup: alpha must be >= 0"),
    (["--cutmix", "-1"], "--cutmix: alpha must be >= 0"),
    (["--max-params", "lots"], "--max-params: expected a parameter count"),
])
def test_bad_design_values_stop_before_any_work(tmp_path, capsys, args, msg):
    """Each is one line and exit status 2 from `fastres train`, before a run folder or data exists
    (in this process: the CLI's main; one of them also as a real command below)."""
    from fastres.cli import main
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "no-data"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err) and err.strip().count("\n") == 0, err
    assert not out.exists() and not (tmp_path / "no-data").exists()


def test_a_bad_design_value_exits_2_from_the_command(tmp_path):
    r = run_cli("fastres", "train", "--out", tmp_path / "run", "--kernel", "4")
    assert r.returncode == 2 and "--kernel: sizes must be odd" in r.stderr and not (tmp_path / "run").exists()


def test_record_carries_parameters_and_macs(small_data, tmp_path):
    r = run_here("fastres", "train", "--preset", "smoke", "--data", small_data, "--out", tmp_path / "r",
                  "--blocks", "1,1,1,1", "--widths", "8,16,16,32", "--kernel", "3,3,5,3", "--shortcut-kernel", "3",
                 "--pool", "2", "--epochs", "1", "--train-limit", "500", "--test-limit", "100", "--batch-size", "100",
                 "--compile-augment", "false", "--loader-workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "r" / "record.json").read_text())
    cfg = make_config("smoke", {"blocks": "1,1,1,1", "widths": "8,16,16,32", "kernel": "3,3,5,3",
                                "shortcut_kernel": "3", "pool": "2"})
    assert rec["parameters"] == formula(*ref_args(cfg)) and rec["macs"] == summarize(cfg)["macs"]
    assert rec["config"]["blocks"] == [1, 1, 1, 1] and rec["status"] == "finished"


# Settings that did not exist before the design space: a checkpoint of an earlier version of
# fastres has none of them in its config (its model is the depth/widths ResNet, whose state_dict
# test_the_papers_model_is_unchanged pins down).
NEW_SETTINGS = ("blocks", "kernel", "stem_kernel", "shortcut_kernel", "pool", "max_params", "cutout", "mixup",
                "cutmix", "optimizer", "betas", "eps", "block", "se", "stem_se", "se_bias", "dropout", "block_dropout")
NEW_CHECKPOINT_KEYS = ("amp", "loss_scaling", "normalization")  # what a checkpoint holds since fp16 and predict


def test_a_checkpoint_of_an_earlier_version_resumes_and_evaluates(small_data, tmp_path):
    from fastres.evaluate import evaluate_checkpoints
    from fastres.train import train

    settings = {"data": str(small_data), "out": str(tmp_path / "r"), "depth": 8, "epochs": 2, "train_limit": 500,
                "test_limit": 100, "batch_size": 100, "compile_augment": False, "loader_workers": 2}
    quiet = lambda *a, **k: None
    train(make_config("paper", {**settings, "epochs": 1}), log=quiet)
    ck_path = tmp_path / "r" / "last.pt"
    ck = torch.load(ck_path, weights_only=False)
    ck["config"] = {k: v for k, v in ck["config"].items() if k not in NEW_SETTINGS}
    ck = {k: v for k, v in ck.items() if k not in NEW_CHECKPOINT_KEYS}
    ck["config"]["epochs"] = 2
    torch.save(ck, ck_path)
    # it predicts, normalizing with its data folder's manifest (it does not keep its normalization)
    from data_prep import TEST_FILE
    from fastres.predict import predict
    got = predict([ck_path], small_data / TEST_FILE, tmp_path / "old.csv", log=quiet)
    assert len((tmp_path / "old.csv").read_text().splitlines()) == 1 + len(got["labels"]) == 501
    rec = train(make_config("paper", settings), resume=True, log=quiet)
    assert rec["resumed_at_epoch"] == 1 and len(rec["epochs"]) == 2 and rec["status"] == "finished"
    ev = evaluate_checkpoints([ck_path], log=quiet)
    assert ev["epoch"] == 2 and ev["test_acc"] == pytest.approx(rec["final_test_acc"], abs=0.02)
