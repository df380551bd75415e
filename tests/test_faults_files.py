"""Faults of the files lrc reads and writes: each a one-line error from the reader or the
writer, never a traceback, a failure in a later forward pass, or a file left behind."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lrc import factorize
from lrc.io import (CheckpointError, WriteError, atomic_path, load_model, load_state, load_weights, read_checkpoint,
                    read_metadata, save_dense, save_model, save_state)
from lrc.layers import TuckerConv2d
from lrc.models import build_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("LRC_DEBUG", None)
LRC = [sys.executable, "-m", "lrc"]


def lrc(*args, preexec_fn=None):
    return subprocess.run([*LRC, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=preexec_fn)


def assert_input_error(proc, *fragments):
    """Exit status 2, exactly one line on stderr, no traceback; ``fragments`` in that line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


# ---- 1. the output of `lrc train --method lora` reads back everywhere ---------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert_ok(lrc("train", "--preset", "digits-mlp", "--method", "lora", "--set", "factorize.rank=4",
                  "--epochs", "1", "--quiet", "--out", out))
    return out


def test_a_lora_run_reads_back_through_evaluate_info_and_export(lora_run, tmp_path):
    model_path = lora_run / "model.safetensors"
    before = sorted(p.name for p in lora_run.iterdir())

    proc = lrc("evaluate", model_path, "--json")
    assert_ok(proc)
    result = json.loads(proc.stdout)
    lora_params = (1024 + 64) * 4 + 1024 + (1024 + 1024) * 4 + 1024  # A, B and bias of layers 1 and 3
    assert result["ranks"] == {"1": 4, "3": 4} and result["params"] == lora_params + 10 * 1024 + 10

    proc = lrc("info", model_path)
    assert_ok(proc)
    assert re.search(r"^  1\s+LoRALinear\s+rank 4$", proc.stdout, re.M)
    assert f"parameters {result['params']:,}" in proc.stdout

    assert_ok(lrc("export", lora_run, "--dense", "--out", tmp_path / "dense.pt"))
    assert_ok(lrc("export", lora_run, "--dtype", "bf16", "--out", tmp_path / "half.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt", "half.safetensors"]
    assert sorted(p.name for p in lora_run.iterdir()) == before

    model, _ = load_model(model_path)
    dense = build_model("mlp", in_features=64, hidden=[1024, 1024], num_classes=10)
    dense.load_state_dict(read_checkpoint(tmp_path / "dense.pt"), strict=True)
    half, meta = load_model(tmp_path / "half.safetensors")
    assert meta["layers"]["3"] == {"kind": "LoRALinear", "rank": 4, "adapter": False}
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(dense(x), model(x), atol=1e-4)
        assert torch.allclose(half(x), model(x), rtol=0.05, atol=0.05 * model(x).abs().max().item())


# ---- 2. metadata of the wrong shape, factors that do not fit: one CheckpointError ---------

ARCH = {"name": "mlp", "args": {"in_features": 8, "hidden": [16, 12], "num_classes": 3}}


def small_model(kind="lowrank", rank=2):
    model = build_model(ARCH["name"], **ARCH["args"])
    factorize(model, rank=rank, exclude=["5"], kind=kind)
    return model


def write(path, tensors, **fields):
    """An lrc file with ``tensors`` and the metadata fields given (JSON-encoded unless str)."""
    meta = {"format": "lrc/1", "architecture": ARCH, "layers": {}, "summary": {}, **fields}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return path


def lowrank_file(path, layers=None, **changes):
    """A valid file of :func:`small_model`, its tensors changed by ``changes`` (name → tensor)."""
    model = small_model()
    tensors = {**model.state_dict(), **{k.replace("_", "."): v for k, v in changes.items()}}
    table = {"1": {"kind": "LowRankLinear", "rank": 2, "adapter": False},
             "3": {"kind": "LowRankLinear", "rank": 2, "adapter": False}}
    return write(path, tensors, layers=table if layers is None else layers)


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("fields, fragment", [
    ({"architecture": ["mlp", {}]}, "architecture must be a mapping"),
    ({"architecture": {"name": "mlp", "args": [8]}}, "architecture args must be a mapping"),
    ({"layers": [["1", "LowRankLinear", 2]]}, "layers must be a mapping"),
    ({"layers": {"1": "LowRankLinear"}}, "layer '1': expected a mapping"),
    ({"summary": ["accuracy", 0.9]}, "summary must be a mapping"),
    ({"layers": {"1": {"kind": "LowRankLinear", "rank": 0}}}, "rank must be a positive integer, got 0"),
    ({"layers": {"1": {"kind": "LowRankLinear", "rank": "2"}}}, "rank must be a positive integer"),
    ({"layers": {"1": {"kind": "LowRankLinear", "rank": True}}}, "rank must be a positive integer"),
    ({"layers": {"1": {"kind": "LowRankLinear", "rank": [2, 2]}}}, "rank must be a positive integer"),
    ({"layers": {"1": {"kind": "TuckerConv2d", "rank": 2}}}, "pair of positive integers"),
    ({"layers": {"1": {"kind": "LowRankLinear", "rank": 2, "adapter": "no"}}}, "adapter must be true or false"),
    ({"layers": {"1": {"kind": "LoRALinear", "rank": 2, "adapter": True}}}, "LoRALinear has no adapter mode"),
    ({"layers": {"1": {"kind": "Linear", "rank": 2}}}, "unknown layer kind"),
])
def test_metadata_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, fields, fragment):
    path = write(tmp_path / "bad.safetensors", small_model().state_dict(), **fields)
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as info:
        read_metadata(path)
    assert str(info.value).startswith(f"{path}: damaged lrc metadata") and "\n" not in str(info.value)
    expect_error(path, fragment)


@pytest.mark.parametrize("layers, fragments", [
    ({"2": {"kind": "LowRankLinear", "rank": 2}}, ["layer '2'", "ReLU, not the nn.Linear"]),
    ({"1": {"kind": "LowRankConv2d", "rank": 2}}, ["layer '1'", "Linear, not the nn.Conv2d"]),
    ({"1": {"kind": "TuckerConv2d", "rank": [2, 2]}}, ["layer '1'", "not the nn.Conv2d"]),
    ({"1": {"kind": "LowRankLinear", "rank": 9}}, ["layer '1'", "rank 9", "rank must be an integer in [1, 8]"]),
    ({"7": {"kind": "LowRankLinear", "rank": 2}}, ["layer '7' does not exist in mlp"]),
])
def test_a_layer_table_that_does_not_fit_the_architecture(tmp_path, layers, fragments):
    expect_error(lowrank_file(tmp_path / "bad.safetensors", layers=layers), *fragments)


def test_an_architecture_that_cannot_be_built(tmp_path):
    expect_error(write(tmp_path / "a.safetensors", {}, architecture={"name": "resnet9000"}),
                 "unknown model 'resnet9000'")
    expect_error(write(tmp_path / "b.safetensors", {}, architecture={"name": "mlp", "args": {"depth": 3}}),
                 "bad arguments for model 'mlp'")


def test_factors_that_disagree_with_the_recorded_rank_or_each_other(tmp_path):
    # all factors of rank 3 (consistent), the table says 2: `lrc info` used to call this fine
    low = small_model(rank=3).state_dict()
    path = lowrank_file(tmp_path / "rank.safetensors", **{k.replace(".", "_"): low[k] for k in ("1.U", "1.S", "1.V")})
    expect_error(path, "layer '1' is recorded as LowRankLinear of rank 2", "1.U has shape [16, 3], not [16, 2]")
    # V of another rank than U and S: used to load, then fail in the forward pass
    expect_error(lowrank_file(tmp_path / "v.safetensors", **{"1_V": torch.zeros(8, 3)}), "1.V has shape [8, 3]")
    # U that does not fit the layer's output
    expect_error(lowrank_file(tmp_path / "u.safetensors", **{"3_U": torch.zeros(11, 2)}), "3.U has shape [11, 2]")
    # a dense tensor of the wrong shape, a missing and a foreign tensor
    expect_error(lowrank_file(tmp_path / "b.safetensors", **{"5_weight": torch.zeros(3, 11)}), "wrong shape: 5.weight")
    tensors = small_model().state_dict()
    del tensors["3.S"]
    path = write(tmp_path / "m.safetensors", tensors, layers={"1": {"kind": "LowRankLinear", "rank": 2},
                                                              "3": {"kind": "LowRankLinear", "rank": 2}})
    expect_error(path, "missing: 3.S")


def test_lora_and_tucker_factors_are_checked_against_their_ranks(tmp_path):
    lora = small_model(kind="lora").state_dict()
    table = {"1": {"kind": "LoRALinear", "rank": 2, "adapter": False}, "3": {"kind": "LoRALinear", "rank": 2}}
    model, meta = load_model(write(tmp_path / "lora.safetensors", lora, layers=table))
    assert model[1].rank == 2 and torch.equal(model[1].A, lora["1.A"])
    expect_error(write(tmp_path / "lora-bad.safetensors", {**lora, "1.B": torch.zeros(8, 3)}, layers=table),
                 "1.B has shape [8, 3], not [8, 2]")

    arch = {"name": "lenet5", "args": {}}
    net = build_model("lenet5")
    net.features[3] = TuckerConv2d.from_conv(net.features[3], ranks=(4, 3))
    tucker = {"features.3": {"kind": "TuckerConv2d", "rank": [4, 3], "adapter": False}}
    model, _ = load_model(write(tmp_path / "t.safetensors", net.state_dict(), architecture=arch, layers=tucker))
    assert model.features[3].ranks == (4, 3)
    core = net.state_dict()["features.3.core"][:, :2]
    expect_error(write(tmp_path / "t-bad.safetensors", {**net.state_dict(), "features.3.core": core},
                       architecture=arch, layers=tucker), "features.3.core has shape [4, 2, 5, 5], not [4, 3, 5, 5]")


def test_load_weights_never_lets_a_load_state_dict_error_escape():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="meta tensor") as info:
        load_weights(model, {"weight": torch.empty(2, 2, device="meta"), "bias": torch.zeros(2)}, "x.pt")
    assert str(info.value).startswith("x.pt does not fit the architecture") and "\n" not in str(info.value)


def test_malformed_metadata_through_lrc_info(tmp_path):
    path = write(tmp_path / "bad.safetensors", small_model().state_dict(), layers=[["1", "LowRankLinear", 2]])
    assert_input_error(lrc("info", path), str(path), "layers must be a mapping")
    assert list(tmp_path.iterdir()) == [path]


# ---- 3. torch.load's warnings stay off the terminal --------------------------------------


def test_torch_load_warnings_are_silenced(tmp_path, monkeypatch):
    original = torch.load

    def noisy_load(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", noisy_load)
    torch.save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_checkpoint(tmp_path / "c.pt")["w"].shape == (2,)
        assert load_state(tmp_path / "c.pt")["w"].shape == (2,)
    assert caught == []


# ---- 4. an unreadable file is not "no such file" -----------------------------------------


@contextmanager
def open_folder():
    """A folder that every user may enter (the parents of ``tmp_path`` are private)."""
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


@contextmanager
def as_nobody():
    """Root reads any file: drop the effective user while inside."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except OSError:
        pytest.skip("root, and cannot drop the effective user")
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_file_says_permission_denied():
    with open_folder() as folder:
        path, state = folder / "m.safetensors", folder / "state.pt"
        save_model(path, small_model(), ARCH)
        save_state(state, {"epoch": 1})
        path.chmod(0)
        state.chmod(0)
        with as_nobody():
            for read in (read_metadata, load_model, read_checkpoint, load_state):
                with pytest.raises(CheckpointError) as info:
                    read(state if read is load_state else path)
                message = str(info.value)
                assert "cannot be read (permission denied)" in message and "No such file" not in message, message


# ---- 5. a failed write: one clear error, no temporary file -------------------------------


def test_a_full_disk_during_torch_save_names_the_target_and_the_cause(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    target.write_bytes(b"previous")

    def failing_save(obj, f, *args, **kwargs):  # what torch.save says when the disk fills
        f.write(b"PK" * 100) if hasattr(f, "write") else Path(f).write_bytes(b"PK" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**9, 10**9, 0))
    with pytest.raises(WriteError) as info:
        save_state(target, {"epoch": 1})
    assert str(info.value) == f"{target}: could not write it (no space left on device); the previous file is kept"
    assert isinstance(info.value, CheckpointError)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"previous"


def test_a_full_disk_during_save_file_names_the_target_and_the_cause(tmp_path, monkeypatch):
    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"{}")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("lrc.io.save_file", failing_save_file)
    target = tmp_path / "m.safetensors"
    with pytest.raises(WriteError, match=re.escape(f"{target}: could not write it (no space left on device); "
                                                   "nothing was written")):
        save_model(target, small_model(), ARCH)
    assert list(tmp_path.iterdir()) == []


def test_a_real_failed_write_of_each_writer(tmp_path):
    """Files may grow to 100 kB here (RLIMIT_FSIZE): every writer fails for real, with EFBIG."""
    arch = {"name": "mlp", "args": {"in_features": 64, "hidden": [1024], "num_classes": 10}}
    model = build_model(arch["name"], **arch["args"])  # 270 kB of weights
    writers = {"state.pt": lambda p: save_state(p, model.state_dict()),
               "dense.pt": lambda p: save_dense(p, model), "dense.safetensors": lambda p: save_dense(p, model),
               "m.safetensors": lambda p: save_model(p, model, arch)}
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        for name, write in writers.items():
            with pytest.raises(WriteError) as info:
                write(tmp_path / name)
            assert str(info.value) == (f"{tmp_path / name}: could not write it ({os.strerror(errno.EFBIG).lower()}); "
                                       "nothing was written")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []


# ---- 6. temporary files: PID in the name, stale ones swept, own one always removed -------


def test_a_killed_writer_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "m.safetensors"
    code = ("import sys, time; from lrc.io import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            "    tmp.write_bytes(b'half'); print(tmp.name, flush=True); time.sleep(120)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    stale = tmp_path / writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    writer.stdout.close()
    assert stale.name.startswith(f".m.safetensors.{writer.pid}.") and stale.is_file()

    live = subprocess.Popen(["sleep", "60"])  # a concurrent writer: its file stays
    try:
        concurrent = tmp_path / f".m.safetensors.{live.pid}.0123abcd.tmp"
        concurrent.write_bytes(b"busy")
        other = tmp_path / ".other.safetensors.1.0123abcd.tmp"  # another target's: not ours to judge
        other.write_bytes(b"")
        with atomic_path(target) as tmp:
            assert tmp.name.startswith(f".m.safetensors.{os.getpid()}.") and tmp.name.endswith(".tmp")
        save_model(target, small_model(), ARCH)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([concurrent.name, other.name, target.name])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_atomic_path_removes_its_file_on_any_exception(tmp_path, interrupt):
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(interrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise interrupt()
    assert list(tmp_path.iterdir()) == [target] and target.read_text() == "old"


def test_written_files_follow_the_umask(tmp_path):
    save_model(tmp_path / "m.safetensors", small_model(), ARCH)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ---- 7. file names that fit the format ---------------------------------------------------


def test_save_model_and_save_dense_refuse_names_of_another_format(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match=r"use --out NAME\.safetensors, or --dense for a \.pt state dict"):
        save_model(tmp_path / "m.pt", model, ARCH)
    with pytest.raises(ValueError, match=r"\.safetensors, \.pt or \.pth"):
        save_dense(tmp_path / "m.bin", model)
    assert list(tmp_path.iterdir()) == []
    for name in ("d.safetensors", "d.pt", "d.pth"):
        save_dense(tmp_path / name, model)
        assert read_checkpoint(tmp_path / name).keys() == build_model(ARCH["name"], **ARCH["args"]).state_dict().keys()
