"""What the commands share: the consoles, the error report, the options, the progress display."""

from __future__ import annotations

import logging
import stat
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

from app.errors import CamserveError
from app.settings import ConfigurationError, Settings, load_settings
from camserve._wire import service_url
from camserve.answers import Explained
from camserve.errors import ClientError
from camserve.request import ExplainRequest, split_names

F = TypeVar("F", bound=Callable[..., Any])
#: Errors about one file of the command line (or of a folder named there), found here.
FILE_ERRORS = frozenset({"file_not_found", "not_a_file", "unreadable_file"})
#: Errors about one image: the others of a folder still get explained.
IMAGE_ERRORS = FILE_ERRORS | {
    "invalid_image",
    "unsupported_media_type",
    "image_too_large",
    "payload_too_large",
}
#: What a file that is neither a regular file nor a folder is, by its mode.
_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
err = Console(stderr=True)
out = Console()


class Failed(Exception):
    """Stop the command: the message is printed, the exit status is 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_image_file(path: Path) -> None:
    """``ClientError`` (a ``FILE_ERRORS`` code) unless ``path`` is a regular file; found without
    opening it: the read of a FIFO would wait for a writer forever."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise file_error(path, error) from None
    if stat.S_ISDIR(mode):
        raise ClientError(
            "not_a_file",
            "a folder, not an image file (the folders in a folder are not searched); name it "
            "on the command line to explain its images",
        )
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
        raise ClientError(
            "not_a_file",
            f"{kind}, not a regular file: skipped without opening it; save the image as a file",
        )


def file_error(path: Path, error: OSError) -> ClientError:
    """What a failed look at (or read of) ``path`` means, as an error about that file alone."""
    if isinstance(error, FileNotFoundError):
        if path.is_symlink():
            return ClientError(
                "file_not_found",
                f"a broken link: its target {str(path.readlink())!r} does not exist; fix the "
                "link or remove it",
            )
        return ClientError("file_not_found", "no such file (was it removed during the run?)")
    if isinstance(error, IsADirectoryError):
        return ClientError("not_a_file", "a folder, not an image file")
    if isinstance(error, PermissionError):
        return ClientError(
            "unreadable_file",
            "permission denied: this user cannot read it; fix its permissions (chmod +r)",
        )
    return ClientError("unreadable_file", f"cannot be read: {error.strerror or error}")


def read_image_file(path: Path) -> bytes:
    """The bytes of the image file ``path``; ``ClientError`` (a ``FILE_ERRORS`` code) when it is
    not a regular file or cannot be read."""
    check_image_file(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise file_error(path, error) from None


def about(path: Path, error: ClientError) -> Failed:
    """``error`` about the one file of a command, as the error that stops it, naming the file."""
    return Failed(error.code, f"{path}: {error.message}")


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


def quiet_logs(verbose: bool) -> None:
    """The pipeline's warnings, one line each (a failed model's traceback is not for a shell)."""

    class OneLine(logging.Formatter):
        def formatException(self, exc_info: Any) -> str:  # noqa: N802 (logging's name)
            return ""

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine("camserve: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def local_settings(model_store: Path | None, device: str | None) -> Settings:
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


def _server_url(context: click.Context, param: click.Parameter, url: str | None) -> str | None:
    """``--url`` checked: an http(s) URL with a host, else a usage error that says so."""
    if not url:
        return None
    try:
        return service_url(url, "the URL")
    except ValueError as error:
        raise click.BadParameter(str(error), context, param) from None


def _url_options(func: F, url_help: str) -> F:
    func = click.option(
        "--api-key",
        envvar="CAMSERVE_API_KEY",
        help="the server's API key (sent as X-API-Key) [env: CAMSERVE_API_KEY]",
    )(func)
    return click.option("--url", envvar="CAMSERVE_URL", callback=_server_url, help=url_help)(func)


def server_options(func: F) -> F:
    """``--url`` and ``--api-key`` of a command that runs in this process without ``--url``."""
    return _url_options(
        func,
        "a camserve server to send the work to, e.g. http://127.0.0.1:8000; without it the "
        "model store is loaded in this process [env: CAMSERVE_URL]",
    )


def jobs_server_options(func: F) -> F:
    """``--url`` and ``--api-key`` of a ``jobs`` command, which needs a server."""
    return _url_options(
        func,
        "the camserve server that runs the jobs, e.g. http://127.0.0.1:8000 (required: jobs "
        "need a server) [env: CAMSERVE_URL]",
    )


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
            "--faithfulness",
            metavar="METRICS",
            help="score each map: deletion,insertion (RISE), confidence (Grad-CAM++'s drop, "
            "2 forwards) or road (ROAD: runs as a job); the scores go to results.jsonl. "
            "Steps: -O faithfulness_steps=16",
        ),
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


def build_request(
    methods: tuple[str, ...],
    model: str | None,
    class_idx: int | None,
    layers: tuple[str, ...],
    size: str | None,
    image_format: str,
    raw: bool,
    fields: tuple[str, ...],
    faithfulness: str | None = None,
) -> ExplainRequest:
    given: dict[str, list[str]] = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="-O/--option")
        given.setdefault(name.strip(), []).append(value.strip())
    # A name given twice stays a list: the service (or read_text here) takes it for a field
    # that repeats and refuses it for one that takes one value, instead of keeping the last.
    if faithfulness:
        given.setdefault("faithfulness", []).append(faithfulness)
    parsed: dict[str, str | list[str]] = {
        name: values[0] if len(values) == 1 else values for name, values in given.items()
    }
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


def print_summary(path: Path, explained: Explained) -> None:
    """One line per image: its top class and what each method explained (each class, with
    ``classes`` or ``top_classes``); a detector's boxes or a segmenter's classes (it has no top
    class) and what was explained of them."""
    if not explained.predictions:
        if explained.detections is not None:
            found = f"{len(explained.detections)} detection(s)"
        else:
            found = f"{len(explained.segments or [])} class(es)"
        what = ", ".join(
            f"{m.method}: "
            + (f"box {m.detection} " if m.detection is not None else "")
            + f"{m.label} {m.probability:.2f}"
            for m in explained.explanations
        )
        out.print(f"{path}  {found}  [{what}]", highlight=False, soft_wrap=True)
        return
    top = explained.predictions[0]
    methods = ", ".join(
        f"{m.method}: {m.label}" + ("" if m.class_idx == top.class_idx else " (asked)")
        for m in explained.explanations
    )
    out.print(
        f"{path}  {top.label} {top.probability:.2f}  [{methods}]", highlight=False, soft_wrap=True
    )
