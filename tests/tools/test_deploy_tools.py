"""The gateway check's nginx config and the KServe predictor pod, as the deploy lint uses them."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from app.grpc.status import BY_STATUS, RETRY_AFTER
from tools.gateway_check import (
    CONF,
    POLL_S,
    Outcome,
    Relay,
    excused,
    free_port,
    gateway_conf,
    grpc_burst,
    told_to_wait,
    verdict,
    wait_ready,
)
from tools.kserve_pod import predictor_pod

ROOT = Path(__file__).resolve().parents[2]


def test_gateway_conf_swaps_replicas_listen_and_log(tmp_path: Path) -> None:
    text = gateway_conf([9001, 9002, 9003], 9100, tmp_path)
    assert "camserve-replica:8000" not in text
    for port in (9001, 9002, 9003):
        assert f"server 127.0.0.1:{port} max_fails=2 fail_timeout=10s;" in text
    assert "listen 127.0.0.1:9100;" in text and "listen 8080;" not in text
    assert f"access_log {tmp_path}/access.log camserve;" in text
    # Both HTTP upstreams (models, jobs) get the replicas, and the gRPC one too (no gRPC
    # ports given); everything else is the shipped file.
    assert text.count("server 127.0.0.1:9001 ") == 3
    assert text.count("\n") == CONF.read_text().count("\n") + 6
    assert "camserve-replica:8001" not in text and "listen 8081 http2;" not in text


def test_gateway_conf_passes_grpc_to_the_replicas_grpc_ports(tmp_path: Path) -> None:
    text = gateway_conf([9001], 9100, tmp_path, grpc_ports=[9201, 9202], grpc_listen=9300)
    grpc_block = text.split("upstream camserve_grpc {", 1)[1].split("}", 1)[0]
    assert "server 127.0.0.1:9201 " in grpc_block and "server 127.0.0.1:9202 " in grpc_block
    assert "9001" not in grpc_block
    assert "listen 127.0.0.1:9300 http2;" in text
    assert "grpc_pass grpc://camserve_grpc;" in text


def test_jobs_are_hashed_by_client_only_for_replicas_that_keep_them_in_memory(
    tmp_path: Path,
) -> None:
    def jobs_location(text: str) -> str:
        return text.split("location /jobs {", 1)[1].split("}", 1)[0]

    shipped = jobs_location(gateway_conf([9001], 9100, tmp_path, memory_jobs=False))
    assert "proxy_pass http://camserve;" in shipped and "camserve_jobs;" not in shipped
    memory = jobs_location(gateway_conf([9001], 9100, tmp_path, memory_jobs=True))
    assert "\n            proxy_pass http://camserve_jobs;" in memory


def test_every_http_route_to_the_replicas_is_limited_per_client_address() -> None:
    text = CONF.read_text()
    assert "limit_req_zone $binary_remote_addr zone=camserve_clients" in text
    http = text.split("listen 8080;", 1)[1]
    proxied = re.findall(r"location ([^{]+)\{([^}]*proxy_pass[^}]*)\}", http)
    assert {where.strip() for where, _ in proxied} == {"/", "/jobs", "~ ^/v[12]/"}
    for where, block in proxied:
        assert "limit_req zone=camserve_clients" in block, where
    refused = http.split("location @rate_limited {", 1)[1].split("}", 1)[0]
    assert "add_header Retry-After 1 always;" in refused and '"code":"rate_limited"' in refused
    assert "error_page 429 = @rate_limited;" in http and "limit_req_status 429;" in text


def test_the_gateway_check_fails_on_what_a_client_saw_not_only_on_the_flood() -> None:
    assert verdict(0, ["succeeded"] * 5, flood_held=True) == []
    assert verdict(2, ["succeeded"] * 5, flood_held=True) == [
        "2 request(s) ended in an error at the client"
    ]
    assert verdict(0, ["succeeded", "GET 429"], flood_held=True) == [
        "jobs after the kill: succeeded, GET 429"
    ]
    assert verdict(0, [], flood_held=False) == ["the flood from one address was not limited"]
    assert verdict(0, ["succeeded"], flood_held=True, grpc_errors=1) == [
        "1 gRPC call(s) ended in an error at the client"
    ]
    assert verdict(0, ["succeeded"], flood_held=True, grpc_flood_held=False) == [
        "the gRPC flood from one address was not limited"
    ]


def test_a_grpc_call_fails_the_check_unless_it_ends_with_its_kinds_code() -> None:
    def call(kind: str, code: str | None, error: str | None = None) -> Outcome:
        return Outcome(1, kind, "grpc-001", None, None, error, code=code)

    assert not call("grpc-infer", "OK").failed and not call("grpc-bad-model", "NOT_FOUND").failed
    assert call("grpc-infer", "UNAVAILABLE").failed and call("grpc-bad-model", "OK").failed
    assert call("grpc-live", "OK", "not live").failed  # answered, but not what was asked
    assert call("grpc-infer", None).failed
    assert Outcome(1, "predict", None, 503, None).failed
    assert not Outcome(1, "bad-method", None, 422, None).failed


def test_only_a_grpc_call_written_to_the_killed_replica_before_its_port_closed_is_excused() -> None:
    victim = "127.0.0.1:9202"
    lost = Outcome(7, "grpc-infer", "grpc-007", None, None, "gone", sent_at=1.0, code="UNAVAILABLE")
    line = {"upstream": victim, "upstream_status": "502"}
    assert excused(lost, line, victim, closed_at=1.1)
    # Sent once the port refused connections: the gateway must have sent it elsewhere.
    assert not excused(lost, line, victim, closed_at=0.9)
    # Another replica, a retry that failed too, or a call that got another code.
    assert not excused(lost, {**line, "upstream": "127.0.0.1:9201"}, victim, closed_at=1.1)
    assert not excused(
        lost, {"upstream": f"{victim}, 127.0.0.1:9201", "upstream_status": "502, 502"}, victim, 1.1
    )
    internal = Outcome(
        7, "grpc-infer", "grpc-007", None, None, "reset", sent_at=1.0, code="INTERNAL"
    )
    assert not excused(internal, line, victim, closed_at=1.1)
    assert not excused(lost, line, victim, closed_at=None)


def test_the_gateway_checks_job_polls_stay_within_the_rate_per_address() -> None:
    rate = re.search(r"zone=camserve_clients:\S+ rate=(\d+)r/s;", CONF.read_text())
    assert rate is not None and 1 / POLL_S <= int(rate.group(1))


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx)")
@pytest.mark.parametrize("memory_jobs", [True, False])
def test_the_shipped_gateway_conf_is_valid_nginx(tmp_path: Path, memory_jobs: bool) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(gateway_conf([9001, 9002, 9003], 9100, tmp_path, memory_jobs))
    directives = f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(conf), "-g", directives],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def grpc_server_block() -> str:
    return CONF.read_text().split("listen 8081 http2;", 1)[1].split("listen 8080;", 1)[0]


def test_the_gateways_own_grpc_refusals_are_grpc_statuses_of_camserves_meaning() -> None:
    # nginx's default was an HTML page, which a client read as UNKNOWN (413) or UNAVAILABLE
    # (502, 504) 'Received http2 header with status: ...', naming no fix.
    block = grpc_server_block()
    pages = re.findall(r"error_page ([\d ]+) = (@\w+);", block)
    assert {int(s) for statuses, _ in pages for s in statuses.split()} == {
        413,
        429,
        502,
        503,
        504,
    }
    for statuses, name in pages:
        answer = block.split(f"location {name} {{", 1)[1].split("}", 1)[0]
        assert "default_type application/grpc;" in answer and "return 204;" in answer
        code = re.search(r"add_header grpc-status (\d+) always;", answer)
        assert code is not None and re.search(r'add_header grpc-message "[^"]+" always;', answer)
        for status in map(int, statuses.split()):
            # 502 is a replica that did not answer: UNAVAILABLE, as camserve's 503.
            assert int(code.group(1)) == BY_STATUS[503 if status == 502 else status].value[0]


def test_grpc_calls_are_limited_per_client_address_with_http_requests() -> None:
    # The gRPC server had no limit: one address flooded the replicas over gRPC while HTTP was
    # limited. One zone for both doors: an address has one budget whichever it uses.
    block = grpc_server_block()
    proxied = re.findall(r"location ([^{]+)\{([^}]*grpc_pass[^}]*)\}", block)
    assert [where.strip() for where, _ in proxied] == ["/"]
    limit = re.search(r"limit_req zone=(\w+) burst=(\d+) nodelay;", proxied[0][1])
    http_limit = re.search(
        r"limit_req zone=(\w+) burst=(\d+) nodelay;", CONF.read_text().split("listen 8080;")[1]
    )
    assert limit is not None and http_limit is not None
    assert limit.groups() == http_limit.groups() == ("camserve_clients", limit.group(2))
    assert "error_page 429 = @grpc_rate_limited;" in block
    refused = block.split("location @grpc_rate_limited {", 1)[1].split("}", 1)[0]
    assert f"add_header {RETRY_AFTER} 1 always;" in refused  # as a replica's refusals carry it
    assert "add_header x-request-id $camserve_request_id always;" in refused


def test_both_doors_refusals_state_the_zones_rate_and_burst() -> None:
    text = CONF.read_text()
    zone = re.search(r"zone=camserve_clients:\S+ rate=(\d+)r/s;", text)
    burst = re.search(r"limit_req zone=camserve_clients burst=(\d+) nodelay;", text)
    assert zone is not None and burst is not None
    rate = zone.group(1)
    http = text.split("location @rate_limited {", 1)[1].split("}", 1)[0]
    grpc_page = grpc_server_block().split("location @grpc_rate_limited {", 1)[1].split("}", 1)[0]
    for page, unit in ((http, "requests"), (grpc_page, "calls")):
        message = re.search(r"[Mm]essage\W+(Over [^\"]+)\"", page)
        assert message is not None, page
        assert message.group(1).startswith(f"Over {rate} {unit} a second from this address")
        assert f"(bursts of {burst.group(1)})" in message.group(1)
        assert message.group(1).endswith(f"at most {rate} a second.")


@contextlib.contextmanager
def gateway_without_replicas(tmp_path: Path) -> Iterator[int]:
    """nginx with the shipped file and no replica listening; its gRPC port."""
    replica, listen, grpc_listen = free_port(), free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        gateway_conf([replica], listen, tmp_path, grpc_ports=[replica], grpc_listen=grpc_listen)
    )
    directives = f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf), "-g", directives])
    try:
        wait_ready(f"http://127.0.0.1:{listen}/gateway/health", timeout=20)
        yield grpc_listen
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx)")
def test_a_grpc_call_with_no_replica_to_answer_it_is_unavailable_saying_so(
    tmp_path: Path,
) -> None:
    with gateway_without_replicas(tmp_path) as grpc_listen:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_listen}")
        with pytest.raises(InferenceServerException) as raised:
            client.is_server_live(client_timeout=10)
        client.close()
    assert raised.value.status() == "StatusCode.UNAVAILABLE"
    assert raised.value.message() == "No camserve replica answered; retry shortly."


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx)")
def test_a_burst_of_grpc_calls_from_one_address_is_refused_resource_exhausted(
    tmp_path: Path,
) -> None:
    # Before: 150 calls at once from one address all went on to the (absent) replicas.
    with (
        gateway_without_replicas(tmp_path) as grpc_listen,
        contextlib.closing(Relay("127.0.0.6", grpc_listen)) as flooder,
        contextlib.closing(Relay("127.0.0.7", grpc_listen)) as other,
    ):
        calls = grpc_burst(flooder.target_url, 150)
        bystander = grpc_burst(other.target_url, 2)
    refused = [c for c in calls if c.code == "RESOURCE_EXHAUSTED"]
    passed = [c for c in calls if c.code == "UNAVAILABLE"]  # on to the replicas: none here
    assert refused and passed and len(refused) + len(passed) == len(calls)
    assert all(told_to_wait(c) for c in refused)
    assert {c.message for c in refused} == {
        "Over 10 calls a second from this address, HTTP requests included (bursts of 50); "
        "wait for retry-after seconds, then make at most 10 a second."
    }
    # With tritonclient.grpc and with grpc (whose error gives the trailing metadata).
    assert {c.trailers is None for c in refused} == {True, False}
    assert all(c.trailers[RETRY_AFTER] == "1" for c in refused if c.trailers is not None)
    # Another address is not refused: its calls go on to the replicas.
    assert [c.code for c in bystander] == ["UNAVAILABLE", "UNAVAILABLE"]


def test_predictor_pod_keeps_the_pod_spec_only() -> None:
    document = yaml.safe_load((ROOT / "deploy/kserve/inferenceservice.yaml").read_text())
    pod = predictor_pod(document)
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "camserve"
    assert {"minReplicas", "maxReplicas", "timeout", "containerConcurrency"}.isdisjoint(pod["spec"])
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.parametrize(
    "document",
    [
        {"apiVersion": "v1", "kind": "Pod"},
        {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "spec": {}},
    ],
)
def test_predictor_pod_refuses_other_documents(document: dict) -> None:
    with pytest.raises(ValueError):
        predictor_pod(document)
