"""``camserve`` end to end: in-process and against a real server, the same answers as /explain;
every bad input ends in a message and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import httpx
import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from camserve import ServiceError, cli
from camserve.cli.common import Display
from tests.camserve.conftest import API_KEY
from tests.camserve.test_client import explain_over_http
from tests.http.test_server import ROOT, environment, free_port


def camserve(*args: str | Path) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def in_process(store: Path) -> list[str | Path]:
    return ["--model-store", store, "--device", "cpu", "--model", "tiny"]


def remote(url: str) -> list[str | Path]:
    return ["--url", url, "--api-key", API_KEY]


def lines(folder: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_in_process_and_url_give_what_explain_gives(
    store: Path, server: str, images: Path, tmp_path: Path
) -> None:
    path = images / "a.png"
    answer = explain_over_http(server, path, method="GradCAM,ScoreCAM")
    (expected,) = answer["results"]
    runs = {"in-process": in_process(store), "url": remote(server)}
    for name, where in runs.items():
        folder = tmp_path / name
        result = camserve(
            "explain",
            path,
            "-m",
            "GradCAM,ScoreCAM",
            "--raw",
            "--format",
            "png",
            "-o",
            folder,
            "--jobs",
            "never",
            *where,
        )
        assert result.exit_code == 0, result.output
        (line,) = lines(folder)
        got = {p["class_idx"]: p["logit"] for p in line["predictions"]}
        for prediction in expected["predictions"]:
            assert got[prediction["class_idx"]] == pytest.approx(prediction["logit"], abs=1e-5)
        for explanation in expected["explanations"]:
            method = explanation["method"]
            final = explanation["maps"][-1]
            raw = np.load(folder / f"a.{method}.npy")
            np.testing.assert_allclose(raw, final["raw"]["values"], atol=1e-5, err_msg=name)
            overlay = Image.open(folder / f"a.{method}.png")
            assert overlay.size == (final["width"], final["height"])
        assert line["via"] == ("in-process" if name == "in-process" else "explain")


def test_a_folder_gives_one_overlay_per_image_and_method(
    store: Path, images: Path, tmp_path: Path
) -> None:
    result = camserve(
        "explain", images, "-m", "GradCAM", "-m", "CAM", "-o", tmp_path, *in_process(store)
    )
    # notes.txt is not picked from the folder: only image files are.
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.CAM.jpg", "a.GradCAM.jpg", "b.CAM.jpg", "b.GradCAM.jpg", "results.jsonl"]
    assert [line["file"] for line in lines(tmp_path)] == [
        str(images / "a.png"),
        str(images / "b.png"),
    ]
    assert "2 of 2 images explained" in result.output


@pytest.mark.parametrize("where", ["in-process", "url"])
def test_a_long_method_reports_its_own_progress(
    store: Path,
    server: str,
    images: Path,
    tmp_path: Path,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports: list[tuple[int, int]] = []
    report = Display.report
    monkeypatch.setattr(
        Display,
        "report",
        lambda self, task, done, total: (
            reports.append((done, total)),
            report(self, task, done, total),
        ),
    )
    args = in_process(store) if where == "in-process" else remote(server)
    result = camserve(
        "explain", images / "a.png", "-m", "ScoreCAM", "-O", "batch_size=1", "-o", tmp_path, *args
    )
    assert result.exit_code == 0, result.output
    assert reports and reports[-1] == (4, 4)  # a masked forward per channel of `features`
    assert lines(tmp_path)[0]["via"] == ("in-process" if where == "in-process" else "job")


def test_models_lists_the_same_models_here_and_on_the_server(store: Path, server: str) -> None:
    here, there = camserve("models", "--model-store", store), camserve("models", *remote(server))
    assert here.exit_code == there.exit_code == 0, here.output + there.output
    for output in (here.output, there.output):
        assert "tiny" in output and "features" in output and "GradCAM" in output
        assert "broken" in output and "failed" in output


def test_jobs_submit_watch_and_cancel(server: str, images: Path, tmp_path: Path) -> None:
    submitted = camserve(
        "jobs", "submit", images / "b.png", "-m", "ScoreCAM", "--raw", *remote(server)
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip()
    watched = camserve("jobs", "watch", job_id, "-o", tmp_path, *remote(server))
    assert watched.exit_code == 0, watched.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.ScoreCAM.jpg",
        "b.ScoreCAM.npy",
        "results.jsonl",
    ]
    slow = camserve(
        "jobs",
        "submit",
        images / "a.png",
        "-m",
        "SSCAM",
        "--model",
        "resnet",
        "-O",
        "num_samples=64",
        "-O",
        "batch_size=1",
        *remote(server),
    )
    cancelled = camserve("jobs", "cancel", slow.output.strip(), *remote(server))
    assert cancelled.exit_code == 0 and cancelled.output.strip().endswith("cancelled")


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def always_busy() -> Iterator[str]:
    """A server that answers every request with 503 overloaded and Retry-After: 0."""

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.refuse()

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.refuse()

        def refuse(self) -> None:
            body = json.dumps(
                {"error": {"code": "overloaded", "message": "Too many requests wait already."}}
            ).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def bad_inputs(store: Path, server: str, busy: str, images: Path) -> dict[str, tuple]:  # type: ignore[type-arg]
    image = images / "a.png"
    return {
        "missing file": (("explain", images / "nope.png", *in_process(store)), "file_not_found"),
        "unknown method here": (
            ("explain", image, "-m", "Nope", *in_process(store)),
            "unsupported_method",
        ),
        "unknown method there": (
            ("explain", image, "-m", "Nope", *remote(server)),
            "unsupported_method",
        ),
        "unknown option": (
            ("explain", image, "-O", "nope=1", *in_process(store)),
            "malformed_parameter",
        ),
        "a typo of an option there": (
            ("explain", image, "-O", "colormp=jet", *remote(server)),
            "malformed_parameter",
        ),
        "a one-value option given twice here": (
            ("explain", image, "-O", "top_k=3", "-O", "top_k=4", *in_process(store)),
            "malformed_parameter",
        ),
        "a one-value option given twice there": (
            ("explain", image, "-O", "top_k=3", "-O", "top_k=4", *remote(server)),
            "malformed_parameter",
        ),
        "a number in other digits": (
            ("explain", image, "--size", "\u0664\u0660\u0660", *in_process(store)),
            "malformed_parameter",
        ),
        "unreachable server": (
            ("explain", image, "--url", f"http://127.0.0.1:{free_port()}"),
            "unreachable",
        ),
        "wrong key": (("explain", image, "--url", server, "--api-key", "wrong"), "unauthorized"),
        "no key": (("models", "--url", server), "unauthorized"),
        "a model that failed": (
            ("explain", image, "--model", "broken", *remote(server)),
            "model_unavailable",
        ),
        "a 503 that persists": (("explain", image, "--url", busy), "overloaded"),
        "missing store": (
            ("explain", image, "--model-store", images / "nothing"),
            "model_store_missing",
        ),
        "jobs without a server": (("jobs", "cancel", "x"), "no_server"),
        "a folder to jobs submit": (("jobs", "submit", images, *remote(server)), "not_a_file"),
        "a server URL that is not its root": (
            ("models", "--url", f"{server}/v2", "--api-key", API_KEY),
            "not_camserve",
        ),
    }


def test_bad_inputs_end_in_a_message_and_exit_1(
    store: Path,
    server: str,
    always_busy: str,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAMSERVE_URL", raising=False)
    for case, (args, code) in bad_inputs(store, server, always_busy, images).items():
        result = camserve(*args, "-o", tmp_path) if args[0] == "explain" else camserve(*args)
        assert result.exit_code == 1, (case, result.output)
        assert f"error {code}:" in result.output, (case, result.output)
        assert_no_traceback(result)


def test_one_bad_image_of_a_folder_is_recorded_and_the_rest_explained(
    store: Path, images: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes((images / "a.png").read_bytes())
    (folder / "bad.png").write_bytes(b"not a png")
    result = camserve("explain", folder, "-o", tmp_path / "out", *in_process(store))
    assert result.exit_code == 1, result.output
    assert "bad.png: unsupported_media_type" in result.output
    bad, good = lines(tmp_path / "out")
    assert bad["error"]["code"] == "unsupported_media_type" and good["predictions"]
    assert_no_traceback(result)


@pytest.mark.parametrize("where", ["in-process", "url"])
def test_entries_of_a_folder_that_are_not_readable_files_are_reported_and_skipped(
    store: Path,
    server: str,
    images: Path,
    tmp_path: Path,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes((images / "a.png").read_bytes())
    (folder / "broken.png").symlink_to(folder / "gone.png")
    (folder / "d.png").mkdir()
    (folder / "locked.png").write_bytes((images / "b.png").read_bytes())
    fifo = folder / "fifo.png"
    os.mkfifo(fifo)
    # Root reads a file of mode 000: its read fails as it would for another user.
    read_bytes = Path.read_bytes

    def refuse_locked(path: Path) -> bytes:
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    # Were the FIFO opened, its read would wait for a writer: this one comes after a while, so
    # that the test fails instead of hanging.
    unblock = threading.Timer(20, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.start()
    try:
        where_args = in_process(store) if where == "in-process" else remote(server)
        result = camserve("explain", folder, "-o", tmp_path / "out", *where_args)
    finally:
        unblock.cancel()
    assert result.exit_code == 1, result.output
    expected = {
        "broken.png": "file_not_found",
        "d.png": "not_a_file",
        "fifo.png": "not_a_file",
        "locked.png": "unreadable_file",
    }
    for name, code in expected.items():
        assert f"{name}: {code}" in result.output, (name, result.output)
    assert "a broken link" in result.output and "a FIFO" in result.output
    assert "permission denied" in result.output and "a folder" in result.output
    records = {Path(line["file"]).name: line for line in lines(tmp_path / "out")}
    assert {name: records[name]["error"]["code"] for name in expected} == expected
    assert records["good.png"]["predictions"]
    assert "1 of 5 images explained" in result.output
    assert_no_traceback(result)


def test_an_output_folder_that_cannot_be_written_is_named(
    store: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    image = images / "a.png"
    for out in (in_the_way, in_the_way / "out"):
        result = camserve("explain", image, "-o", out, *in_process(store))
        assert result.exit_code == 1, result.output
        assert "error output_not_writable:" in result.output, result.output
        assert repr(str(out)) in result.output and "-o/--out" in result.output
        assert_no_traceback(result)
    write_text = Path.write_text

    def read_only(path: Path, *args: object, **kwargs: object) -> int:
        if path.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return write_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", read_only)  # root writes in a folder of mode 555
    result = camserve("explain", image, "-o", tmp_path / "locked", *in_process(store))
    assert result.exit_code == 1, result.output
    assert "output_not_writable" in result.output and "Permission denied" in result.output
    assert_no_traceback(result)


def test_jobs_submit_of_a_folder_says_it_takes_one_file(images: Path) -> None:
    result = camserve("jobs", "submit", images, "--url", "http://127.0.0.1:1")
    assert result.exit_code == 1
    assert f"{images} is a folder; `jobs submit` takes one image file" in result.output
    assert "no such file" not in result.output


def test_a_url_without_a_scheme_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for command in (("models",), ("jobs", "cancel", "x"), ("explain", "x.png")):
        result = camserve(*command, "--url", "localhost:18741")
        assert result.exit_code == 2, result.output
        assert "http:// or https://" in result.output and "http://localhost:18741" in result.output
    monkeypatch.setenv("CAMSERVE_URL", "localhost:18741")
    result = camserve("models")
    assert result.exit_code == 2 and "http:// or https://" in result.output


def test_a_url_below_the_servers_root_is_named_with_the_root(server: str) -> None:
    result = camserve("models", "--url", f"{server}/v2", "--api-key", API_KEY)
    assert result.exit_code == 1, result.output
    assert f"{server}/v2 does not look like the root of a camserve server" in result.output
    assert f"e.g. {server}" in result.output


def test_concurrency_bounds_the_images_in_flight_on_a_server(tmp_path: Path) -> None:
    in_flight, most = 0, 0
    lock = threading.Lock()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            nonlocal in_flight, most
            self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            time.sleep(0.2)
            with lock:
                in_flight -= 1
            body = json.dumps({"error": {"code": "invalid_image", "message": "bad"}}).encode()
            self.send_response(422)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(6):
        (folder / f"{number}.png").write_bytes(b"png")
    try:
        result = camserve(
            "explain", folder, "--concurrency", "2", "-o", tmp_path / "out",
            "--url", f"http://127.0.0.1:{httpd.server_address[1]}",
        )  # fmt: skip
    finally:
        httpd.shutdown()
    assert result.exit_code == 1  # every image refused: recorded, and the run goes on
    assert len(lines(tmp_path / "out")) == 6
    assert most == 2


def test_a_server_run_prints_in_the_order_of_the_images(tmp_path: Path) -> None:
    # The server answers the first image last: it holds that request until the others are
    # answered. The lines and the records still come in the order of the images.
    others_answered = threading.Event()
    answered = 0
    lock = threading.Lock()

    class FirstLast(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            nonlocal answered
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            name = body.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
            if name == "0.png":
                others_answered.wait(timeout=30)
            error = {"error": {"code": "invalid_image", "message": f"{name} refused"}}
            reply = json.dumps(error).encode()
            self.send_response(422)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            with lock:
                answered += 1
                if answered == 3:
                    others_answered.set()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FirstLast)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(4):
        (folder / f"{number}.png").write_bytes(b"png")
    try:
        result = camserve(
            "explain", folder, "-o", tmp_path / "out",
            "--url", f"http://127.0.0.1:{httpd.server_address[1]}",
        )  # fmt: skip
    finally:
        httpd.shutdown()
    assert others_answered.is_set()  # the first image was indeed answered last
    names = [f"{number}.png" for number in range(4)]
    assert [Path(line["file"]).name for line in lines(tmp_path / "out")] == names
    printed = [line for line in result.output.splitlines() if "refused" in line]
    assert [line.split(": invalid_image")[0].rsplit("/", 1)[1] for line in printed] == names


def test_answers_waiting_for_their_turn_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first image is answered only after every other image has had its chance to start
    # (many turns of the event loop): only those of the window do, 2 per slot with 2 slots.
    module = sys.modules["camserve.cli.explain"]
    monkeypatch.setattr(module, "AHEAD_PER_SLOT", 2)
    holding: list[str] = []  # 0.png while it is held
    while_held: list[str] = []

    class HoldFirst:
        def __init__(self, url: str, api_key: str | None = None) -> None:
            pass

        async def __aenter__(self) -> HoldFirst:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

        async def send(self, path: Path, request: object) -> None:
            while_held.extend([path.name] if holding else [])
            if path.name == "0.png":
                holding.append(path.name)
                for _ in range(100):
                    await asyncio.sleep(0)
                holding.clear()
            await asyncio.sleep(0)
            raise ServiceError(422, "invalid_image", f"{path.name} refused")

    monkeypatch.setattr(module, "AsyncClient", HoldFirst)
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(10):
        (folder / f"{number}.png").write_bytes(b"png")
    result = camserve(
        "explain", folder, "--concurrency", "2", "-o", tmp_path / "out", "--url", "http://x"
    )
    assert result.exit_code == 1 and len(lines(tmp_path / "out")) == 10
    assert while_held == ["1.png", "2.png", "3.png"]  # 4.png waited for 0.png to be shown
    assert result.output.index("0.png refused") < result.output.index("1.png refused")


def test_serve_runs_the_service_and_stops_cleanly(store: Path) -> None:
    port = free_port()
    env = environment(store)
    process = subprocess.Popen(
        [sys.executable, "-m", "camserve", "serve", "--port", str(port), "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # One client (and TLS context) for every poll, polling no faster than a new client each
        # time did: each answer is an access-log line in the pipe read only once it stops.
        with httpx.Client(timeout=1) as poll:
            while time.monotonic() < deadline:
                try:
                    if poll.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=5).json()
        assert models["default_model"] == "tiny"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "camserve", "explain", str(tmp_path / "missing.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "file_not_found" in done.stderr and "missing.png" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_help_explains_every_option() -> None:
    def commands(group: click.Group, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        for name, command in group.commands.items():
            yield [*path, name], command
            if isinstance(command, click.Group):
                yield from commands(command, [*path, name])

    found = list(commands(cli.main, []))
    assert {" ".join(p) for p, _ in found} >= {
        "serve",
        "explain",
        "models",
        "jobs submit",
        "jobs watch",
        "jobs cancel",
    }
    for path, command in found:
        shown = camserve(*path, "--help")
        assert shown.exit_code == 0 and command.help, path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.split()[0] in shown.output, (path, param.name)


def test_serve_says_its_store_and_device_are_the_services() -> None:
    shown = " ".join(camserve("serve", "--help").output.split())
    assert "in-process" not in shown
    assert "[env: CAMSERVE_MODEL_STORE; default model_store]" in shown


@pytest.mark.parametrize("command", ["submit", "watch", "cancel"])
def test_the_jobs_commands_say_that_they_need_a_server(command: str) -> None:
    shown = " ".join(camserve("jobs", command, "--help").output.split())
    assert "loaded in this process" not in shown
    assert "the camserve server that runs the jobs" in shown and "required" in shown


def test_the_client_and_the_cli_never_import_the_web_framework() -> None:
    code = (
        "import sys, camserve, camserve.local, camserve.cli; "
        "assert not {'fastapi', 'starlette'} & set(sys.modules), 'fastapi imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_dff_writes_each_concept_and_its_top_labels(
    store: Path, images: Path, tmp_path: Path
) -> None:
    path = images / "a.png"
    where = in_process(store)
    args = ["explain", path, "-m", "DFF", "-O", "n_components=2", "--raw", "-o", tmp_path]
    result = camserve(*args, *where)
    assert result.exit_code == 0, result.output
    (line,) = lines(tmp_path)
    (explanation,) = line["explanations"]
    concepts = explanation["concepts"]
    assert [c["index"] for c in concepts] == [0, 1]
    for concept in concepts:
        assert concept["top_labels"] and {"class_idx", "label"} <= set(concept["top_labels"][0])
        assert (tmp_path / concept["overlay"]).name == f"a.DFF.concept{concept['index']}.jpg"
        assert np.load(tmp_path / concept["raw"]).shape == (32, 32)


def test_a_detectors_boxes_and_a_segmenters_classes_get_their_files_and_lines(
    tmp_path: Path,
) -> None:
    """``-O box=all``: one overlay per box, named by the box's index (two boxes may be of one
    class), and each results.jsonl entry says which detection, box and score it explains."""
    scene = ROOT / "examples" / "scenes" / "scene.png"
    store = ROOT / "model_store"
    args = ("--model-store", store, "--device", "cpu", "--model", "shapes-detect")
    result = camserve("explain", scene, "-O", "box=all", "-o", tmp_path, *args)
    assert result.exit_code == 0, result.output
    [line] = lines(tmp_path)
    entries = line["explanations"]
    assert [e["detection"] for e in entries] == list(range(len(entries))) and len(entries) >= 2
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [f"scene.LayerCAM.box{k}.jpg" for k in range(len(entries))] + ["results.jsonl"]
    )
    for entry in entries:
        assert entry["overlay"] == f"scene.LayerCAM.box{entry['detection']}.jpg"
        assert len(entry["box"]) == 4 and 0 < entry["score"] <= 1
        assert "region" not in entry
    # The summary line names the boxes (a detector has no top class; this crashed once).
    assert f"{len(entries)} detection(s)  [LayerCAM: box 0 " in result.output
    segmenter = (*args[:-1], "shapes-segment")
    result = camserve("explain", scene, "-O", "top_classes=2", "-o", tmp_path / "s", *segmenter)
    assert result.exit_code == 0, result.output
    [line] = lines(tmp_path / "s")
    assert [e["region"] for e in line["explanations"]] == ["mask", "mask"]
    assert "class(es)  [LayerCAM: " in result.output
