"""What a manifest may reach: trusted modules only (refused before import), files inside its
folder, no symbolic link out of the store unless the setting allows it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app.models.access import AccessError, StoreAccess, within
from app.models.manifest import ManifestError, parse_manifest
from app.models.registry import ModelRegistry
from tests.fixtures_models import FIXTURE_MODULE, fixture_access
from tests.models.store_helpers import put_tiny


def registry_of(store: Path, **access: object) -> ModelRegistry:
    rules = {"root": store, "trusted_modules": (FIXTURE_MODULE,), **access}
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=StoreAccess(**rules))  # type: ignore[arg-type]
    registry.discover()
    registry.load_all()
    return registry


def set_model(folder: Path, **values: str) -> None:
    """Rewrite ``[model]`` keys of the manifest in ``folder``."""
    manifest = folder / "model.toml"
    lines = manifest.read_text().splitlines()
    for key, value in values.items():
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        lines.insert(lines.index("[model]") + 1, f"{key} = {value}")
    manifest.write_text("\n".join(lines) + "\n")


def test_subprocess_run_is_refused_and_never_runs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    marker = tmp_path / "ran"
    folder = put_tiny(store, "evil", seed=0)
    set_model(folder, architecture='"subprocess:run"', kwargs=f'{{ args = ["touch", "{marker}"] }}')
    put_tiny(store, "tiny", seed=1)
    registry = registry_of(store)
    assert not marker.exists()
    entry = registry.entry("evil")
    assert entry.status == "failed"
    assert "module subprocess is not trusted" in (entry.error or "")
    assert "CAMSERVE_TRUSTED_MODULES" in (entry.error or "")
    assert registry.entry("tiny").status == "ready"


def test_an_untrusted_module_is_not_even_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported"
    (code / "camserve_probe_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from tests.fixtures_models import TinyNet\n\n"
        "def build(num_classes=3):\n    return TinyNet(num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "camserve_probe_mod", raising=False)
    store = tmp_path / "store"
    set_model(put_tiny(store, "m", seed=0), architecture='"camserve_probe_mod:build"')

    refused = registry_of(store).entry("m")
    assert refused.status == "failed" and "not trusted" in (refused.error or "")
    assert not marker.exists() and "camserve_probe_mod" not in sys.modules

    trusted = registry_of(store, trusted_modules=(FIXTURE_MODULE, "camserve_probe_mod"))
    assert trusted.entry("m").status == "ready" and marker.exists()


def test_the_project_zoo_and_torchvision_are_trusted_by_default() -> None:
    access = StoreAccess()
    access.check_architecture("app.models.zoo.shapes_resnet:build")
    access.check_architecture("torchvision.models:resnet18")
    access.check_architecture("resnet18")
    access.check_architecture("timm:resnet18")
    for refused in ("tests.fixtures_models:build_tiny", "app.models.zoo_x:build", "os:system"):
        with pytest.raises(AccessError, match="CAMSERVE_TRUSTED_MODULES"):
            access.check_architecture(refused)
    with pytest.raises(AccessError, match="package.module:factory"):
        access.check_architecture(".relative:build")


def test_within_respects_the_dots() -> None:
    assert within("a.b", "a.b") and within("a.b.c", "a.b")
    assert not within("a.bc", "a.b") and not within("a", "a.b")


def test_a_factory_must_be_defined_in_the_module_named(tmp_path: Path) -> None:
    # tests.fixtures_models imports Path from pathlib: a trusted module does not lend its
    # imports.
    set_model(put_tiny(tmp_path, "m", seed=0), architecture=f'"{FIXTURE_MODULE}:Path"')
    error = registry_of(tmp_path).entry("m").error or ""
    assert "Path is not defined in tests.fixtures_models (it comes from pathlib" in error


@pytest.mark.parametrize("key", ["labels", "weights"])
@pytest.mark.parametrize("path", ["../../secret.txt", "/etc/hostname", "sub/../../x.pt"])
def test_files_stay_inside_the_model_folder(tmp_path: Path, key: str, path: str) -> None:
    (tmp_path / "secret.txt").write_text("a\nb\nc\n")
    folder = put_tiny(tmp_path / "store", "m", seed=0)
    value = path if key == "labels" or path.endswith(".pt") else path + ".pt"
    set_model(folder, **{key: f'"{value}"'})
    with pytest.raises(ManifestError, match=rf"{key} .* must be a path inside the model's folder"):
        parse_manifest(folder, access=fixture_access(tmp_path / "store"))


def test_labels_served_from_outside_are_refused_through_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top\nsecret\nlines\n")
    store = tmp_path / "store"
    folder = put_tiny(store, "m", seed=0)
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").symlink_to(secret)
    error = registry_of(store).entry("m").error or ""
    assert "labels leads outside the model store" in error
    assert "CAMSERVE_ALLOW_LINKS_OUT_OF_STORE" in error and "secret" not in error
    allowed = registry_of(store, links_out=True)
    assert allowed.get("m").labels == ("top", "secret", "lines")


def test_a_model_folder_linked_from_outside_is_refused_unless_allowed(tmp_path: Path) -> None:
    outside = put_tiny(tmp_path / "elsewhere", "m", seed=0)
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=1)
    (store / "linked").symlink_to(outside, target_is_directory=True)
    (store / "twin").symlink_to(store / "tiny", target_is_directory=True)  # inside: fine
    registry = registry_of(store)
    assert registry.entry("linked").status == "failed"
    assert "folder linked leads outside the model store" in (registry.entry("linked").error or "")
    assert registry.entry("twin").status == "ready"
    # a link out is not walked by the poll's fingerprint (a link to / would cost every scan)
    assert registry.entry("linked").fingerprint == (("linked -> outside the store", 0, 0),)
    assert registry.changes() == ([], [])
    assert registry_of(store, links_out=True).entry("linked").status == "ready"


def test_a_version_folder_linked_from_outside_is_refused(tmp_path: Path) -> None:
    outside = put_tiny(tmp_path / "elsewhere", "m", seed=0)
    store = tmp_path / "store"
    put_tiny(store, "v", seed=1, version=1)
    (store / "v" / "2").symlink_to(outside, target_is_directory=True)
    entry = registry_of(store).entry("v")
    assert entry.versions[2].status == "failed"
    assert "model.toml leads outside the model store" in (entry.versions[2].error or "")


@pytest.mark.parametrize(
    ("key", "path"),
    [("weights", ".w.pt"), ("weights", "_staged/w.pt"), ("labels", ".cache/labels.txt")],
)
def test_a_manifest_may_not_name_a_file_the_scans_pass_over(
    tmp_path: Path, key: str, path: str
) -> None:
    """The scans skip dotfiles and folders starting with '.' or '_'. Weights named there
    loaded; new weights written over them were never seen: a reload answered 200 and went on
    serving the old weights (a hostile review)."""
    folder = put_tiny(tmp_path, "tiny", seed=0)
    (folder / path).parent.mkdir(exist_ok=True)
    (folder / ("weights.pt" if key == "weights" else "labels.txt")).rename(folder / path)
    set_model(folder, **{key: f'"{path}"'})
    entry = registry_of(tmp_path).entry("tiny")
    assert entry.status == "failed"
    assert f"{key} {path!r} is hidden from the scans" in (entry.error or "")
    assert "Rename it" in (entry.error or "")


class _RunsCode:
    """Unpickled without weights_only, this touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (Path.touch, (str(self.marker),))


def test_weights_that_would_run_code_are_refused_and_never_run(tmp_path: Path) -> None:
    """torch's own refusal advised re-running with weights_only=False (code from the store)
    and to file an issue with torch; the message now says what the file holds and how to save
    weights (a hostile review). An empty file said 'cannot read weights weights.pt:', no why."""
    store = tmp_path / "store"
    marker = tmp_path / "ran"
    torch.save({"fc.weight": _RunsCode(marker)}, put_tiny(store, "evil", seed=0) / "weights.pt")
    (put_tiny(store, "empty", seed=1) / "weights.pt").write_bytes(b"")
    registry = registry_of(store)
    assert not marker.exists()
    error = registry.entry("evil").error or ""
    assert "weights.pt: it holds more than tensors (it names " in error
    assert "torch.save(model.state_dict()" in error
    assert "weights_only` set to `False`" not in error and "file an issue" not in error
    assert "the file ends too early (it is empty or truncated)" in (
        registry.entry("empty").error or ""
    )
