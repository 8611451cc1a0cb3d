"""Train ``shapes-segment`` (and so ``shapes-detect``, which shares its weights) on synthetic
scenes of two shapes whose exact masks are known.

Usage (from the repository root)::

    .venv/bin/python tools/train_shape_tasks.py            # writes model_store/shapes-segment/
    .venv/bin/python tools/train_shape_tasks.py --quick    # tiny dry run, to a temp dir

Seeded (torch, numpy, Python), one CPU thread; scenes are ``make_pairs`` at 64x64 with the
service's preprocessing; augmentation: flips and 90-degree rotations (exact symmetries). The
detector's state_dict is the segmenter's under ``segmenter.``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.models.zoo.shapes_dataset import DEFAULT_MEAN, DEFAULT_STD, make_pairs  # noqa: E402
from app.models.zoo.shapes_tasks import ShapesSegmenter  # noqa: E402

SIZE = 64


def targets(masks: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """(n, H, W) class maps: 0 background, label + 1 inside each shape."""
    out = np.zeros(masks.shape[:1] + masks.shape[2:], dtype=np.int64)
    for k in range(masks.shape[1]):
        out[masks[:, k]] = 0
        out += masks[:, k] * (labels[:, k, None, None] + 1)
    return torch.from_numpy(out)


def inputs(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(DEFAULT_STD)[:, None, None]
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--out", type=Path, default=REPO / "model_store")
    args = parser.parse_args()
    if args.quick:
        args.train, args.epochs, args.out = 64, 1, Path(tempfile.mkdtemp())
    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()
    images, masks, labels = make_pairs(args.train, args.seed, SIZE)
    x, y = inputs(images), targets(masks, labels)
    held_images, held_masks, held_labels = make_pairs(200, args.seed + 1, SIZE)
    hx, hy = inputs(held_images), targets(held_masks, held_labels)
    model = ShapesSegmenter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(x) + 31) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            xb, yb = x[batch], y[batch]
            turns = int(torch.randint(0, 4, (1,), generator=generator))
            xb, yb = torch.rot90(xb, turns, (2, 3)), torch.rot90(yb, turns, (1, 2))
            if bool(torch.randint(0, 2, (1,), generator=generator)):
                xb, yb = xb.flip(3), yb.flip(2)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            predicted = model(hx).argmax(1)
        shapes = hy > 0
        accuracy = float((predicted[shapes] == hy[shapes]).float().mean())
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out shape-pixel accuracy "
            f"{accuracy:.3f} ({time.time() - started:.0f} s)",
            flush=True,
        )
    state = {k: v for k, v in model.state_dict().items()}
    segment = args.out / "shapes-segment"
    segment.mkdir(parents=True, exist_ok=True)
    torch.save(state, segment / "weights.pt")
    detect = args.out / "shapes-detect"
    detect.mkdir(parents=True, exist_ok=True)
    torch.save({f"segmenter.{k}": v for k, v in state.items()}, detect / "weights.pt")
    report = {
        "seed": args.seed,
        "train_scenes": args.train,
        "epochs": args.epochs,
        "held_out_shape_pixel_accuracy": round(accuracy, 4),
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    (segment / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
