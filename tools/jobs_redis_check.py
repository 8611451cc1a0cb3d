"""Jobs in Redis across replicas, one of them killed: nothing lost, work spread, any replica reads.

Starts redis-server, 3 ``python -m app`` replicas sharing it (CAMSERVE_JOB_STORE, one model slot
each, a short lease, no explanation cache) and nginx with deploy/gateway/nginx.conf as shipped
for Redis; computes the expected answers with synchronous POST /explain; submits the Score-CAM
jobs through the gateway and polls them there (within its rate per address); SIGKILLs one
replica while it runs a job; waits for every job; restarts the killed replica; and checks that
every job succeeded with the synchronous answer, that each job's status and events read the same
on every replica directly, and that the jobs ran on at least 2 replicas. Prints the figures;
exit status 1 when a check fails.

    tools/jobs_redis_check.sh          # installs nginx and redis-server from apt if missing
    python tools/jobs_redis_check.py --jobs 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.gateway_check import (  # noqa: E402
    free_port,
    gateway_conf,
    png,
    start_replica,
    wait_ready,
)

#: Score-CAM of the shapes model, 8 masked forwards per chunk: about a second a job.
FORM = {"method": "ScoreCAM", "batch_size": "8", "output": "raw,overlay"}
LEASE_S = 3
IMAGES = 10
#: The gateway answers one address 10 requests a second (bursts of 50), 429 past that.
POLL_S = 0.1


def start_redis(port: int, work: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(work)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def redis_version() -> str:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    words = subprocess.run([server, "--version"], capture_output=True, text=True).stdout.split()
    return next((w.removeprefix("v=") for w in words if w.startswith("v=")), "?")


def log_lines(log: Path) -> list[dict]:
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def job_lines(log: Path, what: str) -> dict[str, float]:
    """Job id prefix -> time (epoch s) of each line 'job <id> <what>' in a replica's log."""
    found = {}
    for entry in log_lines(log):
        message = str(entry.get("message", ""))
        parts = message.split(" ", 2)
        if len(parts) == 3 and parts[0] == "job" and parts[2].startswith(what):
            stamp = str(entry["time"]).replace("Z", "+00:00")
            found[parts[1][:8]] = datetime.fromisoformat(stamp).timestamp()
    return found


def comparable(result: dict) -> dict:
    """An /explain body without its timings (they differ from run to run)."""
    return {key: value for key, value in result.items() if key != "timings"}


def poll(client: httpx.Client, job_id: str) -> dict:
    """A job's view through the gateway, paced under its rate per address (after a 429, its
    Retry-After)."""
    while True:
        time.sleep(POLL_S)
        answer = client.get(f"/jobs/{job_id}")
        if answer.status_code != 429:
            break
        time.sleep(float(answer.headers.get("retry-after", "1")))
    if answer.status_code != 200:
        raise SystemExit(f"GET /jobs/{job_id} answered {answer.status_code}: {answer.text}")
    return answer.json()


def events_of(base: str, job_id: str) -> list[str]:
    names = []
    with httpx.stream("GET", f"{base}/jobs/{job_id}/events", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
    return names


def run(jobs: int) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="camserve-jobs-redis-"))
    redis_port, listen = free_port(), free_port()
    ports = [free_port() for _ in range(3)]
    logs = [work / f"replica{i + 1}.log" for i in range(3)]
    env = {
        "CAMSERVE_JOB_STORE": f"redis://127.0.0.1:{redis_port}/0",
        "CAMSERVE_JOB_LEASE_S": str(LEASE_S),
        "CAMSERVE_MAX_JOBS_PER_CLIENT": str(jobs),
        # No explanation cache: the jobs ask for what the synchronous answers computed, and
        # the cache's Redis tier would answer them in milliseconds without running a job.
        "CAMSERVE_CACHE_MB": "0",
    }
    redis = start_redis(redis_port, work)
    replicas = [start_replica(port, log, env) for port, log in zip(ports, logs, strict=True)]
    gateway: subprocess.Popen[bytes] | None = None
    failures: list[str] = []
    try:
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}/ready")
        (work / "nginx.conf").write_text(gateway_conf(ports, listen, work, memory_jobs=False))
        directives = f"daemon off; pid {work}/nginx.pid; error_log {work}/error.log;"
        gateway = subprocess.Popen(
            [nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", directives]
        )
        base = f"http://127.0.0.1:{listen}"
        wait_ready(f"{base}/gateway/health", timeout=20)
        images = [png(seed) for seed in range(IMAGES)]

        with httpx.Client(base_url=base, timeout=120) as client:
            started = time.perf_counter()
            expected = []
            for image in images:
                answer = client.post("/explain", files={"file": ("s.png", image)}, data=FORM)
                answer.raise_for_status()
                expected.append(comparable(answer.json()))
            sync_s = time.perf_counter() - started

            started = time.perf_counter()
            ids = []
            for index in range(jobs):
                image = images[index % IMAGES]
                created = client.post("/jobs", files={"file": ("s.png", image)}, data=FORM)
                if created.status_code != 202:
                    raise SystemExit(f"POST /jobs answered {created.status_code}: {created.text}")
                ids.append(created.json()["id"])
            submit_s = time.perf_counter() - started

            # Kill replica 2 while it runs a job (one it started and has not finished).
            victim = 1
            deadline = time.monotonic() + 120
            while True:
                running = job_lines(logs[victim], "running here")
                ended = job_lines(logs[victim], "succeeded")
                busy = [job for job in running if job not in ended]
                if busy:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("replica 2 never ran a job")
                time.sleep(0.05)
            replicas[victim].send_signal(signal.SIGKILL)
            killed_at = time.time()
            replicas[victim].wait()
            print(f"killed replica 2 (SIGKILL) while it ran job(s) {', '.join(busy)}")

            views: dict[str, dict] = {}
            deadline = time.monotonic() + 300
            while len(views) < len(ids) and time.monotonic() < deadline:
                for job_id in ids:
                    if job_id in views:
                        continue
                    view = poll(client, job_id)
                    if view["status"] not in ("queued", "running"):
                        views[job_id] = view
            all_s = time.perf_counter() - started

        # The killed replica comes back, so that every replica can be asked about every job.
        replicas[victim] = start_replica(ports[victim], logs[victim], env)
        wait_ready(f"http://127.0.0.1:{ports[victim]}/ready")

        statuses = Counter(view["status"] for view in views.values())
        same = sum(
            1
            for index, job_id in enumerate(ids)
            if job_id in views
            and views[job_id]["status"] == "succeeded"
            and comparable(views[job_id]["result"]) == expected[index % IMAGES]
        )
        readable = 0
        for job_id in ids:
            answers = [
                httpx.get(f"http://127.0.0.1:{port}/jobs/{job_id}", timeout=30).json()
                for port in ports
            ]
            streams = [events_of(f"http://127.0.0.1:{port}", job_id) for port in ports]
            if all(a["status"] == "succeeded" for a in answers) and all(
                s == ["succeeded"] for s in streams
            ):
                readable += 1
        finished_on = [job_lines(log, "succeeded") for log in logs]
        attempts = [job_lines(log, "running here (attempt 2") for log in logs]
        taken_over = {job: when for found in attempts for job, when in found.items()}
        mine = {job_id[:8] for job_id in ids}
        per_replica = [sum(1 for job in found if job in mine) for found in finished_on]

        print(
            f"3 replicas (1 model slot each, CAMSERVE_JOB_LEASE_S={LEASE_S}), Redis "
            f"{redis_version()}, nginx; shapes model, Score-CAM (raw + overlay)"
        )
        print(f"synchronous answers: {IMAGES} POST /explain in {sync_s:.1f} s")
        print(f"submitted: {len(ids)} POST /jobs through the gateway in {submit_s:.2f} s")
        print(
            f"finished: {dict(statuses)} within {all_s:.1f} s of the first submission; "
            f"{same}/{len(ids)} equal to the synchronous answer (timings aside)"
        )
        print(
            "jobs run to the end per replica: "
            + ", ".join(f"replica{i + 1}={n}" for i, n in enumerate(per_replica))
            + " (replica2 was killed, then restarted)"
        )
        for job, when in sorted(taken_over.items()):
            print(f"taken over after the kill: job {job}, {when - killed_at:.1f} s after it")
        print(
            f"readable on every replica directly: {readable}/{len(ids)} jobs "
            "(GET /jobs/{id} succeeded and /events gave the final event, on all 3)"
        )

        if statuses.get("succeeded", 0) != len(ids):
            failures.append("not every job succeeded")
        if same != len(ids):
            failures.append("a job's result differs from the synchronous answer")
        if readable != len(ids):
            failures.append("a job was not readable on every replica")
        if sum(1 for n in per_replica if n > 0) < 2:
            failures.append("the jobs ran on fewer than 2 replicas")
        if not any(job in taken_over for job in busy):
            failures.append("the killed replica's job was not taken over")
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
            process.wait(timeout=40)
        redis.terminate()
        redis.wait(timeout=10)
        if os.environ.get("KEEP_WORK"):
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()
    return run(args.jobs)


if __name__ == "__main__":
    sys.exit(main())
