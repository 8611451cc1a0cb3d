"""The fixed cost of one small request, before and after a change, side by side.

    python bench/fixed_cost.py --changed app/cam/overlay.py     # HEAD (A) against HEAD + the
                                                                # working tree's overlay.py (B)
    python bench/fixed_cost.py --baseline HEAD~3 --candidate HEAD --rounds 7 --requests 80
    python bench/fixed_cost.py --changed app/http/routes/forms.py --quick   # about a minute

Answers "did this change make a small model's request cheaper?" for changes that no setting
switches (``bench/env_ab.py`` compares settings). Server A runs the code of ``--baseline`` (a git
revision, unpacked with ``git archive`` into a temporary folder), server B that of
``--candidate`` (another revision; default the baseline) with the working tree's copy of each
``--changed`` file put over it: so the uncommitted edits of other files in a shared working tree
stay out of both. Both get the same store (``shapes``, as ``bench/service_load.py`` builds it),
the same environment and the same 640x480 JPEG.

Each round sends ``--requests`` sequential ``POST /explain`` (GradCAM, default fields, one
client) to A and to B by turns (A first in even rounds, B first in odd ones), after a few
discarded warm-up requests each. Per side and round: the median wall time, the median of every
``timings`` field, and the server's CPU time per request (all its threads, and the event loop's
thread alone, read from ``/proc``). CPU time is the steadier of the two on a shared machine:
another process's load stretches a request's wall time far more than the work it does. The
report gives the medians over rounds of B / A for each.

First, in process and with the thread's own CPU clock, the image stages of such a request on
A's code and on B's (``bench/fixed_cost_stages.py``: decode, render, the answer's JSON), by
turns, one process per tree and round: the steadiest measure of a change to one stage.

Before the rounds, each set of form fields in ``CHECKS`` is sent to A and B once and the answers
are compared with their ``timings`` left out: a change meant to cost less must not change what
a request answers (maps, pictures, errors).

Writes ``bench/results/fixed_cost.json`` (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service_load import TIMING_FIELDS, build_store  # noqa: E402  (bench/, this folder)
from serving import (  # noqa: E402
    machine_info,
    photo_jpeg,
    raise_on_sigterm,
    running_process,
    table_of,
    timed_step,
    warn_if_busy,
)

WARM_UP = 5
#: Form fields whose answers A and B must give alike (besides the defaults).
CHECKS = (
    "",
    "output=overlay,heatmap,raw",
    "image_format=png",
    "alpha=0.3;colormap=viridis",
    "alpha=0.5;size=input",
    "size=300;image_format=webp",
    "method=GradCAM,LayerCAM;top_k=3",
)
CLOCK_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Side:
    name: str
    url: str
    pid: int


def fields_of(text: str) -> dict[str, str]:
    """``a=1;b=2`` -> form fields; ``model=shapes`` unless given."""
    fields = dict(item.split("=", 1) for item in text.split(";") if item)
    return {"model": "shapes", **fields}


def unpack(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (``git archive``) in ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def short(revision: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision],
        capture_output=True,
        text=True,
    ).stdout.strip()


def cpu_ms(pid: int) -> tuple[float, float]:
    """CPU time of a process so far, in ms: all its threads, and its main thread's."""
    total = 0.0
    main = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) * CLOCK_TICK_MS
            total += used
            if int(tid) == pid:
                main = used
    return total, main


def post(client: httpx.Client, url: str, image: bytes, fields: dict[str, str]) -> httpx.Response:
    return client.post(
        f"{url}/explain", files={"file": ("image.jpg", image, "image/jpeg")}, data=fields
    )


def without_timings(answer: httpx.Response) -> Any:
    """The answer as the client reads it, its ``timings`` left out."""
    try:
        body = answer.json()
    except ValueError:
        return answer.status_code, answer.content
    if isinstance(body, dict):
        body.pop("timings", None)
    return answer.status_code, body


def compare_answers(sides: Sequence[Side], image: bytes) -> list[dict]:
    rows = []
    with httpx.Client(timeout=120) as client:
        for check in CHECKS:
            fields = fields_of(check)
            a, b = (without_timings(post(client, s.url, image, fields)) for s in sides)
            rows.append({"fields": check or "(defaults)", "status": a[0], "equal": a == b})
    return rows


def one_round(side: Side, image: bytes, requests: int) -> dict[str, Any]:
    fields = fields_of("")
    with httpx.Client(timeout=120) as client:
        for _ in range(WARM_UP):
            post(client, side.url, image, fields)
        walls: list[float] = []
        timings: list[dict[str, Any]] = []
        cpu_before, main_before = cpu_ms(side.pid)
        for _ in range(requests):
            started = time.perf_counter()
            answer = post(client, side.url, image, fields)
            walls.append((time.perf_counter() - started) * 1000)
            if answer.status_code != 200:
                raise RuntimeError(f"{side.name}: {answer.status_code} {answer.text[:300]}")
            timings.append(answer.json()["timings"])
        cpu_after, main_after = cpu_ms(side.pid)
    row: dict[str, Any] = {
        "side": side.name,
        "wall_ms": round(statistics.median(walls), 2),
        "cpu_ms": round((cpu_after - cpu_before) / requests, 2),
        "loop_cpu_ms": round((main_after - main_before) / requests, 2),
    }
    for name in TIMING_FIELDS:
        values = [t[name] for t in timings if isinstance(t.get(name), int | float)]
        row[name] = round(statistics.median(values), 3) if values else None
    return row


def stage_round(trees: Sequence[tuple[str, Path]], order: int, repeats: int) -> list[dict]:
    """``bench/fixed_cost_stages.py`` on each tree (in turn, ``order`` first), one process
    each."""
    rows = []
    for name, tree in trees if order % 2 == 0 else trees[::-1]:
        out = subprocess.run(
            [sys.executable, str(REPO / "bench" / "fixed_cost_stages.py"), str(tree), str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append({"round": order, "side": name, **json.loads(out.splitlines()[-1])})
    return rows


STAGE_FIELDS = ("decode", "render", "answer")
RATIO_FIELDS = ("wall_ms", "cpu_ms", "loop_cpu_ms", "total_ms", "decode_ms", "encode_ms")


def ratios(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    """Medians over rounds of A's and B's values and of the rounds' B / A."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["side"]] = row
    summary: dict[str, Any] = {"rounds": len(by_round)}
    for name in fields:
        pairs = [(r["A"][name], r["B"][name]) for r in by_round.values() if r["A"][name]]
        summary[name] = {
            "a": round(statistics.median(a for a, _ in pairs), 2),
            "b": round(statistics.median(b for _, b in pairs), 2),
            "b_over_a": round(statistics.median(b / a for a, b in pairs), 3),
        }
    return summary


def trees(baseline: str, candidate: str, changed: Sequence[Path], tmp: Path) -> list[Path]:
    """A's tree and B's (the candidate with the ``changed`` files of the working tree)."""
    tree_a = unpack(baseline, tmp / "a")
    tree_b = unpack(candidate, tmp / "b")
    for path in changed:
        (tree_b / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tree_b / path)
    return [tree_a, tree_b]


@contextlib.contextmanager
def two_servers(sources: Sequence[Path], tmp: Path) -> Iterator[list[Side]]:
    store = build_store(tmp)
    with (
        running_process(store, "cpu", {}, tmp / "a.log", ["shapes"], cwd=sources[0]) as (ua, a),
        running_process(store, "cpu", {}, tmp / "b.log", ["shapes"], cwd=sources[1]) as (ub, b),
    ):
        yield [Side("A", ua, a.pid), Side("B", ub, b.pid)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision that server A runs")
    parser.add_argument("--candidate", default=None, help="server B's revision (the baseline)")
    parser.add_argument(
        "--changed",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a working-tree file that server B runs instead of the candidate's (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=60, help="per side and round")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 requests")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fixed_cost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 3, 20
    args.candidate = args.candidate or args.baseline
    if args.candidate == args.baseline and not args.changed:
        parser.error("A and B would run the same code: give --candidate or --changed")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_on_sigterm()
    warn_if_busy()
    image = photo_jpeg(640, 480, seed=1)
    started_load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    stages: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        sources = trees(args.baseline, args.candidate, args.changed, Path(folder))
        for index in range(args.rounds):
            stages += stage_round(list(zip("AB", sources, strict=True)), index, args.requests)
        print("# stages in process done", flush=True)
        with two_servers(sources, Path(folder)) as sides:
            answers = timed_step("answers, A against B", lambda: compare_answers(sides, image))
            for index in range(args.rounds):
                for side in sides if index % 2 == 0 else sides[::-1]:
                    rows.append({"round": index, **one_round(side, image, args.requests)})
                print(f"# round {index + 1}/{args.rounds} done", flush=True)
    report = {
        "machine": machine_info(torch.device("cpu")),
        "baseline": short(args.baseline),
        "candidate": short(args.candidate),
        "changed": [str(path) for path in args.changed],
        "load_average": {"before": round(started_load, 2), "after": round(os.getloadavg()[0], 2)},
        "requests_per_round": args.requests,
        "answers": answers,
        "summary": ratios(rows, RATIO_FIELDS),
        "stages_summary": ratios(stages, STAGE_FIELDS),
        "rounds": rows,
        "stage_rounds": stages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table_of(answers, ("fields", "status", "equal")))
    print()
    summary = [{"measure": name, **report["summary"][name]} for name in RATIO_FIELDS]
    summary += [
        {"measure": f"{name} stage, thread CPU ms", **report["stages_summary"][name]}
        for name in STAGE_FIELDS
    ]
    print(table_of(summary, ("measure", "a", "b", "b_over_a")))
    print(f"\nload average {report['load_average']}; wrote {args.out}")


if __name__ == "__main__":
    main()
