"""Faults and bad input through the real ``lrc`` entry point: each answered with an exit
status, one line on stderr and no traceback; nothing lost, nothing half-written.

One representative case per class (configs and their values, resumed runs, run
directories, the last good state, metrics rows, signals outside the training loop, start-up);
files (`test_faults_files.py`) and `lrc compare`'s processes (`test_faults_compare.py`) have
their own modules.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .test_cli import ENV, LRC, lrc


def one_line_error(proc, status=2, contains=""):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A one-epoch digits run, finished (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    lrc("train", "--epochs", "1", "--quiet", "--out", out)
    return out


@pytest.mark.parametrize("args, message", [
    (["--set", "train.grad_clip=-1"], "train.grad_clip = -1.0 must be > 0"),
    (["--set", "data.eval_batch_size=0"], "data.eval_batch_size = 0 must be ≥ 1"),
    (["--lr", "inf"], "optimizer.lr = inf must be a finite number"),
    (["--set", "train.warmup_epochs=.nan"], "train.warmup_epochs = nan must be a finite number"),
    (["--set", "factorize.include=5"], "factorize.include = 5 has the wrong type"),
    (["--set", "model.args.hidden=[0]"], "parameter 1.weight has no entries"),
    (["--set", "optimizer.betas=[0.9, 1.5]"], "optimizer.betas = [0.9, 1.5] must lie in [0, 1)"),
])
def test_invalid_values_are_refused_before_anything_is_written(args, message, tmp_path):
    one_line_error(lrc("train", *args, "--out", tmp_path / "r", "--quiet", check=False), 2, message)
    assert list(tmp_path.iterdir()) == []


def test_bad_device_is_one_line(finished):
    one_line_error(lrc("evaluate", finished / "model.safetensors", "--device", "bogus", check=False), 2,
                   "device 'bogus': choose auto, cpu, cuda or cuda:N")


def test_nan_keeps_the_state_before_the_divergence_and_resume_goes_on_from_it(tmp_path):
    common = ("--method", "dense", "--epochs", "1", "--quiet", "--set", "train.schedule=constant")
    start = tmp_path / "start"
    lrc("train", *common, "--lr", "0", "--out", start)  # lr 0: its model is the initial weights
    out = tmp_path / "nan"
    one_line_error(lrc("train", *common, "--lr", "1e12", "--out", out, check=False), 1, "loss became")
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (0, 0)
    initial = load_file(start / "model.safetensors")
    assert all(torch.equal(state["model"][k], initial[k]) for k in initial)  # not the diverged weights
    lrc("train", "--resume", out, "--lr", "1e-3", "--quiet")  # what the message proposes
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_resume_applies_epochs_and_refuses_what_it_cannot_change(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    one_line_error(lrc("train", "--resume", run, "--tau", "0.5", "--set", "optimizer.tau=0.2", check=False), 2,
                   "--tau, --set cannot change a resumed run")
    one_line_error(lrc("train", "--resume", run, "--epochs", "0", check=False), 2, "must be ≥ 1")
    lrc("train", "--resume", run, "--epochs", "2", "--quiet")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "epochs: 2" in (run / "config.yaml").read_text()
    one_line_error(lrc("train", "--resume", run, "--epochs", "1", check=False), 2, "has trained 2 epochs already")


@pytest.mark.parametrize("edit, message", [
    (lambda text: "train: {epochs: [\n", "not valid YAML"),
    (lambda text: 'train: !!python/object/apply:os.system ["touch PWNED"]\n', "not valid YAML"),
    (lambda text: text.replace("epochs: 1\n", "epochs: -4\n"), "train.epochs = -4 must be ≥ 1"),
    (lambda text: text.replace("name: mlp", "name: lenet5"), "bad arguments for model 'lenet5'"),
    (lambda text: text.replace("hidden:\n    - 1024\n    - 1024", "hidden:\n    - 512\n    - 512"),
     "does not match"),  # a model of other sizes than the state's
])
def test_resume_of_an_edited_or_damaged_config_is_one_line(finished, tmp_path, edit, message):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    text = (run / "config.yaml").read_text()
    assert "hidden:\n    - 1024\n    - 1024" in text and "epochs: 1\n" in text
    (run / "config.yaml").write_text(edit(text))
    proc = subprocess.run([*LRC, "train", "--resume", str(run), "--quiet"], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=300)
    one_line_error(proc, 2, message)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"not a state", "not a file of tensors that torch.save wrote, or damaged"),
    (lambda data: data[: len(data) // 2], "truncated or damaged: its zip archive cannot be read"),
])
def test_resume_from_a_damaged_state_says_so_without_torchs_advice(finished, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "state.pt").write_bytes(damage((run / "state.pt").read_bytes()))
    proc = lrc("train", "--resume", run, "--quiet", check=False)
    one_line_error(proc, 2, message)
    assert "weights_only" not in proc.stderr and "restore it, or start a new run" in proc.stderr


def test_a_run_never_overwrites_a_model_or_a_run_in_progress(finished, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    shutil.copy(finished / "model.safetensors", exported)
    before = (exported / "model.safetensors").read_bytes()
    one_line_error(lrc("train", "--epochs", "1", "--out", exported, check=False), 2, "already holds a model")
    assert (exported / "model.safetensors").read_bytes() == before
    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)  # what a running `lrc train` into this directory holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(lrc("train", "--epochs", "1", "--out", busy, check=False), 2, "in use by another lrc run")
    finally:
        os.close(fd)
    assert list(busy.iterdir()) == []


def test_metrics_hold_one_row_per_epoch_after_a_stop_between_the_row_and_the_state(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.copy(run / "state.pt", tmp_path / "state-epoch1.pt")
    lrc("train", "--resume", run, "--epochs", "2", "--quiet")
    # as if killed after epoch 2's row was written but before its state: the state says epoch 1
    shutil.copy(tmp_path / "state-epoch1.pt", run / "state.pt")
    lrc("train", "--resume", run, "--quiet")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


SLOW_WRITE = """
import sys, time
import lrc.io as io
real = io.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
io.save_file = slow
sys.argv = ["lrc", *sys.argv[1:]]
from lrc._entry import main
main()
"""


def test_sigterm_during_a_write_leaves_no_temporary_file(finished, tmp_path):
    target = tmp_path / "out" / "m.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "export", str(finished), "--out", str(target)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the temporary file is written, not yet renamed
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "terminated" and "Traceback" not in err
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_during_start_up_is_one_line(delay, tmp_path):
    proc = subprocess.Popen([*LRC, "train", "--epochs", "1", "--quiet", "--out", str(tmp_path / "r")], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert proc.returncode in (0, 130, -signal.SIGINT)  # 0: it had finished; -2: before Python's handler


def test_a_factorized_file_of_another_architecture_is_one_line(tmp_path):
    lrc("factorize", "--preset", "lenet5-fashion-mnist", "--rank", "4", "--out", tmp_path / "lenet.safetensors")
    one_line_error(lrc("train", "--checkpoint", tmp_path / "lenet.safetensors", "--out", tmp_path / "r", check=False),
                   2, "holds a lenet5")
    assert not (tmp_path / "r").exists()


TINY = """
from torch import nn

def tiny(hidden=32, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
"""


def test_a_model_factory_of_ones_own_is_rebuilt_only_with_trust_code(tmp_path):
    (tmp_path / "mynets.py").write_text(TINY)

    def run(*args):
        return subprocess.run([*LRC, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                              timeout=300)

    proc = run("train", "--set", "model.factory=mynets:tiny", "--set", "model.args={hidden: 64}", "--set",
               "factorize.rank=8", "--set", "factorize.exclude=['3']", "--epochs", "1", "--quiet", "--out", "run")
    assert proc.returncode == 0, proc.stderr
    model = tmp_path / "run" / "model.safetensors"
    one_line_error(run("info", model), 2, "built by mynets:tiny, code of your own")
    assert "LowRankLinear" in run("info", model, "--trust-code").stdout
    out = json.loads(run("evaluate", model, "--json", "--trust-code").stdout)
    assert out["architecture"]["name"] == "factory:mynets:tiny" and out["top1"] > 0.2  # 1 epoch; chance is 0.1
    # a file that names a factory never runs it by itself
    from lrc.io import read_metadata
    from safetensors.torch import save_file

    meta = read_metadata(model)
    evil = {"format": meta["format"], "layers": "{}", "summary": "{}",
            "architecture": json.dumps({"name": "factory:os:system", "args": {"command": "touch PWNED"}})}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "evil.safetensors"), metadata=evil)
    one_line_error(run("info", "evil.safetensors"), 2, "code of your own")
    one_line_error(run("train", "--checkpoint", "evil.safetensors", "--out", "r2"), 2, "built by os:system")
    assert not (tmp_path / "PWNED").exists()
