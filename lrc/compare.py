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
``jobs`` trains several at once, in worker processes that the parent owns (:class:`_Pool`):
on SIGINT/SIGTERM it hands out no further run, passes the signal on to the running ones
(which save a resumable state), waits for them and raises ``TrainingStopped`` (exit status
128 + signal); workers whose parent dies (even by SIGKILL) save their state and exit.
``lora`` is matched to the parameter count of the ``lowrank-adam`` run of the same seed and
learning rate, as in the paper — or, when the configuration sets ``factorize.target_cr``, every
method is held at that c.r. on its own. ``from_dense`` starts every method from one dense model.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import json
import math
import multiprocessing
import multiprocessing.util
import numbers
import os
import pickle
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

import torch
import yaml

from ._entry import deferred_past_finalizer
from .io import CheckpointError, is_lrc_file, read_checkpoint, read_metadata
from .presets import DEFAULTS, METHODS, PresetError, for_method
from .train import TrainingStopped, train

__all__ = ["RunFailed", "check_arguments", "compare", "dense_checkpoint", "lr_name", "run_name"]

LOW_RANK = ("lowrank-adam", "lowrank-sgd", "dlrt-naive")

# configuration keys a finished run may differ in from the one compare would run now: the
# preset's name (a label) and lora's reference run (fixed by the layout of OUT, wherever it lies)
_PER_RUN_KEYS = ("_preset", "factorize.match_cr")
_UNSET = object()
# keys added with a default that is not what lrc did before they existed
_BEFORE_THE_KEY = {"optimizer.lr_scaling": "none", "factorize.allocation": "per-parameter"}

STOP_TIMEOUT_S = 60.0  # how long stopped workers may take to save their state before SIGKILL
_RESUME_HINT = "run the same lrc compare command again to resume"


def compare(cfg: dict, methods: list[str], seeds: list[int], out_dir: str | Path, progress: bool = True,
            log=print, jobs: int = 1, lrs: list[float] | None = None,
            from_dense: str | Path | None = None) -> list[dict]:
    """Run every (method, seed) of ``cfg`` — every (method, seed, lr) with a learning-rate
    grid ``lrs`` — into ``out_dir`` and write the tables and plots.

    ``jobs > 1`` trains that many runs at once in worker processes of one thread each (on a
    CPU with that many cores, or sharing one GPU); the results are the same as with one.
    SIGINT/SIGTERM then stop every run with a saved state (``TrainingStopped``, exit status
    128 + signal); a run that fails stops the others too and is raised naming it.
    ``from_dense`` (a run directory of ``lrc train --method dense`` or a dense checkpoint
    file) becomes every run's ``model.checkpoint``. A run already in ``out_dir`` whose saved
    configuration differs from the one asked for now is a ``ValueError``, before anything runs.
    """
    out_dir = Path(out_dir)
    budgeted = cfg["factorize"].get("target_cr") is not None  # every method at one c.r.: nothing to match
    check_arguments(methods, seeds, jobs, lrs, lora_matched=not budgeted)
    if from_dense is not None:
        cfg = copy.deepcopy(cfg)
        cfg["model"]["checkpoint"] = dense_checkpoint(from_dense)
        cfg["model"]["new_head"] = False  # the dense model's head is already the trained one
    grid = [None] if lrs is None else list(lrs)
    # lowrank-adam before lora, whose ranks it fixes: two waves
    waves = [[(m, s, lr) for lr in grid for s in seeds for m in methods if m != "lora" or budgeted],
             [("lora", s, lr) for lr in grid for s in seeds if "lora" in methods and not budgeted]]
    planned = [[(method, seed, lr, _run_config(cfg, method, seed, out_dir, lr),
                 out_dir / "runs" / run_name(method, seed, lr)) for method, seed, lr in wave] for wave in waves]
    for wave in planned:  # every run already there must be the one asked for, before anything trains
        for *_, run_cfg, run_dir in wave:
            check_same_config(run_cfg, run_dir)
    with _Pool(jobs, progress) if jobs > 1 else contextlib.nullcontext() as pool:
        for wave in planned:
            todo = runs_to_do([(f"{method}{'' if lr is None else f' lr {lr_name(lr)}'} seed {seed}", run_cfg, run_dir)
                               for method, seed, lr, run_cfg, run_dir in wave], log)
            if pool is None:
                _train_here(todo, progress)
            else:
                pool.run(todo)
    rows = summarize(out_dir, methods, seeds, lrs, cfg["data"].get("metric", "accuracy"))
    write_tables(out_dir, rows)
    best = None
    if lrs is not None:
        by_name = {lr_name(lr): lr for lr in lrs}
        best = {method: by_name[row["lr"]] for method, row in best_of_grid(rows).items()}
    plotted = plot(out_dir, methods, seeds, best)
    if not plotted:
        log("plots skipped: matplotlib is not installed (pip install 'lrc[plots]')")
    return rows


def runs_to_do(runs: list[tuple[str, dict, Path]], log) -> list[tuple[str, dict, Path]]:
    """The ``(label, config, run directory)`` of ``runs`` not finished yet, each logged as done
    already, resuming (a saved state) or training."""
    todo = []
    for label, run_cfg, run_dir in runs:
        if (run_dir / "model.safetensors").exists():
            log(f"{label}: done already")
            continue
        log(f"{label}: {'resuming' if (run_dir / 'state.pt').exists() else 'training'}")
        todo.append((label, run_cfg, run_dir))
    return todo


def lr_name(lr: float) -> str:
    """A learning rate as run names and tables show it: 0.003 → ``3e-3``, 0.01 → ``1e-2``,
    2.5e-4 → ``2.5e-4`` (at most 7 significant digits)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(method: str, seed: int, lr: float | None = None) -> str:
    """``<method>-s<seed>``, or ``<method>-lr<lr>-s<seed>`` for a run of a learning-rate grid."""
    return f"{method}-s{seed}" if lr is None else f"{method}-lr{lr_name(lr)}-s{seed}"


def check_arguments(methods: list[str], seeds: list[int], jobs: int, lrs: list[float] | None = None,
                    lora_matched: bool = True) -> None:
    """A ``PresetError`` (one line) for what :func:`compare` cannot run: no or unknown or
    repeated methods, lora without lowrank-adam (unless ``lora_matched`` is false), no or negative
    or repeated seeds, ``jobs`` < 1, an empty learning-rate grid or one with a rate that is not a
    finite number > 0."""
    if not methods:
        raise PresetError(f"--methods needs at least one method; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PresetError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    twice = [m for i, m in enumerate(methods) if m in methods[:i]]
    if twice:
        raise PresetError(f"--methods: {twice[0]} is given twice")
    if lora_matched and "lora" in methods and "lowrank-adam" not in methods:
        raise PresetError("lora is matched to the c.r. of lowrank-adam: include lowrank-adam in --methods")
    if not seeds:
        raise PresetError("--seeds must be ≥ 1")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds) \
            or len(set(seeds)) < len(seeds):
        raise PresetError(f"seeds must be different integers ≥ 0, got {seeds}")
    if isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or jobs < 1:
        raise PresetError(f"--jobs must be ≥ 1, got {jobs}")
    if lrs is not None:
        _check_lrs(lrs)


def _check_lrs(lrs: list[float]) -> None:
    if not lrs:
        raise PresetError("--lrs needs at least one learning rate, e.g. --lrs 1e-3,3e-3,1e-2")
    seen = set()
    for lr in lrs:
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise PresetError(f"--lrs: learning rate {lr!r} must be a finite number > 0, e.g. --lrs 1e-3,3e-3,1e-2")
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
    for key, value in _flatten(DEFAULTS).items():  # a key an older lrc did not have: it behaved so
        if key not in old and not isinstance(value, dict):  # (model.args is flattened away)
            old[key] = _BEFORE_THE_KEY.get(key, value)
    for cfg in (old, new):  # the allocation rule decides nothing without a budget
        if cfg.get("factorize.target_cr") is None and cfg.get("optimizer.max_params") is None:
            cfg["factorize.allocation"] = None
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
    run_cfg = for_method(cfg, method)  # with the preset's settings for that method (a grid's lr wins)
    run_cfg["train"]["seed"] = seed
    if lr is not None:
        run_cfg["optimizer"]["lr"] = float(lr)
    if method == "lora" and cfg["factorize"].get("target_cr") is None:
        run_cfg["factorize"]["match_cr"] = str(out_dir / "runs" / run_name("lowrank-adam", seed, lr))
    return run_cfg


class RunFailed(TrainingStopped):
    """A run of :func:`compare` failed in a worker process (an exception, or the process
    died); the message is one line that names the run. ``exit_code`` is 2 for bad input
    (a ``ValueError``, missing data, an unreadable checkpoint), else 1."""


class _Stop(BaseException):
    """Raised in a worker by SIGINT/SIGTERM while it waits for a run or sets one up."""


def _train_here(todo: list[tuple[str, dict, Path]], progress: bool) -> None:
    """``jobs`` = 1: the runs one after another in this process (Ctrl-C saves the state of
    the run in training, through its training loop)."""
    for label, run_cfg, run_dir in todo:
        try:
            _run(run_cfg, run_dir, progress)
        except TrainingStopped as e:
            if e.exit_code > 128:
                raise TrainingStopped(_interrupted(1), e.exit_code) from None
            raise TrainingStopped(f"{label}: {e}", e.exit_code) from None


def _interrupted(saved: int, killed: int = 0) -> str:
    """``interrupted; 2 runs saved their state — run the same lrc compare command again to resume``"""
    parts = [f"{saved} run{'s' if saved > 1 else ''} saved {'their' if saved > 1 else 'its'} state"] if saved else []
    if killed:
        parts.append(f"{killed} did not stop within {STOP_TIMEOUT_S:.0f} s and {'were' if killed > 1 else 'was'} "
                     "killed (the state of the last finished epoch is kept)")
    return "interrupted" + "".join(f"; {p}" for p in parts) + f" — {_RESUME_HINT}"


class _Worker:
    """One worker process of :class:`_Pool`, its end of the pipe and the run it trains."""

    def __init__(self, ctx, number: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, os.getpid()), name=f"lrc-compare-{number}")
        self.job: tuple[str, dict, Path] | None = None
        self.up = False  # it has said it started a run: it is past starting up
        self.dead = False
        # started with SIGINT/SIGTERM blocked, which it inherits: it unblocks them once it
        # handles them, so a signal that comes while it starts up is not a traceback
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
        try:
            self.process.start()
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child.close()

    def start(self, job: tuple[str, dict, Path], progress: bool) -> bool:
        _, run_cfg, run_dir = job
        try:
            self.conn.send((run_cfg, run_dir, progress))
        except OSError:  # it has died meanwhile
            self.dead = True
            return False
        self.job = job
        return True

    def outcome(self) -> tuple | None:
        """What the run it trains came to, once it has come to something: ``("done",)``,
        ``("stopped", message, exit_code)``, ``("aborted", signal)`` (stopped before training),
        ``("error", exception, traceback)`` or ``("died", exit status)``; None while it runs."""
        ended = False
        while not ended and self.conn.poll():
            try:
                result = self.conn.recv()
            except (EOFError, OSError):  # the process ends (or has ended) without a word
                ended = True
                break
            if result == ("started",):
                self.up = True
                continue
            self.job = None
            return result
        if not ended and self.process.is_alive():
            return None
        self.process.join(5)
        self.job, self.dead = None, True
        return ("died", self.process.exitcode)

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass

    def join(self, deadline: float) -> None:
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.process.close()


class _Pool:
    """The worker processes of ``compare(jobs > 1)``, owned by this (the parent) process.

    Each worker is a "spawn" process of one thread that takes one run at a time from the
    parent over its own pipe, so nothing queued starts once the parent stops. While the pool
    is open, SIGINT/SIGTERM to the parent only set a flag; the parent then hands out no
    further run, sends that signal to the busy workers (whose training loops save a
    resumable state and stop), waits for them (at most :data:`STOP_TIMEOUT_S`, then SIGKILL)
    and raises ``TrainingStopped(…, 128 + signal)``. The same happens when the signal goes to
    the whole process group, or to one worker only. A run that fails stops the others the
    same way and is raised (:class:`RunFailed`, or ``TrainingStopped`` for a non-finite
    loss) naming the run. Workers also end when the parent dies, whatever kills it
    (:func:`_worker_main`)."""

    def __init__(self, jobs: int, progress: bool) -> None:
        self.jobs, self.progress = jobs, progress
        self.workers: list[_Worker] = []
        self.signal: int | None = None
        self._old: dict = {}
        self._ctx = multiprocessing.get_context("spawn")
        self._started = 0

    def __enter__(self) -> _Pool:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if any(w.job for w in self.workers):  # only when the parent itself failed
                self._stop(signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            for w in self.workers:
                if exc_type is not None and not w.up:  # still starting up: nothing to wait for
                    w.process.kill()
                w.close()
            for w in self.workers:
                w.join(deadline)
            self.workers = []
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)
        if exc_type is None and self.signal is not None:  # a signal after the last run
            raise TrainingStopped(_interrupted(0), 128 + self.signal)

    def run(self, todo: list[tuple[str, dict, Path]]) -> None:
        """Train ``todo`` (label, config, run directory), at most ``jobs`` at once."""
        queue = deque(todo)
        progress = self.progress and len(todo) == 1  # one progress bar at a time
        failure: tuple[str, tuple] | None = None
        saved = 0
        while self.signal is None and failure is None:
            while queue:
                worker = self._idle(len(todo))
                if worker is None:
                    break
                if not worker.start(queue[0], progress):
                    continue
                queue.popleft()
            busy = [w for w in self.workers if w.job]
            if not busy:
                return
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
            for w in busy:
                label = w.job[0]
                outcome = w.outcome()
                if outcome is None or outcome[0] == "done":
                    continue
                if outcome[0] == "stopped" and outcome[2] > 128:  # the worker was sent a signal itself
                    saved += 1
                    self.signal = self.signal or outcome[2] - 128
                elif outcome[0] == "aborted":
                    self.signal = self.signal or outcome[1]
                elif failure is None:
                    failure = (label, outcome)
        more, killed = self._stop(self.signal or signal.SIGTERM)
        saved += more
        if failure is not None:
            raise _failure(*failure, saved)
        raise TrainingStopped(_interrupted(saved, killed), 128 + self.signal)

    def _idle(self, wanted: int) -> _Worker | None:
        for w in self.workers:
            if not w.dead and w.job is None and not w.process.is_alive():
                w.dead = True  # ended while idle (sent a signal of its own)
        for w in [w for w in self.workers if w.dead]:
            w.join(time.monotonic())
            self.workers.remove(w)
        idle = [w for w in self.workers if w.job is None]
        if idle:
            return idle[0]
        if len(self.workers) < min(self.jobs, wanted):
            self._started += 1
            self.workers.append(_Worker(self._ctx, self._started))
            return self.workers[-1]
        return None

    def _stop(self, signum: int) -> tuple[int, int]:
        """Send ``signum`` to the busy workers and wait for them; (runs that saved their
        state, workers killed after :data:`STOP_TIMEOUT_S`). A worker still starting up
        (it has not begun its run) is killed at once."""
        busy, saved = [], 0
        for w in [w for w in self.workers if w.job]:
            outcome = w.outcome()  # what it said so far
            if outcome is not None:
                saved += outcome[0] == "stopped"
                continue
            if w.up:
                w.signal(signum)
            else:
                w.process.kill()
            busy.append(w)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while busy and time.monotonic() < deadline:
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                 timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            for w in list(busy):
                outcome = w.outcome()
                if outcome is not None:
                    busy.remove(w)
                    saved += outcome[0] == "stopped"
        for w in busy:
            w.process.kill()
            w.process.join()
            w.job, w.dead = None, True
        return saved, len(busy)


def _failure(label: str, outcome: tuple, saved: int) -> TrainingStopped:
    """The exception for a failed run: one line naming it (and the runs stopped with it)."""
    kind = outcome[0]
    others = (f" ({saved} other run{'s' if saved > 1 else ''} stopped and saved {'their' if saved > 1 else 'its'} "
              f"state)") if saved else ""
    if kind == "stopped":  # a non-finite loss: the run saved its last good state
        return TrainingStopped(f"{label}: {outcome[1]}{others}", outcome[2])
    if kind == "died":
        return RunFailed(f"error: {label}: its worker process ended without a result (exit status "
                         f"{outcome[1]}){others}", 1)
    from .data import DataError

    e = outcome[1]
    if isinstance(e, (ValueError, DataError, CheckpointError, FileNotFoundError)):
        return RunFailed(f"error: {label}: {e}{others}", 2)
    return RunFailed(f"error: {label}: {type(e).__name__}: {e}{others} (LRC_DEBUG=1 shows the traceback)", 1)


class _WorkerSignals:
    """SIGINT/SIGTERM in a worker outside a training loop (whose own handler saves the run's
    state): raise :class:`_Stop` once while ``armed`` (waiting for a run, setting one up),
    else only note the signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    def _handle(self, signum, frame) -> None:
        if self.signum is None and self.armed and deferred_past_finalizer(signum, frame):
            return  # raised here it would be printed and dropped
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self.armed:
            self.armed = False
            raise _Stop(signum)


def _worker_main(conn, parent: int) -> None:
    """A worker process of :class:`_Pool`: trains the runs the parent sends, one at a time,
    and sends back each outcome; ends on ``None``, when the parent's end of the pipe closes,
    on a signal (after the training loop in progress saved its state) and when the parent
    dies (it is then sent SIGTERM). Never prints: the parent reports."""
    signals = _WorkerSignals()
    try:
        _one_thread()
        _die_with_parent(parent)
        signals.install()
        _serve(conn, signals)
    except (_Stop, EOFError, OSError):  # a signal while waiting; the parent is gone
        pass
    signals.armed = False
    # Nothing is left to write (run files are written atomically): end without the
    # interpreter's finalization, which with torch loaded takes a second or more, after what
    # multiprocessing does at a worker's end (its finalizers unlink the semaphores it made,
    # e.g. tqdm's lock, which the resource tracker would otherwise report as leaked).
    try:
        multiprocessing.util._exit_function()
    except Exception:
        return  # the ordinary way out
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(0)


def _serve(conn, signals: _WorkerSignals) -> None:
    """Train what comes through ``conn`` until ``None``, a signal or a run that did not end."""
    while signals.signum is None:
        signals.armed = True
        job = conn.recv()
        if job is None:
            return
        conn.send(("started",))
        outcome = None
        try:
            outcome = _outcome(*job)
            signals.armed = False
        except _Stop as e:
            if outcome is None:
                # before the training loop (nothing saved), or a second signal just after it
                # stopped with its state saved (the loop's ``TrainingStopped`` is the context)
                stopped = e.__context__
                outcome = (("stopped", str(stopped), stopped.exit_code) if isinstance(stopped, TrainingStopped)
                           else ("aborted", e.args[0]))
        signals.armed = False
        conn.send(outcome)
        if outcome[0] != "done":
            return


def _outcome(run_cfg: dict, run_dir: Path, progress: bool) -> tuple:
    try:
        _run(run_cfg, run_dir, progress)
        return ("done",)
    except TrainingStopped as e:
        return ("stopped", str(e), e.exit_code)
    except Exception as e:
        if os.environ.get("LRC_DEBUG"):
            traceback.print_exc()
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        return ("error", e, traceback.format_exc())


def _die_with_parent(parent: int) -> None:
    """Have this process sent SIGTERM when its parent dies, even by SIGKILL:
    ``prctl(PR_SET_PDEATHSIG)`` on Linux, else a thread that watches the parent's pid."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="lrc-watch-parent", daemon=True).start()
    if os.getppid() != parent:  # it died before that
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


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


def summarize(out_dir: Path, methods: list[str], seeds: list[int], lrs: list[float] | None = None,
              metric: str = "accuracy") -> list[dict]:
    """One row per method — per (method, lr) with a grid, then with an ``lr`` column — over
    the seeds' final epochs; with another ``metric`` than accuracy (``data.metric``: ``mcc``,
    ``f1``) also its mean and standard deviation (×100), by which the best of a grid is chosen."""
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
                "trainable_params": round(statistics.fmean(r.get("trainable_params", r["params"]) for r in last)),
            })
            if metric != "accuracy":
                score = [100 * r[f"test_{metric}"] for r in last]
                row.update({"metric": metric, "score_mean": statistics.fmean(score),
                            "score_std": statistics.stdev(score) if len(score) > 1 else 0.0})
            rows.append(row)
    return rows


METRIC_NAMES = {"mcc": "Matthews corr.", "f1": "F1"}


def _score(row: dict) -> float:
    """What a row is ranked by: the data set's metric, else the accuracy."""
    return row.get("score_mean", row["accuracy_mean"])


def best_of_grid(rows: list[dict]) -> dict[str, dict]:
    """Per method, its row with the highest mean accuracy (the first learning rate on a tie)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or _score(r) > _score(best[r["method"]]):
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
    metric = rows[0].get("metric")
    head = f" test {METRIC_NAMES[metric]} [×100] |" if metric else ""
    lines = [f"| method |{' lr |' if with_lr else ''}{head} test accuracy [%] | c.r. [%] | parameters | trainable | "
             "time / epoch [s] | optimizer state [KiB] |",
             f"| --- |{' ---: |' if with_lr else ''}{' ---: |' if metric else ''} ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lr = f" {r['lr']} |" if with_lr else ""
        score = f" {r['score_mean']:.2f} ± {r['score_std']:.2f} |" if metric else ""
        lines.append(f"| {r['method']} |{lr}{score} {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                     f"{r['compression_ratio']:.1f} | {r['params']:,} | {r.get('trainable_params', r['params']):,} | "
                     f"{r['time_per_epoch_s']:.2f} | {r['optimizer_state_bytes'] / 1024:.1f} |")
    return lines


def _grid_table(rows: list[dict]) -> list[str]:
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        cells.setdefault(r["method"], {})[r["lr"]] = grid_cell(r)
    metric = rows[0].get("metric")
    name = f"test {METRIC_NAMES[metric]}" if metric else "test accuracy"
    lines = [f"{name[0].upper()}{name[1:]} {'[×100]' if metric else '[%]'} (c.r.) per learning rate:", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "| --- |" + " ---: |" * len(lrs)]
    lines += [f"| {method} | " + " | ".join(by_lr.get(lr, "") for lr in lrs) + " |" for method, by_lr in cells.items()]
    lines += ["", f"Best of grid (the learning rate with the highest mean {name}, per method):", ""]
    return lines + _method_table(list(best_of_grid(rows).values()), with_lr=True)


def grid_cell(row: dict) -> str:
    """A cell of the per-learning-rate table: ``mean ± std (c.r. %)``."""
    key = "score" if "score_mean" in row else "accuracy"
    return f"{row[key + '_mean']:.2f} ± {row[key + '_std']:.2f} ({row['compression_ratio']:.1f} %)"


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
            ax.set(xlabel="epoch", title=title)
    for ax in axes:  # logarithmic where there is something to show on it (fixed ranks truncate nothing)
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
    axes[0].set_ylabel(f"median over layers (seed {seed})")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "diagnostics.png", dpi=120)
    plt.close(fig)
