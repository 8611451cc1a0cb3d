"""Every page of docs/ is listed where a reader looks for it: the site's nav (mkdocs.yml), the
home page (docs/index.md) and the README's table; and the home page shows the README's two
commands as the README does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PAGES = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}


def nav_pages(entry: Any) -> Iterator[str]:
    if isinstance(entry, str):
        yield entry
    elif isinstance(entry, list):
        for item in entry:
            yield from nav_pages(item)
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from nav_pages(value)


def linked(text: str, prefix: str = "") -> set[str]:
    return set(re.findall(rf"\]\({re.escape(prefix)}([\w-]+\.md)(?:#[\w-]*)?\)", text))


def commands_block(text: str) -> str:
    """The first ```bash block: `make serve` and `make test`."""
    found = re.search(r"```bash\n(make serve.*?)```", text, re.DOTALL)
    assert found, "no ```bash block that starts with `make serve`"
    return found[1]


def test_the_site_nav_lists_every_page() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    assert set(nav_pages(nav)) == PAGES | {"index.md"}


@pytest.mark.parametrize(("page", "prefix"), [("docs/index.md", ""), ("README.md", "docs/")])
def test_the_home_page_and_the_readme_link_every_page(page: str, prefix: str) -> None:
    missing = PAGES - linked((ROOT / page).read_text(), prefix)
    assert not missing, f"{page} does not link {sorted(missing)}"


def test_the_home_page_shows_the_readmes_commands() -> None:
    readme = commands_block((ROOT / "README.md").read_text())
    assert commands_block((ROOT / "docs" / "index.md").read_text()) == readme
    assert "apt-get" in readme and "make shell" in readme  # what make test needs; the PATH


def test_the_api_page_names_every_form_field_and_method_of_explain() -> None:
    from app.cam import METHODS
    from app.http.app import create_app

    schema = create_app().openapi()["components"]["schemas"]["Body_explain_images_explain_post"]
    api = (ROOT / "docs" / "api.md").read_text()
    table = api[api.index("Form fields of `/explain`:") :]
    table = table[: table.index("\n\n", table.index("| Field |"))]
    rows = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert set(schema["properties"]) - {"file"} - named == set()
    method_row = next(row for row in table.splitlines() if row.startswith("| `method` |"))
    assert {m for m in METHODS if f"`{m}`" not in method_row} == set()
