"""The store's layout: version folders, the version policy, fingerprints."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from app.errors import InvalidModelName
from app.models.manifest import ManifestError, VersionPolicy, parse_manifest, parse_policy
from app.models.store import (
    check_name,
    content_digest,
    fingerprint,
    model_folders,
    read_layout,
)
from tests.models.store_helpers import new_weights, put_tiny


def test_a_folder_without_versions_is_version_one(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    layout = read_layout(folder)
    assert not layout.versioned
    assert layout.versions == {1: folder}
    assert model_folders(tmp_path) == [folder]  # the staging folder is gone, `_` ones skipped


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [3]),
        ("[version_policy]\nlatest = 2", [2, 3]),
        ("[version_policy]\nall = true", [1, 2, 3]),
        ("[version_policy]\nspecific = [1, 3]", [1, 3]),
    ],
)
def test_the_newest_manifest_picks_the_served_versions(
    tmp_path: Path, policy: str, served: list[int]
) -> None:
    for number in (1, 2):
        put_tiny(tmp_path, "m", seed=number, version=number)
    put_tiny(tmp_path, "m", seed=3, version=3, policy=policy)
    layout = read_layout(tmp_path / "m")
    assert layout.versioned and layout.available == (1, 2, 3)
    assert sorted(layout.versions) == served
    assert layout.problem is None


def test_a_policy_that_selects_nothing_says_so(tmp_path: Path) -> None:
    put_tiny(tmp_path, "m", seed=1, version=1, policy="[version_policy]\nspecific = [7]")
    layout = read_layout(tmp_path / "m")
    assert layout.versions == {}
    assert layout.problem == "version_policy (specific 7) selects none of the versions 1"


@pytest.mark.parametrize(
    "table",
    [{}, {"latest": 0}, {"all": False}, {"specific": []}, {"latest": 1, "all": True}, {"x": 1}],
)
def test_bad_policies_are_refused_with_the_usage(table: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="takes one of latest = N, all = true or specific"):
        parse_policy(table)


def test_the_manifest_checks_its_policy(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "m", seed=1, version=1, policy="[version_policy]\nlatest = 0")
    with pytest.raises(ManifestError, match="got latest = 0"):
        parse_manifest(folder, name="m", version=1)
    assert parse_policy({"latest": 2}) == VersionPolicy(latest=2)


def test_fingerprint_changes_with_new_weights(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    before = fingerprint(folder)
    assert fingerprint(folder) == before
    new_weights(folder, seed=1)
    assert fingerprint(folder) != before


def test_only_ascii_numbers_are_version_folders(tmp_path: Path) -> None:
    put_tiny(tmp_path, "m", seed=1, version=1)
    for odd in ("²", "٣", "01", "0", "1x"):  # "²" and "٣" pass str.isdigit()
        (tmp_path / "m" / odd).mkdir()
    layout = read_layout(tmp_path / "m")
    assert layout.available == (1,) and list(layout.versions) == [1]


def test_a_folder_of_odd_digits_only_is_one_unversioned_model(tmp_path: Path) -> None:
    (tmp_path / "m" / "²").mkdir(parents=True)
    layout = read_layout(tmp_path / "m")
    assert not layout.versioned and layout.versions == {1: tmp_path / "m"}


@pytest.mark.parametrize("name", ["x" * 5000, "é" * 128, "a/b", "a\0b", ""])
def test_model_names_are_bounded_before_any_file_call(name: str) -> None:
    with pytest.raises(InvalidModelName, match="1 to 255 bytes"):
        check_name(name)


def test_a_name_of_255_bytes_is_fine() -> None:
    check_name("x" * 255)
    check_name("é" * 127)


def test_fingerprint_follows_links_inside_the_store_once_and_never_out(tmp_path: Path) -> None:
    """Links to folders are followed so that their files are watched; a hostile store's links
    (a loop, the store itself, the file system's root) must not make a scan endless or long."""
    store = tmp_path / "store"
    folder = put_tiny(store, "m", seed=0)
    put_tiny(store, "other", seed=1)
    (folder / "loop").symlink_to(".")
    (folder / "store").symlink_to("..")
    (folder / "root").symlink_to("/")
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    names = [path for path, _, _ in fingerprint(folder, store)]
    assert "store/other/weights.pt" in names  # the store is inside the store: walked once
    assert not any(name.startswith(("root/", "loop/", "store/m/")) for name in names)
    assert {"root -> /", "loop -> ."} <= set(names)
    assert len(names) == len(set(names))
    assert not any(n.startswith("store/") for n, _, _ in fingerprint(folder))  # no store


def _specials(folder: Path) -> list[str]:
    """A FIFO, a socket and a link to /dev/zero in ``folder``: the names put there."""
    os.mkfifo(folder / "notes.fifo")
    with socket.socket(socket.AF_UNIX) as held:
        held.bind(str(folder / "agent.sock"))
    (folder / "zeros.bin").symlink_to("/dev/zero")
    return ["agent.sock", "notes.fifo", "zeros.bin"]


def _within(seconds: float, work: Callable[[], str]) -> str:
    """``work()``, run on a daemon thread: a reader stuck on a FIFO fails the test, not the run."""
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"still reading after {seconds} s"
    return done[0]


def test_files_that_are_no_regular_files_are_no_part_of_a_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A FIFO in a model folder held its load "loading" for ever (the digest waited for a
    # writer) and the service's shutdown waited on that load; /dev/zero never ends.
    folder = put_tiny(tmp_path, "tiny", seed=0)
    before = fingerprint(folder)
    with caplog.at_level(logging.WARNING, logger="app.models.store"):
        special = _specials(folder)
        assert fingerprint(folder) == before
    assert all(name in caplog.text for name in special) and "FIFO" in caplog.text
    assert _within(10, lambda: content_digest(folder, fingerprint(folder))) == content_digest(
        folder, before
    )


def test_a_special_file_in_a_files_place_counts_by_its_name_alone(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    special = _specials(folder)
    listed = tuple((name, 0, 0) for name in special)  # listed, then swapped before the read
    first = _within(10, lambda: content_digest(folder, listed))
    for name in special:
        (folder / name).unlink()
        (folder / name).write_bytes(b"")
    assert _within(10, lambda: content_digest(folder, listed)) != first
