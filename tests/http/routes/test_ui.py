"""GET / serves the page and its assets to a browser, KServe v1's liveness to other clients;
CAMSERVE_UI=false leaves the page out."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

from app.cam import COLORMAPS, colormap_lut
from tests.conftest import assert_error

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what a browser sends


def test_page_and_its_assets(client: TestClient) -> None:
    page = client.get("/", headers=HTML)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Everything the page loads is relative to the service: no CDN, no absolute URL.
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(not re.match(r"[a-z]+://|//", s) for s in sources), sources
    for asset, media in (
        ("ui/tasks.js", "javascript"),
        ("ui/page.js", "javascript"),
        ("ui/page.css", "text/css"),
    ):
        assert f'"{asset}"' in page.text
        response = client.get(f"/{asset}")
        assert response.status_code == 200 and media in response.headers["content-type"]
    for script in ("ui/page.js", "ui/tasks.js"):
        assert re.search(r"https?://", client.get(f"/{script}").text) is None


def test_colormaps_are_the_servers_own(client: TestClient) -> None:
    tables = client.get("/ui/colormaps.json").json()
    assert list(tables) == list(COLORMAPS)
    assert all(bytes(tables[name]) == colormap_lut(name) for name in COLORMAPS)


def test_the_page_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/ui/colormaps.json", "/docs", "/redoc"} & set(paths)


def test_ui_can_be_switched_off(make_client: Callable[..., TestClient]) -> None:
    off = make_client(ui=False)
    assert off.get("/", headers=HTML).json() == {"status": "alive"}
    assert_error(off.get("/ui/page.js"), 404, "not_found")
    assert off.get("/docs").status_code == 200  # the API docs stay


def test_page_is_open_when_a_key_is_set(make_client: Callable[..., TestClient]) -> None:
    keyed = make_client(api_key="k")
    page = keyed.get("/", headers=HTML)  # the page asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_error(keyed.get("/models"), 401, "unauthorized")


def test_hidden_wins_over_every_display_rule_of_the_page(client: TestClient) -> None:
    """`.row { display: flex }` once showed the hidden opacity and colour-map controls."""
    css = client.get("/ui/page.css").text
    assert re.search(r"\[hidden\]\s*\{\s*display:\s*none\s*!important;?\s*\}", css)


def test_the_page_knows_no_method_by_name(client: TestClient) -> None:
    """Which methods exist, what they are and which are slow comes from /models/{name}: the
    page's script names none of them (a second list would drift from the engine's)."""
    from app.cam import METHODS

    script = client.get("/ui/page.js").text
    named = [m for m in METHODS if re.search(rf"\b{m}\b", script)]
    assert named == []
    assert "method_info" in script and ".slow" in script


def test_a_client_that_does_not_ask_for_html_gets_kserve_liveness(client: TestClient) -> None:
    refusing = ("text/html;q=0, application/json", "application/json, text/html;q=0.5")
    for accept in ("*/*", "application/json", None, "text/html;q=0", *refusing):
        answer = client.get("/", headers={} if accept is None else {"Accept": accept})
        assert (answer.status_code, answer.json()) == (200, {"status": "alive"}), accept
        assert answer.headers["vary"] == "Accept"


def test_the_page_goes_to_whoever_prefers_html(client: TestClient) -> None:
    """Accept is read by quality, as /explain reads it (the page once went to any Accept that
    held the text "text/html", even at q=0)."""
    for accept in (HTML["Accept"], "TEXT/HTML", "application/json;q=0.5, text/html", "text/*"):
        answer = client.get("/", headers={"Accept": accept})
        assert answer.headers["content-type"].startswith("text/html"), accept
