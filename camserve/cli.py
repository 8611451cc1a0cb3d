"""``camserve``: serve a model store, explain images from the shell, list models, follow jobs.

``camserve explain`` runs the pipeline in this process by default; with ``--url`` (or
CAMSERVE_URL) it sends the same work to a server. Errors print the service's code and message and
exit with status 1 (2 for a bad command line), never with a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from app import __version__
from app.errors import CamserveError
from app.pipeline.results import JobProgress
from app.settings import ConfigurationError, Settings, load_settings
from camserve.answers import Explained
from camserve.client import AsyncClient, Client
from camserve.errors import ClientError
from camserve.images import find_images
from camserve.local import LocalService, ModelRow
from camserve.outputs import OutputFolder
from camserve.request import ExplainRequest, split_names

F = TypeVar("F", bound=Callable[..., Any])
#: Errors about one image: the others of a folder still get explained.
IMAGE_ERRORS = frozenset(
    {"invalid_image", "unsupported_media_type", "image_too_large", "payload_too_large"}
)
err = Console(stderr=True)
out = Console()


class Failed(Exception):
    """Stop the command: the message is printed, the exit status is 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@contextmanager
def reported_errors() -> Iterator[None]:
    """Print the service's (or the pipeline's) code and message and exit 1; no traceback."""
    try:
        yield
    except (ClientError, CamserveError, Failed) as error:
        err.print(
            f"[red]camserve: error[/] [bold]{error.code}[/]: {error.message}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    except ConfigurationError as error:
        err.print(
            f"[red]camserve: error[/] [bold]configuration[/]: {error}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("camserve: interrupted")
        sys.exit(130)


def _quiet_logs(verbose: bool) -> None:
    """The pipeline's warnings, one line each (a failed model's traceback is not for a shell)."""

    class OneLine(logging.Formatter):
        def formatException(self, exc_info: Any) -> str:  # noqa: N802 (logging's name)
            return ""

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine("camserve: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def _settings(model_store: Path | None, device: str | None) -> Settings:
    overrides: dict[str, Any] = {}
    if model_store is not None:
        overrides["model_store"] = model_store
    if device is not None:
        overrides["device"] = device
    settings = load_settings(**overrides)
    if not settings.model_store.is_dir():
        raise Failed(
            "model_store_missing",
            f"the model store {str(settings.model_store)!r} is not a folder; pass --model-store "
            "or set CAMSERVE_MODEL_STORE, or send the work to a server with --url.",
        )
    return settings


def server_options(func: F) -> F:
    func = click.option(
        "--api-key",
        envvar="CAMSERVE_API_KEY",
        help="the server's API key (sent as X-API-Key) [env: CAMSERVE_API_KEY]",
    )(func)
    return click.option(
        "--url",
        envvar="CAMSERVE_URL",
        help="a camserve server to send the work to, e.g. http://127.0.0.1:8000; without it the "
        "model store is loaded in this process [env: CAMSERVE_URL]",
    )(func)


def store_options(func: F) -> F:
    func = click.option(
        "--device", help="auto, cpu, cuda or cuda:N (in-process runs) [env: CAMSERVE_DEVICE]"
    )(func)
    return click.option(
        "--model-store",
        type=click.Path(path_type=Path),
        help="folder with one folder per model (in-process runs) [env: CAMSERVE_MODEL_STORE]",
    )(func)


def request_options(func: F) -> F:
    """The options that describe an explanation, shared by ``explain`` and ``jobs submit``."""
    options = [
        click.option(
            "-m",
            "--method",
            "methods",
            multiple=True,
            help="CAM method(s): comma-separated or repeated (GradCAM,ScoreCAM); "
            "default: the model's",
        ),
        click.option("--model", help="model name; default: the store's default model"),
        click.option("--class-idx", type=int, help="class to explain; default: the top-1 class"),
        click.option(
            "--layer", "layers", multiple=True, help="target layer(s); several add a fused map"
        ),
        click.option(
            "--size",
            help="size of the pictures: 'original', 'input' or a longest side in pixels; "
            "default: the image's, scaled down to CAMSERVE_MAX_OUTPUT_SIDE",
        ),
        click.option(
            "--format",
            "image_format",
            type=click.Choice(["jpeg", "png", "webp"]),
            default="jpeg",
            show_default=True,
            help="encoding of the overlays",
        ),
        click.option("--raw", is_flag=True, help="also write each raw map as a .npy file"),
        click.option(
            "-O",
            "--option",
            "fields",
            multiple=True,
            metavar="NAME=VALUE",
            help="a method option or other /explain field, repeatable: -O num_samples=8 "
            "-O colormap=viridis -O alpha=0.4",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _request(
    methods: tuple[str, ...],
    model: str | None,
    class_idx: int | None,
    layers: tuple[str, ...],
    size: str | None,
    image_format: str,
    raw: bool,
    fields: tuple[str, ...],
) -> ExplainRequest:
    parsed = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="-O/--option")
        parsed[name.strip()] = value.strip()
    return ExplainRequest(
        methods=split_names(methods),
        model=model,
        class_idx=() if class_idx is None else (class_idx,),
        target_layers=split_names(layers),
        outputs=("overlay", "raw") if raw else ("overlay",),
        image_format=image_format,
        size=size,
        fields=parsed,
    )


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


# ---------------------------------------------------------------------------------------- serve


@main.command()
@click.option("--host", help="address to bind [env: CAMSERVE_HOST; default 127.0.0.1]")
@click.option("--port", type=int, help="port to bind [env: CAMSERVE_PORT; default 8000]")
@store_options
def serve(host: str | None, port: int | None, model_store: Path | None, device: str | None) -> None:
    """Run the HTTP service (what `python -m app` does); Ctrl-C drains and stops it.

    Every other setting comes from CAMSERVE_* variables (see the configuration docs)."""
    from app.__main__ import main as serve_main

    given = {"host": host, "port": port, "model_store": model_store, "device": device}
    sys.exit(serve_main(**{k: v for k, v in given.items() if v is not None}))


# -------------------------------------------------------------------------------------- explain


class Display:
    """A bar over the images, and one for a long method's own progress on each image."""

    def __init__(self, images: int, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=quiet or not err.is_terminal,  # no bars in logs and pipes
        )
        self.images = self.progress.add_task("images", total=images)

    def image_task(self, name: str, methods: str) -> TaskID:
        return self.progress.add_task(f"  {name} {methods}", total=None, visible=False)

    def report(self, task: TaskID, done: int, total: int) -> None:
        """A long method's progress (called from the model thread or the event loop)."""
        self.progress.update(task, completed=done, total=total, visible=total > 0)

    def finish(self, task: TaskID) -> None:
        self.progress.remove_task(task)
        self.progress.advance(self.images)


@main.command()
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
    request = _request(methods, model, class_idx, layers, size, image_format, raw, fields)
    with reported_errors():
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise Failed("file_not_found", f"no such file or folder: {', '.join(missing)}")
        images = find_images(list(paths))
        if not images:
            raise Failed("no_images", f"no image files in {', '.join(map(str, paths))}")
        _quiet_logs(verbose)
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
                    _explain_local(images, request, folder, display, _settings(model_store, device))
                )
        done = len(images) - failed
        err.print(f"{done} of {len(images)} images explained; results in {folder.results}")
        if failed:
            sys.exit(1)


def _summary(path: Path, explained: Explained) -> None:
    top = explained.predictions[0]
    methods = ", ".join(
        f"{m.method}: {m.label}" + ("" if m.class_idx == top.class_idx else " (asked)")
        for m in explained.methods.values()
    )
    out.print(
        f"{path}  {top.label} {top.probability:.2f}  [{methods}]", highlight=False, soft_wrap=True
    )


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
                    path.read_bytes(),
                    request,
                    progress=functools.partial(display.report, task),
                )
            except CamserveError as error:
                _image_failed(folder, path, error)
                failed += 1
            else:
                explained = Explained(response)
                folder.write(str(path), explained, "in-process")
                _summary(path, explained)
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
    as_job = use_jobs == "always" or (use_jobs == "auto" and request.runs_long)
    slots = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(client: AsyncClient, path: Path) -> None:
        nonlocal failed
        async with slots:
            task = display.image_task(path.name, ",".join(request.methods))
            try:
                if as_job:
                    job = await client.submit(path, request)
                    explained = await job.wait(
                        progress=lambda p: display.report(task, p.done, p.total)
                    )
                else:
                    explained = await client.send(path, request)
            except ClientError as error:
                _image_failed(folder, path, error)
                failed += 1
            else:
                folder.write(str(path), explained, "job" if as_job else "explain")
                _summary(path, explained)
            display.finish(task)

    async with AsyncClient(url, api_key=api_key) as client:
        await asyncio.gather(*(one(client, path) for path in images))
    return failed


# --------------------------------------------------------------------------------------- models


@main.command()
@server_options
@store_options
def models(
    url: str | None, api_key: str | None, model_store: Path | None, device: str | None
) -> None:
    """List the models with their status, target layers and the methods that apply."""
    with reported_errors():
        _quiet_logs(False)
        rows = (
            _remote_models(url, api_key) if url else asyncio.run(_local_models(model_store, device))
        )
        table = Table("model", "status", "layers", "methods")
        for row in rows:
            status = row.status if row.error is None else f"{row.status}: {row.error}"
            table.add_row(row.name, status, ", ".join(row.layers), ", ".join(row.methods))
        out.print(table)


async def _local_models(model_store: Path | None, device: str | None) -> list[ModelRow]:
    async with LocalService(_settings(model_store, device)) as service:
        return service.models()


def _remote_models(url: str, api_key: str | None) -> list[ModelRow]:
    with Client(url, api_key=api_key) as client:
        rows = []
        for summary in client.models().models:
            if summary.status != "ready":
                rows.append(ModelRow(summary.name, summary.status, error=summary.error))
                continue
            detail = client.model(summary.name)
            rows.append(
                ModelRow(
                    detail.name,
                    detail.status,
                    tuple(detail.target_layers),
                    tuple(detail.methods),
                )
            )
        return rows


# ----------------------------------------------------------------------------------------- jobs


@main.group()
def jobs() -> None:
    """Explanations as background jobs on a server: submit, watch, cancel."""


def _server(url: str | None) -> str:
    if not url:
        raise Failed("no_server", "jobs run on a server: pass --url or set CAMSERVE_URL.")
    return url


@jobs.command("submit")
@click.argument("image", type=click.Path(path_type=Path))
@request_options
@server_options
def submit_job(
    image: Path,
    methods: tuple[str, ...],
    model: str | None,
    class_idx: int | None,
    layers: tuple[str, ...],
    size: str | None,
    image_format: str,
    raw: bool,
    fields: tuple[str, ...],
    url: str | None,
    api_key: str | None,
) -> None:
    """Start explaining IMAGE as a job; prints the job's id (follow it with `jobs watch ID`)."""
    request = _request(methods, model, class_idx, layers, size, image_format, raw, fields)
    with reported_errors():
        if not image.is_file():
            raise Failed("file_not_found", f"no such file: {image}")
        with Client(_server(url), api_key=api_key) as client:
            job = client.submit(image, request)
        out.print(job.id, highlight=False, soft_wrap=True)


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
@server_options
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
        _summary(Path(source), explained)


@jobs.command("cancel")
@click.argument("job_id")
@server_options
def cancel_job(job_id: str, url: str | None, api_key: str | None) -> None:
    """Cancel a queued or running job (a finished one is forgotten)."""
    with reported_errors():
        with Client(_server(url), api_key=api_key) as client:
            view = client.job(job_id).cancel()
        out.print(f"{view.id} {view.status}", highlight=False, soft_wrap=True)


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
