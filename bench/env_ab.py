"""Two servers that differ only in their environment, under the same load, side by side.

    python bench/env_ab.py --b OMP_WAIT_POLICY=PASSIVE
    python bench/env_ab.py --a CAMSERVE_FIT_PASS_THREADS=false --b CAMSERVE_FIT_PASS_THREADS=true
    python bench/env_ab.py --b OMP_WAIT_POLICY=PASSIVE --quick        # smoke run, ~1 minute

Answers "does this variable make the service faster or slower here?" for any variable the
service reads, its own ``CAMSERVE_*`` settings and the runtime's (``OMP_WAIT_POLICY``,
``OMP_NUM_THREADS``, ``MALLOC_ARENA_MAX``, ...). Server A gets the ``--a`` variables, server B
the ``--b`` ones; both get everything else of the calling environment except ``CAMSERVE_*``
(``bench/serving.py``'s ``server_env``), so a variable the shell sets reaches both.

The store and the 640x480 JPEG are ``bench/service_load.py``'s (random-weight resnet18 and
resnet50, ``shapes``). Each round runs closed-loop GradCAM load on every model and concurrency
level, on A and B by turns (level by level, A first then B first, as ``service_load`` does),
after one discarded warm-up round each. ``--rounds`` repeats the whole alternation; the report
gives, per model and level, the medians over rounds of B's throughput / A's (above 1: B serves
more) and B's p50 / A's (below 1: B answers sooner). Writes ``bench/results/env_ab.json``
(``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from service_load import TORCHVISION_MODELS, Config, build_store, run_load  # noqa: E402
from serving import (  # noqa: E402  (bench/, this script's own folder)
    machine_info,
    photo_jpeg,
    raise_on_sigterm,
    running_server,
    table_of,
    timed_step,
    warn_if_busy,
)


def _variables(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    if any("=" not in item or item.startswith("=") for item in items):
        parser.error("--a and --b take NAME=VALUE")
    return dict(item.split("=", 1) for item in items)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, dict[str, dict[str, str]], int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--b", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per level (default max(100, 4 x c))"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="time cap per level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="resnet18, c=1,4, 1 round")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "env_ab.json")
    args = parser.parse_args(argv)
    sides = {"a": _variables(args.a, parser), "b": _variables(args.b, parser)}
    if sides["a"] == sides["b"]:
        parser.error("--a and --b must differ")
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - {"shapes", *TORCHVISION_MODELS}
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}")
    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c)
    rounds, requests, seconds = args.rounds, args.requests, args.seconds
    if args.quick:
        models, concurrency, rounds = ("resnet18",), (1, 4), 1
        requests, seconds = requests or 12, min(seconds, 15.0)
    config = Config(
        device="cpu",
        models=models,
        concurrency=concurrency,
        requests=requests,
        seconds=seconds,
        reference_repeats=0,
        stage_repeats=0,
        extra_env={},
        out=args.out,
        quick=args.quick,
    )
    return config, sides, max(1, rounds)


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and level: A's and B's median throughput and p50 over the rounds, and the
    medians of the rounds' B / A ratios."""
    keyed: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        keyed.setdefault((row["model"], row["concurrency"]), {"a": [], "b": []})[
            row["mode"]
        ].append(row)
    table = []
    for (model, concurrency), sides in keyed.items():
        pairs = list(zip(sides["a"], sides["b"], strict=False))
        throughput = [b["throughput_rps"] / a["throughput_rps"] for a, b in pairs if a["ok"]]
        latency = [b["p50_ms"] / a["p50_ms"] for a, b in pairs if a["p50_ms"] and b["p50_ms"]]
        table.append(
            {
                "model": model,
                "concurrency": concurrency,
                "a_rps": round(statistics.median(r["throughput_rps"] for r in sides["a"]), 2),
                "b_rps": round(statistics.median(r["throughput_rps"] for r in sides["b"]), 2),
                "throughput_b_over_a": round(statistics.median(throughput), 3)
                if throughput
                else None,
                "a_p50_ms": round(statistics.median(r["p50_ms"] or 0 for r in sides["a"]), 1),
                "b_p50_ms": round(statistics.median(r["p50_ms"] or 0 for r in sides["b"]), 1),
                "p50_b_over_a": round(statistics.median(latency), 3) if latency else None,
                "rounds": len(pairs),
                "errors": sum(r["errors"] + r["errors_503"] for r in sides["a"] + sides["b"]),
            }
        )
    return table


def run(config: Config, sides: dict[str, dict[str, str]], rounds: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "config": {
            "a": sides["a"],
            "b": sides["b"],
            "models": list(config.models),
            "concurrency": list(config.concurrency),
            "requests_per_level": config.requests or "max(100, 4 x concurrency)",
            "seconds_cap_per_level": config.seconds,
            "rounds": rounds,
        },
    }
    with tempfile.TemporaryDirectory(prefix="camserve-ab-") as tmp:
        root = Path(tmp)
        store = timed_step("model store", lambda: build_store(root))
        image = photo_jpeg(640, 480, 1)
        with contextlib.ExitStack() as servers:
            urls = {
                side: servers.enter_context(
                    running_server(store, "cpu", env, root / f"server-{side}.log", config.models)
                )
                for side, env in sides.items()
            }
            rows = []
            for number in range(rounds):
                order = urls if number % 2 == 0 else dict(reversed(urls.items()))
                step = timed_step(
                    f"round {number + 1} of {rounds}",
                    lambda order=order: run_load(order, image, config, label="server "),
                )
                rows.extend(dict(row, round=number + 1) for row in step)
    report["load"] = rows
    report["comparison"] = compare(rows)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    raise_on_sigterm()
    config, sides, rounds = parse_args(argv)
    warn_if_busy()
    started = time.perf_counter()
    report = run(config, sides, rounds)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n## A: {sides['a'] or 'the environment as is'}; B: {sides['b']}\n")
    print(
        table_of(
            report["comparison"],
            (
                "model",
                "concurrency",
                "a_rps",
                "b_rps",
                "throughput_b_over_a",
                "a_p50_ms",
                "b_p50_ms",
                "p50_b_over_a",
                "rounds",
                "errors",
            ),
        )
    )
    print(f"\nwrote {config.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
