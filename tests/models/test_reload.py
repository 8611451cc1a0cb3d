"""Reloads, unloads and versions in the registry: swaps beside the old model, failures kept."""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.errors import ModelBusy, ModelNotFound, ModelUnavailable
from app.models.registry import ModelRegistry
from tests.fixtures_models import fixture_access
from tests.models.store_helpers import break_weights, new_weights, put_tiny

X = torch.ones(1, 3, 32, 32)


def started(store: Path) -> ModelRegistry:
    registry = ModelRegistry(
        store, torch.device("cpu"), "tiny", control="explicit", access=fixture_access(store)
    )
    registry.discover()
    registry.load_all()
    return registry


def logits(registry: ModelRegistry, name: str = "tiny", version: int | None = None) -> torch.Tensor:
    return registry.get(name, version).module(X)


def test_reload_swaps_and_frees_the_old_model_after_its_last_user(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    in_flight = registry.get("tiny")  # a request that started on the old model
    old_answer = in_flight.module(X)
    gone = weakref.ref(in_flight)

    new_weights(folder, seed=1)
    assert registry.changes() == (["tiny"], [])
    registry.load("tiny")
    assert registry.changes() == ([], [])
    assert not torch.equal(logits(registry), old_answer)
    assert torch.equal(in_flight.module(X), old_answer)  # it finishes on its own model
    del in_flight
    gc.collect()
    assert gone() is None


def test_unchanged_versions_are_kept_not_rebuilt(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    before = registry.get("tiny")
    registry.load("tiny")
    assert registry.get("tiny") is before


def test_a_failed_reload_keeps_the_old_model_serving(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    before = logits(registry)
    break_weights(folder)
    entry = registry.load("tiny")
    assert entry.status == "ready"
    assert "cannot read weights weights.pt" in (entry.reload_error or "")
    assert torch.equal(logits(registry), before)
    assert registry.changes() == ([], [])  # the broken files are not retried until they change
    new_weights(folder, seed=2)
    entry = registry.load("tiny")
    assert entry.reload_error is None and not torch.equal(logits(registry), before)


def test_a_new_model_that_fails_shows_how_to_fix_it(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    break_weights(put_tiny(tmp_path, "other", seed=1))
    assert registry.load("other").status == "failed"
    with pytest.raises(ModelUnavailable, match="then POST /models/other/load"):
        registry.get("other")


def test_unload_keeps_the_folder_listed_and_removal_forgets_it(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "other", seed=1)
    registry = started(tmp_path)
    registry.unload("other")
    assert registry.entry("other").status == "unloaded"
    with pytest.raises(ModelUnavailable, match="POST /models/other/load"):
        registry.get("other")
    registry.load("other")
    assert registry.entry("other").status == "ready"
    shutil.rmtree(tmp_path / "other")
    assert registry.changes() == ([], ["other"])
    registry.unload("other")
    with pytest.raises(ModelNotFound):
        registry.entry("other")
    with pytest.raises(ModelNotFound, match="in the model store"):
        registry.load("other")


def test_one_load_at_a_time_per_model(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    with registry.claim("tiny"):
        with pytest.raises(ModelBusy, match="being loaded or unloaded already") as caught:
            registry.acquire("tiny")
        registry.acquire("other")  # another model is not held
    assert caught.value.status_code == 409
    registry.acquire("tiny")  # released with the block


def test_versions_newest_by_default_each_on_request(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    put_tiny(tmp_path, "v", seed=2, version=2, policy="[version_policy]\nall = true")
    registry = started(tmp_path)
    entry = registry.entry("v")
    assert entry.versioned and sorted(entry.versions) == [1, 2]
    assert registry.get("v").spec.version == 2
    assert registry.get("v", 1).spec.version == 1 and registry.get("v", 1).spec.name == "v"
    assert not torch.equal(logits(registry, "v", 1), logits(registry, "v", 2))
    with pytest.raises(ModelNotFound, match="has no version 3 \\(served: 1, 2\\)"):
        registry.get("v", 3)


def test_a_broken_newest_version_leaves_the_older_one_serving(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    break_weights(put_tiny(tmp_path, "v", seed=2, version=2, policy="[version_policy]\nlatest = 2"))
    registry = started(tmp_path)
    assert registry.entry("v").status == "ready"
    assert registry.get("v").spec.version == 1
    with pytest.raises(ModelUnavailable, match="version 2 failed to load"):
        registry.get("v", 2)


def test_a_newest_manifest_that_breaks_keeps_the_policys_versions_serving(tmp_path: Path) -> None:
    """``latest = 2`` serves versions 1 and 2; version 2's manifest then stops being TOML. Its
    policy can no longer be read: the reload keeps choosing by the one it had, so version 1
    goes on serving (the default policy, latest 1, dropped it: a hostile review)."""
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    newest = put_tiny(tmp_path, "v", seed=2, version=2, policy="[version_policy]\nlatest = 2")
    registry = started(tmp_path)
    assert sorted(registry.entry("v").versions) == [1, 2]
    (newest / "model.toml").write_text("garbage = [\n")
    assert registry.changes() == (["v"], [])
    registry.load("v")
    assert sorted(registry.entry("v").versions) == [1, 2]
    assert registry.get("v", 1).spec.version == 1
    assert registry.get("v").spec.version == 2  # its previous load serves, with its error
    assert registry.entry("v").versions[2].reload_error is not None


def test_a_new_version_folder_is_picked_up_and_the_old_one_retired(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    registry = started(tmp_path)
    put_tiny(tmp_path, "v", seed=2, version=2)
    assert registry.changes() == (["v"], [])
    registry.load("v")
    assert sorted(registry.entry("v").versions) == [2]  # latest 1 by default
    assert registry.get("v").spec.version == 2


def nan_weights(folder: Path) -> None:
    """Weights of the right shapes whose every output is NaN."""
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save(state, folder / ".weights.pt.new")
    (folder / ".weights.pt.new").replace(folder / "weights.pt")


def test_a_swap_to_nan_weights_keeps_the_old_model_serving(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    before = logits(registry)
    nan_weights(folder)
    entry = registry.load("tiny")
    assert entry.status == "ready"
    assert "gave 3 of 3 logits that are NaN or infinite" in (entry.reload_error or "")
    assert torch.equal(logits(registry), before)


def test_a_first_load_of_nan_weights_fails_with_the_reason(tmp_path: Path) -> None:
    nan_weights(put_tiny(tmp_path, "tiny", seed=0))
    entry = started(tmp_path).entry("tiny")
    assert entry.status == "failed" and "NaN or infinite" in (entry.error or "")


def test_a_reload_whose_folder_cannot_be_read_keeps_the_old_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    registry = started(tmp_path)
    before = logits(registry)
    listing = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self.name == "tiny":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    entry = registry.load("tiny")
    assert entry.status == "ready" and "Permission denied" in (entry.reload_error or "")
    assert torch.equal(logits(registry), before)
    monkeypatch.undo()
    assert registry.load("tiny").reload_error is None


def test_loading_a_model_whose_folder_is_gone_says_so(tmp_path: Path) -> None:
    """It listed the model itself among the available ones (it is still loaded), which
    contradicted 'Unknown model' (a hostile review)."""
    put_tiny(tmp_path, "tiny", seed=0)
    folder = put_tiny(tmp_path, "other", seed=1)
    registry = started(tmp_path)
    shutil.rmtree(folder)
    with pytest.raises(ModelNotFound) as caught:
        registry.load("other")
    message = caught.value.message
    assert "Available models: tiny." in message
    assert "folder that is gone" in message and "/models/other/unload" in message


def test_a_new_version_that_fails_leaves_the_one_it_retires_serving(tmp_path: Path) -> None:
    """Under ``latest = 1``, a broken version 2 beside a serving version 1 retired version 1:
    the model stopped serving (a hostile review). It serves on until version 2 loads."""
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    registry = started(tmp_path)
    before = logits(registry, "v")
    newest = put_tiny(tmp_path, "v", seed=2, version=2)
    break_weights(newest)
    entry = registry.load("v")
    assert entry.status == "ready" and entry.serving is not None and entry.serving.number == 1
    assert entry.versions[2].status == "failed"
    assert "version 2: cannot read weights" in (entry.reload_error or "")
    assert "previous version 1 goes on serving" in (entry.reload_error or "")
    assert torch.equal(logits(registry, "v"), before)
    assert registry.changes() == ([], [])
    assert registry.load("v").serving is entry.serving  # the same broken files: still serving

    new_weights(newest, seed=2)
    entry = registry.load("v")
    assert sorted(entry.versions) == [2] and entry.reload_error is None
    assert registry.get("v").spec.version == 2


def test_weights_in_a_linked_folder_are_seen_to_change(tmp_path: Path) -> None:
    """A link to a folder inside the store is served, but the scans did not look into it: new
    weights there were never seen, so a reload kept serving the old ones (a hostile review)."""
    shared = put_tiny(tmp_path, "_shared", seed=0)
    folder = put_tiny(tmp_path, "tiny", seed=0)
    (folder / "weights.pt").unlink()
    (folder / "shared").symlink_to("../_shared")
    text = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(text.replace('"weights.pt"', '"shared/weights.pt"'))
    registry = started(tmp_path)
    before = logits(registry)
    new_weights(shared, seed=1)
    assert registry.changes() == (["tiny"], [])
    registry.load("tiny")
    assert not torch.equal(logits(registry), before)


def test_a_new_version_folder_that_is_a_link_is_picked_up(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "v", seed=1, version=1)
    put_tiny(tmp_path, "_v2", seed=2)
    registry = started(tmp_path)
    (tmp_path / "v" / "2").symlink_to("../_v2")
    assert registry.changes() == (["v"], [])
    registry.load("v")
    assert registry.get("v").spec.version == 2


def test_an_unload_does_not_undo_a_swap_that_lands_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unload copied the entries, looked at the folder (a file system call, other threads
    run), then wrote its copy back: a reload of another model that swapped in meanwhile was
    undone, and that model served its old weights after its load answered (a hostile review)."""
    put_tiny(tmp_path, "tiny", seed=0)
    other = put_tiny(tmp_path, "other", seed=1)
    registry = started(tmp_path)
    new_weights(other, seed=2)
    is_dir = Path.is_dir
    swapped: list[torch.Tensor] = []

    def reload_meanwhile(self: Path) -> bool:  # the other model's load ends on another thread
        if self == tmp_path / "tiny" and not swapped:
            registry.load("other")
            swapped.append(logits(registry, "other"))
        return is_dir(self)

    monkeypatch.setattr(Path, "is_dir", reload_meanwhile)
    registry.unload("tiny")
    assert swapped and torch.equal(logits(registry, "other"), swapped[0])
    assert registry.entry("tiny").status == "unloaded"
    assert "other" not in registry.changes()[0]


def _reload_spoilt(
    tmp_path: Path, model: str, spoil: Callable[[dict[str, torch.Tensor]], str]
) -> tuple[Any, str]:
    """Serve a copy of the shipped ``model``, spoil its weights on disk (``spoil`` changes the
    state dict and names what it changed), reload it: the entry, and that name. The version
    that served before still serves."""
    put_tiny(tmp_path, "tiny", seed=0)
    folder = tmp_path / model
    shutil.copytree(Path(__file__).parents[2] / "model_store" / model, folder)
    registry = started(tmp_path)
    before = registry.get(model)
    state = torch.load(folder / "weights.pt", weights_only=True)
    name = spoil(state)
    torch.save(state, folder / ".weights.pt.new")
    (folder / ".weights.pt.new").replace(folder / "weights.pt")
    entry = registry.load(model)
    assert entry.status == "ready" and registry.get(model) is before
    return entry, name


@pytest.mark.parametrize("model", ["shapes-segment", "shapes-detect"])
def test_nan_weights_of_a_detector_or_segmenter_fail_the_load(tmp_path: Path, model: str) -> None:
    """Only a classifier's logits were probed for NaN: a detector with NaN weights answered no
    box and a segmenter only background, and a swap to them replaced good weights (a hostile
    review)."""

    def spoil(state: dict[str, torch.Tensor]) -> str:
        name = next(k for k, v in state.items() if k.endswith("weight") and v.is_floating_point())
        state[name] = torch.full_like(state[name], float("nan"))
        return name

    entry, name = _reload_spoilt(tmp_path, model, spoil)
    assert f"parameter {name} holds" in (entry.reload_error or "")
    assert "NaN or infinite" in (entry.reload_error or "")


@pytest.mark.parametrize("model", ["shapes", "shapes-segment", "shapes-detect"])
def test_nan_running_statistics_fail_the_load(tmp_path: Path, model: str) -> None:
    """A norm's running statistics are buffers, not parameters: NaN there made every answer NaN
    (a classifier's probe caught it; a detector's and a segmenter's did not), and were not
    checked (a hostile review)."""

    def spoil(state: dict[str, torch.Tensor]) -> str:
        name = next(k for k in state if k.endswith("running_var"))
        state[name][0] = float("nan")
        return name

    entry, name = _reload_spoilt(tmp_path, model, spoil)
    error = entry.reload_error or ""
    # A classifier's warm-up probe sees NaN logits first; the others get the buffer's name.
    expected = "logits that are NaN" if model == "shapes" else f"buffer {name} holds 1 of"
    assert expected in error, error


def test_an_infinite_buffer_is_allowed_as_an_attention_mask(tmp_path: Path) -> None:
    from app.models.loading import _check_finite

    module = torch.nn.Linear(2, 2)
    module.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    _check_finite(module)  # no error: -inf masks are how attention leaves positions out
    module.mask[0] = float("nan")
    with pytest.raises(Exception, match="buffer mask holds 1 of 2 values that are NaN"):
        _check_finite(module)


def test_an_unload_before_the_first_scan_reaches_the_model_holds(tmp_path: Path) -> None:
    """The repository API answers while the first scan loads the store: a model it unloaded
    before the scan came to it was then loaded by the scan, and served (a hostile review)."""
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "late", seed=1)
    registry = ModelRegistry(
        tmp_path, torch.device("cpu"), "tiny", control="explicit", access=fixture_access(tmp_path)
    )
    registry.discover()
    with registry.claim("late"):
        registry.unload("late")
    registry.load_all()
    assert registry.entry("late").status == "unloaded"
    assert registry.entry("tiny").status == "ready" and registry.scanned
