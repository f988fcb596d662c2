"""Config: presets, typed overrides, and clean rejection of bad values (exit 2, no heavy work)."""
import pytest

from conftest import run_cli
from fastres.config import Config, ConfigError, PRESETS, from_dict, make_config, parse_overrides


def test_paper_preset_is_the_papers_recipe():
    c = make_config("paper")
    assert (c.depth, c.widths, c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.schedule) == \
        (68, (16, 32, 64), 50, 64, 0.01, 0.9, 5e-4, "cosine_epoch")
    assert c.augment and not c.nesterov and c.label_smoothing == 0 and c.ema == 0


def test_typed_overrides():
    o = parse_overrides(["--lr", "0.2", "--nesterov", "--widths", "8,16,32", "--epochs=3", "--tta", "false",
                         "--batch-size", "128"])
    c = make_config("smoke", o)
    assert c.lr == 0.2 and c.nesterov is True and c.widths == (8, 16, 32) and c.epochs == 3
    assert c.tta is False and c.batch_size == 128 and c.depth == 20  # smoke's value kept
    assert isinstance(c.epochs, int) and isinstance(c.lr, float)
    assert from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.lr = 1.0  # frozen


@pytest.mark.parametrize("args,msg", [
    (["--lr", "0"], "--lr: must be > 0"),
    (["--lr", "-0.1"], "--lr: must be > 0"),
    (["--lr", "nan"], "--lr: must be > 0"),
    (["--batch-size", "0"], "--batch-size: must be > 0"),
    (["--epochs", "-1"], "--epochs: must be > 0"),
    (["--epochs", "2.5"], "--epochs: expected int"),
    (["--nesterov", "maybe"], "--nesterov: expected bool"),
    (["--device", "tpu"], "--device: must be one of"),
    (["--depth", "21"], "--depth: must be 6n+2"),
    (["--colour", "red"], "unknown setting --colour \\(see"),
    (["--lr"], "--lr needs a value"),
    (["--lrr", "0.1"], "unknown setting --lrr; did you mean --lr\\?"),
    (["--batchsize", "64"], "unknown setting --batchsize; did you mean --batch-size\\?"),
    (["--no-lr"], "unknown setting --no-lr \\(see"),
])
def test_rejections(args, msg):
    with pytest.raises(ConfigError, match=msg.replace("+", "\\+")):
        make_config("paper", parse_overrides(args))


def test_no_key_turns_a_bool_off():
    c = make_config("tuned", parse_overrides(["--no-augment", "--no-tta", "--no-decay-bn-bias"]))
    assert c.augment is False and c.tta is False
    assert c.no_decay_bn_bias is True  # a setting whose own name starts with no-
    assert make_config("paper", parse_overrides(["--augment"])).augment is True


def test_auto_on_off_switches_take_bools_and_bare_flags():
    """--whole-step (auto | on | off): a bare flag means on, --no-KEY off, a bool its on/off; a
    checkpoint written when it was a bool reads back as on/off."""
    assert make_config("paper").whole_step == "auto" and make_config("paper").data_placement == "auto"
    for args, want in [(["--whole-step"], "on"), (["--no-whole-step"], "off"), (["--whole-step", "true"], "on"),
                       (["--whole-step", "0"], "off"), (["--whole-step", "auto"], "auto"), (["--amp"], "on")]:
        key = args[0].removeprefix("--").removeprefix("no-").replace("-", "_")
        assert getattr(make_config("paper", parse_overrides(args)), key) == want, args
    assert make_config("paper", {"whole_step": True}).whole_step == "on"
    assert from_dict({**make_config("paper").to_dict(), "whole_step": False}).whole_step == "off"
    with pytest.raises(ConfigError, match="--whole-step: must be one of auto, on, off"):
        make_config("paper", parse_overrides(["--whole-step", "sometimes"]))
    with pytest.raises(ConfigError, match="--data-placement: must be one of auto, stream, device"):
        make_config("paper", parse_overrides(["--data-placement", "disk"]))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        make_config("fast")
    assert set(PRESETS) >= {"paper", "smoke", "tuned", "throughput"}


@pytest.mark.parametrize("args", [["--lr", "0"], ["--batch-size", "-4"], ["--epochs", "0"], ["--preset", "nope"],
                                  ["--bogus", "1"]])
def test_cli_rejects_before_heavy_work(args, tmp_path):
    r = run_cli("fastres", "train", "--out", tmp_path / "run", "--data", tmp_path / "nodata", *args, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("fastres: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "nodata").exists()


def test_help_lists_every_setting():
    r = run_cli("fastres", "train", "--help")
    assert r.returncode == 0
    for f in Config.__dataclass_fields__:
        if f != "preset":
            assert "--" + f.replace("_", "-") in r.stdout, f
    assert "smoke" in r.stdout and "--resume" in r.stdout
