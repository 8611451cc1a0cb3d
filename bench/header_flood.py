"""What header floods cost a running server: the event loop's stall and the memory they add.

    python bench/header_flood.py --url http://127.0.0.1:8000 --pid 1234

Sends ``--floods`` requests at once, each of ``--headers`` tiny header fields (``a: b``), while
a probe asks for ``/health`` every 10 ms. Prints the probe's slowest answer (the stall), how
each flood was answered, and the server's resident memory before and after (``--pid``).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import psutil


def flood(host: str, port: int, headers: int, answers: list[bytes]) -> None:
    chunk = b"a: b\r\n" * 10_000
    with socket.create_connection((host, port), timeout=60) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            for _ in range(headers // 10_000):
                sock.sendall(chunk)
            sock.sendall(b"\r\n")
        except OSError:
            pass  # the server closed the connection: read its answer
        received = b""
        try:
            while part := sock.recv(65536):
                received += part
        except OSError:
            pass
    answers.append(received.split(b"\r\n", 1)[0] or b"(closed without an answer)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="the server's process id, for its memory")
    parser.add_argument("--headers", type=int, default=1_000_000)
    parser.add_argument("--floods", type=int, default=1)
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    process = psutil.Process(args.pid) if args.pid else None
    rss_before = process.memory_info().rss if process else 0
    answers: list[bytes] = []
    floods = [
        threading.Thread(target=flood, args=(host, port, args.headers, answers))
        for _ in range(args.floods)
    ]
    worst = 0.0
    peak = rss_before
    with httpx.Client(base_url=args.url, timeout=60) as probe:
        probe.get("/health")
        started = time.perf_counter()
        for thread in floods:
            thread.start()
        while any(thread.is_alive() for thread in floods):
            began = time.perf_counter()
            probe.get("/health")
            worst = max(worst, time.perf_counter() - began)
            if process:
                peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    print(f"{args.floods} flood(s) of {args.headers:,} headers, {elapsed:.2f} s in all")
    print(f"slowest /health during the floods: {worst * 1000:.0f} ms")
    for answer in answers:
        print(f"  answered: {answer.decode('latin-1')}")
    if process:
        after = process.memory_info().rss
        print(
            f"server RSS: {rss_before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB, "
            f"{after / 2**20:.0f} MiB after"
        )


if __name__ == "__main__":
    main()
