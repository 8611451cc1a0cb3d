"""``camserve explain``: images in, overlays, raw maps and ``results.jsonl`` out; in this process
or on a server."""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

import click

from app.errors import CamserveError
from app.settings import Settings
from camserve.answers import Explained
from camserve.cli.common import (
    IMAGE_ERRORS,
    Display,
    Failed,
    build_request,
    check_image_file,
    err,
    file_error,
    local_settings,
    print_summary,
    quiet_logs,
    read_image_file,
    reported_errors,
    request_options,
    server_options,
    store_options,
)
from camserve.client import AsyncClient
from camserve.errors import ClientError
from camserve.images import find_images
from camserve.local import LocalService
from camserve.outputs import OutputFolder
from camserve.request import ExplainRequest

#: Answers that may wait for their turn to be shown, per image in flight on a server.
AHEAD_PER_SLOT = 8


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@request_options
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="folder for the overlays, raw maps and results.jsonl",
)
@server_options
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="images in flight at once on a server",
)
@click.option(
    "--jobs",
    "use_jobs",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="on a server, send images as /jobs: auto does for methods that run many forwards per "
    "image (Score-CAM family, Ablation-CAM, SmoothGrad-CAM++), which could outlast the "
    "request timeout; their progress shows",
)
@store_options
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@click.option("-v", "--verbose", is_flag=True, help="log the pipeline's progress (in-process)")
def explain(
    paths: tuple[Path, ...],
    methods: tuple[str, ...],
    model: str | None,
    class_idx: int | None,
    layers: tuple[str, ...],
    size: str | None,
    image_format: str,
    raw: bool,
    faithfulness: str | None,
    fields: tuple[str, ...],
    out: Path,
    url: str | None,
    api_key: str | None,
    concurrency: int,
    use_jobs: str,
    model_store: Path | None,
    device: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Explain images (files or folders of them): one overlay per image and method in OUT,
    .npy raw maps with --raw, and results.jsonl with the predictions and timings."""
    request = build_request(
        methods, model, class_idx, layers, size, image_format, raw, fields, faithfulness
    )
    with reported_errors():
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise Failed("file_not_found", f"no such file or folder: {', '.join(missing)}")
        images = find_images(list(paths))
        if not images:
            raise Failed("no_images", f"no image files in {', '.join(map(str, paths))}")
        quiet_logs(verbose)
        folder = OutputFolder(out)
        display = Display(len(images), quiet)
        with display.progress:
            if url:
                failed = asyncio.run(
                    _explain_remote(
                        images, request, folder, display, url, api_key, concurrency, use_jobs
                    )
                )
            else:
                failed = asyncio.run(
                    _explain_local(
                        images, request, folder, display, local_settings(model_store, device)
                    )
                )
        done = len(images) - failed
        err.print(f"{done} of {len(images)} images explained; results in {folder.results}")
        if failed:
            sys.exit(1)


def _image_failed(folder: OutputFolder, path: Path, error: ClientError | CamserveError) -> None:
    """Record an error about this image alone; any other error stops the run."""
    if error.code not in IMAGE_ERRORS:
        raise error
    folder.write_error(str(path), error.code, error.message)
    err.print(
        f"[red]camserve: {path}:[/] [bold]{error.code}[/]: {error.message}",
        highlight=False,
        soft_wrap=True,
    )


async def _explain_local(
    images: list[Path],
    request: ExplainRequest,
    folder: OutputFolder,
    display: Display,
    settings: Settings,
) -> int:
    failed = 0
    async with LocalService(settings) as service:
        for path in images:
            task = display.image_task(path.name, ",".join(request.methods))
            try:
                response = await service.explain(
                    path.name,
                    read_image_file(path),
                    request,
                    progress=functools.partial(display.report, task),
                )
            except (CamserveError, ClientError) as error:
                _image_failed(folder, path, error)
                failed += 1
            else:
                explained = Explained(response)
                folder.write(str(path), explained, "in-process")
                print_summary(path, explained)
            display.finish(task)
    return failed


async def _explain_remote(
    images: list[Path],
    request: ExplainRequest,
    folder: OutputFolder,
    display: Display,
    url: str,
    api_key: str | None,
    concurrency: int,
    use_jobs: str,
) -> int:
    """``concurrency`` images in flight at once; their lines and records come out in the
    order of ``images``, each as soon as the images before it are done. An image starts only
    while fewer than ``AHEAD_PER_SLOT * concurrency`` answers wait for their turn (a slow first
    image does not make the run hold a whole folder's answers)."""
    as_job = use_jobs == "always" or (use_jobs == "auto" and request.runs_long)
    slots = asyncio.Semaphore(concurrency)
    ahead = asyncio.Semaphore(AHEAD_PER_SLOT * concurrency)

    async def one(client: AsyncClient, index: int) -> tuple[int, Explained | ClientError]:
        path = images[index]
        await ahead.acquire()  # released once this image's answer is shown
        async with slots:
            task = display.image_task(path.name, ",".join(request.methods))
            try:
                check_image_file(path)
                if as_job:
                    job = await client.submit(path, request)
                    return index, await job.wait(
                        progress=lambda p: display.report(task, p.done, p.total)
                    )
                return index, await client.send(path, request)
            except OSError as error:  # the client's read of the file
                if error.filename is None:
                    raise
                return index, file_error(path, error)
            except ClientError as error:
                if error.code not in IMAGE_ERRORS:
                    raise  # stops the run, at once: not only when its turn to print comes
                return index, error
            finally:
                display.finish(task)

    failed = 0
    finished: dict[int, Explained | ClientError] = {}
    shown = 0
    async with AsyncClient(url, api_key=api_key) as client:
        tasks = [asyncio.ensure_future(one(client, index)) for index in range(len(images))]
        try:
            for next_done in asyncio.as_completed(tasks):
                index, answer = await next_done
                finished[index] = answer
                while shown in finished:
                    path, answer = images[shown], finished.pop(shown)
                    if isinstance(answer, ClientError):
                        _image_failed(folder, path, answer)
                        failed += 1
                    else:
                        folder.write(str(path), answer, "job" if as_job else "explain")
                        print_summary(path, answer)
                    shown += 1
                    ahead.release()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return failed
