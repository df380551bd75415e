"""Running the ``lrc`` command from tests.

``lrc(*args)`` runs the command in this process (the same Typer app the console script calls,
with stdout and stderr captured at the file-descriptor level, so that what worker processes
write is captured too) and returns a ``subprocess.CompletedProcess``: a fresh interpreter per
call cost ~2–3 s of imports, minutes of the suite. Warnings reach the captured stderr under a
fresh interpreter's filters, as the console script would show them, and the command computes with
one thread, as under ``ENV`` (bitwise the results of a worker of ``lrc compare --jobs``). Tests of what only a real
process shows — signals, the console script's start-up, torchrun — start one with ``LRC`` and
``ENV``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings

import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LRC = [sys.executable, "-m", "lrc"]


class CommandTimeout(Exception):
    pass


def _timed_out(signum, frame):
    raise CommandTimeout("the command ran past the test's timeout")


def lrc(*args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``lrc ARGS`` in this process: its exit status, stdout and stderr. A command still running
    after ``timeout`` seconds is interrupted (an exception raised by SIGALRM), so that a hang
    fails its test instead of stalling the suite."""
    from lrc.cli import app

    argv = [str(a) for a in args]
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    streams = sys.stdout, sys.stderr
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in streams:
            stream.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
        try:
            torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))  # as the command ran in ENV: results bitwise alike
            signal.signal(signal.SIGALRM, _timed_out)
            signal.alarm(timeout)
            with warnings.catch_warnings():
                _interpreter_warnings()
                app(args=argv, prog_name="lrc", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the console script would end with: a traceback, status 1
            traceback.print_exc()
            code = 1
        finally:
            signal.alarm(0)
            sys.stdout.close()  # flushes; the descriptors stay open (closefd=False)
            sys.stderr.close()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            torch.set_num_threads(threads)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", errors="replace")
        stderr = err.read().decode("utf-8", errors="replace")
    proc = subprocess.CompletedProcess(["lrc", *argv], code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"lrc {' '.join(argv)} exited {code}:\n{stderr}")
    return proc


def _interpreter_warnings() -> None:
    """Warnings as a fresh ``python`` shows them: each once per place, on ``sys.stderr``, except
    the deprecation, import and resource warnings that Python hides by default."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))
