"""``lrc compare``: several methods × seeds (× learning rates) on one preset, with a table in
the form of the paper's Table 1 and plots in the form of its Figure 2.

    OUT/runs/<method>-s<seed>/       one ordinary run directory each (resumable)
    OUT/runs/<method>-lr<lr>-s<seed>/  the same with a learning-rate grid (``lrs``), e.g.
                                     lowrank-adam-lr3e-3-s0
    OUT/results.md, results.csv      accuracy mean ± std over seeds, c.r., time per epoch,
                                     optimizer-state memory, per method (and learning rate;
                                     with a grid also the best learning rate of each method)
    OUT/curves.png, ranks.png        (with matplotlib) loss/accuracy against epochs, median over
                                     seeds; per-layer ranks against epochs for low-rank methods
                                     (with a grid: each method at its best learning rate)

Finished runs are not run again and interrupted ones are resumed, provided their saved
configuration is the one that would be run now (else a ``ValueError`` names the run);
``jobs`` trains several at once. ``lora`` is matched to the parameter count of the
``lowrank-adam`` run of the same seed and learning rate, as in the paper. ``from_dense``
starts every method from one dense model.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from .io import CheckpointError, is_lrc_file, read_checkpoint, read_metadata
from .presets import METHODS, PresetError
from .train import train

__all__ = ["compare", "dense_checkpoint", "lr_name", "run_name"]

LOW_RANK = ("lowrank-adam", "lowrank-sgd", "dlrt-naive")

# configuration keys a finished run may differ in from the one compare would run now: the
# preset's name (a label) and lora's reference run (fixed by the layout of OUT, wherever it lies)
_PER_RUN_KEYS = ("_preset", "factorize.match_cr")
_UNSET = object()


def compare(cfg: dict, methods: list[str], seeds: list[int], out_dir: str | Path, progress: bool = True,
            log=print, jobs: int = 1, lrs: list[float] | None = None,
            from_dense: str | Path | None = None) -> list[dict]:
    """Run every (method, seed) of ``cfg`` — every (method, seed, lr) with a learning-rate
    grid ``lrs`` — into ``out_dir`` and write the tables and plots.

    ``jobs > 1`` trains that many runs at once in worker processes of one thread each (on a
    CPU with that many cores, or sharing one GPU); the results are the same as with one.
    ``from_dense`` (a run directory of ``lrc train --method dense`` or a dense checkpoint
    file) becomes every run's ``model.checkpoint``. A run already in ``out_dir`` whose saved
    configuration differs from the one asked for now is a ``ValueError``, before anything runs.
    """
    out_dir = Path(out_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PresetError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "lora" in methods and "lowrank-adam" not in methods:
        raise PresetError("lora is matched to the c.r. of lowrank-adam: include lowrank-adam in --methods")
    if jobs < 1:
        raise PresetError(f"--jobs must be ≥ 1, got {jobs}")
    if lrs is not None:
        _check_lrs(lrs)
    if from_dense is not None:
        cfg = copy.deepcopy(cfg)
        cfg["model"]["checkpoint"] = dense_checkpoint(from_dense)
        cfg["model"]["new_head"] = False  # the dense model's head is already the trained one
    grid = [None] if lrs is None else list(lrs)
    # lowrank-adam before lora, whose ranks it fixes: two waves
    waves = [[(m, s, lr) for lr in grid for s in seeds for m in methods if m != "lora"],
             [("lora", s, lr) for lr in grid for s in seeds if "lora" in methods]]
    planned = [[(method, seed, lr, _run_config(cfg, method, seed, out_dir, lr),
                 out_dir / "runs" / run_name(method, seed, lr)) for method, seed, lr in wave] for wave in waves]
    for wave in planned:  # every run already there must be the one asked for, before anything trains
        for *_, run_cfg, run_dir in wave:
            check_same_config(run_cfg, run_dir)
    for wave in planned:
        todo = []
        for method, seed, lr, run_cfg, run_dir in wave:
            label = f"{method}{'' if lr is None else f' lr {lr_name(lr)}'} seed {seed}"
            if (run_dir / "model.safetensors").exists():
                log(f"{label}: done already")
                continue
            log(f"{label}: {'resuming' if (run_dir / 'state.pt').exists() else 'training'}")
            todo.append((run_cfg, run_dir))
        _train_all(todo, jobs, progress)
    rows = summarize(out_dir, methods, seeds, lrs)
    write_tables(out_dir, rows)
    best = None
    if lrs is not None:
        by_name = {lr_name(lr): lr for lr in lrs}
        best = {method: by_name[row["lr"]] for method, row in best_of_grid(rows).items()}
    plotted = plot(out_dir, methods, seeds, best)
    if not plotted:
        log("plots skipped: matplotlib is not installed (pip install 'lrc[plots]')")
    return rows


def lr_name(lr: float) -> str:
    """A learning rate as run names and tables show it: 0.003 → ``3e-3``, 0.01 → ``1e-2``,
    2.5e-4 → ``2.5e-4`` (at most 7 significant digits)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(method: str, seed: int, lr: float | None = None) -> str:
    """``<method>-s<seed>``, or ``<method>-lr<lr>-s<seed>`` for a run of a learning-rate grid."""
    return f"{method}-s{seed}" if lr is None else f"{method}-lr{lr_name(lr)}-s{seed}"


def _check_lrs(lrs: list[float]) -> None:
    if not lrs:
        raise PresetError("--lrs needs at least one learning rate, e.g. --lrs 1e-3,3e-3,1e-2")
    seen = set()
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise PresetError(f"--lrs: learning rate {lr!r} must be a number ≥ 0")
        if lr_name(lr) in seen:
            raise PresetError(f"--lrs: learning rate {lr_name(lr)} is given twice")
        seen.add(lr_name(lr))


def dense_checkpoint(source: str | Path) -> str:
    """The dense model behind ``--from-dense``: a run directory of ``lrc train --method dense``
    (its ``model.safetensors``) or a checkpoint file (``.pt``/``.pth``/``.safetensors`` of a
    plain state dict, or an lrc file without factorized layers). Checked to be readable and
    dense; returned as an absolute path, so every run records where it started from."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise ValueError(f"--from-dense {source}: no model.safetensors there; give a finished "
                             "`lrc train --method dense` run directory or a checkpoint file")
    elif not path.is_file():
        raise ValueError(f"--from-dense {source}: no such file or directory")
    try:
        if is_lrc_file(path):
            if read_metadata(path)["layers"]:
                raise ValueError(f"--from-dense {source}: {path} is a factorized model; give a dense run "
                                 "(`lrc train --method dense`) or a dense checkpoint")
        else:
            read_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(f"--from-dense: {e}") from None
    return str(path.resolve())


def check_same_config(run_cfg: dict, run_dir: Path) -> None:
    """A run already in ``run_dir`` (finished, or interrupted with a state to resume) must have
    been made with ``run_cfg``, up to the keys of :data:`_PER_RUN_KEYS`; else a ``ValueError``
    that names the run and the first differing key."""
    if not ((run_dir / "model.safetensors").exists() or (run_dir / "state.pt").exists()):
        return
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{run_dir} holds a run without a readable config.yaml; use another --out or delete it")
    wanted = yaml.safe_load(yaml.safe_dump(run_cfg))  # the types config.yaml would hold
    old, new = _flatten(saved), _flatten(wanted)
    keys = list(new) + [k for k in old if k not in new]
    diffs = [k for k in keys if k not in _PER_RUN_KEYS and old.get(k, _UNSET) != new.get(k, _UNSET)]
    if diffs:
        key = diffs[0]
        was = (f"was run without {key} (an older lrc)" if key not in old
               else f"was run with {key} = {_show(old[key])}")
        more = f" (and {len(diffs) - 1} more setting(s))" if len(diffs) > 1 else ""
        raise ValueError(f"{run_dir} {was}, this compare asks for {key} = {_show(new.get(key, _UNSET))}{more}: "
                         "use another --out or delete that run")


def _show(value) -> str:
    return "(unset)" if value is _UNSET else json.dumps(value)


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run_config(cfg: dict, method: str, seed: int, out_dir: Path, lr: float | None = None) -> dict:
    run_cfg = copy.deepcopy(cfg)
    run_cfg["optimizer"]["method"] = method
    run_cfg["train"]["seed"] = seed
    if lr is not None:
        run_cfg["optimizer"]["lr"] = float(lr)
    if method == "lora":
        run_cfg["factorize"]["match_cr"] = str(out_dir / "runs" / run_name("lowrank-adam", seed, lr))
    return run_cfg


def _train_all(todo: list[tuple[dict, Path]], jobs: int, progress: bool) -> None:
    if jobs == 1 or len(todo) <= 1:
        for run_cfg, run_dir in todo:
            _run(run_cfg, run_dir, progress)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_one_thread) as pool:
        for future in [pool.submit(_run, run_cfg, run_dir, False) for run_cfg, run_dir in todo]:
            future.result()


def _run(run_cfg: dict, run_dir: Path, progress: bool) -> None:
    """One run; an interrupted one (``state.pt`` left) is resumed with its own saved config."""
    if (run_dir / "state.pt").exists():
        train({}, run_dir, resume=True, progress=progress)
    else:
        train(run_cfg, run_dir, progress=progress)


def _one_thread() -> None:
    # several torch processes with one OpenMP pool each on the same cores slow each other ~100×
    torch.set_num_threads(1)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(out_dir: Path, methods: list[str], seeds: list[int], lrs: list[float] | None = None) -> list[dict]:
    """One row per method — per (method, lr) with a grid, then with an ``lr`` column — over
    the seeds' final epochs."""
    rows = []
    for method in methods:
        for lr in [None] if lrs is None else lrs:
            finals = [_history(out_dir / "runs" / run_name(method, s, lr)) for s in seeds]
            last = [h[-1] for h in finals]
            acc = [100 * r["test_accuracy"] for r in last]
            row = {"method": method} if lr is None else {"method": method, "lr": lr_name(lr)}
            row.update({
                "seeds": len(seeds),
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "compression_ratio": statistics.fmean(r["compression_ratio"] for r in last),
                "params": round(statistics.fmean(r["params"] for r in last)),
                "time_per_epoch_s": statistics.fmean(e["time_s"] for h in finals for e in h),
                "optimizer_state_bytes": round(statistics.fmean(r.get("optimizer_state_bytes", 0) for r in last)),
            })
            rows.append(row)
    return rows


def best_of_grid(rows: list[dict]) -> dict[str, dict]:
    """Per method, its row with the highest mean accuracy (the first learning rate on a tie)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or r["accuracy_mean"] > best[r["method"]]["accuracy_mean"]:
            best[r["method"]] = r
    return best


def write_tables(out_dir: Path, rows: list[dict]) -> None:
    """``results.csv`` (the rows) and ``results.md``: one table per method, or with a
    learning-rate grid a method × lr table and the best of the grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = _grid_table(rows) if "lr" in rows[0] else _method_table(rows)
    lines.append(f"\nMean ± standard deviation over {rows[0]['seeds']} seed(s).")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def _method_table(rows: list[dict], with_lr: bool = False) -> list[str]:
    lines = [f"| method |{' lr |' if with_lr else ''} test accuracy [%] | c.r. [%] | parameters | time / epoch [s] | "
             "optimizer state [KiB] |",
             f"| --- |{' ---: |' if with_lr else ''} ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lr = f" {r['lr']} |" if with_lr else ""
        lines.append(f"| {r['method']} |{lr} {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                     f"{r['compression_ratio']:.1f} | {r['params']:,} | {r['time_per_epoch_s']:.2f} | "
                     f"{r['optimizer_state_bytes'] / 1024:.1f} |")
    return lines


def _grid_table(rows: list[dict]) -> list[str]:
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        cells.setdefault(r["method"], {})[r["lr"]] = grid_cell(r)
    lines = ["Test accuracy [%] (c.r.) per learning rate:", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "| --- |" + " ---: |" * len(lrs)]
    lines += [f"| {method} | " + " | ".join(by_lr.get(lr, "") for lr in lrs) + " |" for method, by_lr in cells.items()]
    lines += ["", "Best of grid (the learning rate with the highest mean test accuracy, per method):", ""]
    return lines + _method_table(list(best_of_grid(rows).values()), with_lr=True)


def grid_cell(row: dict) -> str:
    """A cell of the per-learning-rate table: ``mean ± std (c.r. %)``."""
    return f"{row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} ({row['compression_ratio']:.1f} %)"


def plot(out_dir: Path, methods: list[str], seeds: list[int], lrs: dict[str, float] | None = None) -> bool:
    """``curves.png`` and ``ranks.png``; ``lrs`` (method → learning rate) picks each method's
    runs of a grid. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lrs = lrs or {}

    def label(method: str) -> str:
        return method if method not in lrs else f"{method}, lr {lr_name(lrs[method])}"

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        histories = [_history(out_dir / "runs" / run_name(method, s, lrs.get(method))) for s in seeds]
        epochs = [e["epoch"] for e in histories[0]]
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_accuracy", 100.0)):
            median = [statistics.median(scale * h[i][key] for h in histories) for i in range(len(epochs))]
            ax.plot(epochs, median, label=label(method))
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy [%]")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=120)
    plt.close(fig)
    low = [m for m in methods if m in LOW_RANK]
    if low:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in low:
            history = _history(out_dir / "runs" / run_name(method, seeds[0], lrs.get(method)))
            for layer, first in history[0]["ranks"].items():
                modes = range(len(first)) if isinstance(first, list) else [None]  # Tucker: one line per mode
                for mode in modes:
                    ax.plot([e["epoch"] for e in history],
                            [e["ranks"][layer] if mode is None else e["ranks"][layer][mode] for e in history],
                            label=f"{label(method)} {layer}" + ("" if mode is None else f" ({('out', 'in')[mode]})"))
        ax.set(xlabel="epoch", ylabel="rank", title=f"per-layer rank (seed {seeds[0]})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / "ranks.png", dpi=120)
        plt.close(fig)
        _plot_diagnostics(plt, out_dir, low, seeds[0], lrs, label)
    return True


DIAGNOSTICS = (("step_norm", "‖ΔW‖_F per step"), ("rotation", "basis rotation per step (RMS sin θ)"),
               ("truncated_energy", "energy truncated per step"))


def _plot_diagnostics(plt, out_dir: Path, methods: list[str], seed: int, lrs: dict, label) -> None:
    """``diagnostics.png``: per epoch, the median over layers of what the optimizer logged
    (step size, basis rotation, truncated energy), for each low-rank method."""
    histories = {m: _history(out_dir / "runs" / run_name(m, seed, lrs.get(m))) for m in methods}
    if not any("layers" in e for h in histories.values() for e in h):
        return  # runs of an lrc that did not log them
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4 * len(DIAGNOSTICS), 3.6))
    for method, history in histories.items():
        rows = [e for e in history if e.get("layers")]
        for ax, (key, title) in zip(axes, DIAGNOSTICS):
            ax.plot([e["epoch"] for e in rows], [statistics.median(v[key] for v in e["layers"].values()) for e in rows],
                    marker="o", label=label(method))
            ax.set(xlabel="epoch", title=title, yscale="log")
    axes[0].set_ylabel(f"median over layers (seed {seed})")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "diagnostics.png", dpi=120)
    plt.close(fig)
