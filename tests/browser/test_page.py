"""The page at / in headless chromium against a real service (model_store/shapes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from tests.browser.conftest import API_KEY, ROOT

EXAMPLES = ROOT / "examples"


@dataclass
class Watched:
    """A page with everything it logged and loaded."""

    page: object
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def watch(browser: object, url: str, **context: object) -> Watched:
    page = browser.new_context(**context).new_page()  # type: ignore[attr-defined]
    watched = Watched(page)
    page.on("console", lambda m: m.type == "error" and watched.errors.append(m.text))
    page.on("pageerror", lambda e: watched.errors.append(str(e)))
    page.on("requestfailed", lambda r: watched.failed.append(f"{r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and watched.failed.append(f"{r.url} {r.status}"))
    page.on("request", lambda r: watched.requests.append(f"{r.method} {r.url}"))
    page.goto(url)
    return watched


@pytest.fixture
def shown(browser: object, server: str) -> Iterator[Watched]:
    watched = watch(browser, f"{server}/")
    watched.page.wait_for_selector("#methods input[value=GradCAM]")
    yield watched
    watched.page.context.close()


def explain(page: object, image: Path | dict, *methods: str, cards: int = 1) -> None:
    """Pick the image and methods, press Explain from the keyboard, wait for the pictures."""
    page.set_input_files("#file", image)
    for box in page.query_selector_all("#methods input"):
        box.set_checked(box.get_attribute("value") in methods)
    page.focus("#explain")
    page.keyboard.press("Enter")
    if cards:
        page.wait_for_function(
            f"document.querySelectorAll('#results figure.card').length === {cards}"
            " && !document.querySelector('#explain').disabled"
        )


def picture(page: object, method: str) -> str:
    return page.eval_on_selector(
        f"#results figure[data-method={method}] canvas", "canvas => canvas.toDataURL()"
    )


def test_page_loads_with_no_console_errors(shown: Watched) -> None:
    page = shown.page
    assert page.title() == "camserve: explain an image"
    assert page.input_value("#model") == "shapes"
    methods = page.eval_on_selector_all("#methods input", "els => els.map(e => e.value)")
    assert {"GradCAM", "ScoreCAM", "CAM"} <= set(methods)
    assert page.is_checked("#methods input[value=GradCAM]")
    assert page.is_checked("#layers input[value=layer3]")
    assert not page.is_checked("#layers input[value=layer1]")
    assert shown.errors == [] and shown.failed == []


def test_star_gives_an_overlay_labelled_star(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    card = page.locator("#results figure[data-method=GradCAM]")
    assert card.locator(".label").inner_text() == "star"
    assert "ms" in card.locator(".time").inner_text()
    assert page.locator("#topk button").first.inner_text().startswith("star")
    # An overlay, not a blank canvas: many distinct colours.
    colours = page.eval_on_selector(
        "#results canvas",
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  const s = new Set(); for (let i = 0; i < d.length; i += 4)
                  s.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]); return s.size; }""",
    )
    assert colours > 500
    assert shown.errors == [] and shown.failed == []


def test_scorecam_gives_a_new_overlay(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    gradcam = picture(page, "GradCAM")
    explain(page, EXAMPLES / "star.png", "ScoreCAM")
    assert page.locator("#results figure").get_attribute("data-method") == "ScoreCAM"
    assert picture(page, "ScoreCAM") != gradcam


def test_slider_and_colormap_change_the_picture_without_a_request(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    before, requests = picture(page, "GradCAM"), len(shown.requests)
    page.focus("#opacity")
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#opacity") == "0.7"
    assert page.inner_text("#opacity-value") == "0.70"
    after = picture(page, "GradCAM")
    assert after != before
    page.select_option("#colormap", "viridis")
    assert picture(page, "GradCAM") not in (before, after)
    assert len(shown.requests) == requests


def test_class_from_the_top_k_is_explained(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    second = page.locator("#topk button").nth(1)
    label = second.inner_text().split()[0]
    second.click()
    page.wait_for_function(f"document.querySelector('#results .label')?.textContent === {label!r}")
    assert page.locator("#topk button").nth(1).get_attribute("aria-pressed") == "true"
    assert label in page.inner_text("#class-choice")


def test_a_text_file_named_png_shows_the_error(shown: Watched) -> None:
    page = shown.page
    text = {"name": "notes.png", "mimeType": "image/png", "buffer": b"just some words\n" * 4}
    explain(page, text, "GradCAM", cards=0)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "unsupported_media_type" in error.inner_text()
    assert "415" in error.inner_text()
    assert page.locator("#results figure").count() == 0


def test_two_methods_at_once_show_two_overlays(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM", "ScoreCAM", cards=2)
    explains = [r for r in shown.requests if r.startswith("POST")]
    assert len(explains) == 1  # both methods in one request
    methods = page.eval_on_selector_all("#results figure", "els => els.map(e => e.dataset.method)")
    assert methods == ["GradCAM", "ScoreCAM"]
    assert [t.strip() for t in page.locator("#results .label").all_inner_texts()] == ["star"] * 2
    assert picture(page, "GradCAM") != picture(page, "ScoreCAM")
    # The README's screenshot: PAGE_SCREENSHOT=docs/page.png writes it there.
    target = os.environ.get("PAGE_SCREENSHOT")
    if target:
        page.set_viewport_size({"width": 1100, "height": 720})
        page.screenshot(path=str(ROOT / target), full_page=True)
        shot = Image.open(ROOT / target)
        shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(ROOT / target, optimize=True)


def test_download_gives_a_png(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    with page.expect_download() as info:
        page.locator("#results figure button").click()
    download = info.value
    assert download.suggested_filename == "star-GradCAM-layer3-star.png"
    assert Path(download.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readable_on_a_phone(browser: object, server: str) -> None:
    watched = watch(browser, f"{server}/", viewport={"width": 375, "height": 740})
    page = watched.page
    page.wait_for_selector("#methods input[value=GradCAM]")
    explain(page, EXAMPLES / "star.png", "GradCAM")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    width = page.eval_on_selector("#results canvas", "c => c.getBoundingClientRect().width")
    assert 200 < width <= 375
    page.context.close()


def test_api_key_field_appears_then_works(browser: object, servers: dict[str, str]) -> None:
    watched = watch(browser, f"{servers['keyed']}/")
    page = watched.page
    key_box = page.locator("#key-box")
    key_box.wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#methods input[value=GradCAM]")
    explain(page, EXAMPLES / "star.png", "GradCAM")
    assert page.locator("#results .label").inner_text() == "star"
    assert page.evaluate("sessionStorage.getItem('camserve-api-key')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    # Only the first /models call was refused.
    assert [f for f in watched.failed if "401" in f] == [f"{servers['keyed']}/models 401"]
    page.context.close()


@pytest.mark.parametrize("path, title", [("/docs", ".swagger-ui .title"), ("/redoc", "h1")])
def test_api_docs_load_offline(browser: object, server: str, path: str, title: str) -> None:
    watched = watch(browser, f"{server}{path}")
    page = watched.page
    heading = page.locator(title).first
    heading.wait_for(state="visible")
    assert "camserve" in heading.inner_text()
    page.wait_for_load_state("networkidle")
    outside = [r for r in watched.requests if server not in r and " blob:" not in r]
    if path == "/redoc":
        # Its CDN logo, refused by the page's own policy before any connection
        # (app/http/routes/docs.py).
        logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
        assert outside == [f"GET {logo}"]
        assert watched.failed == [f"{logo} csp"]
        assert len(watched.errors) == 1 and logo in watched.errors[0]
    else:
        assert outside == []
        assert watched.failed == [] and watched.errors == []
    page.context.close()
