"""The comparison of the README at several learning rates, with the same tuning budget for
every method: ``lrc compare`` groups over presets × learning rates, the ``squared``
second-moment variant of lowrank-adam, and the dense-pretrained pipeline (train dense,
factorize it, train the factorized model), all runs of all groups on one pool of worker
processes of one thread each (CPU cores, or sharing one GPU).

    python benchmarks/grid.py --presets digits-mlp --lrs 3e-3 1e-2 3e-2 --jobs 2 --out bench
    python benchmarks/grid.py --presets lenet5-fashion-mnist mlp-fashion-mnist --lrs 3e-3 1e-2 1e-3 \\
        --jobs 14 --out bench --set data.data_dir=.data/fashion-mnist --set train.device=cuda
    python benchmarks/grid.py ... --report-only          # tables of what has finished

Each group is an ordinary ``lrc compare`` directory (runs/, results.md, results.csv, plots):

    OUT/<preset>/lr<lr>/              dense, lowrank-adam, lora (matched c.r.), dlrt-naive, with
                                      optimizer.second_moment=paper (the paper's rule)
    OUT/<preset>/lr<lr>-squared/      lowrank-adam with optimizer.second_moment=squared (the default)
    OUT/<preset>/pretrained-lr<lr>/   lowrank-adam, lora, dlrt-naive started from the dense
                                      seed-0 model (first learning rate only)
    OUT/summary.md                    every group's table

Finished runs are kept; running the same command again trains only what is missing.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from lrc.compare import _one_thread, _run, _run_config, plot, summarize, write_tables
from lrc.presets import apply_override, load_preset

ALL = ["dense", "lowrank-adam", "lora", "dlrt-naive"]
FROM_DENSE = ["lowrank-adam", "lora", "dlrt-naive"]


@dataclass
class Group:
    out: Path
    cfg: dict
    methods: list[str]
    needs: list[Path] = field(default_factory=list)  # models that must exist before any run starts


def groups(args) -> list[Group]:
    """In priority order: the full comparison at the first two learning rates, the pretrained
    pipeline (at the first), the squared variant, then the remaining learning rates."""
    ranked = []
    for preset in args.presets:
        base = load_preset(preset)
        for assignment in args.set:
            base = apply_override(base, assignment)
        root = Path(args.out) / preset
        for i, lr in enumerate(args.lrs):
            late = i >= 2
            # the comparison as measured for the README: lowrank-adam with the paper's second moment
            cfg = apply_override(apply_override(base, f"optimizer.lr={lr}"), "optimizer.second_moment=paper")
            ranked.append(((late, 0, i), Group(root / f"lr{lr}", cfg, ALL)))
            squared = apply_override(cfg, "optimizer.second_moment=squared")
            ranked.append(((late, 2, i), Group(root / f"lr{lr}-squared", squared, ["lowrank-adam"])))
            if i == 0:
                dense = root / f"lr{lr}" / "runs" / "dense-s0" / "model.safetensors"
                pretrained = copy.deepcopy(cfg)
                pretrained["model"]["checkpoint"] = str(dense)
                ranked.append(((late, 1, i), Group(root / f"pretrained-lr{lr}", pretrained, FROM_DENSE, [dense])))
    return [g for _, g in sorted(ranked, key=lambda t: t[0])]


def runs(group: Group, seeds: list[int]):
    """(run_dir, config, models it needs) in the order compare would train them."""
    for method in sorted(group.methods, key=lambda m: m == "lora"):
        for seed in seeds:
            needs = list(group.needs)
            if method == "lora":
                needs.append(group.out / "runs" / f"lowrank-adam-s{seed}" / "model.safetensors")
            yield group.out / "runs" / f"{method}-s{seed}", _run_config(group.cfg, method, seed, group.out), needs


def train_all(todo: list, jobs: int, deadline: float) -> None:
    pending = [t for t in todo if not (t[0] / "model.safetensors").exists()]
    failed: set[Path] = set()
    running = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_one_thread) as pool:
        while pending or running:
            for item in list(pending):
                run_dir, cfg, needs = item
                if any(n.parent in failed for n in needs):
                    failed.add(run_dir)
                    pending.remove(item)
                    print(f"skipped {run_dir}: a run it needs failed", flush=True)
                elif len(running) < jobs and time.time() < deadline and all(n.exists() for n in needs):
                    running[pool.submit(_run, cfg, run_dir, False)] = run_dir
                    pending.remove(item)
            if not running:
                break  # past the deadline, or waiting on nothing
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run_dir = running.pop(future)
                try:
                    future.result()
                    print(f"done {run_dir}", flush=True)
                except Exception as e:  # one failed run does not stop the grid
                    failed.add(run_dir)
                    print(f"FAILED {run_dir}: {e}", flush=True)


def report(all_groups: list[Group], seeds: list[int], out: Path) -> None:
    """Each group's tables and plots, and OUT/summary.md: per preset, test accuracy
    (mean ± std over seeds) of every method against the learning rate, then every group's table."""
    pivot: dict[str, dict[str, dict[str, str]]] = {}  # preset → row label → lr → cell
    sections = []
    for group in all_groups:
        done = [m for m in group.methods
                if all((group.out / "runs" / f"{m}-s{s}" / "model.safetensors").exists() for s in seeds)]
        if not done:
            continue
        rows = summarize(group.out, done, seeds)
        write_tables(group.out, rows)
        plot(group.out, done, seeds)
        preset, name = group.out.parent.name, group.out.name
        lr = name.split("lr", 1)[1].removesuffix("-squared")
        for r in rows:
            label = r["method"] + (" (squared)" if name.endswith("-squared") else "")
            label = ("from dense: " if name.startswith("pretrained") else "") + label
            pivot.setdefault(preset, {}).setdefault(label, {})[lr] = (
                f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} ({r['compression_ratio']:.1f} %)")
        missing = [m for m in group.methods if m not in done]
        sections += [f"### {group.out.relative_to(out)}" + (f" (unfinished: {', '.join(missing)})" if missing else ""),
                     "", (group.out / "results.md").read_text()]
    lines = []
    for preset, table in pivot.items():
        lrs = sorted({lr for cells in table.values() for lr in cells}, key=float)
        lines += [f"## {preset}: test accuracy [%] (c.r.), mean ± std over {len(seeds)} seed(s)", "",
                  "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                  "| --- |" + " ---: |" * len(lrs)]
        lines += [f"| {label} | " + " | ".join(cells.get(lr, "") for lr in lrs) + " |" for label, cells in table.items()]
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines + sections))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits-mlp"])
    parser.add_argument("--lrs", nargs="+", default=["3e-3", "1e-2", "3e-2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    all_groups = groups(args)
    if not args.report_only:
        todo = [r for g in all_groups for r in runs(g, seeds)]
        train_all(todo, args.jobs, time.time() + args.budget_s)
    report(all_groups, seeds, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
