"""``python -m lrc``: the ``lrc`` command."""

from ._entry import main

main()
