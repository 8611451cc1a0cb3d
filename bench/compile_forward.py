"""The plain forward eager and compiled (``[model] compile``), side by side.

    python bench/compile_forward.py                                  # CPU: resnet50, compile
    python bench/compile_forward.py --device cuda --modes compile,cudagraphs --rounds 30

A random-weight torchvision model is prepared as ``load_model`` prepares it (eval, no grad,
channels-last weights on the CPU) and each mode is built with ``app.models.compiling`` and warmed
as a load warms it (the seconds that takes are the ``compile_s`` column). Then the rounds alternate
eager and compiled forwards under inference mode, for each batch size, and the table gives their
medians and the ratio compiled / eager (below 1: the compiled forward is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import machine_info, table_of  # noqa: E402

from app.models.compiling import CompiledForward  # noqa: E402
from app.models.manifest import CompileMode  # noqa: E402


def timed(forward: Any, x: torch.Tensor) -> float:
    """Seconds of one forward (the device's queue drained)."""
    started = time.perf_counter()
    with torch.inference_mode():
        forward(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - started


def measure(
    arch: str, device: torch.device, modes: list[str], batches: list[int], rounds: int
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().requires_grad_(False).to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    rows = []
    for mode in modes:
        started = time.perf_counter()
        compiled = CompiledForward(model, mode_of(mode))
        compiled.warm_up((3, 224, 224), device)
        compile_s = time.perf_counter() - started
        for batch in batches:
            x = torch.rand(batch, 3, 224, 224, device=device)
            for forward in (model, compiled, model, compiled):  # warm-up (a new batch size)
                timed(forward, x)
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for index in range(rounds):
                order = ("eager", "compiled") if index % 2 == 0 else ("compiled", "eager")
                for name in order:
                    times[name].append(timed(model if name == "eager" else compiled, x))
            eager, fast = (statistics.median(times[n]) * 1000 for n in ("eager", "compiled"))
            rows.append(
                {
                    "model": arch,
                    "mode": mode,
                    "batch": batch,
                    "compile_s": round(compile_s, 1),
                    "eager_ms": round(eager, 2),
                    "compiled_ms": round(fast, 2),
                    "ratio": round(fast / eager, 3),
                }
            )
            print(table_of(rows[-1:], tuple(rows[-1])), flush=True)
    return rows


def mode_of(name: str) -> CompileMode:
    if name == "compile":
        return "compile"
    if name == "cudagraphs":
        return "cudagraphs"
    raise SystemExit(f"--modes takes compile and cudagraphs, not {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--modes", default="compile", help="compile and/or cudagraphs")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(args.model, device, args.modes.split(","), batches, args.rounds)
    report = {"machine": machine_info(device), "rows": rows}
    print(f"\n## compiled forward ({device}, {report['machine'].get('gpu') or 'cpu'})\n")
    print(table_of(rows, tuple(rows[0])))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
