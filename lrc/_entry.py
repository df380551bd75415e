"""The ``lrc`` console script. Tiny on purpose: a Ctrl-C or SIGTERM that arrives while the
command's modules are still being imported ends it with one line, not a traceback."""

from __future__ import annotations

import signal
import sys


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves its state itself): unwinds the stack so
    that temporary files are removed, then the command exits with status 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except Terminated:
        sys.stderr.write("terminated\n")
        raise SystemExit(143) from None
    cli_main()
