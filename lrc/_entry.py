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


def deferred_past_finalizer(signum: int, frame, delay: float = 0.02) -> bool:
    """For a handler that must raise: whether it was called inside a ``__del__`` (``frame`` and
    its callers), where an exception is printed as "Exception ignored in …" with its traceback
    and dropped, so the signal would be lost (tqdm's bars, for one, close in ``__del__``). If so,
    ``signum`` is sent to this process again after ``delay`` seconds, from a daemon thread, and
    the handler should return without raising."""
    while frame is not None and frame.f_code.co_name != "__del__":
        frame = frame.f_back
    if frame is None:
        return False
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
    return True


def _on_sigterm(signum, frame) -> None:
    if not deferred_past_finalizer(signum, frame):
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
    """Python's own SIGINT handler, except inside a finalizer (see :func:`deferred_past_finalizer`)."""
    if not deferred_past_finalizer(signum, frame):
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
