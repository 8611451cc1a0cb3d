"""Write tiny models into a store the way an operator would: complete folders, renamed in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tests.fixtures_models import build_tiny, write_model


def put_tiny(
    store: Path, name: str, seed: int, *, version: int | None = None, policy: str = ""
) -> Path:
    """A tiny model seeded with ``seed`` as ``store/name`` (or ``store/name/version``), written
    beside the store and moved in with one rename, so a poll never sees half of it."""
    torch.manual_seed(seed)
    staging = store / f"_staging-{name}-{version}-{seed}"
    shutil.rmtree(staging, ignore_errors=True)
    write_model(
        staging,
        "m",
        build_tiny(),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )
    built = staging / "m"
    if policy:
        manifest = built / "model.toml"
        manifest.write_text(manifest.read_text() + "\n" + policy + "\n")
    target = store / name if version is None else store / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(built, target)
    shutil.rmtree(staging)
    return target


def new_weights(folder: Path, seed: int) -> None:
    """Replace the weights of a tiny model folder in one rename (the manifest stays)."""
    torch.manual_seed(seed)
    staged = folder / ".weights.pt.new"
    torch.save(build_tiny().state_dict(), staged)
    os.replace(staged, folder / "weights.pt")


def break_weights(folder: Path) -> None:
    """Replace the weights with bytes that are no state_dict."""
    staged = folder / ".weights.pt.new"
    staged.write_bytes(b"not a checkpoint")
    os.replace(staged, folder / "weights.pt")
