"""Train the default camserve model (small ResNet) on the synthetic shapes dataset.

Usage (from the repository root)::

    .venv/bin/python tools/train_shapes.py            # full run, writes model_store/shapes/
    .venv/bin/python tools/train_shapes.py --quick    # tiny dry run, writes to a temp dir

The run is seeded (torch, numpy, Python), uses 2 CPU threads, precomputes the training
set once in memory (uint8) and applies only exact symmetries of the task as
augmentation (flips and 90 degree rotations: every class is rotation invariant).
Preprocessing is exactly the service's: ``uint8 / 255`` then ``(x - mean) / std`` at
128x128.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.models.zoo.shapes_dataset import (  # noqa: E402
    CLASSES,
    DEFAULT_MEAN,
    DEFAULT_STD,
    make_dataset,
    to_tensor_batch,
)
from app.models.zoo.shapes_resnet import build  # noqa: E402

IMAGE_SIZE = 128
MANIFEST = """\
description = "Small ResNet trained on the synthetic shapes dataset (8 classes), shipped as the \
default model."

[model]
architecture = "app.models.zoo.shapes_resnet:build"
kwargs = {{ num_classes = {num_classes} }}
weights = "weights.pt"
num_classes = {num_classes}
labels = "labels.txt"

[preprocess]
resize = {size}
crop = {size}
mean = [{mean}]
std = [{std}]
input_shape = [3, {size}, {size}]

[cam]
target_layers = ["layer3"]
fc_layer = "fc"
default_method = "GradCAM"
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="torch/numpy/python seed")
    p.add_argument("--train-seed", type=int, default=1000, help="dataset seed (training)")
    p.add_argument("--heldout-seed", type=int, default=2000, help="dataset seed (held out)")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-heldout", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="OneCycle peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "model_store" / "shapes")
    p.add_argument("--quick", action="store_true", help="tiny dry run into a temp directory")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_heldout, args.epochs = 512, 256, 1
        args.out = Path(tempfile.mkdtemp(prefix="shapes_quick_"))
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip + 90 degree rotation per batch quarter (exact symmetries of the task)."""
    out = torch.empty_like(x)
    chunks = torch.arange(x.shape[0]).chunk(4)
    for idx in chunks:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        flip = bool(torch.randint(0, 2, (1,), generator=gen))
        part = torch.rot90(x[idx], k, dims=(2, 3))
        out[idx] = part.flip(3) if flip else part
    return out


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, bs: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), bs):
        x = to_tensor_batch(images[i : i + bs], DEFAULT_MEAN, DEFAULT_STD)
        x = x.contiguous(memory_format=torch.channels_last)
        pred = model(x).argmax(1).numpy()
        correct += int((pred == labels[i : i + bs]).sum())
    return correct / len(images)


def train(args: argparse.Namespace) -> dict:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    t0 = time.time()
    x_train, _, y_train = make_dataset(args.n_train, args.train_seed, IMAGE_SIZE)
    x_held, _, y_held = make_dataset(args.n_heldout, args.heldout_seed, IMAGE_SIZE)
    gen_time = time.time() - t0
    print(f"generated {len(x_train)} train + {len(x_held)} held-out images in {gen_time:.1f}s")
    print("train class counts:", np.bincount(y_train, minlength=len(CLASSES)).tolist())

    model = build(num_classes=len(CLASSES)).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=args.lr,
        total_steps=args.epochs * steps_per_epoch,
        pct_start=0.15,
        div_factor=10.0,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    x_train_t = torch.from_numpy(x_train)  # uint8 N,H,W,3 (shared memory, no copy)
    y_train_t = torch.from_numpy(y_train)
    mean = torch.tensor(DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_STD).view(1, 3, 1, 1)

    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        t_ep = time.time()
        perm = torch.randperm(len(x_train), generator=gen)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            x = x_train_t[idx].permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - mean) / std).contiguous()
            x = augment(x, gen).contiguous(memory_format=torch.channels_last)
            y = y_train_t[idx]
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(y)
            tot_correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        held_acc = evaluate(model, x_held, y_held)
        rec = {
            "epoch": epoch,
            "loss": tot_loss / seen,
            "train_acc": tot_correct / seen,
            "heldout_acc": held_acc,
            "epoch_s": time.time() - t_ep,
        }
        history.append(rec)
        print(
            f"epoch {epoch:2d}/{args.epochs}  loss {rec['loss']:.4f}  "
            f"train acc {rec['train_acc']:.4f}  held-out acc {held_acc:.4f}  "
            f"({rec['epoch_s']:.0f}s, total {time.time() - t_start:.0f}s)",
            flush=True,
        )

    model = model.to(memory_format=torch.contiguous_format)
    final_acc = history[-1]["heldout_acc"]
    wall = time.time() - t_start
    return {
        "model": model,
        "history": history,
        "heldout_acc": final_acc,
        "wall_s": wall,
        "gen_s": gen_time,
        "n_params": n_params,
    }


def write_outputs(args: argparse.Namespace, result: dict, argv: list[str]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result["model"].state_dict().items()}
    torch.save(state, out / "weights.pt")
    (out / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "model.toml").write_text(
        MANIFEST.format(
            num_classes=len(CLASSES),
            size=IMAGE_SIZE,
            mean=", ".join(str(v) for v in DEFAULT_MEAN),
            std=", ".join(str(v) for v in DEFAULT_STD),
        )
    )
    size_mb = (out / "weights.pt").stat().st_size / 1e6
    cmd = " ".join([".venv/bin/python", "tools/train_shapes.py", *argv])
    rows = "\n".join(
        f"| {r['epoch']} | {r['loss']:.4f} | {r['train_acc']:.4f} | {r['heldout_acc']:.4f} "
        f"| {r['epoch_s']:.0f} |"
        for r in result["history"]
    )
    (out / "TRAINING.md").write_text(
        f"""# Default model: shapes ResNet

Trained by `tools/train_shapes.py`; reproduce with:

```
{cmd}
```

| item | value |
|---|---|
| machine | 2 CPU cores (shared), torch {torch.__version__}, {platform.python_version()} |
| seeds | torch/numpy/python {args.seed}; train set {args.train_seed}; \
held-out set {args.heldout_seed} |
| dataset | `app.models.zoo.shapes_dataset`, {IMAGE_SIZE}x{IMAGE_SIZE}, {len(CLASSES)} classes \
({", ".join(CLASSES)}) |
| train / held-out images | {args.n_train} / {args.n_heldout} (generated once, in memory) |
| augmentation | random 90 degree rotations and horizontal flips |
| preprocessing | uint8 / 255, then (x - {list(DEFAULT_MEAN)}) / {list(DEFAULT_STD)} |
| architecture | `app.models.zoo.shapes_resnet:build`, {result["n_params"]} parameters, \
weights.pt {size_mb:.2f} MB |
| optimiser | AdamW lr {args.lr} (OneCycle), weight decay {args.weight_decay}, \
batch {args.batch_size}, label smoothing 0.05 |
| epochs | {args.epochs} |
| **held-out accuracy** | **{result["heldout_acc"]:.4f}** ({args.n_heldout} images, \
seed {args.heldout_seed}) |
| wall time | {result["wall_s"]:.0f} s in total (of which {result["gen_s"]:.0f} s data \
generation) |

## Per-epoch log

| epoch | train loss | train acc | held-out acc | seconds |
|---|---|---|---|---|
{rows}
"""
    )
    print(json.dumps({"out": str(out), "weights_mb": round(size_mb, 3)}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = train(args)
    print(f"final held-out accuracy: {result['heldout_acc']:.4f} on {args.n_heldout} images")
    print(f"total wall time: {result['wall_s']:.1f}s")
    write_outputs(args, result, argv)


if __name__ == "__main__":
    main()
