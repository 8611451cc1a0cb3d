"""Latency of every CAM method, as a ratio to the plain inference forward measured in the same run.

    python bench/cam_latency.py                      # CPU (and CUDA when present), default set
    python bench/cam_latency.py --quick              # a smoke run
    python bench/cam_latency.py --device cuda --models resnet50 --batches 1,32

For each model and batch size the rounds interleave one plain forward (``torch.inference_mode``)
with one forward + CAM call per method, so that the machine's drift hits all of them alike; the
table reports medians and the ratio to the forward. Models have random weights, are in eval mode
and frozen (as the service runs them) unless ``--trainable``.

The Score-CAM family is timed once per configuration against a naive implementation of the same
method (one masked forward per channel and per sample, in chunks of ``batch_size``, no skipping,
default memory layout), and the maximum difference between the two maps is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cam import METHODS, normalize_maps, resize_maps  # noqa: E402
from app.models.loading import build_model as build_from_spec  # noqa: E402
from app.models.manifest import parse_manifest  # noqa: E402

TARGETS = {"resnet18": "layer4", "resnet50": "layer4", "mobilenet_v2": "features"}
FAST_METHODS = [
    "CAM",
    "GradCAM",
    "GradCAMpp",
    "XGradCAM",
    "LayerCAM",
    "SmoothGradCAMpp",
    "HiResCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "RefineCAM",
]
#: RefineCAM multiplies the maps of several layers: the last two stages.
REFINE_TARGETS = {
    "resnet18": ["layer3", "layer4"],
    "resnet50": ["layer3", "layer4"],
    "mobilenet_v2": ["features.13", "features"],
}
SCORE_METHODS = ["ScoreCAM", "SSCAM", "ISCAM", "AblationCAM"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def _timed_result(fn: Callable[[], torch.Tensor], device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000, result


@torch.inference_mode()
def _activation(model, module, x) -> torch.Tensor:
    store = {}
    handle = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    model(x)
    handle.remove()
    return store["a"]


def build_model(name: str, device: torch.device, trainable: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    return model.requires_grad_(trainable)


def load_shapes_model(device: torch.device):
    """The service's default model, if it has been trained and shipped."""
    root = Path(__file__).resolve().parents[1] / "model_store" / "shapes"
    if not (root / "model.toml").exists() or not (root / "weights.pt").exists():
        return None
    spec = parse_manifest(root)
    model, _ = build_from_spec(spec)
    model = model.eval().to(device).requires_grad_(False)
    return model, spec.target_layers[0], spec.input_shape


def time_fast_methods(
    model, layer, x, methods, repeats, device, refine_layers=None
) -> dict[str, list[float]]:
    shape = tuple(x.shape[1:])
    classes = list(range(x.shape[0]))
    extractors = {
        name: METHODS[name](
            model, refine_layers if name == "RefineCAM" else layer, input_shape=shape
        )
        for name in methods
    }
    for extractor in extractors.values():
        extractor.disable_hooks()
    times: dict[str, list[float]] = {"forward": [], **{name: [] for name in methods}}

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    def explain(extractor) -> Callable[[], object]:
        def run() -> object:
            context = torch.enable_grad() if extractor.requires_grad else torch.inference_mode()
            with context:
                scores = model(x)
            return extractor(classes, scores)

        return run

    for round_idx in range(repeats + 2):  # two warm-up rounds
        elapsed = {"forward": _timed(plain, device)}
        for name, extractor in extractors.items():
            extractor.enable_hooks()
            elapsed[name] = _timed(explain(extractor), device)
            extractor.disable_hooks()
            extractor.reset_hooks()
        if round_idx >= 2:
            for key, value in elapsed.items():
                times[key].append(value)
    for extractor in extractors.values():
        extractor.remove_hooks()
    return times


@torch.inference_mode()
def naive_score_map(model, layer_module, x, classes, method: str, batch_size: int, **opts):
    """The textbook loop: every channel of every sample, every noise draw or step."""
    activation = _activation(model, layer_module, x).float()
    n, k = activation.shape[:2]
    size = x.shape[2:]
    samples = opts.get("num_samples", 1)
    noise = None
    if method == "SSCAM":
        generator = torch.Generator(device=x.device).manual_seed(opts["seed"])
        noise = opts["std"] * torch.randn((samples, *size), generator=generator, device=x.device)
    scores = torch.zeros(n, k, device=x.device)
    for i in range(n):
        for s in range(samples):
            for start in range(0, k, batch_size):
                maps = activation[i, start : start + batch_size]
                masks = normalize_maps(resize_maps(maps, size))
                if method == "ISCAM":
                    masks = masks * (s + 1) / samples
                elif method == "SSCAM":
                    masks = masks + noise[s]
                probs = model(x[i : i + 1] * masks[:, None])[:, classes[i]]
                scores[i, start : start + batch_size] += probs / samples
    weights = torch.softmax(scores, dim=1)
    return normalize_maps(torch.relu((weights[:, :, None, None] * activation).sum(1)))


def time_score_methods(
    model,
    layer,
    x,
    samples: dict[str, int],
    batch_size: int,
    device,
    rounds: int = 1,
    methods: list[str] | None = None,
) -> list[dict]:
    """Ours and the naive loop alternate for ``rounds`` rounds; medians are reported.
    AblationCAM has no naive counterpart here: its own time only."""
    rows = []
    classes = list(range(x.shape[0]))
    module = dict(model.named_modules())[layer]
    with torch.inference_mode():
        model(x)  # warm-up
    for name in methods or SCORE_METHODS:
        opts: dict = {"batch_size": batch_size}
        if name not in ("ScoreCAM", "AblationCAM"):
            opts["num_samples"] = samples[name]
        if name == "SSCAM":
            opts.update(std=2.0, seed=0)
        extractor = METHODS[name](model, layer, input_shape=tuple(x.shape[1:]), **opts)

        def ours(extractor=extractor):
            with torch.inference_mode():
                scores = model(x)
            return extractor(classes, scores)[0]

        naive_opts = {k: v for k, v in opts.items() if k != "batch_size"}

        def naive(name=name, naive_opts=naive_opts):
            return naive_score_map(model, module, x, classes, name, batch_size, **naive_opts)

        ours_times, naive_times = [], []
        naive_map = None
        for _ in range(rounds):
            ours_ms, ours_map = _timed_result(ours, device)
            ours_times.append(ours_ms)
            if name == "AblationCAM":
                continue
            extractor.disable_hooks()
            naive_ms, naive_map = _timed_result(naive, device)
            extractor.enable_hooks()
            naive_times.append(naive_ms)
        extractor.remove_hooks()
        ours_ms = statistics.median(ours_times)
        naive_ms = statistics.median(naive_times) if naive_times else None
        a = _activation(model, module, x)
        flat = (a.flatten(2).amax(2) == a.flatten(2).amin(2)).float().mean().item()
        rows.append(
            {
                "method": name,
                "num_samples": opts.get("num_samples", 1),
                "channels": int(a.shape[1]),
                "flat_share": round(flat, 3),
                "ours_ms": round(ours_ms, 1),
                "naive_ms": None if naive_ms is None else round(naive_ms, 1),
                "speedup": None if naive_ms is None else round(naive_ms / ours_ms, 2),
                "max_abs_diff": None
                if naive_map is None
                else float((ours_map - naive_map).abs().max()),
            }
        )
        print(f"    {rows[-1]}", flush=True)
    return rows


def machine(device: torch.device) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}); host {cpu}"
    return f"CPU {cpu} (torch {torch.__version__}, {platform.system()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both if present)")
    parser.add_argument("--trainable", action="store_true", help="leave parameters trainable")
    parser.add_argument(
        "--score-models", default="resnet18,shapes", help="models for the Score-CAM family"
    )
    parser.add_argument("--score-samples", type=int, default=2, help="SSCAM/ISCAM draws/steps")
    parser.add_argument("--shapes-samples", type=int, default=0, help="0: the methods' defaults")
    parser.add_argument("--score-batch-size", type=int, default=32)
    parser.add_argument(
        "--shapes-rounds", type=int, default=5, help="timing rounds on the (cheap) shapes model"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--methods", default=",".join(FAST_METHODS), help="gradient & cheap ones")
    parser.add_argument("--score-methods", default=",".join(SCORE_METHODS))
    parser.add_argument("--out", default="bench/results/cam_latency.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.repeats, args.size = "resnet18", "1", 2, 64
        args.score_models = "resnet18"
    devices = [torch.device(args.device)] if args.device else [torch.device("cpu")]
    if args.device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    report: dict = {"runs": []}
    for device in devices:
        print(f"## {machine(device)}", flush=True)
        run = {"device": machine(device), "fast": [], "score": []}
        for model_name in filter(None, args.models.split(",")):
            model = build_model(model_name, device, args.trainable)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, args.size, args.size, device=device)
                methods = [m for m in args.methods.split(",") if m]
                times = time_fast_methods(
                    model,
                    TARGETS[model_name],
                    x,
                    methods,
                    args.repeats,
                    device,
                    REFINE_TARGETS[model_name],
                )
                base = statistics.median(times["forward"])
                print(f"{model_name} B={batch}: forward {base:.1f} ms", flush=True)
                for name in methods:
                    med = statistics.median(times[name])
                    row = {
                        "model": model_name,
                        "batch": batch,
                        "method": name,
                        "ms": round(med, 2),
                        "forward_ms": round(base, 2),
                        "x_forward": round(med / base, 3),
                    }
                    run["fast"].append(row)
                    print(f"  {name:16s} {med:9.1f} ms  {med / base:6.2f}x fwd", flush=True)
        for model_name in filter(None, args.score_models.split(",")):
            if model_name == "shapes":
                loaded = load_shapes_model(device)
                if loaded is None:
                    print("shapes model not shipped yet: skipped", flush=True)
                    continue
                model, layer, shape = loaded
                samples = args.shapes_samples
                size = shape[1:]
            else:
                model, layer = build_model(model_name, device, False), TARGETS[model_name]
                samples, size = args.score_samples, (args.size, args.size)
            torch.manual_seed(1)
            x = torch.randn(1, 3, *size, device=device)
            per_method = {"SSCAM": samples or 35, "ISCAM": samples or 10}
            print(f"{model_name} Score-CAM family, num_samples {per_method}:", flush=True)
            rounds = args.shapes_rounds if model_name == "shapes" else 1
            rows = time_score_methods(
                model,
                layer,
                x,
                per_method,
                args.score_batch_size,
                device,
                rounds,
                [m for m in args.score_methods.split(",") if m],
            )
            for row in rows:
                row["model"] = model_name
            run["score"].extend(rows)
        report["runs"].append(run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
