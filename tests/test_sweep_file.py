"""Sweep files: what a TOML file means (grid or sampled, joint choices, ranges), and bad files
refused with one line, exit status 2, before any folder or study exists."""
from __future__ import annotations

import itertools

import optuna
import pytest

from conftest import REPO
from fastres.cli import main
from fastres.config import make_config
from fastres.sweepfile import SweepError, load_sweep


def write(tmp_path, text: str, name: str = "study.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GRID = """
preset = "smoke"
seeds = [0, 1]
[fixed]
epochs = 4
[space]
lr = [0.05, 0.1, 0.2]
optimizer = ["sgd", "adamw"]
model = [ { blocks = [1, 1, 1], widths = [8, 16, 32] }, { blocks = [1, 1, 1, 1], widths = [8, 16, 32, 64] } ]
"""


def test_a_grid_is_every_combination_and_each_becomes_the_config_it_names(tmp_path):
    spec = load_sweep(write(tmp_path, GRID))
    assert spec.is_grid and spec.name == "study" and spec.seeds == (0, 1)
    grid = spec.grid()
    # built independently: the product of the three lists, in the file's order
    models = ["blocks=1,1,1 widths=8,16,32", "blocks=1,1,1,1 widths=8,16,32,64"]
    want = [dict(lr=a, optimizer=b, model=c) for a, b, c in itertools.product([0.05, 0.1, 0.2], ["sgd", "adamw"], models)]
    assert grid == want and spec.n_trials() == 12
    cfg = spec.config(grid[-1], seed=1, out="x")
    assert cfg == make_config("smoke", dict(epochs=4, lr=0.2, optimizer="adamw", blocks="1,1,1,1",
                                            widths="8,16,32,64", seed=1, out="x"))
    assert cfg.depth == 10  # blocks given together fix the depth


def test_ranges_make_a_sampled_study_whose_trials_get_their_choices_from_optuna(tmp_path):
    spec = load_sweep(write(tmp_path, """
trials = 5
max_params = "1.1M"
[space]
lr = { low = 0.001, high = 0.1, log = true }
epochs = { low = 10, high = 50, step = 10 }
batch_size = [64, 128]
"""))
    assert spec.sampler == "tpe" and not spec.is_grid and spec.n_trials() == 5 and spec.max_params == 1_100_000
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(5):
        t = study.ask()
        p = spec.suggest(t)
        cfg = spec.config(p, seed=0)
        assert 0.001 <= cfg.lr <= 0.1 and cfg.epochs in (10, 20, 30, 40, 50) and cfg.batch_size in (64, 128)
        assert isinstance(cfg.epochs, int) and cfg.max_params == 1_100_000
        assert t.params == p  # stored in the study under the file's names
        study.tell(t, 0.5)


@pytest.mark.parametrize("text, words", [
    ("[space]\nlrr = [0.1]\n", ["unknown setting --lrr", "did you mean --lr"]),
    ("[space]\nseed = [0, 1]\n", ["seed cannot be set per trial", "seeds = [...]"]),
    ("[space]\nout = ['a']\n", ["out cannot be set per trial"]),
    ("[space]\noptimizer = { low = 1, high = 2 }\n", ["a range needs a numeric setting"]),
    ("[space]\nlr = { low = 0.1, high = 0.01 }\n", ["low < high"]),
    ("[space]\nlr = { low = 0, high = 0.1, log = true }\n", ["log = true needs low > 0"]),
    ("[space]\noptimizer = ['sgd', 'lion']\n", ["[space] optimizer = 'lion'", "must be one of sgd, adam, adamw"]),
    ("[space]\nwidths = [[16, 32, 64], [16, 32]]\n", ["[space] widths = '16,32'", "one width per stage"]),
    ("[space]\nlr = [0.1, 0.1]\n", ["each choice once"]),
    ("[space]\n", ["[space] is missing or empty"]),
    ("sampler = 'grid'\n[space]\nlr = { low = 0.01, high = 0.1 }\n", ["needs every [space] entry as a list"]),
    ("pruner = 'hyperband'\n[space]\nlr = [0.1]\n", ["pruner: one of none, median, halving"]),
    ("seeds = []\n[space]\nlr = [0.1]\n", ["seeds: a list of integers"]),
    ("epochs = 3\n[space]\nlr = [0.1]\n", ["unknown key 'epochs'", "[fixed] or [space]"]),
    ("[fixed]\nbatch_size = 0\n[space]\nlr = [0.1]\n", ["--batch-size: must be > 0"]),
    # valid alone, not together: blocks of 4 stages with the fixed 3 widths
    ("[fixed]\nwidths = [8, 16, 32]\n[space]\nmodel = [{ blocks = [1, 1, 1] }, { blocks = [1, 1, 1, 1] }]\n",
     ["model = 'blocks=1,1,1,1'", "one width per stage"]),
    ("[space\nlr = [0.1]\n", ["not valid TOML"]),
])
def test_a_bad_sweep_file_stops_with_one_line_and_nothing_written(tmp_path, capsys, text, words):
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert all(w in str(e.value) for w in words), str(e.value)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastres: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_settings_on_the_command_line_belong_in_the_file(tmp_path, capsys):
    path = write(tmp_path, "[space]\nlr = [0.1]\n")
    assert main(["sweep", str(path), "--lr", "0.2", "--out", str(tmp_path / "o")]) == 2
    assert "settings go in the file" in capsys.readouterr().err
    assert main(["sweep", "--workers", "2", "--preset", "smoke"]) == 2
    assert "need a sweep file" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_the_example_sweep_files_are_valid(path):
    spec = load_sweep(path)
    assert spec.space and spec.n_trials() > 0
    if spec.is_grid:  # every configuration of a grid builds
        assert all(spec.config(p, spec.seeds[0]) for p in spec.grid())


def test_blocks_se_and_dropout_are_space_entries(tmp_path, capsys):
    """The blocks other studies publish vary like any setting; a bad reduction is refused with the
    entry that holds it, before anything runs."""
    spec = load_sweep(write(tmp_path, """
preset = "smoke"
[space]
model = [ { block = "preact", se = 8 }, { block = "bottleneck", blocks = [2, 2, 2], stem_se = 4 } ]
dropout = [0.0, 0.3]
"""))
    cfgs = [spec.config(p, seed=0, out="x") for p in spec.grid()]
    assert [(c.block, c.se, c.stem_se, c.dropout) for c in cfgs] == [
        ("preact", 8, 0, 0.0), ("preact", 8, 0, 0.3), ("bottleneck", 0, 4, 0.0), ("bottleneck", 0, 4, 0.3)]
    assert cfgs[0] == make_config("smoke", {"block": "preact", "se": 8, "seed": 0, "out": "x"})
    assert cfgs[0].depth == 20 and cfgs[2].depth == 3 * 6 + 2  # the preset's stages; bottlenecks count 3
    bad = write(tmp_path, 'preset = "smoke"\n[space]\nse = [0, 99]\n', "bad.toml")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "se = 99" in err and "--se: reduction 99" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_the_estimate_times_the_runs_own_step(monkeypatch):
    """The sweep's estimate measures the step a run trains with (TrainStep, with the config's
    optimizer and loss scaling), not a loop of its own: each timed step is one TrainStep call that
    moves the weights."""
    from fastres import step as step_module
    from fastres.sweep import measure_step_s

    calls, real = [], step_module.TrainStep.__call__

    def counted(self, x, y):
        calls.append(type(self.opt).__name__)
        return real(self, x, y)

    monkeypatch.setattr(step_module.TrainStep, "__call__", counted)
    cfg = make_config("smoke", {"blocks": "1,1,1", "widths": "4,8,16", "batch_size": 8, "optimizer": "adamw",
                                "device": "cpu", "amp": "off", "channels_last": "false"})
    seconds, device = measure_step_s(cfg)
    assert calls == ["AdamW"] * 6 and seconds > 0 and device
