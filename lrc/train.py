"""The training loop behind ``lrc train``: one run directory per run.

    RUN/config.yaml        the resolved configuration
    RUN/metrics.jsonl|csv  one row per epoch: loss, accuracy, ranks, c.r., lr, time
    RUN/state.pt           training state for --resume (written atomically, every epoch
                           and on SIGINT/SIGTERM; kept as the last good state on NaN)
    RUN/model.safetensors  the compressed model (lrc format), written at the end

Resuming continues at the exact batch where the state was written: the data order of an
epoch is a function of (seed, epoch), and the RNG states are restored, so on the CPU a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from .data import build_data
from .distributed import all_reduce_mean_, broadcast_
from .evaluate import check_model_takes, evaluate, layer_ranks
from .io import (CheckpointError, atomic_path, is_lrc_file, load_model, load_state, load_weights, read_checkpoint,
                 read_metadata, save_model, save_state)
from .layers import FACTORIZED, TuckerConv2d
from .models import architecture_name, build_model
from .optim import LowRankAdam, LowRankOptimizer, LowRankSGD
from .presets import PEFT
from .surgery import compression_ratio, factorize

__all__ = ["TrainingStopped", "RunResult", "train", "resolve_device"]


class TrainingStopped(RuntimeError):
    """The run stopped before its end (interrupt or non-finite loss); the state is saved."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    metrics: dict


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of an epoch whose order depends only on (seed, epoch); each process takes
    its share of every global batch (``batch_size`` is the global batch). ``set_position``
    skips the first ``batches`` global batches (for resuming mid-epoch)."""

    def __init__(self, n: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.batch_size, self.rank, self.world = n, seed, batch_size, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batches: int) -> None:
        self.epoch, self.start = epoch, batches

    def global_size(self, batch: int) -> int:
        return min(self.batch_size, self.n - batch * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for b in range(self.start, len(self) + self.start):
            chunk = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield chunk.tensor_split(self.world)[self.rank].tolist()

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size) - self.start


def setup_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, Gloo on
    CPUs. Returns ``(rank, world, device, initialised_here)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    initialised = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised = True
    return dist.get_rank(), dist.get_world_size(), device, initialised


def calibration_batches(dataset, samples: int, batch_size: int = 64) -> list:
    """``samples`` training samples (the same fixed subset for every seed and method) in batches,
    for ``factorize(calibration=…)``; empty for ``samples = 0``."""
    if not samples:
        return []
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(4242))[:samples].tolist()
    # a generator of its own: iterating a DataLoader draws its base seed from the global one, which
    # would shift the run's random stream (head initialisation, dropout) against the same seed without
    return list(DataLoader(Subset(dataset, keep), batch_size=batch_size, generator=torch.Generator()))


class Run(NamedTuple):
    """What :func:`build_run` builds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    architecture: dict
    report: object  # the FactorizationReport, None when nothing was factorized here
    teacher: nn.Module | None  # the starting model, frozen, with ``train.distill``


def build_run(cfg: dict, device: torch.device, total_steps: int = 0, calibration=None) -> Run:
    """Model (dense, from checkpoint, factorized), optimizer, architecture record and, with
    ``train.distill``, the teacher (a frozen copy of the model as loaded, before any surgery);
    ``calibration``: the batches ``factorize.calibration`` asks for (see :func:`calibration_batches`)."""
    arch = {"name": architecture_name(cfg["model"]["name"], cfg["model"].get("factory")),
            "args": dict(cfg["model"]["args"])}
    path = cfg["model"]["checkpoint"]
    fac, opt_cfg = cfg["factorize"], cfg["optimizer"]
    report = None
    if path and is_lrc_file(path):  # an lrc file (factorized, or a dense run's): continue from it
        # its factory is imported only if it is the one this (the user's own) configuration names
        model, meta = load_model(path, trust_code=read_metadata(path)["architecture"]["name"] == arch["name"])
        if _canonical(meta["architecture"]) != _canonical(arch):
            raise ValueError(f"{path} holds a {_show_arch(meta['architecture'])}, the configuration asks for a "
                             f"{_show_arch(arch)}; use a preset of that model or --set model.args…")
        arch = meta["architecture"]
        if opt_cfg["method"] == "dense" and meta["layers"]:  # a dense run's file is fine
            raise ValueError(f"{path} is a factorized model; train it with a low-rank method, or export it "
                             "with `lrc export --dense` first")
    else:
        model = build_model(arch["name"], **arch["args"])
        if path:
            load_weights(model, read_checkpoint(path), str(path), new_head=cfg["model"]["new_head"])
    teacher = None
    if cfg["train"].get("distill", 0.0) > 0:  # the model as the user gave it, before factorize/PEFT change it
        if not path:
            raise ValueError("train.distill learns from the model the run starts from: give a trained one "
                             "(--checkpoint, --from-dense or model.checkpoint)")
        if cfg["model"]["new_head"]:
            raise ValueError("train.distill learns from the starting model, whose new head is untrained: train "
                             "it dense first (lrc train --method dense) and distill from that run (--from-dense)")
        teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    method = opt_cfg["method"]
    if method in PEFT:
        from .models.hf import apply_peft

        apply_peft(model, method, fac["include"], fac.get("trainable"), total_steps,
                   dropout=fac.get("adapter_dropout", 0.0))
    elif method != "dense" and not any(isinstance(m, FACTORIZED) for m in model.modules()):
        ranks, include = None, fac["include"]
        if method == "lora" and fac["match_cr"]:
            ranks = matched_lora_ranks(fac["match_cr"], model)
            include = list(ranks)
        budgeted = fac.get("target_cr") is not None  # the budget chooses the ranks; no preset cap
        capped = cfg["optimizer"].get("max_params") is not None  # a budget in parameters, ranks from the preset
        # a budget warm-up starts at the preset's ranks and shrinks to the target in training (lora has no
        # training of ranks: it starts at the target)
        warmup_epochs = cfg["train"].get("budget_warmup_epochs", 0.0)
        start_cr = cfg["train"].get("budget_warmup_start_cr")
        if warmup_epochs > 0 and not (budgeted or capped):
            raise ValueError("train.budget_warmup_epochs shrinks a budget to a target c.r. or to "
                             "optimizer.max_params: set --target-cr or optimizer.max_params")
        if start_cr is not None and not budgeted:
            raise ValueError("train.budget_warmup_start_cr is where a budget warm-up to a target c.r. starts: "
                             "set --target-cr")
        if start_cr is not None and not warmup_epochs > 0:
            raise ValueError("train.budget_warmup_start_cr is where a budget warm-up starts: set "
                             "train.budget_warmup_epochs too")
        warm = budgeted and warmup_epochs > 0 and method != "lora"
        if warm and start_cr is None and fac["rank"] is None:
            raise ValueError("train.budget_warmup_epochs starts from the ranks factorize.rank gives (or from "
                             "train.budget_warmup_start_cr): set one")
        # the first ranks: the target's budget, the warm-up's start budget, or the preset's rank
        first_cr = start_cr if warm else fac.get("target_cr")
        report = factorize(model, rank=None if first_cr is not None else fac["rank"], tau=fac["tau"],
                           include=include, exclude=fac["exclude"], kind="lora" if method == "lora" else "lowrank",
                           ranks=ranks, conv_format=fac["conv_format"],
                           target_cr=first_cr,
                           adapter=fac.get("adapter", False), adapter_dropout=fac.get("adapter_dropout", 0.0),
                           allocation=fac.get("allocation", "relative"),
                           calibration=calibration if fac.get("calibration") else None,
                           calibration_samples=max(1, fac.get("calibration") or 1))
        if not report.replaced:
            raise ValueError("factorize replaced no layer: check factorize.rank/include/exclude "
                             "(a rank must be below what a layer allows to save parameters)")
    if fac.get("adapter") and method not in ("dense", *PEFT):
        _freeze_for_adapters(model, fac.get("trainable"))
    if arch["name"] == "hf" and "config" not in arch["args"]:  # the file rebuilds without the directory
        arch["args"]["config"] = model.model.config.to_diff_dict()
    for module in model.modules():  # how the Tucker convolutions run (whether factorized here or loaded so)
        if isinstance(module, TuckerConv2d):
            module.execution = fac.get("execution", "auto")
    model.to(device)
    common = dict(lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    if method in ("dense", "lora", *PEFT):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], betas=tuple(opt_cfg["betas"]),
                                **common)
    else:
        lowrank = dict(tau=opt_cfg["tau"], min_rank=opt_cfg["min_rank"], max_rank=opt_cfg["max_rank"],
                       mode=opt_cfg["mode"], update_every=opt_cfg.get("update_every", 1),
                       target_cr=fac.get("target_cr"), max_params=opt_cfg.get("max_params"),
                       allocation=fac.get("allocation", "relative"), fixed_ranks=opt_cfg.get("fixed_ranks", False),
                       rank_every=opt_cfg.get("rank_every", 1), svd_batching=opt_cfg.get("svd_batching", "auto"),
                       augmentation=opt_cfg.get("augmentation", "auto"),
                       basis_every=opt_cfg.get("basis_every", 1), capacity=opt_cfg.get("capacity"),
                       truncation=opt_cfg.get("truncation", "svd"),
                       new_block_fraction=opt_cfg.get("new_block_fraction"))
        if method in ("lowrank-adam", "dlrt-naive"):
            opt = LowRankAdam(model, betas=tuple(opt_cfg["betas"]), second_moment=opt_cfg["second_moment"],
                              project_moments=method == "lowrank-adam", lr_scaling=opt_cfg.get("lr_scaling", "none"),
                              new_moments=opt_cfg.get("new_moments", "zero"),
                              coefficient_metric=opt_cfg.get("coefficient_metric", "uniform"), **common, **lowrank)
        else:
            opt = LowRankSGD(model, momentum=opt_cfg["momentum"], **common, **lowrank)
    return Run(model, opt, arch, report, teacher)


def text_options(cfg: dict) -> dict | None:
    """The options of the ``text`` data set from a configuration (the tokenizer defaults to the
    model's directory); ``None`` for other data sets."""
    dcfg = cfg["data"]
    if dcfg["name"] != "text":
        return None
    return {"tokenizer": dcfg.get("tokenizer") or cfg["model"]["args"].get("path"),
            "text_column": dcfg.get("text_column", "text"), "label_column": dcfg.get("label_column", "label"),
            "max_length": dcfg.get("max_length", 64), "columns": dcfg.get("columns"),
            "train_file": dcfg.get("train_file"), "test_file": dcfg.get("test_file")}


def _trainable_params(model: nn.Module) -> int:
    """Parameters that train; for PEFT AdaLoRA those of the ranks its allocator kept."""
    if hasattr(model, "adapted_trainable_params"):
        return model.adapted_trainable_params()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _freeze_for_adapters(model: nn.Module, trainable) -> None:
    """Adapter training: only the adapters' factors and the parameters matching ``trainable``
    (default: a classification head, ``*classifier*``/``*head*``) train; the rest is frozen."""
    import fnmatch

    patterns = list(trainable) if trainable is not None else ["*classifier*", "*head*"]
    factor_ids = {id(p) for m in model.modules() if isinstance(m, FACTORIZED) and getattr(m, "adapter", False)
                  for p in m.factor_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in factor_ids or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))


def _canonical(arch: dict) -> str:
    args = {k: v for k, v in arch.get("args", {}).items() if k != "config"}  # hf: the recorded config.json
    return json.dumps({"name": arch.get("name"), "args": args}, sort_keys=True)


def _show_arch(arch: dict) -> str:
    return f"{arch.get('name')} {json.dumps(arch.get('args', {}), sort_keys=True)}"


def matched_lora_ranks(reference: str | Path, model: nn.Module) -> dict[str, int]:
    """Per-layer LoRA ranks whose parameters match those of a finished low-rank run
    (``r(n+m) + r²`` for ``U S Vᵀ`` against ``r'(n+m)`` for ``A Bᵀ``), as the paper matches
    its LoRA baseline. ``reference`` is a run directory or its ``model.safetensors``."""
    path = Path(reference)
    path = path / "model.safetensors" if path.is_dir() else path
    meta = read_metadata(path)
    ranks = {}
    for name, spec in meta["layers"].items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} is not in this model; match against a run of the same "
                             "architecture") from None
        n, m = weight.shape[0], weight[0].numel()
        if isinstance(spec["rank"], list):  # Tucker: r_out·out + r_in·in + r_out·r_in·kh·kw
            (r_out, r_in), k = spec["rank"], weight[0, 0].numel()
            params = r_out * n + r_in * weight.shape[1] + r_out * r_in * k
        else:
            params = spec["rank"] * (n + m) + spec["rank"] ** 2
        ranks[name] = max(1, min(round(params / (n + m)), n, m))
    if not ranks:
        raise ValueError(f"{path} has no factorized layer to match")
    return ranks


def _schedule(cfg: dict, steps_per_epoch: int):
    total = cfg["train"]["epochs"] * steps_per_epoch
    warmup = int(cfg["train"]["warmup_epochs"] * steps_per_epoch)
    cosine = cfg["train"]["schedule"] == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Interrupts:
    """Turns SIGINT/SIGTERM into a flag checked between batches."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: dict, run_dir: str | Path, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, changes: dict | None = None) -> RunResult:
    """Run (or resume) the configured training in ``run_dir``; ``max_steps`` stops early
    with a saved state, as an interrupt would (for tests). ``changes`` (resume only):
    ``{"train.epochs": 20, …}``, keys of :data:`RESUMABLE_CHANGES`. Under torchrun, every
    process runs this; rank 0 alone writes files. A preset's ``methods`` settings for the
    configured method are applied here (:func:`lrc.presets.for_method`)."""
    if not resume and ("methods" in cfg or "_user_keys" in cfg):
        from .presets import for_method

        cfg = for_method(cfg, cfg["optimizer"]["method"])
    run_dir = Path(run_dir)
    state_path = run_dir / "state.pt"
    created = not run_dir.exists()
    lock = _lock_run_dir(run_dir, create=not resume) if _is_main_process() else None
    try:
        if resume:
            saved = load_state(state_path)
            cfg = _resumed_config(run_dir, saved, changes or {})
        else:
            _check_fresh(run_dir)
        return _train_in_group(cfg, run_dir, state_path, saved if resume else None, progress, max_steps)
    finally:
        if lock is not None:
            os.close(lock)
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):  # failed before writing anything
            run_dir.rmdir()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _lock_run_dir(run_dir: Path, create: bool) -> int | None:
    """Hold an exclusive lock on the run directory for the life of the run, so that a second
    ``lrc train`` into the same directory stops with a clear line instead of overwriting it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file; a run needs a directory: choose another --out")
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way above it, no permission, a full disk
            raise ValueError(f"cannot create the run directory {run_dir} ({e.strerror or e}); "
                             "choose another --out") from None
    elif not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory to resume")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"{run_dir} is in use by another lrc run; wait for it or choose another --out") from None
    return fd


def _check_fresh(run_dir: Path) -> None:
    """A new run never overwrites a run's state or a finished model."""
    if (run_dir / "state.pt").exists():
        raise ValueError(f"{run_dir} already holds a run; resume it with --resume or choose another --out")
    if (run_dir / "model.safetensors").exists():
        raise ValueError(f"{run_dir} already holds a model (model.safetensors); choose another --out or remove it")


# what ``--resume`` may change: where and how long the run goes on and its learning rate (after a
# non-finite loss), never what it trains
RESUMABLE_CHANGES = ("train.epochs", "train.device", "data.data_dir", "data.workers", "optimizer.lr")


def _resumed_config(run_dir: Path, saved: dict, changes: dict) -> dict:
    """The run's ``config.yaml``, checked against the schema (it may have been edited) and
    against its state, with ``changes`` (keys of :data:`RESUMABLE_CHANGES`) applied and saved."""
    from .presets import PresetError, apply_override, resolve_config

    path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the run cannot be resumed without its configuration") from None
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not valid YAML ({problem}); fix it or start a new run") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping of sections; fix it or start a new run")
    label = raw.pop("_preset", None)
    cfg = resolve_config(raw, source=str(path))
    for key, value in changes.items():
        if key not in RESUMABLE_CHANGES:
            raise PresetError(f"{key} cannot change when a run is resumed (only "
                              f"{', '.join(RESUMABLE_CHANGES)}); start a new run with --out")
        cfg = apply_override(cfg, f"{key}={json.dumps(value)}")
    done = int(saved.get("epoch", 0)) if isinstance(saved, dict) else 0
    if cfg["train"]["epochs"] < done:
        raise PresetError(f"{run_dir} has trained {done} epochs already; train.epochs = {cfg['train']['epochs']} "
                          f"must be ≥ {done}")
    cfg["_preset"] = label
    if changes and _is_main_process():
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _train_in_group(cfg, run_dir, state_path, saved, progress, max_steps) -> RunResult:
    tcfg = cfg["train"]
    rank, world, device, initialised = setup_distributed(tcfg["device"])
    try:
        result = _train(cfg, run_dir, state_path, saved, rank, world, device, progress and rank == 0, max_steps)
        if initialised:
            # Gloo aborts a process whose peer tears its connection down first ("terminate called
            # without an active exception"): leave together.
            dist.barrier()
        return result
    finally:
        if initialised:
            dist.destroy_process_group()


def _train(cfg, run_dir, state_path, saved, rank, world, device, progress, max_steps) -> RunResult:
    tcfg, main = cfg["train"], rank == 0
    batch_size = cfg["data"]["batch_size"]
    if batch_size % world:
        raise ValueError(f"data.batch_size = {batch_size} (the global batch) must be divisible by the "
                         f"{world} processes")
    torch.manual_seed(tcfg["seed"])
    random.seed(tcfg["seed"])
    np.random.seed(tcfg["seed"])

    dcfg = cfg["data"]
    data = build_data(dcfg["name"], dcfg["data_dir"], tcfg["seed"], dcfg["image_size"], dcfg.get("channels"),
                      dcfg.get("train_samples"), text=text_options(cfg), test_samples=dcfg.get("test_samples"))
    metric = dcfg.get("metric", "accuracy")
    if metric == "f1" and data.num_classes != 2:
        raise ValueError(f"data.metric f1 is the F1 score of class 1 of two classes; this data set has "
                         f"{data.num_classes}: use accuracy or mcc")
    steps = tcfg["epochs"] * math.ceil(len(data.train) / batch_size)
    model, opt, arch, report, teacher = build_run(
        cfg, device, steps, calibration_batches(data.train, cfg["factorize"].get("calibration", 0)))
    check_model_takes(model, data.test, data.num_classes, dcfg["name"], device,  # before any file of the run
                      "set the model's arguments to this data (model.args: e.g. in_features, num_classes or "
                      "num_labels), or use a preset made for it")
    broadcast_([t.data for t in list(model.parameters()) + list(model.buffers())])  # same start everywhere
    own_averaging = isinstance(opt, LowRankOptimizer)  # else: average here for AdamW
    sampler = GlobalBatchSampler(len(data.train), tcfg["seed"], batch_size, rank, world)
    train_loader = DataLoader(data.train, batch_sampler=sampler, num_workers=cfg["data"]["workers"])
    _, test_loader = data.loaders(batch_size, tcfg["seed"], cfg["data"]["eval_batch_size"], cfg["data"]["workers"])
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps_per_epoch))

    epoch, batch_done, step = 0, 0, 0
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            _set_base_lr(opt, sched, cfg["optimizer"]["lr"])
            _set_rng_state(saved["rng"])
            epoch, batch_done, step = int(saved["epoch"]), int(saved["batch"]), int(saved["step"])
            epoch_sums = saved["epoch_sums"].tolist()
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{state_path} does not match {run_dir / 'config.yaml'} ({problem[:200]}); "
                                  "restore the run's own files or start a new run") from None
    else:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
            for name in ("metrics.jsonl", "metrics.csv"):
                (run_dir / name).unlink(missing_ok=True)
        epoch_sums = [0.0, 0.0, 0.0]  # loss·n, correct, n (global)

    def snapshot(epoch_, batch_, step_, sums, own: bool = False) -> dict:
        """The training state; ``own``: copies on the CPU, so that later steps cannot change it
        (the last good state kept for a non-finite loss)."""
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": _rng_state(), "epoch": epoch_, "batch": batch_, "step": step_,
                 "epoch_sums": torch.tensor(sums, dtype=torch.float64), "world": world}
        if budget_warmup:
            state["budget_range"] = [int(v) for v in budget_range]
        return _owned_copy(state) if own else state

    def stop(state: dict, message: str, code: int):
        if main:
            save_state(state_path, state)
        raise TrainingStopped(message, code)

    use_bf16 = tcfg["bf16"] and device.type == "cuda"
    tau_warmup = round(tcfg.get("tau_warmup_epochs", 0.0) * steps_per_epoch) if isinstance(opt, LowRankOptimizer) else 0
    budget_warmup = (round(tcfg.get("budget_warmup_epochs", 0.0) * steps_per_epoch)
                     if isinstance(opt, LowRankOptimizer) and opt.budget is not None else 0)
    if budget_warmup:  # from the size the model starts with (at step 0 of the run, also on resume)
        budget_range = (saved or {}).get("budget_range") or (
            sum(p.numel() for layer in opt.layers for p in layer.factor_parameters()), opt.budget)
    taus = [cfg["optimizer"]["tau"]] * len(opt.param_groups)  # not the groups' (a resumed warm-up lowered them)
    last, comm_bytes = {}, 0
    with _Interrupts() as interrupts:
        while epoch < tcfg["epochs"]:
            model.train()
            sampler.set_position(epoch, batch_done)
            started = time.perf_counter()
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{tcfg['epochs']}", disable=not progress,
                       leave=False, initial=batch_done, total=steps_per_epoch)
            good = snapshot(epoch, batch_done, step, epoch_sums, own=main)  # the last good state
            for x, y in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                share = y.numel() * world / sampler.global_size(batch_done)  # local mean → global mean
                opt.zero_grad()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    if teacher is not None:
                        with torch.no_grad():
                            soft = teacher(x)
                        loss = distillation_loss(out, soft, loss, tcfg["distill"], tcfg["distill_temperature"])
                    extra = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
                    if extra is not None:  # PEFT AdaLoRA's orthogonal regulariser
                        loss = loss + extra
                # one read from the device per step: loss·n, correct, n, interrupt, non-finite (summed over processes)
                local_loss = loss.detach().double()
                stats = torch.stack([local_loss * y.numel(), (out.argmax(1) == y).sum().double(),
                                     local_loss.new_tensor(float(y.numel())),
                                     local_loss.new_tensor(float(interrupts.signal is not None)),
                                     (~torch.isfinite(local_loss)).double()])
                if world > 1:
                    dist.all_reduce(stats)
                loss_sum, correct, n, interrupted, nonfinite = stats.tolist()
                if nonfinite:
                    value = local_loss.item() if not math.isfinite(local_loss.item()) else "non-finite on another process"
                    stop(good, f"loss became {value} at epoch {epoch + 1}, batch {batch_done + 1}; stopped. The "
                               f"last good state is in {state_path}: go on from it with a lower learning rate, "
                               f"lrc train --resume {run_dir} --lr LR (or start anew with --set "
                               "train.grad_clip=1.0)", 1)
                (loss * share).backward()
                if step < tau_warmup:  # the last warm-up step sets τ and lets ranks grow again
                    _tau_warmup(opt, taus, step, tau_warmup)
                if budget_warmup:
                    opt.budget = _warm_budget(*budget_range, step, budget_warmup)
                if tcfg["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
                if not own_averaging:
                    comm_bytes = all_reduce_mean_([p.grad for p in model.parameters() if p.grad is not None])
                opt.step()
                if hasattr(model, "after_step"):  # PEFT AdaLoRA's rank allocator
                    model.after_step(step)
                if own_averaging:
                    comm_bytes = opt.bytes_communicated
                sched.step()
                step += 1
                batch_done += 1
                epoch_sums = [epoch_sums[0] + loss_sum, epoch_sums[1] + correct, epoch_sums[2] + n]
                if progress and batch_done % 10 == 0:
                    bar.set_postfix(loss=f"{epoch_sums[0] / epoch_sums[2]:.3f}",
                                    acc=f"{epoch_sums[1] / epoch_sums[2]:.3f}",
                                    rank=f"{_mean_rank(model):.1f}", cr=f"{compression_ratio(model):.1f}%")
                if interrupted or (max_steps is not None and step >= max_steps):
                    bar.close()
                    why = "interrupted" if interrupted else f"stopped after {step} steps"
                    code = 128 + (interrupts.signal or signal.SIGINT) if interrupted else 0
                    stop(snapshot(epoch, batch_done, step, epoch_sums),
                         f"{why}; the state is saved: lrc train --resume {run_dir}", code)
            bar.close()
            if isinstance(opt, LowRankOptimizer):
                opt.finish_cycle()  # update_every > 1: the epoch's model at its truncated ranks
                opt.compact()  # capacity: the layers at their active ranks (their real size) to evaluate and save
            ev = evaluate(model, test_loader, device, bf16=use_bf16)
            last = {"epoch": epoch + 1, "train_loss": epoch_sums[0] / max(epoch_sums[2], 1),
                    "train_accuracy": epoch_sums[1] / max(epoch_sums[2], 1), "test_loss": ev["loss"],
                    "test_accuracy": ev["top1"], "compression_ratio": compression_ratio(model),
                    "params": ev["params"], "lr": opt.param_groups[0]["lr"],
                    "trainable_params": _trainable_params(model),
                    "time_s": time.perf_counter() - started, "optimizer_state_bytes": _state_bytes(opt),
                    "processes": world, "comm_bytes_per_step": comm_bytes, "ranks": layer_ranks(model)}
            if "top5" in ev:
                last["test_top5"] = ev["top5"]
            if metric != "accuracy":  # the data set's own measure (GLUE: CoLA's Matthews correlation, QQP's F1)
                last[f"test_{metric}"] = ev[metric]
            if isinstance(opt, LowRankOptimizer):
                names = {module: name for name, module in model.named_modules()}
                last["layers"] = {names[layer]: values for layer, values in opt.pop_diagnostics().items()}
            epoch, batch_done, epoch_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
            if main:
                _append_metrics(run_dir, last)
                save_state(state_path, snapshot(epoch, 0, step, epoch_sums))
            if progress:
                extra = f", test {metric} {last[f'test_{metric}']:.4f}" if metric != "accuracy" else ""
                tqdm.write(f"epoch {epoch}: train loss {last['train_loss']:.4f}, test accuracy "
                           f"{100 * last['test_accuracy']:.2f}%{extra}, c.r. {last['compression_ratio']:.1f}%")

    if not last:  # resumed a finished run
        ev = evaluate(model, test_loader, device, bf16=use_bf16)
        last = {"test_accuracy": ev["top1"], "test_loss": ev["loss"], "compression_ratio": compression_ratio(model),
                "ranks": layer_ranks(model)}
        if metric != "accuracy":
            last[f"test_{metric}"] = ev[metric]
    model_path = run_dir / "model.safetensors"
    summary = {k: last[k] for k in ("test_accuracy", "test_loss", "compression_ratio", f"test_{metric}") if k in last}
    summary.update(preset=cfg.get("_preset"), data=cfg["data"]["name"], epochs=tcfg["epochs"],
                   method=cfg["optimizer"]["method"])
    for key in ("image_size", "channels"):
        if cfg["data"].get(key) is not None:
            summary[key] = cfg["data"][key]
    summary["input_shape"] = list(next(iter(test_loader))[0].shape[1:])  # for latency and ONNX export
    text = text_options(cfg)
    if text:
        summary["text"] = text
        summary["data_dir"] = cfg["data"]["data_dir"]
    if cfg["data"].get("test_samples"):
        summary["test_samples"] = cfg["data"]["test_samples"]
    if hasattr(model, "merge_peft"):  # PEFT adapters merged: the file holds a plain model
        model.merge_peft()
    if main:
        save_model(model_path, model, arch, summary)
    return RunResult(run_dir, model_path, last)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, task_loss: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    """``(1 − weight)·task_loss + weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, the KL
    averaged over the batch (Hinton et al. 2015; the T² keeps the soft term's gradient on the scale
    of the task loss's as T changes)."""
    t = temperature
    wide = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: the softmaxes in float32
    soft = F.kl_div(F.log_softmax(student.to(wide) / t, dim=1), F.log_softmax(teacher.to(wide) / t, dim=1),
                    log_target=True, reduction="batchmean")
    return (1.0 - weight) * task_loss + weight * t * t * soft


def _warm_budget(start: int, final: int, step: int, steps: int) -> int:
    """AdaLoRA's cubic schedule: the budget moves from ``start`` to ``final`` over ``steps``,
    fast at first, and stays at ``final`` after."""
    frac = min(1.0, (step + 1) / steps)
    return round(final + (start - final) * (1.0 - frac) ** 3)


def _tau_warmup(opt: LowRankOptimizer, taus: list[float], step: int, steps: int) -> None:
    """Truncation warm-up: over the first ``steps`` steps τ rises linearly from 0 to its value
    and ranks may only shrink, so that a pretrained network loses its small singular values
    gradually instead of all at the first step."""
    frac = min(1.0, (step + 1) / steps)
    for group, tau in zip(opt.param_groups, taus):
        group["tau"], group["grow"] = tau * frac, frac >= 1.0


def _set_base_lr(opt: torch.optim.Optimizer, sched, lr: float) -> None:
    """A resumed run's learning rate is its configuration's (``--resume --lr`` may lower it after a
    non-finite loss); the schedule's factor at the current step stays."""
    if all(base == lr for base in sched.base_lrs):
        return  # unchanged: leave the restored values bit for bit
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)


def _owned_copy(obj):
    """``obj`` with every tensor copied to the CPU (containers rebuilt, everything else shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _owned_copy(v)) for k, v in obj.items())  # keeps OrderedDict
    if isinstance(obj, (list, tuple)):
        return type(obj)(_owned_copy(v) for v in obj)
    return obj


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _mean_rank(model: nn.Module) -> float:
    ranks = [r for m in model.modules() if isinstance(m, FACTORIZED)  # a Tucker layer: both modes
             for r in (m.rank if isinstance(m.rank, list) else [m.active_rank])]
    return sum(ranks) / len(ranks) if ranks else 0.0


def _append_metrics(run_dir: Path, row: dict) -> None:
    """Record the row of an epoch, replacing any row of that epoch or later (left by a run that
    stopped between this write and its state's, then resumed): one row per epoch, always.
    Both files are rewritten atomically."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                old = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(old, dict) and isinstance(old.get("epoch"), int) and old["epoch"] < row["epoch"]:
                rows.append(old)
    rows.append(row)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flats = []
    for r in rows:
        flat = {k: v for k, v in r.items() if k not in ("ranks", "layers")}
        flat["ranks"] = " ".join(f"{k}:{v}" for k, v in r.get("ranks", {}).items())
        flats.append(flat)
    fields = list(dict.fromkeys(k for flat in flats for k in flat))
    with atomic_path(run_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(flats)
