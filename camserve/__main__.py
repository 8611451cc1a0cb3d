"""``python -m camserve``: the ``camserve`` command line."""

from camserve.cli import run

run()
