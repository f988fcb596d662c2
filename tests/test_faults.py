"""Failures a user can meet: each gives one clear message, a documented exit status, no traceback,
and loses nothing good. Every test builds its damaged input itself (from copies of real data)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, run_here
from data_prep import MANIFEST_FILE, TEST_FILE, TRAIN_FILE

TINY = ["--preset", "smoke", "--depth", "8", "--train-limit", "0", "--batch-size", "100",
        "--loader-workers", "2", "--compile-augment", "false"]


def train_args(data, out, *extra):
    return ["fastres", "train", "--data", data, "--out", out, *TINY, *extra]


def assert_clean_failure(r, status, *phrases):
    """Exit `status`, no traceback, and stderr's message holds every phrase."""
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for p in phrases:
        assert p in r.stderr, (p, r.stderr[-3000:])


@pytest.fixture(scope="module")
def one_epoch_run(small_data, tmp_path_factory):
    """A finished 1-epoch run of a tiny model: its folder holds a good last.pt."""
    out = tmp_path_factory.mktemp("faults") / "run"
    r = run_here(*train_args(small_data, out, "--epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


# --- checkpoints ------------------------------------------------------------------------------
def test_resume_from_truncated_checkpoint_is_refused_and_keeps_it(one_epoch_run, small_data, tmp_path):
    out = copy_run(one_epoch_run, tmp_path / "run")
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])
    r = run_here(*train_args(small_data, out, "--epochs", "1", "--resume"))
    assert_clean_failure(r, 2, str(out / "last.pt"), "not a readable checkpoint")
    assert (out / "last.pt").read_bytes() == good[: len(good) // 2]  # nothing replaced it


def _truncated(ck_bytes, path):
    path.write_bytes(ck_bytes[:4096])


def _not_a_checkpoint(ck_bytes, path):
    path.write_text("these are not the weights you are looking for\n")


def _foreign_dict(ck_bytes, path):
    torch.save({"state_dict": torch.nn.Linear(4, 2).state_dict()}, path)


def _other_model(ck_bytes, path):
    """A fastres checkpoint whose config says another model (depth 14, blocks 2,2,2) than its weights have."""
    ck = torch.load(__import__("io").BytesIO(ck_bytes), weights_only=False)
    ck["config"]["depth"], ck["config"]["blocks"] = 14, [2, 2, 2]
    torch.save(ck, path)


@pytest.mark.parametrize("damage,phrase", [
    (_truncated, "not a readable checkpoint"),
    (_not_a_checkpoint, "not a readable checkpoint"),
    (_foreign_dict, "not a fastres checkpoint (missing model, config, epoch)"),
    (_other_model, "weights do not fit this model"),
])
def test_eval_on_damaged_or_foreign_file(one_epoch_run, small_data, tmp_path, damage, phrase):
    path = tmp_path / "bad.pt"
    damage((one_epoch_run / "last.pt").read_bytes(), path)
    r = run_here("fastres", "eval", path, "--data", small_data)
    assert_clean_failure(r, 2, str(path), phrase)


def test_eval_of_missing_checkpoint(tmp_path):
    r = run_here("fastres", "eval", tmp_path / "nope.pt")
    assert_clean_failure(r, 2, "checkpoint not found")


# --- data folders -----------------------------------------------------------------------------
def _edit_manifest(d, change):
    p = d / MANIFEST_FILE
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m))


def _truncate_train(d):
    p = d / TRAIN_FILE
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 3)


def _flip_a_byte_of_test(d):
    """Same size, same header: only the content hash can tell."""
    p = d / TEST_FILE
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size - 5000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "truncated train file": (_truncate_train, [TRAIN_FILE, "bytes, the manifest says"]),
    "edited test count": (lambda d: _edit_manifest(d, lambda m: m["counts"].update(test=10_000)),
                          [TEST_FILE, "holds 500 images, the manifest says 10,000"]),
    "manifest without mean": (lambda d: _edit_manifest(d, lambda m: m.pop("mean")),
                              [MANIFEST_FILE, "incomplete manifest", "'mean'"]),
    "manifest deleted": (lambda d: (d / MANIFEST_FILE).unlink(),
                         [MANIFEST_FILE, "manifest missing, so the .beton files beside it cannot be verified"]),
    "a flipped byte": (_flip_a_byte_of_test, [TEST_FILE, "differs from the manifest's SHA-256"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_training_on_a_damaged_data_folder_says_which_file_and_how_to_fix(small_data, tmp_path, case):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    damage, phrases = DAMAGE[case]
    damage(data)
    r = run_here(*train_args(data, tmp_path / "run", "--epochs", "1"))
    assert_clean_failure(r, 2, *phrases, f"fastres-prep --source {small_data_source(small_data)}"
                         if case != "manifest deleted" else "fastres-prep", f"--out {data} --force")
    assert not (tmp_path / "run" / "last.pt").exists()


def small_data_source(d):
    return json.loads((d / MANIFEST_FILE).read_text())["source"]


def test_prep_force_repairs_a_damaged_folder(small_data, tmp_path, cifar_dir):
    """The suggested fix works, and a plain rerun already rebuilds damaged output."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    _truncate_train(data)
    r = run_cli("data_prep", "--source", cifar_dir, "--out", data, "--limit-train", "2000", "--limit-test", "500")
    assert r.returncode == 0 and "writing" in r.stdout, r.stderr[-2000:]
    from data_prep.convert import verify
    # (FFCV's page layout depends on its writer processes' timing, so the bytes may differ:)
    assert verify(data)["content_sha256"] == json.loads((small_data / MANIFEST_FILE).read_text())["content_sha256"]
    r = run_here(*train_args(data, tmp_path / "run", "--epochs", "1"))
    assert r.returncode == 0, r.stderr[-2000:]


# --- output folders ---------------------------------------------------------------------------
def test_out_that_is_a_file_or_under_a_file(small_data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_clean_failure(run_here(*train_args(small_data, f, "--epochs", "1")), 2, "is a file, not a folder")
    assert_clean_failure(run_here(*train_args(small_data, f / "run", "--epochs", "1")), 4,
                         "cannot create the run folder", "Not a directory")
    assert f.read_text() == "x"


def test_prep_out_that_is_a_file(tmp_path, cifar_dir):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_here("data_prep", "--source", cifar_dir, "--out", f)
    assert_clean_failure(r, 2, "is a file, not a folder")
    assert f.read_text() == "x"


def _limit_file_size(nbytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))  # writes past it fail with EFBIG
    return pre


def _in_own_mount(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (root's `unshare -m`), where it mounts
    small or read-only file systems that vanish with it."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root) to mount a small or read-only file system")
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && " + script],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def _cmd(args) -> str:
    return " ".join(map(str, [sys.executable, "-m", *args]))


@pytest.mark.slow  # 2+ minutes on 2 cores without bf16 units: out of the default run's 25-minute budget
def test_interrupt_then_failed_checkpoint_writes_keep_the_last_good_one(small_data, tmp_path):
    """Ctrl-C stops at a safe point with exit 130 and a resume command; a checkpoint write that
    fails (file too large; disk full) stops with exit 4 and leaves the previous checkpoint byte
    for byte, and no temporary file; the run then resumes to the end."""
    out = tmp_path / "run"
    args = train_args(small_data, out, "--epochs", "4")
    p = subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "last.pt").exists():
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "fastres: interrupted: stopped" in stderr, stderr[-3000:]
    assert f"resume with: fastres train --data {small_data} --out {out}" in stderr and "--resume" in stderr
    assert json.loads((out / "record.json").read_text())["status"] == "interrupted"
    assert not (out / "run.lock").exists()
    good = (out / "last.pt").read_bytes()
    epoch = torch.load(out / "last.pt", weights_only=False)["epoch"]
    assert epoch < 4
    resume = [*args, "--resume"]

    # A file size limit: the next checkpoint cannot be written (EFBIG).
    r = run_cli(*resume, preexec_fn=_limit_file_size(len(good) // 2))
    assert_clean_failure(r, 4, f"could not write {out / 'last.pt'}", "File too large",
                         "the previous last.pt is kept")
    assert (out / "last.pt").read_bytes() == good
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # no half-written leftovers

    # A full disk: a copy of the run on a file system with room for what it holds, not one more
    # checkpoint (ENOSPC).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    room = sum(f.stat().st_size for f in out.iterdir()) + 128 * 1024
    r = _in_own_mount(f"mount -t tmpfs -o size={room} tmpfs {mnt} && cp -r {out} {mnt}/run && "
                      f"{{ {_cmd(train_args(small_data, mnt / 'run', '--epochs', '4', '--resume'))}; "
                      f"echo status=$?; }} && cp {mnt}/run/last.pt {tmp_path}/after.pt && ls -a {mnt}/run")
    assert "status=4" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "after.pt").read_bytes() == good
    assert ".tmp-" not in r.stdout

    r = run_cli(*resume)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} after epoch {epoch}" in r.stdout
    assert json.loads((out / "record.json").read_text())["status"] == "finished"


def test_read_only_file_system_is_refused_before_any_work(small_data, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _in_own_mount(f"mount -t tmpfs -o ro,size=1m tmpfs {mnt} && "
                      f"{{ {_cmd(train_args(small_data, mnt / 'run', '--epochs', '1'))}; echo status=$?; }}")
    assert "status=4" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "cannot create the run folder" in r.stderr and "Read-only file system" in r.stderr
    assert "Traceback" not in r.stderr and "warm-up" not in r.stdout


def test_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(small_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(small_data, out, "--epochs", "30")
    p = subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not (out / "run.lock").exists() or not (out / "run.lock").read_text().strip():
            assert p.poll() is None and time.time() - t0 < 300
            time.sleep(0.05)
        r = run_here(*args)
        assert_clean_failure(r, 5, f"{out} is in use by another training (pid {p.pid})")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (out / "run.lock").read_text().strip() == str(p.pid)  # left behind by the killed run
    r = run_here(*train_args(small_data, out, "--epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the lock of pid {p.pid}, which is no longer running" in r.stdout
    assert not (out / "run.lock").exists()


# --- fastres-prep killed ----------------------------------------------------------------------
def _children(pid):
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _running(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_conversion_leaves_no_workers_and_its_leftovers_are_removed(cifar_dir, tmp_path):
    out = tmp_path / "data"
    p = subprocess.Popen([sys.executable, "-m", "data_prep", "--source", str(cifar_dir), "--out", str(out),
                          "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len([k for k in _children(p.pid) if _running(k)]) < 2 or not list(out.glob(".*.tmp-*")):
        assert p.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    writers = _children(p.pid)
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.time()
    while any(_running(k) for k in writers) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not [k for k in writers if _running(k)], "writer processes outlived the killed conversion"
    leftovers = list(out.glob(".*.tmp-*"))
    assert leftovers
    r = run_cli("data_prep", "--source", cifar_dir, "--out", out, "--limit-train", "500", "--limit-test", "100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removed {leftovers[0]}" in r.stdout
    assert sorted(f.name for f in out.iterdir()) == sorted([MANIFEST_FILE, TEST_FILE, TRAIN_FILE])


# The converting process killed in the instant after a fork, before the writer asked the kernel
# to kill it with its parent: a hook registered first holds the writer there for 1 s, while the
# parent kills itself. The writer must notice its parent is gone and exit, not write.
_KILLED_RIGHT_AFTER_FORK = """
import os, signal, sys, time
os.register_at_fork(after_in_child=lambda: time.sleep(1.0))
from data_prep.convert import forks_die_with_this_process
with forks_die_with_this_process():
    pid = os.fork()
if pid == 0:
    time.sleep(1.0)
    open(sys.argv[1], "w").write("an orphaned writer ran on")
    os._exit(0)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_forked_just_before_the_conversion_died_exits(tmp_path):
    marker = tmp_path / "orphan-wrote"
    r = subprocess.run([sys.executable, "-c", _KILLED_RIGHT_AFTER_FORK, str(marker)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    writer = int(r.stdout)
    t0 = time.time()
    while _running(writer) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not _running(writer) and not marker.exists()


def test_a_new_run_into_a_folder_holding_another_is_refused_and_leaves_it_untouched(one_epoch_run, small_data,
                                                                                   tmp_path):
    """Without --resume, `--out` over a finished run's folder (here with a run that would diverge
    in its first epoch, which once replaced the earlier run's record.json) is refused in one line
    naming both ways on, exit 2, the folder byte for byte as it was."""
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    before = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    r = run_here(*train_args(small_data, out, "--epochs", "1", "--lr", "600", "--warmup-epochs", "1"))
    assert_clean_failure(r, 2, f"--out {out} holds another run", "--resume", "another --out")
    assert r.stderr.count("\n") == 1
    after = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before and any(n.name == "record.json" for n in before)
