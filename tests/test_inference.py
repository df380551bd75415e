"""Inference: the plain-module form of factorized layers, latency, the per-layer choice, and
ONNX export (with onnxruntime when the onnx extra is installed)."""

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from lrc import factorize
from lrc.inference import (OnnxUnavailable, choose_layers, dense_form, export_onnx, inference_form, latency_ms,
                           merge_layers)
from lrc.layers import LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, TuckerConv2d
from lrc.layers.plain import factored_modules
from lrc.models import build_model

from .test_cli import lrc

f64 = torch.float64
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _layers():
    torch.manual_seed(0)
    conv = dict(stride=2, padding=1, dilation=1)
    yield LowRankLinear(12, 20, 5, dtype=f64), torch.randn(3, 12, dtype=f64)
    yield LowRankLinear.from_linear(nn.Linear(12, 20, dtype=f64), rank=4, adapter=True), torch.randn(3, 12, dtype=f64)
    yield LowRankConv2d(4, 6, 3, 3, **conv, dtype=f64), torch.randn(2, 4, 9, 9, dtype=f64)
    yield LowRankConv2d(4, 6, (3, 1), 2, padding=(2, 0), dilation=(2, 1), bias=False, dtype=f64), \
        torch.randn(2, 4, 9, 9, dtype=f64)
    yield TuckerConv2d(4, 6, 3, (3, 2), **conv, dtype=f64), torch.randn(2, 4, 9, 9, dtype=f64)
    yield LoRALinear(12, 20, 5, dtype=f64), torch.randn(3, 12, dtype=f64)
    yield LoRAConv2d(4, 6, 3, 2, 2, 1, dtype=f64), torch.randn(2, 4, 9, 9, dtype=f64)


@pytest.mark.parametrize("layer, x", list(_layers()), ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_factored_modules_compute_the_layer_in_float64(layer, x):
    with torch.no_grad():
        for p in layer.parameters():  # random non-zero factors (an adapter's S starts at 0)
            p.add_(0.1 * torch.randn_like(p))
        plain = factored_modules(layer)
        assert all(type(m) in (nn.Linear, nn.Conv2d, nn.Sequential) for m in plain.modules())
        assert torch.allclose(plain(x), layer(x), rtol=0, atol=1e-12)


def _model(fmt="matrix"):
    torch.manual_seed(0)
    model = build_model("vgg_small", num_classes=10, in_channels=1).double()
    factorize(model, rank=6, conv_format=fmt)
    return model, torch.randn(4, 1, 28, 28, dtype=f64)


@pytest.mark.parametrize("fmt", ["matrix", "tucker"])
def test_inference_and_dense_forms_have_the_models_outputs(fmt):
    model, x = _model(fmt)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(inference_form(model)(x), want, rtol=0, atol=1e-10)
        assert torch.allclose(dense_form(model)(x), want, rtol=0, atol=1e-10)
    assert any(p.shape == (6, 6) for p in model.parameters())  # the model itself is unchanged


def test_choose_layers_times_every_factorized_layer_and_merging_keeps_the_outputs():
    model, x = _model()
    choices = choose_layers(model, x[:1], budget_s=0.01)
    factorized = [n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]
    assert sorted(choices) == sorted(factorized)
    for c in choices.values():
        assert c["kept"] in ("factorized", "dense") and c["factorized_ms"] > 0 and c["dense_ms"] > 0
        assert c["kept"] == ("factorized" if c["factorized_ms"] <= c["dense_ms"] else "dense")
    with torch.no_grad():
        want = model(x)
        merge_layers(model, factorized[:2])
        assert all(type(model.get_submodule(n)) in (nn.Conv2d, nn.Linear) for n in factorized[:2])
        assert torch.allclose(model(x), want, rtol=0, atol=1e-10)
    assert latency_ms(model, x, budget_s=0.01) > 0


def test_export_onnx_says_which_extra_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    model, x = _model()
    with pytest.raises(OnnxUnavailable, match=r"pip install 'lrc\[onnx\]'"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra (onnx, onnxscript, onnxruntime)")
@pytest.mark.parametrize("fmt", ["matrix", "tucker"])
def test_onnx_export_round_trip_with_onnxruntime(fmt, tmp_path):
    model, x = _model(fmt)
    model = model.float()
    checked = export_onnx(model, x.float(), tmp_path / "m.onnx")
    assert checked["max_abs_diff"] <= 1e-4 * max(1.0, checked["max_abs_output"])
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(7, 1, 28, 28)  # another batch size: the batch dimension is dynamic
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(batch), atol=1e-4, rtol=1e-4)


# ---- the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "digits"
    lrc("train", "--epochs", "1", "--quiet", "--out", out)
    return out


def test_evaluate_reports_latency_against_the_dense_model(run):
    result = json.loads(lrc("evaluate", run / "model.safetensors", "--json").stdout)
    rows = result["latency_ms"]["cpu"]
    assert set(rows) == {"1", "64"}
    assert all(r["dense"] > 0 and r["compressed"] > 0 for r in rows.values())
    text = lrc("evaluate", run / "model.safetensors").stdout
    assert "latency cpu batch   1: dense" in text and "latency cpu batch  64" in text
    assert result["dense_flops_per_sample"] > result["flops_per_sample"] > 0 and "(dense " in text
    assert "latency_ms" not in json.loads(lrc("evaluate", run / "model.safetensors", "--json", "--no-latency").stdout)


def test_export_inference_merges_what_is_faster_and_keeps_the_accuracy(run, tmp_path):
    proc = lrc("export", run, "--inference", "--out", tmp_path / "inf.safetensors")
    assert proc.stdout.count("at batch 1 on cpu") == 2  # both factorized layers of digits-mlp, each decided
    before = json.loads(lrc("evaluate", run / "model.safetensors", "--json", "--no-latency").stdout)
    after = json.loads(lrc("evaluate", tmp_path / "inf.safetensors", "--json", "--no-latency").stdout)
    assert after["top1"] == pytest.approx(before["top1"], abs=1 / 360)
    info = lrc("info", tmp_path / "inf.safetensors").stdout
    assert "inference:" in info


@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra (onnx, onnxscript, onnxruntime)")
def test_export_onnx_from_the_command_line(run, tmp_path):
    proc = lrc("export", run, "--onnx", tmp_path / "m.onnx")
    assert "onnxruntime agrees with PyTorch" in proc.stdout and (tmp_path / "m.onnx").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (("--onnx", "m.pt"), "must end in .onnx"),
    ((), "say where to write"),
    (("--dense", "--inference", "--out", "x.safetensors"), "give one"),
    (("--onnx", "m.onnx", "--input-shape", "a,b"), "--input-shape a,b"),
])
def test_export_bad_input_is_one_line(run, args, message, tmp_path):
    proc = lrc("export", run, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
