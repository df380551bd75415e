"""Inference: latency measurement, the plain-module form of a compressed model, the per-layer
choice between factorized and merged, and ONNX export.

A factorized layer is faster than its dense weight only where ``r(n + m) < n·m`` by enough to
beat the cost of a second kernel, which depends on the device, the batch and the library. So
the choice is measured, per layer, on the layer's own input: :func:`choose_layers`.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .layers import FACTORIZED
from .layers.plain import factored_modules
from .surgery import densify, replace_module

__all__ = ["latency_ms", "inference_form", "choose_layers", "merge_layers", "dense_form", "export_onnx",
           "OnnxUnavailable"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency_ms(module: nn.Module, x: Tensor, budget_s: float = 0.3, min_runs: int = 5,
               max_runs: int = 200) -> float:
    """Median wall time of ``module(x)`` in milliseconds, after three warm-up calls; runs until
    ``budget_s`` is spent (at least ``min_runs``, at most ``max_runs``). Synchronises CUDA
    around each call, so that the time is the kernels' and not the launch's."""
    device = x.device
    was_training = module.training
    module.eval()
    try:
        for _ in range(3):
            module(x)
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
            t = time.perf_counter()
            module(x)
            _sync(device)
            times.append(time.perf_counter() - t)
    finally:
        module.train(was_training)
    return 1e3 * statistics.median(times)


def inference_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode in which every factorized layer is its chain of standard
    modules (:func:`~lrc.layers.plain.factored_modules`): the same outputs, no autograd
    function, the coefficient folded into a factor — what a deployment runs."""
    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        if name and isinstance(module, FACTORIZED):
            replace_module(out, name, factored_modules(module))
    return out


def dense_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every factorized layer merged back to dense: the
    dense model it came from, at the compressed weights."""
    return densify(copy.deepcopy(model)).eval()


@torch.inference_mode()
def choose_layers(model: nn.Module, x: Tensor, budget_s: float = 0.1) -> dict[str, dict]:
    """For each factorized layer of ``model``: the latency of its factored form and of its
    merged dense form on the input it receives when ``model`` runs on ``x`` (captured with
    forward hooks), and which is faster. Returns ``{name: {"kept": "factorized"|"dense",
    "factorized_ms": …, "dense_ms": …}}``; the model is not changed."""
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, FACTORIZED):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach())))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, layer_input in inputs.items():
        layer = model.get_submodule(name)
        factored = latency_ms(factored_modules(layer), layer_input, budget_s)
        dense = latency_ms(layer.to_dense(), layer_input, budget_s)
        out[name] = {"kept": "factorized" if factored <= dense else "dense",
                     "factorized_ms": factored, "dense_ms": dense}
    return out


def merge_layers(model: nn.Module, names) -> nn.Module:
    """Merge the factorized layers ``names`` of ``model`` back to dense, in place."""
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_dense())
    return model


def is_text_batch(x: Tensor) -> bool:
    """Whether ``x`` is a batch of lrc's text form: integers ``(N, 2, T)``, token ids and mask."""
    return not x.is_floating_point() and x.dim() == 3 and x.shape[1] == 2


class TextInputs(nn.Module):
    """A text model as ONNX users call it: ``input_ids`` and ``attention_mask`` (``N×T`` each,
    what a tokenizer returns) as two inputs, stacked into lrc's ``(N, 2, T)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(torch.stack([input_ids, attention_mask], 1))


def _max_positions(model: nn.Module) -> int | None:
    """The longest sequence a Hugging Face model's position embeddings take (``None``: unbounded)."""
    config = getattr(getattr(model, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


class OnnxUnavailable(ValueError):
    """``torch.onnx.export`` needs packages of the ``onnx`` extra (the CLI: one line, exit 2)."""


def export_onnx(model: nn.Module, x: Tensor, path: str | Path, check: bool = True) -> dict:
    """Write ``model`` (its inference form) as ONNX to ``path`` with a dynamic batch dimension,
    atomically; with ``check`` and onnxruntime installed, run the file on ``x`` and return the
    largest absolute difference from PyTorch's outputs (``max_abs_diff``) and onnxruntime's
    latency at ``x``'s batch (``onnxruntime_ms``)."""
    from .io import atomic_path

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OnnxUnavailable(f"ONNX export needs the onnx extra ({e.name} is missing): "
                              "pip install 'lrc[onnx]'") from None
    plain = inference_form(model).cpu().float()
    x = x.detach().cpu()
    path = Path(path)
    if is_text_batch(x):  # token ids and attention mask: two inputs, any batch and sequence length
        module, args, names = TextInputs(plain).eval(), (x[:, 0], x[:, 1]), ["input_ids", "attention_mask"]
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=_max_positions(plain))
        dynamic = ({0: batch, 1: sequence}, {0: batch, 1: sequence})
    else:
        x = x.float()
        module, args, names = plain, (x,), ["input"]
        dynamic = ({0: torch.export.Dim("batch")},)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # torch.onnx says when it renames a dynamic axis after another with the same constraints
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=["logits"],
                                    dynamic_shapes=dynamic, verbose=False)
        program.save(str(tmp), external_data=False)
    result: dict = {"path": str(path)}
    if not check:
        return result
    try:
        import onnxruntime as ort
    except ImportError:
        return result
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.inference_mode():
        want = plain(x)
    result["max_abs_diff"] = (got - want).abs().max().item()
    result["max_abs_output"] = want.abs().max().item()
    times = []
    for i in range(53):
        t = time.perf_counter()
        session.run(None, feed)
        if i >= 3:
            times.append(time.perf_counter() - t)
    result["onnxruntime_ms"] = 1e3 * statistics.median(times)
    return result
