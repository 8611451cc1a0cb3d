"""The page with a detector and a segmenter (model_store's shapes-detect and shapes-segment) in
headless chromium: the boxes or the mask drawn over the image after /predict, and a click on a
box or a class explaining it, with its faithfulness scores when asked for."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.browser.conftest import ROOT
from tests.browser.test_page import MAPS, Watched, failures, shot, shown_scores, watch

SCENE = ROOT / "examples" / "scenes" / "scene.png"


@pytest.fixture
def shown(browser: object, server: str) -> Iterator[Watched]:
    watched = watch(browser, f"{server}/")
    watched.page.wait_for_selector("#methods input[value=GradCAM]")
    yield watched
    watched.page.context.close()


def predicted(server: str, model: str, **form: str) -> dict:
    files = {"file": ("scene.png", SCENE.read_bytes(), "image/png")}
    response = httpx.post(f"{server}/predict", files=files, data={"model": model, **form})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def open_with(page: object, model: str) -> None:
    """Pick the model, then the scene; wait for the task view to draw /predict's answer."""
    page.select_option("#model", model)
    page.wait_for_function(f"() => state.detail && state.detail.name === {model!r}")
    page.set_input_files("#file", SCENE)
    page.wait_for_selector("#task-view:not([hidden]) #task-list button")


def canvas_pixels(page: object) -> np.ndarray:
    """The task canvas as (H, W, 4) bytes."""
    data = page.evaluate(
        """() => {
          const c = document.querySelector('#task-canvas');
          return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
        }"""
    )
    width, height = page.evaluate(
        "[document.querySelector('#task-canvas').width, "
        "document.querySelector('#task-canvas').height]"
    )
    return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)


def click_at(page: object, x: float, y: float) -> None:
    """Click the task canvas at (x, y) in the image's pixels, whatever its size on screen."""
    box = page.locator("#task-canvas").bounding_box()
    width = page.evaluate("document.querySelector('#task-canvas').width")
    scale = box["width"] / width
    page.locator("#task-canvas").click(position={"x": x * scale, "y": y * scale})


def record_forms(page: object) -> None:
    """Keep the text fields of every form the page sends (``sent_forms(page)`` reads them)."""
    page.evaluate(
        """() => {
          const original = window.fetch;
          window.sentForms = [];
          window.fetch = (url, options = {}) => {
            if (options.body instanceof FormData) {
              const fields = {};
              for (const [k, v] of options.body.entries()) {
                if (typeof v === "string") fields[k] = v;
              }
              window.sentForms.push([String(url), fields]);
            }
            return original(url, options);
          };
        }"""
    )


def last_explain(page: object) -> dict[str, str]:
    """The text fields of the last form sent to /explain."""
    forms = page.evaluate("window.sentForms")
    return [fields for url, fields in forms if url == "explain"][-1]


def wait_for_card(page: object) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll({MAPS!r}).length === 1"
        " && !document.querySelector('#explain').disabled"
    )


def test_a_detectors_boxes_are_drawn_and_a_click_explains_one(shown: Watched, server: str) -> None:
    page = shown.page
    record_forms(page)
    found = predicted(server, "shapes-detect")["detections"]
    assert len(found) >= 2
    open_with(page, "shapes-detect")
    buttons = page.locator("#task-list button")
    assert buttons.count() == len(found)
    assert [buttons.nth(i).inner_text() for i in range(len(found))] == [
        f"{i}: {d['label']} {d['score']:.2f}" for i, d in enumerate(found)
    ]
    # Each box is outlined in its class's colour on the image (the left edge, half way down).
    pixels = canvas_pixels(page)
    original = np.asarray(Image.open(SCENE).convert("RGB"))
    assert pixels.shape[:2] == original.shape[:2]
    for detection in found:
        x0, y0, x1, y1 = (round(v) for v in detection["box"])
        colour = page.evaluate(f"taskColour({detection['class_idx']})")
        assert list(pixels[(y0 + y1) // 2, x0 + 1, :3]) == colour, detection
    shot(page, "detector-boxes")

    # A click inside box 1 (where no smaller box lies) explains box 1.
    x0, y0, x1, y1 = found[1]["box"]
    inside = [
        (x, y)
        for x in np.linspace(x0 + 3, x1 - 3, 9)
        for y in np.linspace(y0 + 3, y1 - 3, 9)
        if not any(
            b["box"][0] <= x <= b["box"][2] and b["box"][1] <= y <= b["box"][3]
            for k, b in enumerate(found)
            if k != 1
        )
    ]
    assert inside, "box 1 has a point of its own"
    click_at(page, *inside[0])
    wait_for_card(page)
    card = page.locator(MAPS)
    assert card.locator(".label").inner_text() == found[1]["label"]
    line = card.locator(".task-line").inner_text()
    assert line.startswith(f"box 1 · score {found[1]['score']:.2f}")
    assert f"[{round(x0)}, {round(y0)}, {round(x1)}, {round(y1)}]" in line
    sent = last_explain(page)
    assert sent["box"] == "1" and "class_idx" not in sent and "top_k" not in sent
    assert buttons.nth(1).get_attribute("aria-pressed") == "true"
    assert buttons.nth(0).get_attribute("aria-pressed") == "false"
    assert page.inner_text("#class-choice").startswith(f"box 1: {found[1]['label']}")
    assert page.inner_text("#class-reset") == "Back to the top box"
    assert page.inner_text("#status").startswith(f"scene.png: {found[1]['label']}")
    shot(page, "detector-box-explained")

    # The keyboard's way: box 0's button.
    buttons.nth(0).focus()
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#task-list button').getAttribute('aria-pressed') === 'true'"
    )
    wait_for_card(page)
    assert page.locator(MAPS).locator(".label").inner_text() == found[0]["label"]
    assert last_explain(page)["box"] == "0"

    # Back to the default: the server's top box, no box sent.
    sent = len(page.evaluate("window.sentForms"))
    page.click("#class-reset")
    page.wait_for_function(f"() => window.sentForms.length > {sent}")
    wait_for_card(page)
    assert "box" not in last_explain(page)
    assert page.inner_text("#class-choice") == "the top detection"
    assert page.is_hidden("#class-reset")
    assert shown.errors == [] and failures(shown) == []


def test_a_segmenters_mask_is_drawn_and_a_class_explains_its_region(
    shown: Watched, server: str
) -> None:
    page = shown.page
    record_forms(page)
    answer = predicted(server, "shapes-segment", output="mask")
    segments = answer["segments"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
    open_with(page, "shapes-segment")
    buttons = page.locator("#task-list button")
    assert [buttons.nth(i).inner_text() for i in range(buttons.count())] == [
        f"{s['label']} ({s['pixels']} px)" for s in segments
    ]
    # The mask is drawn half-transparent over the shapes, and leaves the background alone.
    pixels = canvas_pixels(page)[..., :3].astype(int)
    original = np.asarray(Image.open(SCENE).convert("RGB")).astype(int)
    background = mask == 0
    assert np.array_equal(pixels[background], original[background])
    shape = segments[1]  # the largest after the background
    inside = mask == shape["class_idx"]
    colour = np.asarray(page.evaluate(f"taskColour({shape['class_idx']})"))
    blended = (original[inside] + colour) / 2
    assert np.abs(pixels[inside] - blended).max() <= 2
    shot(page, "segmenter-mask")

    buttons.nth(1).click()
    wait_for_card(page)
    card = page.locator(MAPS)
    assert card.locator(".label").inner_text() == shape["label"]
    assert card.locator(".task-line").inner_text() == "region: mask"
    sent = last_explain(page)
    assert (sent["class_idx"], sent["region"]) == (str(shape["class_idx"]), "mask")
    assert page.inner_text("#class-choice").startswith(f"{shape['label']} (class")
    shot(page, "segmenter-region-explained")

    # A click on a pixel of another class explains that class.
    other = segments[2]
    ys, xs = np.nonzero(mask == other["class_idx"])
    middle = len(ys) // 2
    click_at(page, xs[middle] + 0.5, ys[middle] + 0.5)
    page.wait_for_function(
        f"() => document.querySelector({MAPS + ' .label'!r})?.textContent === {other['label']!r}"
        " && !document.querySelector('#explain').disabled"
    )
    assert last_explain(page)["class_idx"] == str(other["class_idx"])
    assert shown.errors == [] and failures(shown) == []


def test_the_faithfulness_box_scores_an_explained_box(shown: Watched) -> None:
    page = shown.page
    record_forms(page)
    open_with(page, "shapes-detect")
    assert page.is_visible("#faithfulness")
    page.check("#faithfulness")
    page.locator("#task-list button").nth(0).click()
    wait_for_card(page)
    # With the scores asked for, the method runs as a job (a detector's take long on a CPU).
    [(url, sent)] = [(u, f) for u, f in page.evaluate("window.sentForms") if u != "predict"]
    assert url == "jobs"
    assert sent["box"] == "0" and sent["faithfulness"] == "deletion,insertion,confidence"
    deletion, insertion, _drop = shown_scores(page)
    # shapes-detect is trained: its top box's Layer-CAM map deletes the detection faster than
    # the insertion curve brings it back.
    assert deletion < insertion
    assert shown.errors == [] and failures(shown) == []


def test_a_classifier_leaves_the_task_view_hidden(shown: Watched) -> None:
    page = shown.page
    open_with(page, "shapes-detect")
    page.select_option("#model", "shapes")
    page.wait_for_function("() => state.detail && state.detail.name === 'shapes'")
    assert page.is_hidden("#task-view") and page.is_visible("#faithfulness")
    assert page.eval_on_selector("#class-reset", "b => b.textContent") == "Back to top-1"
    assert page.locator("#task-list button").count() == 0
