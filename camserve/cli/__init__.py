"""``camserve``: serve a model store, explain images from the shell, list models, follow jobs.

``camserve explain`` runs the pipeline in this process by default; with ``--url`` (or
CAMSERVE_URL) it sends the same work to a server. Errors print the service's code and message and
exit with status 1 (2 for a bad command line), never with a traceback.
"""

from __future__ import annotations

import os
import sys

import click

from app import __version__
from camserve.cli.common import err
from camserve.cli.explain import explain
from camserve.cli.jobs import jobs
from camserve.cli.models import models
from camserve.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="camserve")
def main() -> None:
    """camserve: predictions and class activation maps for PyTorch image classifiers.

    \b
    camserve serve                         run the HTTP service
    camserve explain examples/ -m GradCAM  explain images (in-process, or --url a server)
    camserve models                        list the models of the store
    camserve jobs submit|watch|cancel      background jobs on a server
    """


for command in (serve, explain, models, jobs):
    main.add_command(command)


def run() -> None:
    """The console script: no traceback for what escapes, unless CAMSERVE_DEBUG is set."""
    try:
        main()
    except Exception as error:  # a bug: say so in one line
        if os.environ.get("CAMSERVE_DEBUG"):
            raise
        err.print(
            f"[red]camserve: internal error[/] {type(error).__name__}: {error} "
            "(set CAMSERVE_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
