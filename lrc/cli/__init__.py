"""The ``lrc`` command. Thin: parses, calls the library, prints.

Exit status: 0 on success, 1 on a runtime failure, 2 on bad usage or input. Errors are one
line on stderr (set ``LRC_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import __version__
from .._entry import Terminated, signals_noted

app = typer.Typer(help="Compress neural networks by dynamical low-rank training.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lrc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Compress neural networks by dynamical low-rank training."""


def _signal_exit(e: BaseException) -> typer.Exit:
    """Ctrl-C (``KeyboardInterrupt``) or SIGTERM (:class:`Terminated`): one line, the shell's status."""
    interrupted = isinstance(e, KeyboardInterrupt)
    typer.echo("interrupted" if interrupted else "terminated", err=True)
    return typer.Exit(130 if interrupted else 143)


def friendly_errors(fn):
    """Turn the library's errors into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals_noted():  # these import torch
                from ..data import DataError
                from ..io import CheckpointError, WriteError
                from ..train import TrainingStopped
        except (KeyboardInterrupt, Terminated) as e:
            raise _signal_exit(e) from None
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TrainingStopped as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(e.exit_code) from None
        except WriteError as e:  # not bad input: the disk (exit 1)
            if os.environ.get("LRC_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except (ValueError, DataError, CheckpointError, FileNotFoundError) as e:
            if os.environ.get("LRC_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `lrc info … | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, Terminated) as e:
            raise _signal_exit(e) from None
        except Exception as e:  # a bug or an environment failure: still one line
            if os.environ.get("LRC_DEBUG"):
                raise
            typer.echo(f"error: {type(e).__name__}: {e} (LRC_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command("presets")
@friendly_errors
def presets_cmd() -> None:
    """List the shipped presets, one line each.

    Example: lrc presets
    """
    from ..presets import list_presets

    for name, desc in list_presets().items():
        typer.echo(f"{name:<24} {desc}")


@app.command("train")
@friendly_errors
def train_cmd(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", show_default=False,
                                         help="Preset name (`lrc presets`) or a YAML file (default: digits-mlp)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/PRESET)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs (with --resume: train on to this many)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate."),
    tau: Optional[float] = typer.Option(None, help="Truncation tolerance τ in (0, 1)."),
    method: Optional[str] = typer.Option(None, help="lowrank-adam, lowrank-sgd, dense, lora or dlrt-naive."),
    match_cr: Optional[Path] = typer.Option(None, "--match-cr", help="lora: match the parameters of this low-rank run."),
    target_cr: Optional[float] = typer.Option(None, "--target-cr", help="Compression ratio in percent to reach and "
                                              "keep: one parameter budget over all layers, in place of factorize.tau."),
    conv_format: Optional[str] = typer.Option(None, "--conv-format", help="Convolutions as matrix or tucker."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the data set lies."),
    checkpoint: Optional[str] = typer.Option(None, help="Start from: a dense checkpoint (.pt/.pth/.safetensors, "
                                             "torchvision:WEIGHTS) or a factorized lrc file."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume the run in this directory (its own "
                                          "settings; --epochs, --lr, --device, --data-dir may change)."),
    set_: List[str] = typer.Option([], "--set", help="Override any preset field: section.key=value."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Factorize and train a model with the geometric low-rank optimizers.

    Example: lrc train --preset digits-mlp --epochs 5 --set optimizer.lr=1e-3
    """
    from ..presets import apply_override, load_preset
    from ..train import train

    if resume is not None:
        fixed = [option for option, value in (
            ("--preset", preset), ("--out", out), ("--tau", tau), ("--method", method),
            ("--match-cr", match_cr), ("--target-cr", target_cr), ("--conv-format", conv_format),
            ("--checkpoint", checkpoint),
            ("--seed", seed), ("--set", set_ or None)) if value is not None]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change a resumed run (its config.yaml fixes them; "
                             "--epochs, --lr, --device and --data-dir can); start a new run with --out instead")
        changes = {key: value for key, value in (("train.epochs", epochs), ("optimizer.lr", lr), ("train.device", device),
                                                  ("data.data_dir", str(data_dir) if data_dir else None))
                   if value is not None}
        result = train({}, resume, resume=True, progress=not quiet, changes=changes)
    else:
        preset = preset or "digits-mlp"
        cfg = load_preset(preset)
        flags = (("--epochs", "train.epochs", epochs), ("--lr", "optimizer.lr", lr),
                 ("--tau", "optimizer.tau", tau), ("--method", "optimizer.method", method),
                 ("--device", "train.device", device), ("--seed", "train.seed", seed),
                 ("--data-dir", "data.data_dir", str(data_dir) if data_dir else None),
                 ("--match-cr", "factorize.match_cr", str(match_cr) if match_cr else None),
                 ("--conv-format", "factorize.conv_format", conv_format),
                 ("--checkpoint", "model.checkpoint", str(checkpoint) if checkpoint else None))
        for option, key, value in flags:
            if value is not None:
                cfg = apply_override(cfg, f"{key}={json.dumps(value)}", f"{option} {value}")
        for assignment in set_:
            cfg = apply_override(cfg, assignment)
        cfg = _with_target_cr(cfg, target_cr)
        if tau is not None and cfg["factorize"]["tau"] is None and cfg["factorize"]["rank"] is None:
            cfg = apply_override(cfg, f"factorize.tau={tau}")
        cfg["_user_keys"] = _user_keys(set_, {key: value for _, key, value in flags})
        cfg["_preset"] = Path(preset).stem
        result = train(cfg, out or Path("runs") / Path(preset).stem, progress=not quiet)
    m = result.metrics
    typer.echo(f"test accuracy {100 * m['test_accuracy']:.2f}%  c.r. {m['compression_ratio']:.1f}%  "
               f"ranks {m['ranks']}")
    typer.echo(f"wrote {result.model_path}")


@app.command("compare")
@friendly_errors
def compare_cmd(
    preset: str = typer.Option("digits-mlp", "--preset", "-p", help="Preset name or YAML file."),
    methods: str = typer.Option("dense,lowrank-adam,lora,dlrt-naive", help="Comma-separated methods."),
    seeds: int = typer.Option(3, help="Number of seeds (0, 1, …)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: runs/compare-PRESET)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the data set lies."),
    set_: List[str] = typer.Option([], "--set", help="Override any preset field: section.key=value."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs trained at once (one thread each; CPU cores or one GPU)."),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="Learning-rate grid, comma-separated (e.g. 1e-3,3e-3,1e-2): "
                                      "every method × seed × lr is a run (default: the preset's lr)."),
    target_cr: Optional[float] = typer.Option(None, "--target-cr", help="Hold every low-rank method and LoRA at "
                                              "this compression ratio (percent; in place of factorize.tau)."),
    from_dense: Optional[Path] = typer.Option(None, "--from-dense", metavar="RUN|CHECKPOINT",
                                              help="Start every method from this dense model: a run directory of "
                                              "`lrc train --method dense` or a checkpoint file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train several methods over several seeds (and learning rates) and write a comparison
    table and plots.

    Every method gets the same preset; lora is matched to lowrank-adam's parameter count.
    Runs already finished in OUT are not run again (they must have the settings asked for).

    Example: lrc compare --preset digits-mlp --methods dense,lowrank-adam,lora,dlrt-naive --seeds 3 --jobs 2
    """
    from ..compare import compare
    from ..presets import apply_override, load_preset

    cfg = load_preset(preset)
    for option, key, value in (("--epochs", "train.epochs", epochs),
                               ("--data-dir", "data.data_dir", str(data_dir) if data_dir else None)):
        if value is not None:
            cfg = apply_override(cfg, f"{key}={json.dumps(value)}", f"{option} {value}")
    for assignment in set_:
        cfg = apply_override(cfg, assignment)
    cfg = _with_target_cr(cfg, target_cr)
    cfg["_user_keys"] = _user_keys(set_, {"train.epochs": epochs, "data.data_dir": data_dir})
    if seeds < 1:
        raise ValueError("--seeds must be ≥ 1")
    out_dir = out or Path("runs") / f"compare-{Path(preset).stem}"
    compare(cfg, [m.strip() for m in methods.split(",") if m.strip()], list(range(seeds)), out_dir,
            progress=not quiet, log=lambda msg: typer.echo(msg, err=True), jobs=jobs,
            lrs=None if lrs is None else _parse_lrs(lrs), from_dense=from_dense)
    typer.echo((out_dir / "results.md").read_text())
    typer.echo(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.csv'}")


@app.command("sweep")
@friendly_errors
def sweep_cmd(
    preset: str = typer.Option("digits-mlp", "--preset", "-p", help="Preset name or YAML file."),
    taus: Optional[str] = typer.Option(None, "--taus", help="Truncation tolerances in training, comma-separated "
                                       "(e.g. 0.05,0.1,0.2,0.3)."),
    target_crs: Optional[str] = typer.Option(None, "--target-crs", help="Target compression ratios in percent, "
                                             "comma-separated (e.g. 80,90,95)."),
    seeds: int = typer.Option(1, help="Number of seeds (0, 1, …)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: runs/sweep-PRESET)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs."),
    method: Optional[str] = typer.Option(None, help="A low-rank method or lora (default: the preset's)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the data set lies."),
    set_: List[str] = typer.Option([], "--set", help="Override any preset field: section.key=value."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs trained at once (one thread each)."),
    from_dense: Optional[Path] = typer.Option(None, "--from-dense", metavar="RUN|CHECKPOINT",
                                              help="Start every run from this dense model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train one run per τ (or target c.r.) and seed; write the accuracy-against-c.r. table and
    a Pareto plot. Finished runs are not run again.

    Example: lrc sweep --preset digits-mlp --target-crs 80,90,95 --jobs 2
    """
    from ..presets import apply_override, load_preset
    from ..sweep import sweep

    if (taus is None) == (target_crs is None):
        raise ValueError("give one of --taus or --target-crs")
    knob, text = ("tau", taus) if taus is not None else ("target_cr", target_crs)
    values = _parse_numbers(text, "--taus" if knob == "tau" else "--target-crs", "0.05,0.1,0.2" if knob == "tau"
                            else "80,90,95")
    cfg = load_preset(preset)
    for option, key, value in (("--epochs", "train.epochs", epochs), ("--method", "optimizer.method", method),
                               ("--data-dir", "data.data_dir", str(data_dir) if data_dir else None)):
        if value is not None:
            cfg = apply_override(cfg, f"{key}={json.dumps(value)}", f"{option} {value}")
    for assignment in set_:
        cfg = apply_override(cfg, assignment)
    cfg["_user_keys"] = _user_keys(set_, {"train.epochs": epochs, "data.data_dir": data_dir})
    if seeds < 1:
        raise ValueError("--seeds must be ≥ 1")
    out_dir = out or Path("runs") / f"sweep-{Path(preset).stem}"
    cfg["_preset"] = Path(preset).stem
    sweep(cfg, knob, values, out_dir, list(range(seeds)), jobs=jobs, progress=not quiet,
          log=lambda msg: typer.echo(msg, err=True), from_dense=from_dense)
    typer.echo((out_dir / "sweep.md").read_text())
    typer.echo(f"wrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.csv'}"
               + (f", {out_dir / 'pareto.png'}" if (out_dir / "pareto.png").exists() else ""))


def _user_keys(assignments: list[str], flags: dict) -> list[str]:
    """The ``section.key`` names the user set (``--set`` and the flags that set a preset field that
    a preset's ``methods`` section may also set): they win over that section."""
    keys = [a.split("=", 1)[0].strip() for a in assignments if "=" in a]
    return keys + [key for key, value in flags.items() if value is not None]


def _not_the_input(out: Path | None, source: Path | str | None, option: str = "--out") -> None:
    """Refuse to write over the file a command reads: it would be lost if anything failed, and is
    replaced even when nothing does."""
    if out is None or source is None:
        return
    try:
        same = Path(out).exists() and Path(out).resolve() == Path(source).resolve()
    except OSError:
        return
    if same:
        raise ValueError(f"{option} {out} is the file being read; write to another file")


def _parse_numbers(text: str, option: str, example: str) -> list[float]:
    values = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(f"{option} {text}: {item!r} is not a number (e.g. {option} {example})") from None
    return values


def _with_target_cr(cfg: dict, target_cr: float | None) -> dict:
    """``--target-cr``: factorize.target_cr set, factorize.tau (which it replaces) cleared."""
    from ..presets import with_target_cr

    return cfg if target_cr is None else with_target_cr(cfg, target_cr, f"--target-cr {target_cr:g}")


def _parse_lrs(text: str) -> list[float]:
    """``"1e-3,3e-3"`` → ``[0.001, 0.003]``; a ValueError names what is not a number."""
    return _parse_numbers(text, "--lrs", "1e-3,3e-3,1e-2")


@app.command("factorize")
@friendly_errors
def factorize_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Factorized model to write (.safetensors)."),
    preset: str = typer.Option("digits-mlp", "--preset", "-p", help="Takes the model and factorize settings."),
    checkpoint: Optional[str] = typer.Option(None, help="Dense weights: .pt/.pth/.safetensors, or torchvision:WEIGHTS."),
    rank: Optional[int] = typer.Option(None, help="Initial rank per layer."),
    conv_format: Optional[str] = typer.Option(None, "--conv-format",
                                              help="How convolutions are factorized: matrix or tucker (default: the preset's)."),
    tau: Optional[float] = typer.Option(None, help="Truncation tolerance τ in (0, 1) for the initial ranks."),
    target_cr: Optional[float] = typer.Option(None, "--target-cr", help="Compression ratio in percent: the ranks "
                                              "of all layers chosen together under one budget (in place of --tau)."),
    include: List[str] = typer.Option([], "--include", help="Glob of layer names to factorize (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Glob of layers kept dense (repeatable)."),
    calibration: int = typer.Option(0, "--calibration", metavar="N", help="Truncate for the inputs N training "
                                    "samples of the preset's data set give each layer (activation-aware), not "
                                    "for the weights alone."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the preset's data set lies "
                                            "(for --calibration)."),
    set_: List[str] = typer.Option([], "--set", help="Override any preset field: section.key=value."),
) -> None:
    """Replace a model's dense layers by factorized ones (truncated SVD) and write it.

    The first conv and the classifier head stay dense by default (the preset's exclude list).

    Example: lrc factorize --preset lenet5-fashion-mnist --checkpoint lenet5.pt --tau 0.05 --out lenet5-lr.safetensors
    """
    from ..io import load_weights, read_checkpoint, save_model
    from ..models import architecture_name, build_model
    from ..presets import apply_override, load_preset
    from ..surgery import CONV_FORMATS, compression_ratio, factorize

    cfg = load_preset(preset)
    for assignment in set_:
        cfg = apply_override(cfg, assignment)
    _not_the_input(out, checkpoint if checkpoint and ":" not in checkpoint else None)
    if conv_format is not None and conv_format not in CONV_FORMATS:
        raise ValueError(f"--conv-format {conv_format!r}: choose one of {', '.join(CONV_FORMATS)}")
    cfg = _with_target_cr(cfg, target_cr)
    fac = cfg["factorize"]
    if tau is not None and target_cr is not None:
        raise ValueError("--tau and --target-cr both choose the ranks; give one")
    if rank is not None or tau is not None or target_cr is not None:  # the preset's cap does not bind a budget
        fac = dict(fac, rank=rank, tau=tau)
    if tau is not None and not 0.0 < tau < 1.0:
        raise ValueError(f"--tau {tau}: must lie in (0, 1)")
    if calibration < 0:
        raise ValueError(f"--calibration {calibration}: a number of training samples (0: off)")
    calibration = calibration or fac["calibration"]
    arch = {"name": architecture_name(cfg["model"]["name"], cfg["model"]["factory"]), "args": dict(cfg["model"]["args"])}
    model = build_model(arch["name"], **arch["args"])
    if checkpoint:
        load_weights(model, read_checkpoint(checkpoint), str(checkpoint), new_head=cfg["model"]["new_head"])
    batches = None
    if calibration:
        from ..data import build_data
        from ..train import calibration_batches, text_options

        d = cfg["data"]
        data = build_data(d["name"], data_dir or d["data_dir"], 0, d["image_size"], d.get("channels"),
                          d.get("train_samples"), text=text_options(cfg))
        batches = calibration_batches(data.train, calibration)
    report = factorize(model, rank=fac["rank"], tau=fac["tau"], include=include or fac["include"],
                       exclude=fac["exclude"] if exclude is None else exclude,
                       conv_format=conv_format or fac["conv_format"], target_cr=fac["target_cr"],
                       allocation=fac["allocation"], calibration=batches, calibration_samples=max(1, calibration))
    if not report.replaced:
        raise ValueError("no layer was factorized: every candidate was excluded or would not save parameters "
                         "at this rank (a rank must be below what a layer allows)")
    typer.echo(str(report))
    typer.echo(f"c.r. {compression_ratio(model):.1f}%")
    save_model(out, model, arch, {"source": str(checkpoint) if checkpoint else "random init",
                                  **({"calibration": calibration} if calibration else {})})
    typer.echo(f"wrote {out}")


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="A compressed .safetensors written by lrc."),
    data: Optional[str] = typer.Option(None, help="Data set (default: the one it was trained on)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(256, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Import the model factory (code of your own) "
                                    "that the file names."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Time inference at batch 1 and 64 against "
                                 "the dense model (CPU, and CUDA when present)."),
) -> None:
    """Rebuild a model from its file alone and report accuracy, loss, parameters, c.r., ranks, FLOPs
    and inference latency against the dense model it came from.

    Example: lrc evaluate runs/digits-mlp/model.safetensors --json
    """
    from ..data import build_data
    from ..evaluate import check_model_takes, evaluate
    from ..io import load_model
    from ..train import resolve_device

    dev = resolve_device(device)
    model, meta = load_model(model_path, dev, trust_code=trust_code)
    name = data or meta["summary"].get("data")
    if not name:
        raise ValueError(f"{model_path} does not record its data set; pass --data NAME")
    same = name == meta["summary"].get("data")  # the input form the model was trained on
    text = meta["summary"].get("text") if same else None  # a text data set: its tokenizer and columns
    if text and data_dir is None:
        data_dir = meta["summary"].get("data_dir")
    built = build_data(name, data_dir, image_size=meta["summary"].get("image_size") if same else None,
                       channels=meta["summary"].get("channels") if same else None,
                       text=text, test_samples=meta["summary"].get("test_samples") if same else None)
    check_model_takes(model, built.test, built.num_classes, name, dev,
                      "evaluate it on data of the form it was trained on" + (f" ({meta['summary'].get('data')}: "
                      "leave out --data)" if meta["summary"].get("data") else ""))
    _, test = built.loaders(batch_size, 0, batch_size)
    result = evaluate(model, test, dev)
    result.update(model=str(model_path), architecture=meta["architecture"], data=name)
    sample = next(iter(test))[0]
    from ..evaluate import flops_per_sample
    from ..inference import dense_form

    result["dense_flops_per_sample"] = flops_per_sample(dense_form(model), sample[:1].to(dev))
    if latency:
        result["latency_ms"] = _latency_table(model, sample)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{model_path}: {meta['architecture']['name']} on {name}")
    typer.echo(f"  top-1 {100 * result['top1']:.2f}%" + (f"  top-5 {100 * result['top5']:.2f}%" if "top5" in result else "")
               + f"  loss {result['loss']:.4f}  ({result['samples']} samples)")
    typer.echo(f"  parameters {result['params']:,}  c.r. {result['compression_ratio']:.1f}%  "
               f"FLOPs/sample {result['flops_per_sample']:,} (dense {result['dense_flops_per_sample']:,})")
    for layer, rank in result["ranks"].items():
        typer.echo(f"  {layer:<28} rank {rank}")
    for device_name, rows in result.get("latency_ms", {}).items():
        for batch, row in rows.items():
            typer.echo(f"  latency {device_name} batch {batch:>3}: dense {row['dense']:.3f} ms, compressed "
                       f"{row['compressed']:.3f} ms ({row['compressed'] / row['dense']:.2f}×; median, "
                       f"{row['threads']} threads)" if device_name == "cpu" else
                       f"  latency {device_name} batch {batch:>3}: dense {row['dense']:.3f} ms, compressed "
                       f"{row['compressed']:.3f} ms ({row['compressed'] / row['dense']:.2f}×; median)")


def _latency_table(model, sample, batches=(1, 64)) -> dict:
    """``{device: {batch: {"dense": ms, "compressed": ms}}}``: the median latency of the dense
    model (every factorized layer merged) and of the compressed one (its inference form), on the
    CPU and, when present, on CUDA; inputs are the first test samples, repeated to the batch."""
    import torch

    from ..inference import dense_form, inference_form, latency_ms

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: dict = {}
    for device_name in devices:
        dense, compressed = (form(model).to(device_name) for form in (dense_form, inference_form))
        rows = {}
        for batch in batches:
            x = sample[:batch]
            if len(x) < batch:  # a test set smaller than the batch: its samples repeated
                x = x.repeat(-(-batch // len(x)), *([1] * (x.dim() - 1)))[:batch]
            x = x.to(device_name)
            rows[str(batch)] = {"dense": latency_ms(dense, x), "compressed": latency_ms(compressed, x)}
            if device_name == "cpu":
                rows[str(batch)]["threads"] = torch.get_num_threads()
        table[device_name] = rows
    return table


@app.command("export")
@friendly_errors
def export_cmd(
    source: Path = typer.Argument(..., metavar="RUN_DIR|MODEL", help="A run directory or a compressed model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (.safetensors; .pt for --dense "
                                       "also)."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    dense: bool = typer.Option(False, "--dense", help="Merge into a plain state dict of the original architecture."),
    inference: bool = typer.Option(False, "--inference", help="Per layer, keep it factorized or merge it to dense, "
                                   "whichever measures faster here (--device, --batch-size)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Also (or only) write an ONNX model to this file, "
                                        "checked against PyTorch with onnxruntime (extra: lrc[onnx])."),
    device: str = typer.Option("cpu", help="Where --inference measures: cpu, cuda or auto."),
    batch_size: int = typer.Option(1, "--batch-size", help="The batch --inference measures at."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", metavar="C,H,W",
                                              help="One sample's shape, for files that do not record it."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Import the model factory the file names."),
) -> None:
    """Write the compressed model (or, with --dense, a plain state dict that loads strict
    into the original architecture; with --onnx, an ONNX model).

    Example: lrc export runs/digits-mlp --out digits.safetensors --dtype bf16
    """
    import torch

    from ..io import load_model, save_dense, save_model
    from ..train import resolve_device

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r}: choose fp32, fp16 or bf16")
    if out is None and onnx is None:
        raise ValueError("say where to write: --out FILE (and/or --onnx FILE)")
    if onnx is not None and onnx.suffix != ".onnx":
        raise ValueError(f"--onnx {onnx}: the file name must end in .onnx")
    if dense and inference:
        raise ValueError("--dense merges every layer; --inference chooses per layer: give one")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be ≥ 1")
    path = source / "model.safetensors" if source.is_dir() else source
    _not_the_input(out, path)
    _not_the_input(onnx, path, "--onnx")
    model, meta = load_model(path, trust_code=trust_code)
    example = None
    if inference or onnx is not None:
        shape = _input_shape(input_shape, meta, path)
        example = _example_input(model, meta, shape, batch_size)
    summary = dict(meta["summary"])
    if inference:
        from ..inference import choose_layers, merge_layers

        dev = resolve_device(device)
        model.to(dev)
        choices = choose_layers(model, example.to(dev))
        merge_layers(model, [name for name, c in choices.items() if c["kept"] == "dense"])
        model.cpu()
        for name, c in choices.items():
            typer.echo(f"  {name:<28} {c['kept']:<10} (factorized {c['factorized_ms']:.3f} ms, "
                       f"dense {c['dense_ms']:.3f} ms at batch {batch_size} on {dev.type})")
        summary["inference"] = {"device": dev.type, "batch_size": batch_size,
                                "kept": {name: c["kept"] for name, c in choices.items()}}
    if out is not None:
        if dense and meta["architecture"]["name"] == "hf":
            from ..io import save_dense_pretrained

            save_dense_pretrained(out, model, dtypes[dtype])
            typer.echo(f"wrote {out}/ (AutoModelForSequenceClassification.from_pretrained loads it)")
            out = None
        elif dense:
            save_dense(out, model, dtypes[dtype])
        else:
            save_model(out, model, meta["architecture"], summary, dtypes[dtype])
    if out is not None:
        typer.echo(f"wrote {out} ({out.stat().st_size:,} bytes)")
    if onnx is not None:
        from ..inference import export_onnx

        checked = export_onnx(model, example, onnx)
        line = f"wrote {onnx} ({onnx.stat().st_size:,} bytes)"
        if "max_abs_diff" in checked:
            line += (f"; onnxruntime agrees with PyTorch to {checked['max_abs_diff']:.1e} (outputs up to "
                     f"{checked['max_abs_output']:.1f}), {checked['onnxruntime_ms']:.3f} ms at batch {batch_size}")
        typer.echo(line)


def _example_input(model, meta: dict, shape: list[int], batch_size: int):
    """A batch to trace and time the model with: random images, or for a text model (shape
    ``2×T``) random token ids below its vocabulary size with a full attention mask."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if meta["architecture"]["name"] == "hf":
        if len(shape) != 2 or shape[0] != 2:
            raise ValueError(f"--input-shape {','.join(map(str, shape))}: a text model takes 2,T (token ids and "
                             "attention mask of T tokens), e.g. --input-shape 2,128")
        vocab = getattr(getattr(getattr(model, "model", None), "config", None), "vocab_size", None) or 100
        x = torch.ones(batch_size, *shape, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch_size, shape[1]), generator=generator)
        return x
    return torch.randn(batch_size, *shape, generator=generator)


def _input_shape(text: str | None, meta: dict, path: Path) -> list[int]:
    """One sample's shape: ``--input-shape C,H,W`` or the one the file records."""
    if text is None:
        shape = meta["summary"].get("input_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(f"{path} does not record its input shape; pass --input-shape, e.g. --input-shape 1,28,28")
        return shape
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--input-shape {text}: one sample's shape as positive integers, e.g. 3,32,32 or 64")
    return shape


@app.command("info")
@friendly_errors
def info_cmd(path: Path = typer.Argument(..., metavar="FILE", help="A compressed .safetensors written by lrc."),
             trust_code: bool = typer.Option(False, "--trust-code",
                                             help="Import the model factory the file names.")) -> None:
    """Print what a compressed model file holds, without a data set.

    Example: lrc info runs/digits-mlp/model.safetensors
    """
    from ..io import load_model

    model, meta = load_model(path, trust_code=trust_code)
    from ..surgery import compression_ratio, count_parameters

    arch = meta["architecture"]
    typer.echo(f"{path}: {meta['format']}, {arch['name']} {json.dumps(arch.get('args', {}))}")
    typer.echo(f"  parameters {count_parameters(model):,}  c.r. {compression_ratio(model):.1f}%")
    for layer, spec in meta["layers"].items():
        typer.echo(f"  {layer:<28} {spec['kind']:<14} rank {spec['rank']}")
    for key, value in meta["summary"].items():
        typer.echo(f"  {key}: {value}")


def main() -> None:
    """The command (installed as the ``lrc`` script through :func:`lrc._entry.main`, which also
    turns SIGTERM into :class:`~lrc._entry.Terminated`)."""
    app(prog_name="lrc")


if __name__ == "__main__":  # python -m lrc.cli
    from .._entry import main as entry

    entry()
