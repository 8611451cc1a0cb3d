"""Run the gateway topology here and break it: nginx in front of 3 replicas, one killed midway.

Starts 3 ``python -m app`` replicas on local ports, HTTP and gRPC (JSON logs to files), and nginx
with deploy/gateway/nginx.conf (its upstreams, listen and log lines swapped for local ones),
sends mixed requests through the gateway a few at a time, HTTP ones and gRPC calls with
tritonclient.grpc, kills one replica with SIGKILL once half of them are answered (while a gRPC
call is in flight), and reports: requests per replica, the client-side errors (and which
replica the gateway had sent them to), and the request ids found in each replica's log. Then it
floods each door, HTTP and gRPC, from one address, which the gateway must limit.

    tools/gateway_check.sh            # installs nginx from apt if missing, then runs this
    python tools/gateway_check.py --requests 200 --concurrency 4
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.models.zoo.shapes_dataset import generate_sample  # noqa: E402

CONF = ROOT / "deploy" / "gateway" / "nginx.conf"
MODEL = "shapes"
HTTP_KINDS = (
    "predict",
    "explain",
    "oip-infer",
    "v1-predict",
    "v1-explain",
    "models",
    "health",
    "bad-method",
)
#: Calls to the gRPC listener, with tritonclient.grpc: their outcome is a gRPC status code.
GRPC_KINDS = (
    "grpc-live",
    "grpc-ready",
    "grpc-metadata",
    "grpc-infer",
    "grpc-explain",
    "grpc-bad-model",
)
KINDS = HTTP_KINDS + GRPC_KINDS
#: The code each gRPC call must end with; anything else is an error.
GRPC_EXPECTED = {kind: "OK" for kind in GRPC_KINDS} | {"grpc-bad-model": "NOT_FOUND"}
INFER_KINDS = ("grpc-infer", "grpc-explain")
#: Every gRPC call's request id starts so (tritonclient does not read the answer's metadata).
GRPC_ID = "grpc-"
#: Once half the requests are answered, how long the kill may wait for a ModelInfer in flight.
KILL_WAIT_S = 2.0


@dataclass
class Outcome:
    index: int
    kind: str
    sent_id: str | None
    status: int | None
    """The HTTP status; None for no answer and for a gRPC call."""
    returned_id: str | None
    error: str | None = None
    sent_at: float = 0.0
    code: str | None = None
    """A gRPC call's status code (``OK``, ``NOT_FOUND``, ...); None for HTTP."""
    ended_at: float = 0.0

    @property
    def grpc(self) -> bool:
        return self.kind in GRPC_KINDS

    @property
    def failed(self) -> bool:
        """HTTP: no answer or a 5xx. gRPC: a code other than its kind's (OK, or NOT_FOUND for
        an unknown model), or an answer that is not what was asked."""
        if self.grpc:
            return self.code != GRPC_EXPECTED[self.kind] or self.error is not None
        return self.status is None or self.status >= 500

    @property
    def answer(self) -> str:
        if self.grpc:
            return self.code or "no answer"
        return str(self.status) if self.status is not None else "no answer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(generate_sample(np.random.default_rng(seed)).image).save(buffer, "PNG")
    return buffer.getvalue()


def _servers(ports: list[int]) -> str:
    return "".join(
        f"        server 127.0.0.1:{port} max_fails=2 fail_timeout=10s;\n" for port in ports
    )


def gateway_conf(
    ports: list[int],
    listen: int,
    work: Path,
    memory_jobs: bool = True,
    grpc_ports: list[int] | None = None,
    grpc_listen: int | None = None,
) -> str:
    """The shipped nginx.conf with local replicas, port and log (and, for replicas that keep
    their jobs in memory, /jobs hashed by client address). The gRPC upstream gets
    ``grpc_ports`` (default: ``ports``, enough for nginx to accept the file) and listens on
    ``grpc_listen`` (default: a free port)."""
    text = CONF.read_text()
    for marker, chosen in (("replicas", ports), ("grpc-replicas", grpc_ports or ports)):
        text, count = re.subn(
            rf"( *# {marker}:begin\n).*?( *# {marker}:end\n)",
            lambda m, servers=_servers(chosen): m.group(1) + servers + m.group(2),
            text,
            flags=re.S,
        )
        if count == 0:
            raise SystemExit(f"{CONF}: no {marker}:begin/end block")
    grpc_at = grpc_listen if grpc_listen is not None else free_port()
    text = text.replace("listen 8081 http2;", f"listen 127.0.0.1:{grpc_at} http2;")
    if memory_jobs:
        if "proxy_pass http://camserve;  # jobs:upstream" in text:
            # These replicas keep their jobs in memory: /jobs by client address.
            text = text.replace(
                "proxy_pass http://camserve;  # jobs:upstream", "proxy_pass http://camserve_jobs;"
            )
        else:
            raise SystemExit(f"{CONF}: no '# jobs:upstream' line in location /jobs")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    return text.replace("/var/log/nginx/access.log", str(work / "access.log"))


def start_replica(
    port: int, log: Path, extra_env: dict[str, str] | None = None, grpc_port: int | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CAMSERVE_PORT": str(port),
        # Three replicas on one host: gRPC on a port of its own each, or none.
        "CAMSERVE_GRPC_PORT": str(grpc_port) if grpc_port is not None else "",
        "CAMSERVE_HOST": "127.0.0.1",
        "CAMSERVE_LOG_FORMAT": "json",
        "CAMSERVE_LOG_LEVEL": "INFO",
        "CAMSERVE_DEVICE": "cpu",
        "CAMSERVE_MAX_MODEL_SLOTS": "1",
        # Three replicas on a small machine: one torch thread each.
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=handle, stderr=handle
    )


def wait_refused(port: int, timeout: float = 10.0) -> float | None:
    """When the port stops accepting connections (a killed process holds its listening socket
    until the kernel has torn it down, and the kernel accepts into the backlog until then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return time.perf_counter()
        time.sleep(0.002)
    return None


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready in {timeout:.0f} s: {url}")


def wait_grpc_ready(target: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.closing(grpcclient.InferenceServerClient(target)) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(InferenceServerException):
                if client.is_server_ready(client_timeout=2):
                    return
            time.sleep(0.5)
    raise SystemExit(f"gRPC not ready in {timeout:.0f} s: {target}")


def send(
    client: httpx.Client, triton: grpcclient.InferenceServerClient, index: int, images: list[bytes]
) -> Outcome:
    kind = KINDS[index % len(KINDS)]
    if kind in GRPC_KINDS:
        return call_grpc(triton, index, kind, images[index % len(images)])
    outcome = send_http(client, index, kind, images)
    outcome.ended_at = time.perf_counter()
    return outcome


def call_grpc(
    triton: grpcclient.InferenceServerClient, index: int, kind: str, image: bytes
) -> Outcome:
    """One gRPC call through the gateway, with its own request id (metadata ``x-request-id``:
    tritonclient does not give back the answer's metadata, so the id is how the gateway's and
    the replicas' logs are matched)."""
    sent_id = f"{GRPC_ID}{index:03d}"
    headers = {"x-request-id": sent_id}
    outcome = Outcome(index, kind, sent_id, None, None, sent_at=time.perf_counter())
    try:
        outcome.error = grpc_call(triton, kind, image, headers)
        outcome.code = "OK"
    except InferenceServerException as error:
        outcome.code = (error.status() or "UNKNOWN").removeprefix("StatusCode.")
        outcome.error = error.message()
    outcome.ended_at = time.perf_counter()
    if outcome.code == GRPC_EXPECTED[kind] and outcome.code != "OK":
        outcome.error = None  # the refusal asked for
    return outcome


def grpc_call(
    triton: grpcclient.InferenceServerClient, kind: str, image: bytes, headers: dict[str, str]
) -> str | None:
    """Make the call; what is wrong with its answer, or None."""
    if kind == "grpc-live":
        return None if triton.is_server_live(headers=headers) else "not live"
    if kind == "grpc-ready":
        return None if triton.is_server_ready(headers=headers) else "not ready"
    if kind == "grpc-metadata":
        metadata = triton.get_model_metadata(MODEL, headers=headers)
        return None if metadata.name == MODEL else f"metadata of {metadata.name!r}"
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    if kind == "grpc-bad-model":
        triton.infer(MODEL + "-nope", [tensor], headers=headers)
        return "an unknown model answered"
    names = ["logits", "cam"] if kind == "grpc-explain" else ["logits"]
    outputs = [grpcclient.InferRequestedOutput(name) for name in names]
    parameters = {"method": "GradCAM"} if kind == "grpc-explain" else None
    result = triton.infer(MODEL, [tensor], outputs=outputs, headers=headers, parameters=parameters)
    shapes = {name: result.as_numpy(name).shape for name in names}
    if shapes["logits"][0] != 1 or ("cam" in shapes and shapes["cam"][0] != 1):
        return f"shapes {shapes}"
    return None


def send_http(client: httpx.Client, index: int, kind: str, images: list[bytes]) -> Outcome:
    sent_id = f"gw-{index:03d}" if index % 2 == 0 else None
    headers = {"X-Request-ID": sent_id} if sent_id else {}
    image = images[index % len(images)]
    b64 = base64.b64encode(image).decode()
    files = {"file": ("shape.png", image, "image/png")}
    sent_at = time.perf_counter()
    try:
        if kind == "predict":
            r = client.post("/predict", files=files, data={"top_k": "3"}, headers=headers)
        elif kind == "explain":
            data = {"method": "GradCAM", "size": "input"}
            r = client.post("/explain", files=files, data=data, headers=headers)
        elif kind == "oip-infer":
            body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
            r = client.post(f"/v2/models/{MODEL}/infer", json=body, headers=headers)
        elif kind == "v1-predict":
            body = {"instances": [{"image": {"b64": b64}, "top_k": 2}]}
            r = client.post(f"/v1/models/{MODEL}:predict", json=body, headers=headers)
        elif kind == "v1-explain":
            body = {"instances": [{"image": {"b64": b64}, "method": "LayerCAM", "output": "raw"}]}
            r = client.post(f"/v1/models/{MODEL}:explain", json=body, headers=headers)
        elif kind == "models":
            r = client.get("/models", headers=headers)
        elif kind == "health":
            r = client.get("/health", headers=headers)
        else:
            r = client.post("/explain", files=files, data={"method": "nope"}, headers=headers)
    except httpx.HTTPError as error:
        message = f"{type(error).__name__}: {error}"
        return Outcome(index, kind, sent_id, None, None, message, sent_at)
    return Outcome(
        index, kind, sent_id, r.status_code, r.headers.get("x-request-id"), None, sent_at
    )


JOBS = 5
IMAGES = 16
#: Between polls of a job: the gateway answers one address 10 requests a second (bursts of 50),
#: gRPC calls included.
POLL_S = 0.1


def follow_jobs(client: httpx.Client, images: list[bytes], timeout: float = 60.0) -> list[str]:
    """POST explanation jobs and poll each one to its end through the gateway: the jobs upstream
    must send the polls to the replica that holds the job. Each job's final status (or the
    HTTP status that stopped it)."""
    statuses = []
    for image in images:
        files = {"file": ("shape.png", image, "image/png")}
        created = client.post("/jobs", files=files, data={"method": "ScoreCAM", "output": "raw"})
        if created.status_code != 202:
            statuses.append(f"POST {created.status_code}")
            continue
        url = created.json()["url"]
        deadline = time.monotonic() + timeout
        status = "timed out"
        while time.monotonic() < deadline:
            polled = client.get(url)
            if polled.status_code != 200:
                status = f"GET {polled.status_code}"
                break
            status = polled.json()["status"]
            if status not in ("queued", "running"):
                break
            time.sleep(POLL_S)
        statuses.append(status)
    return statuses


def client_from(address: str, listen: int) -> httpx.Client:
    """A client whose connections to the gateway come from ``address`` (a loopback one)."""
    return httpx.Client(
        base_url=f"http://127.0.0.1:{listen}",
        timeout=60,
        transport=httpx.HTTPTransport(local_address=address),
    )


class Relay:
    """A TCP relay on 127.0.0.1 whose connections to ``port`` leave from ``address`` (a loopback
    one): a gRPC channel cannot choose its source address, as httpx's ``local_address`` does,
    and the gateway limits calls per address."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.target = address, port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target_url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(
                    ("127.0.0.1", self.target), source_address=(self.address, 0)
                )
            except OSError:
                return
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        """Copy until either side ends; then end both (HTTP/2 never half-closes)."""
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        for side in (source, sink):
            with contextlib.suppress(OSError):
                side.shutdown(socket.SHUT_RDWR)
            side.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()


FLOOD = 150


def flood(listen: int) -> bool:
    """``FLOOD`` requests at once from one address: past the gateway's burst they get 429
    ``rate_limited`` with Retry-After, while another address is still answered. Whether it
    held."""
    with (
        client_from("127.0.0.2", listen) as flooder,
        client_from("127.0.0.3", listen) as other,
        ThreadPoolExecutor(8) as pool,
    ):
        answers = list(pool.map(lambda _: flooder.get("/models"), range(FLOOD)))
        bystander = other.get("/models").status_code
    statuses = Counter(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 429]
    told = sum(
        1
        for a in refused
        if a.headers.get("retry-after") == "1"
        and a.json().get("error", {}).get("code") == "rate_limited"
        and a.headers.get("x-request-id")
    )
    print(
        f"flood: {FLOOD} GET /models at once from one address: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        + f"; {told}/{len(refused)} of the 429s with Retry-After, a JSON `rate_limited` and an "
        f"X-Request-ID; another address meanwhile: {bystander}"
    )
    return bool(refused) and told == len(refused) and bystander == 200 and 200 in statuses


@dataclass
class Call:
    """One call of a gRPC burst: its code, message, and (made with grpc itself, not
    tritonclient, which does not give them) the x-request-id sent and the trailing metadata."""

    code: str
    message: str
    sent_id: str | None = None
    trailers: dict[str, str] | None = None


def grpc_burst(target: str, count: int = FLOOD) -> list[Call]:
    """``count`` ServerLive calls at once (8 at a time) on one channel to ``target``, every
    other one with tritonclient.grpc, what clients use, the rest with grpc itself."""

    def live(index: int) -> Call:
        if index % 2 == 0:
            try:
                triton.is_server_live(client_timeout=10)
            except InferenceServerException as error:
                return Call(
                    (error.status() or "UNKNOWN").removeprefix("StatusCode."), error.message()
                )
            return Call("OK", "")
        sent_id = f"grpc-burst-{index:03d}"
        try:
            call(b"", timeout=10, metadata=(("x-request-id", sent_id),))
        except grpc.RpcError as error:
            return Call(
                error.code().name,
                error.details() or "",
                sent_id,
                dict(error.trailing_metadata() or ()),
            )
        return Call("OK", "", sent_id, {})

    with (
        contextlib.closing(grpcclient.InferenceServerClient(target)) as triton,
        grpc.insecure_channel(target) as channel,
        ThreadPoolExecutor(8) as pool,
    ):
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        return list(pool.map(live, range(count)))


def told_to_wait(call: Call) -> bool:
    """A refusal of the gateway's rate: RESOURCE_EXHAUSTED whose message names retry-after, and
    (where seen) retry-after 1 and the call's id in its trailing metadata."""
    return (
        call.code == "RESOURCE_EXHAUSTED"
        and "retry-after" in call.message
        and (
            call.trailers is None
            or (
                call.trailers.get("retry-after") == "1"
                and call.trailers.get("x-request-id") == call.sent_id
            )
        )
    )


def flood_grpc(grpc_listen: int, listen: int) -> bool:
    """``FLOOD`` gRPC calls at once from one address (``grpc_burst``): past the burst they are
    refused, ``told_to_wait``; right after, 20 HTTP requests at once from that address are
    refused too (one budget for both doors: a zone of its own would answer them all), while
    another address is still answered. Whether it held."""
    with (
        contextlib.closing(Relay("127.0.0.4", grpc_listen)) as via,
        contextlib.closing(Relay("127.0.0.5", grpc_listen)) as other_via,
        client_from("127.0.0.4", listen) as same,
        ThreadPoolExecutor(8) as pool,
    ):
        calls = grpc_burst(via.target_url)
        over_http = Counter(pool.map(lambda _: same.get("/models").status_code, range(20)))
        bystander = grpc_burst(other_via.target_url, 2)
    codes = Counter(c.code for c in calls)
    refused = [c for c in calls if c.code != "OK"]
    told = sum(1 for c in refused if told_to_wait(c))
    seen = sum(1 for c in refused if c.trailers is not None)
    print(
        f"gRPC flood: {FLOOD} ServerLive calls at once from one address (half with "
        "tritonclient.grpc, half with grpc): "
        + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
        + f"; {told}/{len(refused)} refusals RESOURCE_EXHAUSTED naming retry-after "
        + (f"({refused[0].message!r})" if refused else "")
        + f", {seen} of them with retry-after 1 and their x-request-id in the trailing "
        "metadata; then 20 GET /models at once from that address: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(over_http.items()))
        + "; another address meanwhile: "
        + ", ".join(c.code for c in bystander)
    )
    return (
        bool(refused)
        and told == len(refused)
        and "OK" in codes
        and 429 in over_http
        and all(c.code == "OK" for c in bystander)
    )


ACCESS_LOGGERS = ("app.http.middleware.access", "app.grpc.access")


def access_ids(log: Path) -> list[str]:
    """Request ids of the access lines of a replica's JSON log, HTTP and gRPC."""
    ids = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") in ACCESS_LOGGERS and entry.get("request_id"):
            ids.append(entry["request_id"])
    return ids


def gateway_lines(log: Path) -> dict[str, dict]:
    entries = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        entries[entry["request_id"]] = entry
    return entries


def run(requests: int, concurrency: int, kill_after: int) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="camserve-gateway-"))
    ports = [free_port() for _ in range(3)]
    grpc_ports = [free_port() for _ in range(3)]
    listen = free_port()
    grpc_listen = free_port()
    replicas = [
        start_replica(port, work / f"replica{i + 1}.log", grpc_port=grpc_port)
        for i, (port, grpc_port) in enumerate(zip(ports, grpc_ports, strict=True))
    ]
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for port, grpc_port in zip(ports, grpc_ports, strict=True):
            wait_ready(f"http://127.0.0.1:{port}/ready")
            wait_grpc_ready(f"127.0.0.1:{grpc_port}")
        conf = gateway_conf(ports, listen, work, grpc_ports=grpc_ports, grpc_listen=grpc_listen)
        (work / "nginx.conf").write_text(conf)
        directives = f"daemon off; pid {work}/nginx.pid; error_log {work}/error.log;"
        gateway = subprocess.Popen(
            [nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", directives]
        )
        wait_ready(f"http://127.0.0.1:{listen}/gateway/health", timeout=20)

        images = [png(seed) for seed in range(IMAGES)]
        victim = 1
        killed_at = None
        kill_time = None
        due = None
        started = time.perf_counter()
        # Each worker is a client of its own address (loopback's 127.0.0.10, .11, ...): the
        # gateway limits requests per address, and this phase is about a replica dying.
        clients = [client_from(f"127.0.0.{10 + n}", listen) for n in range(concurrency)]
        # And a gRPC channel of its own to the gateway's gRPC listener, from an address of its
        # own too (127.0.0.30, .31, ...; the gateway counts gRPC calls in the same zone).
        relays = [Relay(f"127.0.0.{30 + n}", grpc_listen) for n in range(concurrency)]
        tritons = [grpcclient.InferenceServerClient(relay.target_url) for relay in relays]
        with (
            contextlib.ExitStack() as stack,
            ThreadPoolExecutor(concurrency) as pool,
            ThreadPoolExecutor(1) as pool_watch,
        ):
            for client, triton, relay in zip(clients, tritons, relays, strict=True):
                stack.enter_context(client)
                stack.callback(relay.close)
                stack.callback(triton.close)
            futures: list[Future[Outcome]] = [
                pool.submit(send, clients[i % concurrency], tritons[i % concurrency], i, images)
                for i in range(requests)
            ]
            infers = [f for i, f in enumerate(futures) if KINDS[i % len(KINDS)] in INFER_KINDS]
            while killed_at is None:
                done = sum(f.done() for f in futures)
                if done >= kill_after and due is None:
                    due = time.monotonic() + KILL_WAIT_S
                # Once half are answered: at a moment when a ModelInfer call is in flight.
                if due is not None and (any(f.running() for f in infers) or time.monotonic() > due):
                    replicas[victim].send_signal(signal.SIGKILL)
                    kill_time = time.perf_counter()
                    killed_at = done
                    closed = pool_watch.submit(wait_refused, ports[victim])
                time.sleep(0.005)
            wait(futures)
            closed_time = closed.result()
        elapsed = time.perf_counter() - started
        outcomes = [f.result() for f in futures]
        replicas[victim].wait()
        time.sleep(0.5)  # the last access lines
        names = {f"127.0.0.1:{port}": f"replica{i + 1}" for i, port in enumerate(ports)}
        names |= {f"127.0.0.1:{port}": f"replica{i + 1}" for i, port in enumerate(grpc_ports)}
        errors = report(
            outcomes, names, victim, killed_at, kill_time, closed_time, elapsed, work, nginx
        )
        grpc_errors = report_grpc(
            outcomes,
            names,
            f"127.0.0.1:{grpc_ports[victim]}",
            kill_time,
            closed_time,
            work,
            grpc_listen,
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=60) as client:
            jobs = follow_jobs(client, images[:JOBS])
        print(
            f"jobs after the kill: {sum(s == 'succeeded' for s in jobs)}/{len(jobs)} POST /jobs "
            "followed to 'succeeded' with GET /jobs/{id} through the gateway "
            f"({', '.join(sorted(set(jobs)))})"
        )
        failures = verdict(
            errors, jobs, flood(listen), grpc_errors, flood_grpc(grpc_listen, listen)
        )
        print("check: " + ("FAILED: " + "; ".join(failures) if failures else "ok"))
        return 1 if failures else 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=10)
        for process in replicas:
            if process.poll() is None:
                process.terminate()
        for process in replicas:
            process.wait(timeout=20)
        if os.environ.get("KEEP_WORK"):
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def upstreams(entry: dict[str, Any], names: dict[str, str]) -> str:
    """The replicas that the gateway's line names, in the order it tried them."""
    return " -> ".join(
        names.get(a.strip(), a.strip()) for a in entry.get("upstream", "").split(",") if a.strip()
    )


def report(
    outcomes: list[Outcome],
    names: dict[str, str],
    victim: int,
    killed_at: int | None,
    kill_time: float | None,
    closed_time: float | None,
    elapsed: float,
    work: Path,
    nginx: str,
) -> int:
    """Print what the clients, the gateway and the replicas saw; the HTTP client-side errors."""
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    gateway = gateway_lines(work / "access.log")
    # Only what came through the gateway (not this script's own /ready polls).
    per_replica = [
        [i for i in access_ids(work / f"replica{n + 1}.log") if i in gateway] for n in range(3)
    ]
    http = [o for o in outcomes if not o.grpc]
    # names: the replicas' HTTP addresses, then their gRPC ones.
    ports = [address.rpartition(":")[2] for address in names]

    print(
        f"gateway_check: {version.removeprefix('nginx version: ')} in front of 3 replicas "
        f"(python -m app, HTTP ports {', '.join(ports[:3])}, gRPC {', '.join(ports[3:])}); "
        f"{len(outcomes)} mixed requests in turn "
        f"({len(http)} HTTP: {', '.join(HTTP_KINDS)}, half with a client X-Request-ID; "
        f"{len(outcomes) - len(http)} gRPC calls with tritonclient.grpc: "
        f"{', '.join(k.removeprefix('grpc-') for k in GRPC_KINDS)}); replica{victim + 1} "
        f"killed (SIGKILL) after {killed_at} answers; {elapsed:.1f} s"
    )
    print("requests per replica (access lines in its log):")
    for i, ids in enumerate(per_replica):
        note = "  <- killed" if i == victim else ""
        calls = sum(1 for x in ids if x.startswith(GRPC_ID))
        print(f"  replica{i + 1}: {len(ids)} ({len(ids) - calls} HTTP, {calls} gRPC){note}")
    statuses = Counter(o.answer for o in http)
    print("HTTP answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))

    if kill_time is not None and closed_time is not None:
        print(
            f"replica{victim + 1}'s port refused connections {(closed_time - kill_time) * 1000:.0f}"
            " ms after the SIGKILL (until then the kernel still queued connections for it)"
        )
    failed = [o for o in http if o.failed]
    print(f"HTTP client-side errors: {len(failed)}")
    for o in failed:
        entry = gateway.get(o.returned_id or o.sent_id or "", {})
        offset = (o.sent_at - kill_time) * 1000 if kill_time is not None else float("nan")
        print(
            f"  request #{o.index} ({o.kind}, sent {offset:+.0f} ms from the kill): "
            f"{o.status or o.error}, id {o.returned_id}; the gateway had sent it to "
            f"{upstreams(entry, names) or '?'} (upstream status {entry.get('upstream_status')})"
        )
    retried = [e for e in gateway.values() if "," in e.get("upstream", "")]
    print(
        f"sent to a failing replica, then answered by another (the gateway's retry): {len(retried)}"
    )
    for entry in retried:
        print(
            f"  {entry['method']} {entry['uri']} id {entry['request_id']}: "
            f"{upstreams(entry, names)} (upstream statuses {entry['upstream_status']}), "
            f"answered {entry['status']}"
        )

    answered = [o for o in http if not o.failed]
    seen = Counter(i for ids in per_replica for i in ids)
    in_one = sum(1 for o in answered if seen.get(o.returned_id or "") == 1)
    kept = sum(1 for o in http if o.sent_id and o.returned_id == o.sent_id)
    sent = sum(1 for o in http if o.sent_id)
    in_gateway = sum(1 for o in http if (o.returned_id or "") in gateway)
    print(
        f"HTTP ids: {in_one}/{len(answered)} answered requests' X-Request-ID found in exactly one "
        f"replica's log; {in_gateway}/{len(http)} in the gateway's log; client-chosen ids "
        f"kept: {kept}/{sent}"
    )
    print("HTTP ids seen in each replica's log:")
    for i, ids in enumerate(per_replica):
        unique = {x for x in ids if not x.startswith(GRPC_ID)}
        chosen = sum(1 for x in unique if x.startswith("gw-"))
        sample = ", ".join([x for x in ids if x in unique][:3])
        print(
            f"  replica{i + 1}: {len(unique)} ids ({chosen} client-chosen, "
            f"{len(unique) - chosen} made by the gateway), e.g. {sample}"
        )
    return len(failed)


def excused(o: Outcome, entry: dict[str, Any], victim: str, closed_at: float | None) -> bool:
    """A gRPC call that the gateway could not replay: UNAVAILABLE at the client, the gateway's
    line names the killed replica as its one upstream, with nginx's 502, and it was sent before
    that replica's port refused connections (so nginx had connected and written the call).

    nginx passes a gRPC call's message on as it arrives and keeps no copy (its grpc module
    never buffers a request body), so a call written to a replica that dies is not sent to
    another one; HTTP requests, buffered, are. UNAVAILABLE is the code a client retries."""
    return (
        o.grpc
        and o.code == "UNAVAILABLE"
        and entry.get("upstream") == victim
        and entry.get("upstream_status") == "502"
        and closed_at is not None
        and o.sent_at <= closed_at
    )


def report_grpc(
    outcomes: list[Outcome],
    names: dict[str, str],
    victim: str,
    kill_time: float | None,
    closed_time: float | None,
    work: Path,
    grpc_listen: int,
) -> int:
    """Print the gRPC calls' outcomes, the ones in flight at the kill, the errors (each excused
    one retried once, as a client retries UNAVAILABLE); the errors that count."""
    calls = [o for o in outcomes if o.grpc]
    gateway = gateway_lines(work / "access.log")
    seen = Counter(i for n in range(3) for i in access_ids(work / f"replica{n + 1}.log"))
    kinds = Counter(o.kind.removeprefix("grpc-") for o in calls)
    codes = Counter(o.answer for o in calls)
    print(
        f"gRPC calls through the gateway: {len(calls)} ("
        + ", ".join(f"{k} {n}" for k, n in kinds.items())
        + "); codes: "
        + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
    )
    if kill_time is not None:
        flying = [o for o in calls if o.sent_at <= kill_time < o.ended_at]
        where = Counter(upstreams(gateway.get(o.sent_id or "", {}), names) or "?" for o in flying)
        print(
            f"gRPC calls in flight at the kill: {len(flying)} ("
            + ", ".join(f"{r}: {n}" for r, n in sorted(where.items()))
            + ")"
        )
    failed = [o for o in calls if o.failed]
    forgiven = [
        o for o in failed if excused(o, gateway.get(o.sent_id or "", {}), victim, closed_time)
    ]
    again: dict[int, Outcome] = {}
    if forgiven:
        with contextlib.closing(
            grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_listen}")
        ) as triton:
            again = {
                o.index: call_grpc(triton, o.index + 1000, o.kind, png(o.index % IMAGES))
                for o in forgiven
            }
    print(f"gRPC client-side errors: {len(failed)}")
    for o in failed:
        entry = gateway.get(o.sent_id or "", {})
        offset = (o.sent_at - kill_time) * 1000 if kill_time is not None else float("nan")
        note = ""
        if o.index in again:
            note = (
                "; excused (written to the killed replica before its port closed: nginx cannot "
                f"replay a gRPC call), retried once: {again[o.index].answer}"
            )
        print(
            f"  call #{o.index} ({o.kind}, id {o.sent_id}, sent {offset:+.0f} ms from the kill, "
            f"{(o.ended_at - o.sent_at) * 1000:.0f} ms): {o.answer} {o.error!r}; the gateway had "
            f"sent it to {upstreams(entry, names) or '?'} (upstream status "
            f"{entry.get('upstream_status')}){note}"
        )
    retried = [
        e for e in gateway.values() if e["request_id"].startswith(GRPC_ID) and "," in e["upstream"]
    ]
    print(f"gRPC calls refused by a replica's port, then answered by another: {len(retried)}")
    answered = [o for o in calls if not o.failed]
    in_one = sum(1 for o in answered if seen.get(o.sent_id or "") == 1)
    in_gateway = sum(1 for o in calls if (o.sent_id or "") in gateway)
    print(
        f"gRPC ids (metadata x-request-id): {in_one}/{len(answered)} answered calls' id found in "
        f"exactly one replica's log; {in_gateway}/{len(calls)} in the gateway's log"
    )
    return sum(1 for o in failed if o.index not in again or again[o.index].failed)


def verdict(
    client_errors: int,
    jobs: list[str],
    flood_held: bool,
    grpc_errors: int = 0,
    grpc_flood_held: bool = True,
) -> list[str]:
    """What failed: a client saw the kill (over HTTP, or over gRPC other than a call the gateway
    could not replay and whose retry succeeded), a job did not succeed, a flood (HTTP, gRPC)
    was not limited."""
    failures = []
    if client_errors:
        failures.append(f"{client_errors} request(s) ended in an error at the client")
    if grpc_errors:
        failures.append(f"{grpc_errors} gRPC call(s) ended in an error at the client")
    if any(status != "succeeded" for status in jobs):
        failures.append(f"jobs after the kill: {', '.join(jobs)}")
    if not flood_held:
        failures.append("the flood from one address was not limited")
    if not grpc_flood_held:
        failures.append("the gRPC flood from one address was not limited")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=None, help="default: half")
    args = parser.parse_args()
    return run(args.requests, args.concurrency, args.kill_after or args.requests // 2)


if __name__ == "__main__":
    sys.exit(main())
