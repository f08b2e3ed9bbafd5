"""``python -m chatstream``: the same as the ``chatstream`` command."""

from chatstream.cli import main

main()
