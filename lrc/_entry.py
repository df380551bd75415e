"""The ``lrc`` console script. Tiny on purpose: a Ctrl-C or SIGTERM that arrives while the
command's modules are still being imported ends it with one line, not a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves its state itself): unwinds the stack so
    that temporary files are removed, then the command exits with status 143."""


def in_finalizer(frame) -> bool:
    """Whether ``frame`` (where a signal handler was called) runs inside a ``__del__``: an
    exception raised there is printed as "Exception ignored in …" with its traceback and then
    dropped, so the signal would be lost (tqdm's bars, for one, close in ``__del__``)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def deliver_later(signum: int, delay: float = 0.02) -> None:
    """Send ``signum`` to this process again after ``delay`` seconds, from a daemon thread:
    for a handler that must raise but was called inside a finalizer."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _on_sigterm(signum, frame) -> None:
    if in_finalizer(frame):
        deliver_later(signum)
        return
    raise Terminated()


@contextlib.contextmanager
def signals_noted():
    """Inside, SIGINT and SIGTERM are only noted; on leaving, the first one is raised
    (``KeyboardInterrupt``, :class:`Terminated`). For imports of C++ extensions (torch): raised
    inside one of their calls back into Python, the exception cannot be caught and aborts the
    process ("terminate called after throwing an instance of 'pybind11::error_already_set'")."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Terminated()


def _on_sigint(signum, frame) -> None:
    """Python's own SIGINT handler, except inside a finalizer (see :func:`in_finalizer`)."""
    if in_finalizer(frame):
        deliver_later(signum)
        return
    signal.default_int_handler(signum, frame)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except Terminated:
        sys.stderr.write("terminated\n")
        raise SystemExit(143) from None
    cli_main()
