"""End-to-end: the ``lrc`` command (its Typer app in this process, see ``tests/_cli.py``; signals and
torchrun in real processes), on the built-in digits data."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lrc.io import load_model
from lrc.models import build_model

from ._cli import ENV, LRC, lrc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    proc = lrc("train", "--preset", "digits-mlp", "--epochs", "3", "--out", out, "--quiet")
    assert "test accuracy" in proc.stdout and "c.r." in proc.stdout
    return out


def test_train_writes_the_run_directory(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "metrics.csv", "state.pt",
                                                   "model.safetensors"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert last["test_accuracy"] > 0.8  # three epochs on digits
    assert set(last["ranks"]) == {"1", "3"} and 88 < last["compression_ratio"] < 95
    assert last["lr"] < rows[0]["lr"]  # cosine schedule
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "test_accuracy" in csv_lines[0]


def test_evaluate_rebuilds_the_model_from_the_file_alone(run_dir):
    out = json.loads(lrc("evaluate", run_dir / "model.safetensors", "--json", "--device", "cpu").stdout)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert out["top1"] == pytest.approx(last["test_accuracy"])
    assert out["compression_ratio"] == pytest.approx(last["compression_ratio"])
    assert out["ranks"] == last["ranks"] and out["samples"] == 360 and "top5" in out
    # 2·(r₁·(64+1024+r₁) + r₃·(1024+1024+r₃) + 1024·10) multiply-adds for the two factorized layers and the head
    r1, r3 = last["ranks"]["1"], last["ranks"]["3"]
    assert out["flops_per_sample"] == 2 * (r1 * (64 + 1024 + r1) + r3 * (1024 + 1024 + r3) + 1024 * 10)


def test_evaluate_on_data_the_model_cannot_take_is_one_line(tmp_path):
    lrc("factorize", "--preset", "lenet5-fashion-mnist", "--out", tmp_path / "lenet.safetensors")
    proc = lrc("evaluate", tmp_path / "lenet.safetensors", "--data", "digits", "--no-latency", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "does not take the samples of digits" in proc.stderr
    assert "evaluate it on data of the form it was trained on" in proc.stderr  # (a factorized file names none)


def test_the_data_check_before_training_leaves_model_and_random_stream_as_they_were():
    from lrc.data import build_data
    from lrc.evaluate import check_model_takes

    data = build_data("digits", None, 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model_takes(model, data.test, data.num_classes, "digits")
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm's statistics too
    with pytest.raises(ValueError, match="gives 10 outputs but digits has 12 classes"):
        check_model_takes(model, data.test, 12, "digits")
    assert model.training


def test_info_reads_the_file_without_data(run_dir):
    out = lrc("info", run_dir / "model.safetensors").stdout
    rank = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["ranks"]["1"]
    assert "mlp" in out and "LowRankLinear" in out and f"rank {rank}" in out and "test_accuracy" in out


def test_export_dense_loads_strict_into_the_original_architecture(run_dir, tmp_path):
    lrc("export", run_dir, "--dense", "--out", tmp_path / "dense.pt")
    dense = build_model("mlp", in_features=64, hidden=[1024, 1024], num_classes=10)
    dense.load_state_dict(torch.load(tmp_path / "dense.pt", weights_only=True), strict=True)
    model, _ = load_model(run_dir / "model.safetensors")
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(dense(x), model(x), atol=1e-5)


def test_export_bf16_halves_the_file(run_dir, tmp_path):
    lrc("export", run_dir / "model.safetensors", "--dtype", "bf16", "--out", tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "1.U" in tensors and "1.S" in tensors and "1.V" in tensors
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < 0.6 * (run_dir / "model.safetensors").stat().st_size
    model, meta = load_model(tmp_path / "m.safetensors")
    assert meta["layers"]["1"]["rank"] == json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["ranks"]["1"]


def test_presets_lists_every_shipped_preset():
    out = lrc("presets").stdout
    for name in ("digits-mlp", "mlp-fashion-mnist", "lenet5-fashion-mnist"):
        assert name in out


def test_version_and_help():
    from lrc import __version__

    assert lrc("--version").stdout.strip() == f"lrc {__version__}"
    for cmd in ("train", "evaluate", "export", "info", "presets"):
        assert "Example: lrc" in lrc(cmd, "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "--set", "optimizer.bogus=1"], "unknown key optimizer.bogus"),
    (["train", "--set", "epochs=3"], "unknown key 'epochs'"),
    (["train", "--tau", "1.5"], "--tau 1.5: optimizer.tau = 1.5 must lie in (0, 1)"),
    (["train", "--set", "factorize.rank=1000", "--out", "{tmp}/r"], "replaced no layer"),
    (["train", "--set", "data.name=mnist", "--data-dir", "{tmp}", "--out", "{tmp}/f"], "mnist not found in {tmp}"),
    (["evaluate", "{tmp}/missing.safetensors"], "no such file"),
    (["evaluate", "{tmp}/garbage.safetensors"], "not a readable safetensors file"),
    (["train", "--checkpoint", "{tmp}/garbage.pt", "--out", "{tmp}/g"], "cannot read it as a checkpoint"),
    (["train", "--checkpoint", "{tmp}/other.pt", "--out", "{tmp}/o"], "does not fit the architecture (missing: 1.weight"),
    (["export", "{tmp}/garbage.safetensors", "--out", "{tmp}/x.safetensors"], "not a readable"),
    (["factorize", "--checkpoint", "torchvision:Nope.X", "--out", "{tmp}/x.safetensors"], "unknown weights name"),
    (["factorize", "--conv-format", "cp", "--out", "{tmp}/x.safetensors"], "choose one of matrix, tucker"),
    (["train", "--conv-format", "cp", "--out", "{tmp}/c"], "factorize.conv_format 'cp': choose matrix or tucker"),
    (["train", "--set", "data.image_size=64", "--out", "{tmp}/i"], "data.image_size: digits keeps its native size"),
    (["factorize", "--tau", "0", "--out", "{tmp}/x.safetensors"], "must lie in (0, 1)"),
    (["factorize", "--calibration", "-1", "--out", "{tmp}/x.safetensors"], "--calibration -1: a number of"),
    (["train", "--set", "factorize.calibration=-5", "--out", "{tmp}/k"], "factorize.calibration = -5"),
    (["train", "--set", "optimizer.capacity=0", "--out", "{tmp}/cap"], "optimizer.capacity = 0 must be ≥"),
    (["train", "--set", "optimizer.capacity=32", "--set", "optimizer.update_every=2", "--out", "{tmp}/cap"],
     "does not go with optimizer.update_every > 1"),
    (["train", "--set", "optimizer.capacity=16", "--out", "{tmp}/cap"], "capacity=16 is below the rank 30 of layer 1"),
    (["train", "--set", "optimizer.truncation=eigh", "--out", "{tmp}/tr"], "optimizer.truncation 'eigh': choose one of svd"),
    (["train", "--set", "optimizer.new_block_fraction=2", "--out", "{tmp}/nb"],
     "optimizer.new_block_fraction = 2.0 must lie in [0, 1]"),
    (["train", "--set", "optimizer.mode=two_pass", "--set", "optimizer.new_block_fraction=0.5", "--out", "{tmp}/nb"],
     "does not go with optimizer.mode: two_pass"),
    (["train", "--preset", "lenet5-fashion-mnist", "--set", "data.name=digits", "--out", "{tmp}/shape"],
     "the model does not take the samples of digits (each of shape (1, 8, 8))"),
    (["train", "--set", "model.args.num_classes=5", "--out", "{tmp}/shape"],
     "the model gives 5 outputs but digits has 10 classes"),
    (["train", "--out", "{tmp}/garbage.safetensors"], "garbage.safetensors is a file; a run needs a directory"),
    (["train", "--out", "{tmp}/garbage.safetensors/run"], "cannot create the run directory"),
    (["export", "{tmp}/garbage.safetensors", "--dense", "--out", "{tmp}/../{name}/garbage.safetensors"],
     "is the file being read; write to another file"),
    (["factorize", "--checkpoint", "{tmp}/garbage.pt", "--out", "{tmp}/garbage.pt"], "is the file being read"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    proc = lrc(*[a.replace("{tmp}", str(tmp_path)).replace("{name}", tmp_path.name) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert message.replace("{tmp}", str(tmp_path)) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
    assert not (tmp_path / "shape").exists()  # a model that cannot take the data: refused before the run starts
    assert (tmp_path / "garbage.safetensors").read_bytes() == b"\x00" * 64  # never written over


def test_nan_loss_stops_with_the_last_good_state(tmp_path):
    out = tmp_path / "nan"
    proc = lrc("train", "--out", out, "--quiet", "--lr", "1e12", "--set", "optimizer.method=dense",
               "--set", "train.schedule=constant", check=False)
    assert proc.returncode == 1
    assert "loss became nan" in proc.stderr and "last good state" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "state.pt").exists() and not (out / "model.safetensors").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigint_leaves_a_resumable_state_and_resume_finishes(tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen([*LRC, "train", "--out", str(out), "--quiet", "--epochs", "200"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "lrc train --resume" in err and "Traceback" not in err
    state = torch.load(out / "state.pt", weights_only=True)
    assert 1 <= state["epoch"] < 200
    assert not (out / "model.safetensors").exists()
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("epochs: 200", "epochs: 3"))
    done = lrc("train", "--resume", out, "--quiet")
    assert "test accuracy" in done.stdout and (out / "model.safetensors").exists()


@pytest.mark.parametrize("tau_warmup", [0.0, 2.0])  # 2.0: cut in the middle of the truncation warm-up
def test_python_api_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path, tau_warmup):
    from lrc.presets import apply_override, load_preset
    from lrc.train import TrainingStopped, train

    cfg = apply_override(load_preset("digits-mlp"), "train.epochs=2")
    cfg = apply_override(cfg, f"train.tau_warmup_epochs={tau_warmup}")
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(TrainingStopped):
        train(cfg, tmp_path / "cut", progress=False, max_steps=30)  # mid-epoch 2 (23 steps per epoch)
    resumed = train({}, tmp_path / "cut", resume=True, progress=False)
    a, b = load_file(full.model_path), load_file(resumed.model_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert resumed.metrics["ranks"] == full.metrics["ranks"]
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, tmp_path / "full", progress=False)


def test_a_run_held_at_a_capacity_resumes_mid_epoch_and_writes_the_real_sizes(tmp_path):
    from lrc.presets import apply_override, load_preset
    from lrc.train import TrainingStopped, train

    cfg = apply_override(apply_override(load_preset("digits-mlp"), "train.epochs=2"), "optimizer.capacity=32")
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(TrainingStopped):  # mid-epoch 2: the layers held at 32 columns, their masks in the state
        train(cfg, tmp_path / "cut", progress=False, max_steps=30)
    resumed = train({}, tmp_path / "cut", resume=True, progress=False)
    a, b = load_file(full.model_path), load_file(resumed.model_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    ranks = full.metrics["ranks"]
    assert resumed.metrics["ranks"] == ranks and max(ranks.values()) <= 32
    for name, r in ranks.items():  # compacted at the epoch's end: the file holds the active ranks only
        assert a[f"{name}.S"].shape == (r, r) and a[f"{name}.U"].shape[1] == r


def test_metrics_carry_per_layer_diagnostics_and_the_tau_warmup_only_shrinks_ranks(tmp_path):
    from lrc.presets import apply_override, load_preset
    from lrc.train import train

    cfg = load_preset("digits-mlp")
    for o in ("train.epochs=2", "train.tau_warmup_epochs=1", "factorize.rank=12", "optimizer.tau=0.3"):
        cfg = apply_override(cfg, o)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]["layers"]["1"]
    assert set(first) == {"step_norm", "rotation", "truncated_energy", "truncated_energy_max", "spectrum_ratio",
                          "steps"}
    assert 0 < first["spectrum_ratio"] <= 1
    assert first["steps"] == 23 and first["step_norm"] > 0 and 0 <= first["truncated_energy"] <= first["truncated_energy_max"]
    assert all(r <= 12 for row in rows[:1] for r in row["ranks"].values())  # warm-up: never above the start
    assert "layers" not in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def test_factorize_then_train_from_the_factorized_file(tmp_path):
    out = lrc("factorize", "--rank", "8", "--out", tmp_path / "f.safetensors").stdout
    assert "1024×1024" in out and "kept dense: excluded" in out and "c.r. 96.7%" in out
    lrc("train", "--checkpoint", tmp_path / "f.safetensors", "--epochs", "1", "--quiet", "--out", tmp_path / "run",
        "--set", "optimizer.lr_scaling=none")  # the paper's small steps: ranks stay at or below the start
    model, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["layers"]["3"]["rank"] <= 8  # started from the file's rank-8 factors


def test_calibrated_factorize_and_train_truncate_for_the_layers_inputs(tmp_path):
    lrc("train", "--method", "dense", "--epochs", "2", "--quiet", "--out", tmp_path / "dense")
    dense = tmp_path / "dense" / "model.safetensors"
    for name, extra in (("plain", ()), ("calibrated", ("--calibration", "300"))):
        lrc("factorize", "--checkpoint", dense, "--rank", "6", "--out", tmp_path / f"{name}.safetensors", *extra)
    plain, _ = load_model(tmp_path / "plain.safetensors")
    calibrated, meta = load_model(tmp_path / "calibrated.safetensors")
    assert meta["summary"]["calibration"] == 300 and calibrated[1].rank == plain[1].rank == 6
    assert not torch.allclose(calibrated[1].matrix_weight(), plain[1].matrix_weight())
    # on the training inputs the calibrated first layer is closer to the dense one
    from lrc.data import build_data
    from lrc.io import load_weights, read_checkpoint
    from lrc.models import build_model

    x = build_data("digits").train.tensors[0][:300]
    reference = build_model("mlp", in_features=64, hidden=[1024, 1024], num_classes=10)
    load_weights(reference, read_checkpoint(str(dense)), str(dense))
    with torch.no_grad():
        error = {name: (m[:2](x) - reference[:2](x)).norm() for name, m in (("plain", plain), ("calibrated", calibrated))}
    assert error["calibrated"] < error["plain"]
    lrc("train", "--checkpoint", dense, "--set", "factorize.calibration=200", "--set", "factorize.rank=6",
        "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"] > 0.5


def test_dense_method_trains_a_dense_model(tmp_path):
    lrc("train", "--method", "dense", "--epochs", "1", "--quiet", "--out", tmp_path / "d")
    model, meta = load_model(tmp_path / "d" / "model.safetensors")
    assert meta["layers"] == {} and meta["summary"]["method"] == "dense"


def test_compare_runs_every_method_writes_tables_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--seeds", "1", "--epochs", "1", "--quiet", "--out", out,
            "--methods", "dense,lowrank-adam,lora,dlrt-naive", "--jobs", "2")
    proc = lrc(*args)
    # a run in a worker process is the run `lrc train` makes on its own
    lrc("train", "--epochs", "1", "--seed", "0", "--quiet", "--out", tmp_path / "alone")
    alone, pooled = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "alone", out / "runs" / "lowrank-adam-s0"))
    assert alone.keys() == pooled.keys() and all(torch.equal(alone[k], pooled[k]) for k in alone)
    assert "| lowrank-adam |" in proc.stdout
    import csv

    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"dense", "lowrank-adam", "lora", "dlrt-naive"}
    for method, row in rows.items():
        final = json.loads((out / "runs" / f"{method}-s0" / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["accuracy_mean"]) == pytest.approx(100 * final["test_accuracy"])
        assert float(row["compression_ratio"]) == pytest.approx(final["compression_ratio"])
    assert float(rows["dense"]["compression_ratio"]) == 0.0
    assert abs(float(rows["lora"]["compression_ratio"]) - float(rows["lowrank-adam"]["compression_ratio"])) < 1.0
    assert int(rows["lowrank-adam"]["optimizer_state_bytes"]) < int(rows["dense"]["optimizer_state_bytes"]) / 5
    assert (out / "results.md").read_text().startswith("| method | test accuracy")
    assert (out / "curves.png").stat().st_size > 1000 and (out / "ranks.png").stat().st_size > 1000
    before = (out / "runs" / "lora-s0" / "model.safetensors").stat().st_mtime_ns
    again = lrc(*args)
    assert again.stderr.count("done already") == 4
    assert (out / "runs" / "lora-s0" / "model.safetensors").stat().st_mtime_ns == before


def test_compare_lora_needs_lowrank_adam(tmp_path):
    proc = lrc("compare", "--methods", "dense,lora", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "include lowrank-adam" in proc.stderr


def test_torchrun_two_processes_train_write_one_model_and_resume_with_another_count(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrc"]
    out = tmp_path / "ddp"
    proc = subprocess.run([*torchrun, "train", "--epochs", "1", "--quiet", "--out", str(out)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote") == 1 or (out / "model.safetensors").exists()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["processes"] == 2 and row["test_accuracy"] > 0.5
    dense_bytes = 4 * 1_126_410  # what DDP would all-reduce for the dense MLP
    assert 0 < row["comm_bytes_per_step"] < dense_bytes
    # two epochs in all: the second on one process, from the two-process state
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    (out / "model.safetensors").unlink()
    lrc("train", "--resume", out, "--quiet")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in rows] == [2, 1] and (out / "model.safetensors").exists()


def test_sigint_under_torchrun_stops_every_process_with_a_resumable_state(tmp_path):
    out = tmp_path / "ddp-int"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrc",
           "train", "--epochs", "200", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # torchrun forwards it to both workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["world"] == 2 and 1 <= state["epoch"] < 200
    assert not (out / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("epochs: 200", f"epochs: {state['epoch'] + 1}"))
    lrc("train", "--resume", out, "--quiet")
    assert (out / "model.safetensors").exists()
