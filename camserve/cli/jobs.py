"""``camserve jobs submit|watch|cancel``: explanations as background jobs on a server."""

from __future__ import annotations

from pathlib import Path

import click

from app.pipeline.results import JobProgress
from camserve.cli.common import (
    Display,
    Failed,
    about,
    build_request,
    check_image_file,
    file_error,
    jobs_server_options,
    out,
    print_summary,
    reported_errors,
    request_options,
)
from camserve.client import Client
from camserve.errors import ClientError
from camserve.outputs import OutputFolder


@click.group()
def jobs() -> None:
    """Explanations as background jobs on a server: submit, watch, cancel."""


def _server(url: str | None) -> str:
    if not url:
        raise Failed("no_server", "jobs run on a server: pass --url or set CAMSERVE_URL.")
    return url


@jobs.command("submit")
@click.argument("image", type=click.Path(path_type=Path))
@request_options
@jobs_server_options
def submit_job(
    image: Path,
    methods: tuple[str, ...],
    model: str | None,
    class_idx: int | None,
    layers: tuple[str, ...],
    size: str | None,
    image_format: str,
    raw: bool,
    faithfulness: str | None,
    fields: tuple[str, ...],
    url: str | None,
    api_key: str | None,
) -> None:
    """Start explaining IMAGE as a job; prints the job's id (follow it with `jobs watch ID`)."""
    request = build_request(
        methods, model, class_idx, layers, size, image_format, raw, fields, faithfulness
    )
    with reported_errors():
        _check_one_file(image)
        with Client(_server(url), api_key=api_key) as client:
            try:
                job = client.submit(image, request)
            except OSError as error:  # the client's read of the file
                if error.filename is None:
                    raise
                raise about(image, file_error(image, error)) from None
        out.print(job.id, highlight=False, soft_wrap=True)


def _check_one_file(image: Path) -> None:
    """``Failed``, naming ``image``, unless it is one image file that exists."""
    if image.is_dir():
        raise Failed(
            "not_a_file",
            f"{image} is a folder; `jobs submit` takes one image file: name one of its images, "
            f"or explain the whole folder on the server with `camserve explain {image} --jobs "
            "always --url ...`",
        )
    if not image.exists() and not image.is_symlink():
        raise Failed("file_not_found", f"no such file: {image}")
    try:
        check_image_file(image)
    except ClientError as error:
        raise about(image, error) from None


@jobs.command("watch")
@click.argument("job_id")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="folder for the job's overlays, raw maps and results.jsonl",
)
@jobs_server_options
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def watch_job(job_id: str, out: Path, url: str | None, api_key: str | None, quiet: bool) -> None:
    """Follow a job's progress until it ends, then write its results like `explain`."""
    with reported_errors():
        with Client(_server(url), api_key=api_key) as client:
            display = Display(1, quiet)
            task = display.image_task(job_id, "")

            def report(progress: JobProgress) -> None:
                display.report(task, progress.done, progress.total)

            with display.progress:
                explained = client.job(job_id).wait(progress=report)
                display.finish(task)
        source = explained.result.filename
        OutputFolder(out).write(source, explained, "job")
        print_summary(Path(source), explained)


@jobs.command("cancel")
@click.argument("job_id")
@jobs_server_options
def cancel_job(job_id: str, url: str | None, api_key: str | None) -> None:
    """Cancel a queued or running job (a finished one is forgotten)."""
    with reported_errors():
        with Client(_server(url), api_key=api_key) as client:
            view = client.job(job_id).cancel()
        out.print(f"{view.id} {view.status}", highlight=False, soft_wrap=True)
