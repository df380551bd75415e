"""``lrc compare`` with a learning-rate grid (``--lrs``) and from a dense model (``--from-dense``),
through the command (``tests/_cli.py``), on a small MLP over the built-in digits data."""

import csv
import json
import statistics

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lrc.compare import dense_checkpoint
from lrc.io import save_model
from lrc.models import build_model
from lrc.presets import apply_override, load_preset
from lrc.surgery import factorize
from lrc.train import build_run, matched_lora_ranks

from ._cli import lrc

SMALL = ("--epochs", "1", "--set", "model.args.hidden=[32,32]", "--set", "factorize.rank=4", "--quiet")
METHODS = ["dense", "lowrank-adam", "lora"]
LRS = ["3e-3", "3e-2"]
SEEDS = [0, 1]


def finals(out, method, lr):
    """The last metrics row of each seed's run."""
    return [json.loads((out / "runs" / f"{method}-lr{lr}-s{s}" / "metrics.jsonl").read_text().splitlines()[-1])
            for s in SEEDS]


def expected(out, method, lr):
    rows = finals(out, method, lr)
    acc = [100 * r["test_accuracy"] for r in rows]
    return statistics.fmean(acc), statistics.stdev(acc), statistics.fmean(r["compression_ratio"] for r in rows)


def table(md, header_start):
    """The rows (lists of cells) of the Markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "cmp"
    args = ["compare", "--methods", ",".join(METHODS), "--seeds", str(len(SEEDS)), "--lrs", ",".join(LRS),
            "--jobs", "2", "--out", out, *SMALL]
    return out, args, lrc(*args)


def test_lrs_runs_every_method_seed_and_lr_and_tables_hold_their_numbers(grid):
    out, _, proc = grid
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{m}-lr{lr}-s{s}" for m in METHODS for lr in LRS for s in SEEDS)
    rows = {(r["method"], r["lr"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {(m, lr) for m in METHODS for lr in LRS}
    for (method, lr), row in rows.items():
        mean, std, cr = expected(out, method, lr)
        assert float(row["accuracy_mean"]) == pytest.approx(mean)
        assert float(row["accuracy_std"]) == pytest.approx(std)
        assert float(row["compression_ratio"]) == pytest.approx(cr)
        assert int(row["params"]) == round(statistics.fmean(r["params"] for r in finals(out, method, lr)))
        assert int(row["seeds"]) == len(SEEDS)
    md = (out / "results.md").read_text()
    assert md in proc.stdout
    per_lr = table(md, "| method | lr 3e-3 | lr 3e-2 |")
    assert [r[0] for r in per_lr] == METHODS
    for method, *cells in per_lr:
        for lr, cell in zip(LRS, cells):
            mean, std, cr = expected(out, method, lr)
            assert cell == f"{mean:.2f} ± {std:.2f} ({cr:.1f} %)"
    best = table(md, "| method | lr | test accuracy [%] | c.r. [%] | parameters |")
    assert [r[0] for r in best] == METHODS
    for method, lr, accuracy, cr, params, *_ in best:
        means = {x: expected(out, method, x)[0] for x in LRS}
        assert lr == max(LRS, key=means.get)  # the highest mean accuracy over the seeds
        mean, std, cr_expected = expected(out, method, lr)
        assert accuracy == f"{mean:.2f} ± {std:.2f}" and cr == f"{cr_expected:.1f}"
        assert params == f"{int(rows[method, lr]['params']):,}"
    pytest.importorskip("matplotlib")
    assert all((out / f).stat().st_size > 1000 for f in ("curves.png", "ranks.png", "diagnostics.png"))


def test_lora_at_each_lr_is_matched_to_lowrank_adam_at_that_lr(grid):
    out, _, _ = grid
    for lr in LRS:
        for seed in SEEDS:
            reference = out / "runs" / f"lowrank-adam-lr{lr}-s{seed}"
            cfg = yaml.safe_load((out / "runs" / f"lora-lr{lr}-s{seed}" / "config.yaml").read_text())
            assert cfg["optimizer"]["lr"] == float(lr) and cfg["factorize"]["match_cr"] == str(reference)
            lora = json.loads((out / "runs" / f"lora-lr{lr}-s{seed}" / "metrics.jsonl").read_text().splitlines()[-1])
            model = build_model("mlp", in_features=64, hidden=[32, 32], num_classes=10)
            assert lora["ranks"] == matched_lora_ranks(reference, model)
            ranks = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])["ranks"]
            assert lora["ranks"] != {} and all(r >= ranks[k] for k, r in lora["ranks"].items())


def test_a_rerun_with_the_same_settings_reuses_the_runs(grid):
    out, args, _ = grid
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")}
    again = lrc(*args)
    assert again.stderr.count("done already") == len(METHODS) * len(LRS) * len(SEEDS) == len(before)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")} == before


@pytest.mark.parametrize("change, message", [
    (["--epochs", "2"], "dense-lr3e-3-s0 was run with train.epochs = 1, this compare asks for train.epochs = 2"),
    (["--set", "optimizer.tau=0.2"], "dense-lr3e-3-s0 was run with optimizer.tau = 0.15, this compare asks for "
                                     "optimizer.tau = 0.2"),
])
def test_a_rerun_with_other_settings_is_one_line_exit_2_and_writes_nothing(grid, change, message):
    out, args, _ = grid
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = lrc(*args, *change, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "use another --out or delete" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_from_dense_run_directory_starts_every_method_from_it(tmp_path):
    source = tmp_path / "dense"
    lrc("train", "--method", "dense", "--out", source, *SMALL)
    out = tmp_path / "cmp"
    # at lr 0 the dense run keeps the model it started from, exactly
    proc = lrc("compare", "--methods", "dense,lowrank-adam", "--seeds", "1", "--from-dense", source, "--out", out,
               "--set", "optimizer.lr=0", *SMALL)
    assert "Warning" not in proc.stderr, proc.stderr  # nothing moved: the diagnostics plot stays linear
    for method in ("dense", "lowrank-adam"):
        cfg = yaml.safe_load((out / "runs" / f"{method}-s0" / "config.yaml").read_text())
        assert cfg["model"]["checkpoint"] == str((source / "model.safetensors").resolve())
        assert cfg["model"]["new_head"] is False
    start = load_file(str(source / "model.safetensors"))
    after = load_file(str(out / "runs" / "dense-s0" / "model.safetensors"))
    assert start.keys() == after.keys() and all(torch.equal(start[k], after[k]) for k in start)
    lowrank = json.loads((out / "runs" / "lowrank-adam-s0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(lowrank["ranks"]) == {"1", "3"} and all(r <= 4 for r in lowrank["ranks"].values())


def _small_cfg(method: str, checkpoint) -> dict:
    cfg = load_preset("digits-mlp")
    for assignment in ("model.args.hidden=[32, 32]", "factorize.rank=4", f"optimizer.method={method}",
                       f"model.checkpoint={checkpoint}"):
        cfg = apply_override(cfg, assignment)
    return cfg


def test_build_run_takes_a_dense_lrc_file_for_every_method_and_refuses_a_factorized_one_for_dense(tmp_path):
    arch = {"name": "mlp", "args": {"in_features": 64, "hidden": [32, 32], "num_classes": 10}}
    dense = build_model(arch["name"], **arch["args"])
    save_model(tmp_path / "dense.safetensors", dense, arch)
    model = build_run(_small_cfg("dense", tmp_path / "dense.safetensors"), torch.device("cpu")).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    model, _, _, report, _ = build_run(_small_cfg("lowrank-adam", tmp_path / "dense.safetensors"), torch.device("cpu"))
    assert [r.name for r in report.replaced] == ["1", "3"]
    factorize(dense, rank=4, exclude=["5"])
    save_model(tmp_path / "lowrank.safetensors", dense, arch)
    with pytest.raises(ValueError, match="is a factorized model"):
        build_run(_small_cfg("dense", tmp_path / "lowrank.safetensors"), torch.device("cpu"))
    torch.save(build_model(arch["name"], **arch["args"]).state_dict(), tmp_path / "dense.pt")
    assert dense_checkpoint(tmp_path / "dense.pt") == str((tmp_path / "dense.pt").resolve())


@pytest.mark.parametrize("args, message", [
    (["--from-dense", "{tmp}/missing"], "--from-dense {tmp}/missing: no such file or directory"),
    (["--from-dense", "{tmp}"], "no model.safetensors there"),
    (["--from-dense", "{tmp}/garbage.pt"], "cannot read it as a checkpoint"),
    (["--from-dense", "{tmp}/lowrank.safetensors"], "is a factorized model"),
    (["--lrs", "1e-3,x"], "--lrs 1e-3,x: 'x' is not a number"),
    (["--lrs", "1e-3,0.001"], "learning rate 1e-3 is given twice"),
])
def test_bad_from_dense_or_lrs_is_one_line_and_exit_2(args, message, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    model = build_model("mlp", in_features=64, hidden=[32, 32], num_classes=10)
    factorize(model, rank=4, exclude=["5"])
    save_model(tmp_path / "lowrank.safetensors", model, {"name": "mlp", "args": {"hidden": [32, 32]}})
    proc = lrc("compare", "--out", tmp_path / "cmp", *[a.replace("{tmp}", str(tmp_path)) for a in args], *SMALL,
               check=False)
    assert proc.returncode == 2, proc.stderr
    assert message.replace("{tmp}", str(tmp_path)) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def _finished_run(tmp_path):
    """The digits-mlp configuration and a finished run directory to write an older config into."""
    from lrc.presets import load_preset

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    return load_preset("digits-mlp"), run


def test_a_run_of_an_older_lrc_without_a_newer_key_counts_as_that_key_at_its_old_behaviour(tmp_path):
    from lrc.compare import check_same_config

    cfg, run = _finished_run(tmp_path)
    older = yaml.safe_load(yaml.safe_dump(cfg))
    del older["model"]["factory"], older["optimizer"]["update_every"]  # keys this lrc added, old behaviour
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_config(cfg, run)
    del older["optimizer"]["lr_scaling"]  # before the key, the step was the paper's ("none"), not the default
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(ValueError, match='was run with optimizer.lr_scaling = "none", this compare asks for '
                                         'optimizer.lr_scaling = "dense"'):
        check_same_config(cfg, run)


def test_the_allocation_rule_of_an_older_run_matters_only_under_a_budget(tmp_path):
    from lrc.compare import check_same_config

    cfg, run = _finished_run(tmp_path)
    older = yaml.safe_load(yaml.safe_dump(cfg))
    del older["factorize"]["allocation"]  # an lrc before the key: per-parameter, but no budget here
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_config(cfg, run)
    older["factorize"]["target_cr"] = cfg["factorize"]["target_cr"] = 90.0
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(ValueError, match='factorize.allocation = "per-parameter", this compare asks for '
                                         'factorize.allocation = "relative"'):
        check_same_config(cfg, run)


def test_a_presets_methods_section_reaches_compare_and_train_and_a_users_setting_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("factorize: {rank: 4}\noptimizer: {lr: 2.0e-3}\n"
                      "model: {args: {in_features: 64, hidden: [32, 32]}}\n"
                      "methods: {dense: {optimizer.lr: 5.0e-4, train.schedule: constant}}\n")

    def run_lr(run_dir):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert "methods" not in cfg and "_user_keys" not in cfg
        return cfg["optimizer"]["lr"], cfg["train"]["schedule"]

    out = tmp_path / "cmp"
    lrc("compare", "--preset", preset, "--methods", "dense,lowrank-adam", "--seeds", "1", "--epochs", "1", "--quiet",
        "--out", out)
    assert run_lr(out / "runs" / "dense-s0") == (5e-4, "constant")
    assert run_lr(out / "runs" / "lowrank-adam-s0") == (2e-3, "cosine")
    lrc("compare", "--preset", preset, "--methods", "dense,lowrank-adam", "--seeds", "1", "--epochs", "1", "--quiet",
        "--out", out)  # the same settings: the runs are reused, not refused as changed
    lrc("train", "--preset", preset, "--method", "dense", "--epochs", "1", "--quiet", "--out", tmp_path / "t1")
    assert run_lr(tmp_path / "t1") == (5e-4, "constant")
    lrc("train", "--preset", preset, "--method", "dense", "--lr", "1e-3", "--set", "train.schedule=cosine",
        "--epochs", "1", "--quiet", "--out", tmp_path / "t2")
    assert run_lr(tmp_path / "t2") == (1e-3, "cosine")
    lrc("compare", "--preset", preset, "--methods", "dense", "--seeds", "1", "--epochs", "1", "--quiet",
        "--lrs", "1e-2", "--out", tmp_path / "grid")  # a grid's lr wins over the section
    assert run_lr(tmp_path / "grid" / "runs" / "dense-lr1e-2-s0") == (1e-2, "constant")


def test_sweep_applies_the_methods_section_and_reuses_its_runs(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("factorize: {rank: 4}\noptimizer: {lr: 2.0e-3}\n"
                      "model: {args: {in_features: 64, hidden: [32, 32]}}\n"
                      "methods: {lowrank-adam: {optimizer.lr: 5.0e-4}}\n")
    args = ("sweep", "--preset", preset, "--taus", "0.1", "--seeds", "1", "--epochs", "1", "--quiet", "--out",
            tmp_path / "sw")
    lrc(*args)
    (run_dir,) = [d for d in (tmp_path / "sw" / "runs").iterdir() if d.is_dir()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["optimizer"]["lr"] == 5e-4 and "methods" not in cfg
    lrc(*args)  # the same settings: reused, not refused as changed
