"""The page against hostile strings and hostile pages, in headless chromium: what the model
store and the uploader write is shown as text, and a script that got into the page would not
run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.browser.conftest import ROOT, start, stop, wait_ready
from tests.browser.test_page import EXAMPLES, MAPS, explain, watch

#: Each sets ``window.pwned`` if it ever runs: as an element's handler, a script, a frame's script.
PAYLOADS = [
    '<img src=x onerror="window.pwned=1">',
    "<script>window.pwned=2</script>",
    '"><svg onload="window.pwned=3">',
    '\'><iframe srcdoc="<script>parent.pwned=4</script>">',
]
HOSTILE_MODEL = "<img src=x onerror=window.pwned=5>"
HOSTILE_FILE = "<img src=x onerror=window.pwned=6>.png"  # chromium sends a \" as %22
#: What the page itself creates: the preview of the upload and its two scripts.
OWN_ELEMENTS = {"img": 1, "script": 2, "iframe": 0, "svg": 0}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service whose store writes markup everywhere it can: the labels, the description, and
    a model's name (its folder)."""
    store = tmp_path_factory.mktemp("hostile-store")
    for name in ("shapes", HOSTILE_MODEL):
        folder = store / name
        shutil.copytree(ROOT / "model_store" / "shapes", folder)
        labels = [PAYLOADS[i % len(PAYLOADS)].replace("pwned=", f"pwned=1{i}") for i in range(8)]
        (folder / "labels.txt").write_text("\n".join(labels) + "\n")
        manifest = folder / "model.toml"
        lines = manifest.read_text().splitlines()
        assert lines[0].startswith("description = ")
        lines[0] = f"description = '{PAYLOADS[0]}'"  # a TOML literal string
        manifest.write_text("\n".join(lines) + "\n")
    process, url = start(CAMSERVE_MODEL_STORE=str(store))
    try:
        wait_ready(process, url)
        yield url
    finally:
        assert "Traceback" not in stop(process)


def elements(page: object) -> dict[str, int]:
    return {
        tag: page.evaluate(f"() => document.getElementsByTagName({tag!r}).length")
        for tag in OWN_ELEMENTS
    }


def test_hostile_names_labels_and_filenames_show_as_text(browser: object, hostile: str) -> None:
    watched = watch(browser, f"{hostile}/")
    page = watched.page
    page.wait_for_selector("#methods input[value=GradCAM]")
    image = {
        "name": HOSTILE_FILE,
        "mimeType": "image/png",
        "buffer": (EXAMPLES / "star.png").read_bytes(),
    }
    for model in ("shapes", HOSTILE_MODEL):
        page.select_option("#model", model)
        page.wait_for_function(f"() => state.detail && state.detail.name === {model!r}")
        assert PAYLOADS[0] in page.inner_text("#status")  # the description, as text
        explain(page, image, "GradCAM", "DFF", cards=2)
        # Each of the top classes explained in turn: every label is shown in a caption.
        for index in range(5):
            page.locator("#topk button").nth(index).click()
            page.wait_for_function("() => !document.querySelector('#explain').disabled")
        shown = page.inner_text("#topk") + page.inner_text("#results")
        assert HOSTILE_FILE in page.inner_text("#results")
        assert sum(payload.split("pwned=")[0] in shown for payload in PAYLOADS) == len(PAYLOADS)
    assert HOSTILE_MODEL in page.inner_text("#status")
    # A 404 that echoes a model's name: the model is gone when the page asks for it.
    page.evaluate(
        "(name) => { const s = document.querySelector('#model'); s.add(new Option(name, name));"
        " s.value = name; s.dispatchEvent(new Event('change')); }",
        "<img src=y onerror=window.pwned=7>",
    )
    page.locator("#error").wait_for(state="visible")
    assert "<img src=y onerror=window.pwned=7>" in page.inner_text("#error")
    assert page.evaluate("() => window.pwned") is None
    assert elements(page) == OWN_ELEMENTS
    # Nothing failed but that one model's 404.
    assert [f.rsplit(" ", 1)[1] for f in watched.failed] == ["404"]
    assert len(watched.errors) == 1 and "404" in watched.errors[0]
    page.context.close()


def test_a_script_that_got_into_the_page_would_not_run(browser: object, server: str) -> None:
    """The second wall: the page's Content-Security-Policy runs only the service's own files."""
    watched = watch(browser, f"{server}/")
    page = watched.page
    page.wait_for_selector("#methods input[value=GradCAM]")
    page.evaluate(
        """() => {
          window.refused = [];
          document.addEventListener('securitypolicyviolation',
            (e) => window.refused.push(e.violatedDirective));
          document.body.insertAdjacentHTML('beforeend',
            '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>');
          const script = document.createElement('script');
          script.textContent = 'window.pwned = 3';
          document.body.append(script);
          const frame = document.createElement('iframe');
          frame.src = 'javascript:parent.pwned = 4';
          document.body.append(frame);
        }"""
    )
    page.wait_for_function("() => window.refused.length >= 3")
    assert page.evaluate("() => window.pwned") is None
    assert set(page.evaluate("() => window.refused")) == {"script-src-attr", "script-src-elem"}
    # The page itself still works under its policy.
    explain(page, EXAMPLES / "star.png", "GradCAM")
    assert page.locator(f"{MAPS} .label").inner_text() == "star"
    page.context.close()
