"""``lrc sweep``: one run per truncation tolerance (or target c.r.) and seed, the
accuracy-against-c.r. table and its Pareto plot.

    OUT/runs/tau0.1-s0/ …        (or cr90-s0/ with target c.r.s), each a run directory of lrc train
    OUT/sweep.md, sweep.csv      per value: test accuracy mean ± std over seeds, c.r., parameters
    OUT/pareto.png               accuracy against c.r., the Pareto front drawn (matplotlib)

Runs already finished in ``OUT`` are not run again, and must have been made with the settings
asked for now (as with ``lrc compare``, whose process pool and checks this reuses).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import statistics
from pathlib import Path

from .compare import _history, _Pool, _train_here, check_same_config, dense_checkpoint, runs_to_do
from .presets import PresetError, for_method, with_target_cr

__all__ = ["sweep", "pareto_front", "KNOBS"]

KNOBS = {"tau": "optimizer.tau", "target_cr": "factorize.target_cr"}


def _value_name(knob: str, value: float) -> str:
    return f"tau{value:g}" if knob == "tau" else f"cr{value:g}"


def _run_config(cfg: dict, knob: str, value: float, seed: int) -> dict:
    run_cfg = for_method(cfg, cfg["optimizer"]["method"])  # the preset's methods section, if any
    if knob == "tau":
        run_cfg["optimizer"]["tau"] = float(value)
    else:
        run_cfg = with_target_cr(run_cfg, float(value), f"--target-crs {value:g}")
    run_cfg["train"]["seed"] = seed
    return run_cfg


def check_values(knob: str, values: list[float], seeds: list[int], jobs: int) -> None:
    """A ``PresetError`` (one line) for a sweep that cannot run."""
    flag = "--taus" if knob == "tau" else "--target-crs"
    if knob not in KNOBS:
        raise PresetError(f"sweep over {knob!r}: choose one of {', '.join(KNOBS)}")
    if not values:
        raise PresetError(f"{flag} needs at least one value")
    low, high = (0.0, 1.0) if knob == "tau" else (0.0, 100.0)
    bad = [v for v in values if not low < v < high]
    if bad:
        raise PresetError(f"{flag}: {bad[0]:g} must lie in ({low:g}, {high:g})")
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise PresetError(f"{flag}: {twice[0]:g} is given twice")
    if not seeds or any(s < 0 for s in seeds):
        raise PresetError("--seeds must be ≥ 1")
    if jobs < 1:
        raise PresetError(f"--jobs {jobs}: must be ≥ 1")


def sweep(cfg: dict, knob: str, values: list[float], out_dir: str | Path, seeds: list[int] = (0,),
          jobs: int = 1, progress: bool = True, log=print, from_dense: str | Path | None = None) -> list[dict]:
    """Train ``cfg`` once per value of ``knob`` (``"tau"``: the truncation tolerance in training;
    ``"target_cr"``: a target compression ratio, in place of ``factorize.tau``) and seed into
    ``out_dir``, write ``sweep.md``/``sweep.csv`` and ``pareto.png``; return the rows."""
    out_dir, seeds = Path(out_dir), list(seeds)
    check_values(knob, list(values), seeds, jobs)
    if cfg["optimizer"]["method"] in ("dense", "lora") and knob == "tau":
        raise PresetError(f"--taus: method {cfg['optimizer']['method']} has no truncation; sweep --target-crs")
    if knob == "tau" and cfg["factorize"].get("target_cr") is not None:
        raise PresetError("--taus: the configuration sets factorize.target_cr, which replaces τ; sweep --target-crs")
    if cfg["optimizer"]["method"] == "dense":
        raise PresetError("method dense does not compress: sweep a low-rank method or lora")
    if from_dense is not None:
        cfg = copy.deepcopy(cfg)
        cfg["model"]["checkpoint"] = dense_checkpoint(from_dense)
        cfg["model"]["new_head"] = False
    planned = [(value, seed, _run_config(cfg, knob, value, seed),
                out_dir / "runs" / f"{_value_name(knob, value)}-s{seed}") for value in values for seed in seeds]
    for *_, run_cfg, run_dir in planned:
        check_same_config(run_cfg, run_dir)
    todo = runs_to_do([(f"{KNOBS[knob]} {value:g} seed {seed}", run_cfg, run_dir)
                       for value, seed, run_cfg, run_dir in planned], log)
    with _Pool(jobs, progress) if jobs > 1 else contextlib.nullcontext() as pool:
        if pool is None:
            _train_here(todo, progress)
        else:
            pool.run(todo)
    rows = []
    for value in values:
        last = [_history(out_dir / "runs" / f"{_value_name(knob, value)}-s{s}")[-1] for s in seeds]
        acc = [100 * r["test_accuracy"] for r in last]
        rows.append({knob: value, "seeds": len(seeds), "accuracy_mean": statistics.fmean(acc),
                     "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "compression_ratio": statistics.fmean(r["compression_ratio"] for r in last),
                     "params": round(statistics.fmean(r["params"] for r in last))})
    front = pareto_front([(r["compression_ratio"], r["accuracy_mean"]) for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    _write(out_dir, knob, rows)
    if not _plot(out_dir, knob, rows):
        log("plot skipped: matplotlib is not installed (pip install 'lrc[plots]')")
    return rows


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points ``(c.r., accuracy)`` that no other point beats in both (at least as
    high in each, higher in one)."""
    return {i for i, (cr, acc) in enumerate(points)
            if not any(c >= cr and a >= acc and (c > cr or a > acc) for c, a in points)}


def _write(out_dir: Path, knob: str, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = "τ" if knob == "tau" else "target c.r. [%]"
    lines = [f"| {head} | test accuracy [%] | c.r. [%] | parameters | Pareto |",
             "| ---: | ---: | ---: | ---: | :---: |"]
    for r in rows:
        lines.append(f"| {r[knob]:g} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                     f"{r['compression_ratio']:.1f} | {r['params']:,} | {'✓' if r['pareto'] else ''} |")
    lines.append(f"\nMean ± standard deviation over {rows[0]['seeds']} seed(s).")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")


def _plot(out_dir: Path, knob: str, rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar([r["compression_ratio"] for r in rows], [r["accuracy_mean"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows], fmt="o", color="tab:blue", capsize=3)
    for r in rows:
        ax.annotate(f"{'τ ' if knob == 'tau' else ''}{r[knob]:g}", (r["compression_ratio"], r["accuracy_mean"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r["compression_ratio"], r["accuracy_mean"]) for r in rows if r["pareto"])
    ax.plot(*zip(*front), "-", color="tab:orange", label="Pareto front")
    ax.set_xlabel("compression ratio [%]")
    ax.set_ylabel("test accuracy [%]")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(fig)
    return True
