"""The configuration page's table is written from the settings class, and kept current."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings

from app.settings import ENV_PREFIX, Settings
from tools import settings_doc


def test_the_configuration_page_is_current() -> None:
    page = settings_doc.PAGE.read_text(encoding="utf-8")
    assert settings_doc.render(page) == page, (
        "docs/configuration.md is out of date: run .venv/bin/python tools/settings_doc.py"
    )


def test_every_setting_has_a_row_with_a_description() -> None:
    table = settings_doc.settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description for the docs"
        row = f"| `{ENV_PREFIX}{name.upper()}` "  # a renamed one goes on "(formerly ...)"
        assert f"\n{row}|" in table or f"\n{row}(formerly " in table


class _Example(BaseSettings):
    count: int = Field(3, ge=1, le=200_000, description="How many.")
    wait_s: float | None = Field(5.0, gt=0, description="How long | or not.")
    mode: Literal["a", "b"] = Field("a", description="Which.")
    on: bool = Field(True, description="Whether.")
    names: list[str] = Field(default_factory=list, description="Who.")
    slots: int = Field(
        2,
        ge=1,
        validation_alias=AliasChoices("CAMSERVE_SLOTS", "CAMSERVE_OLD_SLOTS"),
        description="Renamed.",
    )


def test_rows_come_from_names_defaults_bounds_and_descriptions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings_doc, "Settings", _Example)
    assert settings_doc.settings_table().splitlines()[2:] == [
        "| `CAMSERVE_COUNT` | `3` | 1 to 200,000 | How many. |",
        "| `CAMSERVE_WAIT_S` | `5` | over 0, or empty | How long \\| or not. |",
        "| `CAMSERVE_MODE` | `a` | `a`, `b` | Which. |",
        "| `CAMSERVE_ON` | `true` | `true`, `false` | Whether. |",
        "| `CAMSERVE_NAMES` | empty | a list | Who. |",
        "| `CAMSERVE_SLOTS` (formerly `CAMSERVE_OLD_SLOTS`) | `2` | at least 1 | Renamed. |",
    ]


def test_a_stale_page_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(f"# C\n\n{settings_doc.BEGIN}\n| old |\n{settings_doc.END}\n\nafter\n")
    monkeypatch.setattr(settings_doc, "PAGE", page)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main([]) == 0
    assert settings_doc.main(["--check"]) == 0
    text = page.read_text()
    assert "| old |" not in text and "`CAMSERVE_DEVICE`" in text and text.endswith("after\n")
