"""The page at / in headless chromium against a real service (model_store/shapes)."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.browser.conftest import API_KEY, ROOT, start, stop, wait_ready

EXAMPLES = ROOT / "examples"


@dataclass
class Watched:
    """A page with everything it logged and loaded."""

    page: object
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


#: Chromium reports a fetch of a ``Cache-Control: no-store`` stream as aborted even once the
#: page has read it to its end (microsoft/playwright#42742): the job's event streams are such.
_STREAM_QUIRK = re.compile(r".*/jobs/[\w-]+/events net::ERR_ABORTED")


def failures(watched: Watched) -> list[str]:
    """Failed requests, less the event streams that only that quirk marks failed."""
    return [f for f in watched.failed if not _STREAM_QUIRK.fullmatch(f)]


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


#: The map cards (the original image has a card of its own, without a method).
MAPS = "#results figure.card[data-method]"


def choose(page: object, *methods: str) -> None:
    for box in page.query_selector_all("#methods input"):
        box.set_checked(box.get_attribute("value") in methods)


def explain(page: object, image: Path | dict, *methods: str, cards: int = 1) -> None:
    """Pick the image and methods, press Explain from the keyboard, wait for the pictures."""
    page.set_input_files("#file", image)
    choose(page, *methods)
    page.focus("#explain")
    page.keyboard.press("Enter")
    if cards:
        page.wait_for_function(
            f"() => document.querySelectorAll({MAPS!r}).length === {cards}"
            " && !document.querySelector('#explain').disabled"
        )


def shot(page: object, name: str) -> None:
    """PAGE_SHOTS=DIR keeps a screenshot of this moment there, to look at."""
    folder = os.environ.get("PAGE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


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
    # One sentence about the model, whatever punctuation its description ends with.
    status = page.inner_text("#status")
    assert status.startswith("Model shapes, 8 classes, on cpu: Small ResNet")
    assert status.endswith("default model.") and ".," not in status and ".." not in status
    assert shown.errors == [] and failures(shown) == []


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
    assert shown.errors == [] and failures(shown) == []


def test_scorecam_gives_a_new_overlay(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    gradcam = picture(page, "GradCAM")
    explain(page, EXAMPLES / "star.png", "ScoreCAM")
    assert page.locator(MAPS).get_attribute("data-method") == "ScoreCAM"
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
    page.wait_for_function(
        f"() => document.querySelector('#results .label')?.textContent === {label!r}"
    )
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
    assert page.locator("#predictions").is_hidden()


def test_a_failed_upload_after_a_success_leaves_nothing_stale(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    page.locator("#topk button").nth(1).click()  # a class of the first image
    page.wait_for_function(
        "() => document.querySelector('#topk button[aria-pressed=true]')"
        "?.dataset.classIdx !== undefined && !document.querySelector("
        "'#explain').disabled && document.querySelector('#class-reset')"
        ".hidden === false"
    )
    assert page.locator(MAPS).count() == 1
    text = {"name": "notes.png", "mimeType": "image/png", "buffer": b"just some words\n" * 4}
    explain(page, text, "GradCAM", cards=0)
    page.locator("#error").wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#explain').disabled")
    shot(page, "failed-after-success")
    assert "415" in page.inner_text("#error")
    assert page.locator("#results figure").count() == 0  # no map, no original of the old image
    assert page.locator("#predictions").is_hidden() and page.locator("#topk li").count() == 0
    assert page.inner_text("#class-choice") == "top-1 of the answer"
    assert page.locator("#class-reset").is_hidden() and page.locator("#view").is_hidden()
    assert "notes.png" in page.inner_text("#file-name")


def test_a_timeout_clears_the_maps_and_speaks_to_a_person(shown: Watched) -> None:
    """The same image, asked again, and the answer is the service's 504: the old maps go, and
    the message says what to do at the page, not which route to POST to."""
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    server_says = (
        "The request took longer than 60 s (CAMSERVE_REQUEST_TIMEOUT_S) and was stopped. Run "
        "long explanations as a job: POST the same form to /jobs, then follow GET /jobs/{id}."
    )
    page.route(
        "**/explain",
        lambda route: route.fulfill(
            status=504, json={"error": {"code": "timeout", "message": server_says}}
        ),
    )
    page.focus("#explain")
    page.keyboard.press("Enter")
    page.locator("#error").wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#explain').disabled")
    message = page.inner_text("#error")
    assert "time limit" in message and "fewer methods" in message
    assert "POST" not in message and "/jobs" not in message and "CAMSERVE" not in message
    assert page.locator("#results figure").count() == 0
    assert page.locator("#predictions").is_hidden() and page.locator("#view").is_hidden()


def test_hidden_controls_stay_hidden_and_out_of_the_tab_order(shown: Watched) -> None:
    page = shown.page
    hidden = ["#view", "#opacity", "#colormap", "#job", "#cancel", "#predictions", "#class-reset",
              "#key-box", "#error"]  # fmt: skip
    for selector in hidden:
        assert page.locator(selector).is_hidden(), selector
    assert page.eval_on_selector("#view", "e => getComputedStyle(e).display") == "none"
    shot(page, "before-any-result")
    reached = []
    for _ in range(80):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.value"))
    assert {"file", "model", "methods-all", "methods-none", "ScoreCAM", "layer3", "explain"} <= set(
        reached
    )
    assert not {"opacity", "colormap", "cancel", "class-reset", "api-key", "key-save"} & set(
        reached
    )


def test_each_method_shows_the_servers_summary_and_cost(shown: Watched, server: str) -> None:
    page = shown.page
    detail = httpx.get(f"{server}/models/shapes").json()
    rows = page.eval_on_selector_all(
        "#methods .method",
        """els => els.map(e => ({value: e.querySelector('input').value,
             name: e.querySelector('.name').textContent, cost: e.querySelector('.cost').textContent,
             hint: e.querySelector('.hint').textContent}))""",
    )
    assert [r["value"] for r in rows] == detail["methods"]
    for row in rows:
        info = detail["method_info"][row["value"]]
        assert info["summary"] in row["hint"]
        assert row["cost"] == ("slow" if info["slow"] else "fast")
    slow = {r["value"] for r in rows if r["cost"] == "slow"}
    assert slow == {"ScoreCAM", "SSCAM", "ISCAM", "AblationCAM", "SmoothGradCAMpp"}
    names = {r["value"]: r["name"] for r in rows}
    assert names["GradCAMpp"] == "Grad-CAM++" and names["SSCAM"] == "SS-CAM"
    assert "64 channels, 16×16" in page.inner_text("label:has(input[value=layer3])")
    page.focus("#methods-all")
    page.keyboard.press("Enter")
    assert page.eval_on_selector_all("#methods input", "els => els.every(e => e.checked)")
    page.focus("#methods-none")
    page.keyboard.press("Space")
    assert page.eval_on_selector_all("#methods input", "els => !els.some(e => e.checked)")


#: Keeps every state the job panel went through, from the page's own DOM.
RECORD_JOB_PANEL = """() => {
  window.jobPanel = [];
  const read = () => window.jobPanel.push({
    hidden: document.querySelector('#job').hidden,
    text: document.querySelector('#job-text').textContent,
    value: document.querySelector('#job-progress').getAttribute('value'),
  });
  new MutationObserver(read).observe(document.querySelector('#output'),
    {subtree: true, attributes: true, childList: true, characterData: true});
}"""


def start_job(page: object, image: Path, method: str) -> str:
    """Press Explain for one slow method; the id of the job the page created."""
    page.set_input_files("#file", image)
    choose(page, method)
    page.evaluate(RECORD_JOB_PANEL)
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/jobs")
    ) as created:
        page.focus("#explain")
        page.keyboard.press("Enter")
    assert created.value.status == 202
    return created.value.json()["id"]


def test_score_cam_runs_as_a_job_with_a_progress_bar(shown: Watched, server: str) -> None:
    page = shown.page
    job = start_job(page, EXAMPLES / "star.png", "ScoreCAM")
    page.wait_for_function(
        f"() => document.querySelectorAll({MAPS!r}).length === 1"
        " && !document.querySelector('#explain').disabled"
    )
    assert posts(shown) == ["jobs"]
    assert any(r.endswith(f"/jobs/{job}/events") for r in shown.requests)
    panel = page.evaluate("window.jobPanel")
    assert any(not state["hidden"] for state in panel)
    counted = [
        s for s in panel if re.fullmatch(r"Score-CAM: \d+ of 64 forwards, .+ left\.", s["text"])
    ]
    assert counted, panel
    assert page.locator("#job").is_hidden()
    assert page.locator(MAPS).get_attribute("data-method") == "ScoreCAM"
    assert page.locator("#results .label").inner_text() == "star"
    assert httpx.get(f"{server}/jobs/{job}").json()["status"] == "succeeded"
    assert shown.errors == [] and failures(shown) == []


def test_a_score_cam_family_job_shows_progress_and_cancels(shown: Watched, server: str) -> None:
    """SS-CAM (Score-CAM with 35 noisy masks a channel) runs long enough to cancel midway."""
    page = shown.page
    job = start_job(page, EXAMPLES / "star.png", "SSCAM")
    page.wait_for_function(
        "() => Number(document.querySelector('#job-progress').getAttribute('value')) > 0"
    )
    text = page.inner_text("#job-text")
    assert re.fullmatch(
        r"SS-CAM: \d+ of 2240 forwards, (about \d+ (s|min)|less than a second|estimating the time)"
        r" left\.",
        text,
    ), text
    shot(page, "job-progress")
    page.focus("#cancel")
    page.keyboard.press("Enter")
    page.wait_for_function("() => !document.querySelector('#explain').disabled")
    shot(page, "job-cancelled")
    assert re.fullmatch(
        r"Cancelled SS-CAM after \d+ of 2240 forwards\.", page.inner_text("#status")
    )
    assert page.locator("#job").is_hidden()
    assert page.evaluate("document.activeElement.id") == "explain"  # focus not lost with the panel
    assert page.locator("#results figure").count() == 0
    view = httpx.get(f"{server}/jobs/{job}").json()
    assert view["status"] == "cancelled"
    assert 0 < view["progress"]["done"] < view["progress"]["total"] == 2240
    assert shown.errors == [] and failures(shown) == []


def test_a_failed_job_shows_its_error_and_keeps_the_maps_of_this_run(shown: Watched) -> None:
    """GradCAM answers, then the Score-CAM job ends failed: its message shows, and the map that
    this same run finished stays, said to be from the methods that finished."""
    page = shown.page
    view = {
        "id": "x",
        "status": "failed",
        "url": "/jobs/x",
        "created": "2026-12-06T00:00:00Z",
        "progress": {"done": 32, "total": 64, "eta_s": None},
        "error": {"code": "invalid_image", "message": "'star.png' could not be decoded."},
    }
    page.route(
        "**/jobs/*/events",
        lambda route: route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=f"id: 1\nevent: failed\ndata: {json.dumps(view)}\n\n",
        ),
    )
    explain(page, EXAMPLES / "star.png", "GradCAM", "ScoreCAM", cards=0)
    page.locator("#error").wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#explain').disabled")
    assert page.inner_text("#error") == "'star.png' could not be decoded. (invalid_image)"
    assert page.eval_on_selector_all(MAPS, "els => els.map(e => e.dataset.method)") == ["GradCAM"]
    assert page.inner_text("#status") == "The maps shown are from the methods that finished."
    assert page.locator("#job").is_hidden()


def test_a_dropped_file_is_named_by_the_picker(shown: Watched) -> None:
    page = shown.page
    page.evaluate(
        """b64 => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const data = new DataTransfer();
          data.items.add(new File([bytes], "dropped-star.png", {type: "image/png"}));
          document.querySelector('#drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode((EXAMPLES / "star.png").read_bytes()).decode(),
    )
    assert page.evaluate("document.querySelector('#file').files[0].name") == "dropped-star.png"
    assert "dropped-star.png" in page.inner_text("#file-name")
    choose(page, "GradCAM")
    page.focus("#explain")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll({MAPS!r}).length === 1")
    assert page.locator("#results .label").inner_text() == "star"


def test_the_original_is_shown_with_the_crop_explained(shown: Watched, tmp_path: Path) -> None:
    page = shown.page
    star = Image.open(EXAMPLES / "star.png").convert("RGB")
    wide = Image.new("RGB", (512, 256), star.getpixel((0, 0)))
    wide.paste(star, (128, 0))
    wide.save(tmp_path / "wide-star.png")
    explain(page, tmp_path / "wide-star.png", "GradCAM")
    original = page.locator("#results figure.original")
    caption = original.locator("figcaption").inner_text()
    assert "wide-star.png (512×256)" in caption
    assert "centre crop inside the dashed frame, scaled to 128×128" in caption
    assert page.locator("#results figure").first.get_attribute("class") == "card original"
    shot(page, "wide-original")
    explain(page, EXAMPLES / "star.png", "GradCAM")
    caption = page.locator("#results figure.original figcaption").inner_text()
    assert "star.png (256×256)" in caption and "crop" not in caption


def posts(watched: Watched) -> list[str]:
    """The paths the page POSTed to, in order."""
    return [r.split(" ", 1)[1].split("/", 3)[3] for r in watched.requests if r.startswith("POST")]


def test_fast_methods_go_to_explain_in_one_request(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM", "CAM", "LayerCAM", cards=3)
    assert posts(shown) == ["explain"]  # all three in one request, none as a job
    methods = page.eval_on_selector_all(MAPS, "els => els.map(e => e.dataset.method)")
    assert methods == ["CAM", "GradCAM", "LayerCAM"]  # the model's order
    assert [t.strip() for t in page.locator("#results .label").all_inner_texts()] == ["star"] * 3
    assert picture(page, "GradCAM") != picture(page, "LayerCAM")
    assert page.locator("#job").is_hidden()
    assert shown.errors == [] and failures(shown) == []


def test_fast_and_slow_methods_together(shown: Watched) -> None:
    """The fast one through /explain, the slow one as a job; each map shows when it is ready."""
    page = shown.page
    explain(page, EXAMPLES / "star.png", "ScoreCAM", "GradCAM", cards=2)
    assert posts(shown) == ["explain", "jobs"]
    methods = page.eval_on_selector_all(MAPS, "els => els.map(e => e.dataset.method)")
    assert methods == ["GradCAM", "ScoreCAM"]
    assert [t.strip() for t in page.locator("#results .label").all_inner_texts()] == ["star"] * 2
    assert picture(page, "GradCAM") != picture(page, "ScoreCAM")
    assert "2 map(s)" in page.inner_text("#status")
    assert shown.errors == [] and failures(shown) == []
    # The README's screenshot: PAGE_SCREENSHOT=docs/page.png writes it there.
    target = os.environ.get("PAGE_SCREENSHOT")
    if target:
        page.set_viewport_size({"width": 1100, "height": 720})
        page.evaluate("document.activeElement.blur()")
        page.screenshot(path=str(ROOT / target), full_page=True)
        image = Image.open(ROOT / target)
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(ROOT / target, optimize=True)


def test_a_smoothing_switch_goes_to_the_methods_that_take_it(shown: Watched) -> None:
    """The switches are the server's boolean options; eigen_smooth with EigenCAM in the same
    request goes to GradCAM only (EigenCAM does not take it), so nothing is refused."""
    page = shown.page
    names = page.eval_on_selector_all("#switches input", "els => els.map(e => e.value)")
    assert names == ["eigen_smooth", "aug_smooth"]
    assert "principal component" in page.inner_text("#switches")
    explain(page, EXAMPLES / "star.png", "GradCAM", "EigenCAM", cards=2)
    plain, eigen = picture(page, "GradCAM"), picture(page, "EigenCAM")
    page.check("#switches input[value=eigen_smooth]")
    explain(page, EXAMPLES / "star.png", "GradCAM", "EigenCAM", cards=2)
    assert picture(page, "GradCAM") != plain  # smoothed
    assert picture(page, "EigenCAM") == eigen  # not sent to EigenCAM
    assert posts(shown) == ["explain", "explain"]
    assert shown.errors == [] and failures(shown) == []


def test_download_gives_a_png(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    with page.expect_download() as info:
        page.locator(f"{MAPS} button").click()
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
    shot(page, "phone")
    page.context.close()


def test_api_key_field_appears_then_works(browser: object, servers: dict[str, str]) -> None:
    watched = watch(browser, f"{servers['keyed']}/")
    page = watched.page
    key_box = page.locator("#key-box")
    key_box.wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "api-key"
    # Said once, in words about the field (not the header), and nowhere else.
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error") == (
        "This server asks for an API key: enter it in the API key field above. (401 unauthorized)"
    )
    assert page.inner_text("#status") == ""
    assert page.inner_text("main").count("asks for an API key") == 2  # the box's own line, and this
    assert "X-API-Key" not in page.inner_text("main")
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#methods input[value=GradCAM]")
    assert page.locator("#error").is_hidden()
    explain(page, EXAMPLES / "star.png", "GradCAM")
    assert page.locator("#results .label").inner_text() == "star"
    # A job, followed with the key in a header (an EventSource could not send one).
    explain(page, EXAMPLES / "star.png", "ScoreCAM")
    assert page.locator(MAPS).get_attribute("data-method") == "ScoreCAM"
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


def shown_scores(page: object) -> tuple[float, float, float]:
    """The deletion and insertion AUCs and the confidence drop (a fraction) under the (one)
    map, as the page words them."""
    line = page.locator(f"{MAPS} .faithfulness").inner_text()
    found = re.fullmatch(
        r"deletion AUC (\d\.\d{3}) \(lower is better\) · insertion AUC (\d\.\d{3}) "
        r"\(higher is better\) · confidence drop (\d+\.\d) % \(lower is better\)",
        line,
    )
    assert found, line
    return float(found[1]), float(found[2]), float(found[3]) / 100


def test_the_faithfulness_box_shows_each_maps_scores_under_it(shown: Watched) -> None:
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM")
    assert page.locator(f"{MAPS} .faithfulness").count() == 0  # not asked for: not computed
    page.check("#faithfulness")
    page.evaluate(
        """() => {
          const original = window.fetch;
          window.posted = [];
          window.fetch = (url, options = {}) => {
            if (options.method === "POST") {
              window.posted.push([String(url), options.body.get("method")]);
            }
            return original(url, options);
          };
        }"""
    )
    explain(page, EXAMPLES / "star.png", "GradCAM")  # the scores come only when asked for
    # The scores are 36 forwards per map: the method ran as a job, with its progress.
    assert page.evaluate("window.posted") == [["jobs", "GradCAM"]]
    deletion, insertion, drop = shown_scores(page)
    assert 0 <= deletion <= 1 and 0 <= insertion <= 1 and 0 <= drop <= 1
    shot(page, "faithfulness")
    # Fast methods share one job (and its forward); a slow one has its own.
    page.evaluate("window.posted = []")
    explain(page, EXAMPLES / "star.png", "GradCAM", "LayerCAM", "ScoreCAM", cards=3)
    assert page.evaluate("window.posted") == [["jobs", "GradCAM,LayerCAM"], ["jobs", "ScoreCAM"]]
    assert page.locator(f"{MAPS} .faithfulness").count() == 3
    assert shown.errors == [] and failures(shown) == []


def test_dff_shows_its_concepts_under_its_map(shown: Watched) -> None:
    """DFF's answer holds its concepts: each is drawn under the DFF card, with its top labels,
    redrawn by the colour map like the maps, and not counted as a map."""
    page = shown.page
    explain(page, EXAMPLES / "star.png", "GradCAM", "DFF", cards=2)
    figures = "#results section.concepts[data-concepts-of=DFF] figure.concept"
    page.wait_for_selector(figures)
    assert page.locator(figures).count() == 4  # n_components' default
    first = page.locator(figures).first
    assert first.locator("strong").inner_text() == "Concept 1"
    tops = first.locator(".concept-labels li").all_inner_texts()
    assert len(tops) == 5 and all(re.fullmatch(r".+ \(\d+\.\d %\)", t) for t in tops)
    # The section follows the DFF card, and only DFF has one.
    after = page.evaluate(
        "document.querySelector('section.concepts').previousElementSibling.dataset.method"
    )
    assert after == "DFF" and page.locator("section.concepts").count() == 1
    concept = f"{figures} canvas"
    drawn = page.eval_on_selector_all(concept, "cs => cs.map(c => c.toDataURL())")
    assert len(set(drawn)) == 4  # four maps, each its own
    page.select_option("#colormap", "viridis")
    assert page.eval_on_selector(concept, "c => c.toDataURL()") != drawn[0]
    assert "2 map(s)" in page.inner_text("#status")
    shot(page, "dff-concepts")
    # Another run without DFF takes the concepts away.
    explain(page, EXAMPLES / "star.png", "GradCAM", cards=1)
    assert page.locator("section.concepts").count() == 0
    assert shown.errors == [] and failures(shown) == []


def test_a_server_gone_mid_job_is_said_in_words(browser: object) -> None:
    """Found by a hostile review: the server killed while a job's stream was open left the page
    saying only 'network error' (the broken stream's own message)."""
    process, url = start()
    try:
        wait_ready(process, url)
        watched = watch(browser, f"{url}/")
        page = watched.page
        page.wait_for_selector("#methods input[value=SSCAM]")
        start_job(page, EXAMPLES / "star.png", "SSCAM")
        page.wait_for_function(
            "() => Number(document.querySelector('#job-progress').getAttribute('value')) > 0"
        )
        process.kill()
        page.wait_for_function("() => !document.querySelector('#explain').disabled")
        assert page.inner_text("#error") == (
            "The server could not be reached: is it still running? Your choices are kept; "
            "press Explain to try again."
        )
        assert page.locator("#job").is_hidden()
        assert page.is_checked("#methods input[value=SSCAM]")  # the choices are kept
        page.context.close()
    finally:
        stop(process)


def test_a_job_the_server_no_longer_has_is_said_in_words(shown: Watched, server: str) -> None:
    """The stream ends before its final event and the job is gone (another replica, or the
    server restarted): the page says so, not the API's 'Submit it again'."""
    page = shown.page

    def forget_then_end(route: object) -> None:
        job = route.request.url.split("/jobs/")[1].split("/")[0]  # type: ignore[attr-defined]
        with httpx.Client(base_url=server) as client:
            client.delete(f"/jobs/{job}")  # cancelled
            assert client.delete(f"/jobs/{job}").status_code == 200  # and forgotten
        route.fulfill(status=200, content_type="text/event-stream", body="")  # type: ignore[attr-defined]

    page.route("**/jobs/*/events", forget_then_end)
    start_job(page, EXAMPLES / "star.png", "SSCAM")
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error") == (
        "The server no longer has this job: it may have restarted. Your choices are kept; "
        "press Explain to run it again. (404 job_not_found)"
    )
    page.wait_for_function("() => !document.querySelector('#explain').disabled")


def test_a_closed_tab_cancels_its_job(browser: object, server: str) -> None:
    """Found by a hostile review: a tab closed mid-job gave its stream's place back, but the job
    ran to its end for no one, and the next request waited behind it."""
    watched = watch(browser, f"{server}/")
    page = watched.page
    page.wait_for_selector("#methods input[value=SSCAM]")
    job = start_job(page, EXAMPLES / "star.png", "SSCAM")
    page.wait_for_function(
        "() => Number(document.querySelector('#job-progress').getAttribute('value')) > 0"
    )
    page.context.close()
    final = {"succeeded", "failed", "cancelled"}
    with httpx.Client(base_url=server, timeout=10) as client:
        view = client.get(f"/jobs/{job}").json()
        for _ in range(600):  # the DELETE the page sent as it closed may still be on its way
            if view["status"] in final:
                break
            time.sleep(0.1)
            view = client.get(f"/jobs/{job}").json()
    assert view["status"] == "cancelled"
    assert view["progress"]["done"] < view["progress"]["total"] == 2240
