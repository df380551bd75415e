"""``lrc compare``: several methods × seeds on one preset, with a table in the form of the
paper's Table 1 and plots in the form of its Figure 2.

    OUT/runs/<method>-s<seed>/   one ordinary run directory each (resumable)
    OUT/results.md, results.csv  accuracy mean ± std over seeds, c.r., time per epoch,
                                 optimizer-state memory, per method
    OUT/curves.png, ranks.png    (with matplotlib) loss/accuracy against epochs, median over
                                 seeds; per-layer ranks against epochs for low-rank methods

Finished runs are not run again; interrupted ones are resumed; ``jobs`` trains several at
once. ``lora`` is matched to the parameter count of the same seed's ``lowrank-adam`` run, as
in the paper.
"""

from __future__ import annotations

import copy
import csv
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .presets import METHODS, PresetError
from .train import train

__all__ = ["compare"]

LOW_RANK = ("lowrank-adam", "lowrank-sgd", "dlrt-naive")


def compare(cfg: dict, methods: list[str], seeds: list[int], out_dir: str | Path, progress: bool = True,
            log=print, jobs: int = 1) -> list[dict]:
    """Run every (method, seed) of ``cfg`` into ``out_dir`` and write the tables and plots.

    ``jobs > 1`` trains that many runs at once in worker processes of one thread each (on a
    CPU with that many cores, or sharing one GPU); the results are the same as with one.
    """
    out_dir = Path(out_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PresetError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "lora" in methods and "lowrank-adam" not in methods:
        raise PresetError("lora is matched to the c.r. of lowrank-adam: include lowrank-adam in --methods")
    if jobs < 1:
        raise PresetError(f"--jobs must be ≥ 1, got {jobs}")
    # lowrank-adam before lora, whose ranks it fixes: two waves
    waves = [[(m, s) for s in seeds for m in methods if m != "lora"],
             [("lora", s) for s in seeds if "lora" in methods]]
    for wave in waves:
        todo = []
        for method, seed in wave:
            run_dir = out_dir / "runs" / f"{method}-s{seed}"
            if (run_dir / "model.safetensors").exists():
                log(f"{method} seed {seed}: done already")
                continue
            log(f"{method} seed {seed}: {'resuming' if (run_dir / 'state.pt').exists() else 'training'}")
            todo.append((_run_config(cfg, method, seed, out_dir), run_dir))
        if jobs == 1 or len(todo) <= 1:
            for run_cfg, run_dir in todo:
                _run(run_cfg, run_dir, progress)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_one_thread) as pool:
                for future in [pool.submit(_run, run_cfg, run_dir, False) for run_cfg, run_dir in todo]:
                    future.result()
    rows = summarize(out_dir, methods, seeds)
    write_tables(out_dir, rows)
    plotted = plot(out_dir, methods, seeds)
    if not plotted:
        log("plots skipped: matplotlib is not installed (pip install 'lrc[plots]')")
    return rows


def _run_config(cfg: dict, method: str, seed: int, out_dir: Path) -> dict:
    run_cfg = copy.deepcopy(cfg)
    run_cfg["optimizer"]["method"] = method
    run_cfg["train"]["seed"] = seed
    if method == "lora":
        run_cfg["factorize"]["match_cr"] = str(out_dir / "runs" / f"lowrank-adam-s{seed}")
    return run_cfg


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


def summarize(out_dir: Path, methods: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for method in methods:
        finals = [_history(out_dir / "runs" / f"{method}-s{s}") for s in seeds]
        last = [h[-1] for h in finals]
        acc = [100 * r["test_accuracy"] for r in last]
        rows.append({
            "method": method,
            "seeds": len(seeds),
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "compression_ratio": statistics.fmean(r["compression_ratio"] for r in last),
            "params": round(statistics.fmean(r["params"] for r in last)),
            "time_per_epoch_s": statistics.fmean(e["time_s"] for h in finals for e in h),
            "optimizer_state_bytes": round(statistics.fmean(r.get("optimizer_state_bytes", 0) for r in last)),
        })
    return rows


def write_tables(out_dir: Path, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| method | test accuracy [%] | c.r. [%] | parameters | time / epoch [s] | optimizer state [KiB] |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                     f"{r['compression_ratio']:.1f} | {r['params']:,} | {r['time_per_epoch_s']:.2f} | "
                     f"{r['optimizer_state_bytes'] / 1024:.1f} |")
    lines.append(f"\nMean ± standard deviation over {rows[0]['seeds']} seed(s).")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def plot(out_dir: Path, methods: list[str], seeds: list[int]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        histories = [_history(out_dir / "runs" / f"{method}-s{s}") for s in seeds]
        epochs = [e["epoch"] for e in histories[0]]
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_accuracy", 100.0)):
            median = [statistics.median(scale * h[i][key] for h in histories) for i in range(len(epochs))]
            ax.plot(epochs, median, label=method)
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
            history = _history(out_dir / "runs" / f"{method}-s{seeds[0]}")
            for layer, first in history[0]["ranks"].items():
                modes = range(len(first)) if isinstance(first, list) else [None]  # Tucker: one line per mode
                for mode in modes:
                    ax.plot([e["epoch"] for e in history],
                            [e["ranks"][layer] if mode is None else e["ranks"][layer][mode] for e in history],
                            label=f"{method} {layer}" + ("" if mode is None else f" ({('out', 'in')[mode]})"))
        ax.set(xlabel="epoch", ylabel="rank", title=f"per-layer rank (seed {seeds[0]})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / "ranks.png", dpi=120)
        plt.close(fig)
    return True
