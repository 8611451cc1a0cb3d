"""Models that change while a real server runs (``python -m app``), in poll and explicit mode:
added, changed under concurrent load without a failed request, broken, removed; versions."""

from __future__ import annotations

import base64
import importlib.util
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.models.registry import ModelEntry
from tests.conftest import assert_error, files, image_bytes
from tests.http.test_server import ROOT, environment, free_port
from tests.models.store_helpers import break_weights, new_weights, put_tiny
from tests.models.test_reload import nan_weights

CLIENTS = 8
ADMIN = {"X-Admin-Key": "admin"}
IMAGE = image_bytes((32, 32), seed=3)


class Server:
    def __init__(self, store: Path, log: Path, **env: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("w") as out:  # a file, not a pipe: the access log must never block it
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=ROOT,
                env=environment(store, CAMSERVE_PORT=str(port), **env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        with httpx.Client(timeout=1) as client:  # one client (and TLS context) for every poll
            until(lambda: self.ready(client), 60, f"server did not start:\n{self.output()}")

    def ready(self, client: httpx.Client) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(self.output())
        try:
            return client.get(f"{self.url}/ready").status_code == 200
        except httpx.TransportError:
            return False

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.output()


def until(check: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def predict(url: str, model: str, version: int | None = None) -> httpx.Response:
    data = {"model": model, "top_k": "3"} | ({"version": str(version)} if version else {})
    return httpx.post(
        f"{url}/predict", files=[("file", ("a.png", IMAGE, "image/png"))], data=data, timeout=30
    )


def logits(response: httpx.Response) -> tuple[float, ...]:
    assert response.status_code == 200, response.text
    predictions = sorted(response.json()["results"][0]["predictions"], key=lambda p: p["class_idx"])
    return tuple(round(p["logit"], 5) for p in predictions)


def model_state(url: str, name: str) -> dict[str, Any] | None:
    for model in httpx.get(f"{url}/models", timeout=5).json()["models"]:
        if model["name"] == name:
            return model
    return None


class Load:
    """``CLIENTS`` threads predicting on one model without pause, each recording its answers."""

    def __init__(self, url: str, model: str) -> None:
        self.answers: list[list[tuple[int, tuple[float, ...] | str]]] = [[] for _ in range(CLIENTS)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, model, i)) for i in range(CLIENTS)
        ]

    def _run(self, url: str, model: str, index: int) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(
                    f"{url}/predict",
                    files=[("file", ("a.png", IMAGE, "image/png"))],
                    data={"model": model, "top_k": "3"},
                )
                if response.status_code == 200:
                    self.answers[index].append((200, logits(response)))
                else:
                    self.answers[index].append((response.status_code, response.text))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def seen(self) -> set[tuple[float, ...] | str]:
        return {answer for client in self.answers for _, answer in client}


def check_swap(load: Load, old: tuple[float, ...], new: tuple[float, ...]) -> None:
    """No request failed; every answer is the old or the new model's; each client saw the old
    model, then the new one, never the old one again."""
    failures = [a for client in load.answers for a in client if a[0] != 200]
    assert not failures, failures[:3]
    assert load.seen() == {old, new}
    for client in load.answers:
        sequence = [answer for _, answer in client]
        assert sequence, "a client got no answer"
        switched = sequence.index(new) if new in sequence else len(sequence)
        assert all(a == old for a in sequence[:switched]) and all(
            a == new for a in sequence[switched:]
        )


def changed_under_load(url: str, folder: Path, swap: Callable[[], None]) -> None:
    old = logits(predict(url, folder.name))
    with Load(url, folder.name) as load:
        until(lambda: sum(map(len, load.answers)) >= 2 * CLIENTS, 30, "no load ran")
        new_weights(folder, seed=11)
        swap()
        until(lambda: len(load.seen()) > 1, 30, "the new weights never answered")
        settled = sum(map(len, load.answers))
        until(lambda: sum(map(len, load.answers)) >= settled + 2 * CLIENTS, 30, "load stalled")
    new = logits(predict(url, folder.name))
    assert new != old
    check_swap(load, old, new)


@pytest.fixture
def poll_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=0)
    server = Server(
        store, tmp_path / "log.jsonl", CAMSERVE_MODEL_CONTROL="poll", CAMSERVE_MODEL_POLL_S="0.1"
    )
    yield server, store
    assert "Traceback" not in server.stop()


@pytest.fixture
def explicit_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=0)
    server = Server(
        store, tmp_path / "log.jsonl", CAMSERVE_MODEL_CONTROL="explicit", CAMSERVE_ADMIN_KEY="admin"
    )
    yield server, store
    assert "Traceback" not in server.stop()


def test_poll_adds_changes_and_removes_models(poll_server: tuple[Server, Path]) -> None:
    server, store = poll_server
    url = server.url
    assert predict(url, "added").status_code == 404
    put_tiny(store, "added", seed=5)
    until(lambda: predict(url, "added").status_code == 200, 20, "the new folder never served")

    changed_under_load(url, store / "tiny", swap=lambda: None)  # the poll notices on its own
    until(lambda: "model tiny version 1 freed" in server.output(), 20, "the old model lingers")

    serving = logits(predict(url, "tiny"))
    break_weights(store / "tiny")
    until(
        lambda: bool((model_state(url, "tiny") or {}).get("reload_error")),
        20,
        "the failed reload is not shown",
    )
    detail = httpx.get(f"{url}/models/tiny", timeout=5).json()
    assert detail["status"] == "ready" and "cannot read weights" in detail["reload_error"]
    assert logits(predict(url, "tiny")) == serving

    shutil.rmtree(store / "added")
    until(lambda: predict(url, "added").status_code == 404, 20, "the removed folder still serves")
    assert model_state(url, "added") is None


def test_explicit_mode_changes_models_only_on_request(
    explicit_server: tuple[Server, Path],
) -> None:
    server, store = explicit_server
    url = server.url
    put_tiny(store, "added", seed=5)
    time.sleep(0.3)
    assert predict(url, "added").status_code == 404  # nobody asked
    loaded = httpx.post(f"{url}/models/added/load", headers=ADMIN, timeout=30)
    assert loaded.status_code == 200 and loaded.json()["status"] == "ready"
    assert predict(url, "added").status_code == 200

    def reload() -> None:
        answer = httpx.post(f"{url}/v2/repository/models/tiny/load", headers=ADMIN, timeout=30)
        assert answer.status_code == 200, answer.text

    changed_under_load(url, store / "tiny", swap=reload)

    serving = logits(predict(url, "tiny"))
    break_weights(store / "tiny")
    failed = httpx.post(f"{url}/models/tiny/load", headers=ADMIN, timeout=30)
    assert failed.status_code == 422 and "cannot read weights" in failed.json()["error"]["message"]
    assert "cannot read weights" in httpx.get(f"{url}/models/tiny").json()["reload_error"]
    assert logits(predict(url, "tiny")) == serving

    shutil.rmtree(store / "added")
    time.sleep(0.3)
    assert predict(url, "added").status_code == 200  # still served until unloaded
    unloaded = httpx.post(f"{url}/v2/repository/models/added/unload", headers=ADMIN, timeout=30)
    assert unloaded.status_code == 200
    assert predict(url, "added").status_code == 404


def test_versions_through_native_and_oip_routes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=0)
    put_tiny(store, "ver", seed=1, version=1)
    put_tiny(store, "ver", seed=2, version=2, policy="[version_policy]\nall = true")
    timm_served = importlib.util.find_spec("timm") is not None
    if timm_served:
        from tests.models.test_timm_models import put_timm

        put_timm(store, "effnet", "efficientnet_b0", size=64)
    server = Server(store, tmp_path / "log.jsonl")
    url = server.url
    try:
        newest, first = predict(url, "ver"), predict(url, "ver", version=1)
        assert newest.json()["version"] == 2 and first.json()["version"] == 1
        assert logits(newest) != logits(first)
        missing = predict(url, "ver", version=3)
        assert missing.status_code == 404 and "has no version 3" in missing.text

        body = {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(IMAGE).decode()],
                }
            ]
        }
        oip = httpx.post(f"{url}/v2/models/ver/versions/1/infer", json=body, timeout=30).json()
        assert oip["model_version"] == "1"
        assert tuple(round(v, 5) for v in oip["outputs"][0]["data"]) == logits(first)
        assert httpx.post(f"{url}/v2/models/ver/infer", json=body).json()["model_version"] == "2"
        assert httpx.get(f"{url}/v2/models/ver").json()["versions"] == ["1", "2"]
        assert httpx.get(f"{url}/v2/models/ver/versions/2/ready").status_code == 200
        assert httpx.get(f"{url}/v2/models/ver/versions/3/ready").status_code == 503

        listed = model_state(url, "ver") or {}
        assert listed["version"] == 2 and [v["version"] for v in listed["versions"]] == [1, 2]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'camserve_model_ready{model="ver",version="1"} 1.0' in metrics
        served = 'method="",model="ver",route="/predict",status="200",version="1"} 1.0'
        assert f"camserve_requests_total{{{served}" in metrics
        if timm_served:  # a timm model through the real server too
            assert predict(url, "effnet").json()["model"] == "effnet"
    finally:
        assert "Traceback" not in server.stop()


# --------------------------------------------------------------------------- a hostile store


def odd_store(root: Path, marker: Path) -> Path:
    """``tiny`` and ``digits`` (version 1 beside a folder "²") serve; beside them, folders that
    once stopped every load, ran code or served files from outside the store."""
    put_tiny(root, "tiny", seed=0)
    put_tiny(root, "digits", seed=1, version=1)
    (root / "digits" / "²").mkdir()
    nested = put_tiny(root, "nested", seed=2)
    (nested / "model.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    evil = put_tiny(root, "evil", seed=3)
    text = (evil / "model.toml").read_text()
    (evil / "model.toml").write_text(
        text.replace(
            'architecture = "tests.fixtures_models:build_tiny"',
            f'architecture = "subprocess:run"\nkwargs = {{ args = ["touch", "{marker}"] }}',
        )
    )
    (root.parent / "secret.txt").write_text("one\ntwo\nthree\n")
    secret = put_tiny(root, "secret", seed=4)
    text = (secret / "model.toml").read_text()
    (secret / "model.toml").write_text(text.replace('"labels.txt"', '"../../secret.txt"'))
    huge = put_tiny(root, "huge", seed=5)
    text = (huge / "model.toml").read_text()
    (huge / "model.toml").write_text(text.replace('"test model"', '"' + "d" * 40_000_000 + '"'))
    return root


def test_a_hostile_store_leaves_the_good_models_serving(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    client = make_client(model_store=odd_store(tmp_path / "store", marker), default_model="tiny")
    assert client.get("/ready").status_code == 200
    listing = client.get("/models")
    assert len(listing.content) < 20_000  # no 40 MB description sent back
    models = {m["name"]: m for m in listing.json()["models"]}
    assert {name: m["status"] for name, m in models.items()} == {
        "digits": "ready",
        "evil": "failed",
        "huge": "failed",
        "nested": "failed",
        "secret": "failed",
        "tiny": "ready",
    }
    assert "CAMSERVE_TRUSTED_MODULES" in models["evil"]["error"] and not marker.exists()
    assert "labels '../../secret.txt' must be a path inside" in models["secret"]["error"]
    assert "the most allowed is 1048576" in models["huge"]["error"]
    assert "nests arrays or tables too deeply" in models["nested"]["error"]
    for name in ("tiny", "digits"):
        explained = client.post(
            "/explain", files=files(image_bytes((32, 32))), data={"model": name}
        )
        assert explained.status_code == 200, explained.text
    detail = client.get("/models/secret")
    assert detail.status_code == 503 and "three" not in detail.text
    assert "must be a path inside" in detail.json()["error"]["message"]
    for path in ("/v2/models/evil/ready", "/v1/models/evil"):
        assert client.get(path).status_code == 503
    assert client.get("/v2/models/tiny/ready").status_code == 200


def test_names_too_long_for_a_folder_are_400_on_every_route(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    client = make_client(model_store=tmp_path, model_control="explicit", admin_key="admin")
    name = "n" * 5000
    assert_error(client.post(f"/models/{name}/load", headers=ADMIN), 400, "invalid_model_name")
    assert_error(client.get(f"/models/{name}"), 400, "invalid_model_name")
    for path in (f"/v2/repository/models/{name}/load", f"/v2/models/{name}/ready"):
        response = client.post(path, headers=ADMIN) if "load" in path else client.get(path)
        assert response.status_code == 400 and "1 to 255 bytes" in response.json()["error"]
    predicted = client.post("/predict", files=files(image_bytes()), data={"model": name})
    assert_error(predicted, 400, "invalid_model_name")


def test_a_repository_load_of_an_odd_folder_is_a_clear_422(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    client = make_client(model_store=tmp_path, model_control="explicit", admin_key="admin")
    odd = put_tiny(tmp_path, "odd", seed=1, version=1)
    (odd / "²").mkdir()
    (odd / "model.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    message = assert_error(client.post("/models/odd/load", headers=ADMIN), 422, "model_load_failed")
    assert "nests arrays or tables too deeply" in message
    oip = client.post("/v2/repository/models/odd/load", headers=ADMIN)
    assert oip.status_code == 422 and "too deeply" in oip.json()["error"]
    assert client.get("/ready").status_code == 200


def test_ready_is_503_while_a_model_stays_loading_past_the_bound(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    client = make_client(model_store=tmp_path, model_load_stall_s=30)
    registry = client.app.state.registry
    registry.entries = {**registry.entries, "stuck": ModelEntry("stuck")}
    assert client.get("/ready").status_code == 200  # loading, within the bound
    registry.entries["stuck"].since -= 31
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["models"]["stuck"] == "loading"
    assert client.get("/v2/health/ready").status_code == 503
    assert client.post("/predict", files=files(image_bytes())).status_code == 200


def test_a_swap_to_nan_weights_is_refused_and_the_old_version_serves(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    client = make_client(model_store=tmp_path, model_control="explicit", admin_key="admin")
    before = client.post("/predict", files=files(image_bytes())).json()
    nan_weights(folder)
    message = assert_error(
        client.post("/models/tiny/load", headers=ADMIN), 422, "model_load_failed"
    )
    assert "NaN or infinite" in message
    assert "NaN or infinite" in client.get("/models/tiny").json()["reload_error"]
    after = client.post("/predict", files=files(image_bytes()))
    assert after.status_code == 200 and after.json()["results"] == before["results"]


def test_poll_mode_logs_a_broken_folder_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=0)
    odd = put_tiny(store, "odd", seed=1, version=1)
    (odd / "²").mkdir()
    server = Server(
        store, tmp_path / "log.jsonl", CAMSERVE_MODEL_CONTROL="poll", CAMSERVE_MODEL_POLL_S="0.1"
    )
    try:
        (odd / "model.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
        until(lambda: (model_state(server.url, "odd") or {}).get("reload_error"), 30, "no reload")
        assert predict(server.url, "odd").status_code == 200  # the old load goes on serving
        time.sleep(1.0)  # about ten more scans
        assert predict(server.url, "tiny").status_code == 200
    finally:
        log = server.stop()
    assert "Traceback" not in log
    assert log.count("nests arrays or tables too deeply") == 1
