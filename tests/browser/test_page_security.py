"""The page against hostile strings and hostile pages, in headless chromium: what the model
store and the uploader write is shown as text, and a script that got into the page would not
run."""

from __future__ import annotations

import base64
import functools
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import CHROMIUM, ROOT, start, stop, wait_ready
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


@pytest.fixture(scope="module")
def other_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A blank page on another loopback port: another site, as a browser sees it."""
    folder = tmp_path_factory.mktemp("other-origin")
    (folder / "index.html").write_text("<!doctype html><title>another site</title>")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()


#: From the other site's page: the API read, and an upload to /explain, each "read STATUS" or
#: "refused: MESSAGE".
FROM_ANOTHER_SITE = """async ([service, png]) => {
  const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
  const form = new FormData();
  form.append('file', new Blob([bytes], { type: 'image/png' }), 'star.png');
  const tries = { models: [service + '/models', {}],
    explain: [service + '/explain', { method: 'POST', body: form }] };
  const out = {};
  for (const [name, [url, init]] of Object.entries(tries)) {
    try { out[name] = `read ${(await fetch(url, init)).status}`; }
    catch (error) { out[name] = `refused: ${error.message}`; }
  }
  return out;
}"""


def forbidden_answers(server: str) -> float:
    """The service's count of 403 answers over every route, from its metrics."""
    text = httpx.get(f"{server}/metrics").text
    pattern = r'^camserve_requests_total\{[^}]*status="403"[^}]*\} (\S+)$'
    return sum(float(n) for n in re.findall(pattern, text, re.MULTILINE))


def test_a_page_on_another_port_can_neither_read_nor_run_explain(
    browser: object, server: str, other_origin: str
) -> None:
    """The service's host name, another port: another site. Without CAMSERVE_CORS_ORIGINS it
    reads nothing (no CORS answer) and its upload is refused before any work (the gate's 403:
    a multipart POST needs no preflight)."""
    assert other_origin.rsplit(":", 1)[0] == server.rsplit(":", 1)[0]
    page = browser.new_context().new_page()  # type: ignore[attr-defined]
    page.goto(other_origin)
    before = forbidden_answers(server)
    png = base64.b64encode((EXAMPLES / "star.png").read_bytes()).decode()
    answers = page.evaluate(FROM_ANOTHER_SITE, [server, png])
    assert answers == {"models": "refused: Failed to fetch", "explain": "refused: Failed to fetch"}
    assert forbidden_answers(server) == before + 1
    page.context.close()


#: What the rebound site's page does once its name resolves to this machine: read the models,
#: and run an explanation, as the page's own origin (no CORS is involved).
FROM_THE_REBOUND_SITE = """async (png) => {
    const models = await fetch("/models");
    const form = new FormData();
    const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
    form.append("file", new Blob([bytes], {type: "image/png"}), "star.png");
    const explain = await fetch("/explain", {method: "POST", body: form});
    const code = async (answer) => answer.ok ? "ok" : (await answer.json()).error.code;
    return {models: [models.status, await code(models)],
            explain: [explain.status, await code(explain)]};
}"""


@pytest.fixture(scope="module")
def open_to_any_host() -> Iterator[str]:
    """A service that answers browsers by any name, as every service did before the rule."""
    process, url = start(CAMSERVE_ALLOWED_HOSTS="*")
    try:
        wait_ready(process, url)
        yield url
    finally:
        assert "Traceback" not in stop(process)


@pytest.mark.parametrize("answers_any_name", [False, True])
def test_a_site_rebound_to_this_machine_cannot_use_the_service(
    browser: object, server: str, open_to_any_host: str, answers_any_name: bool
) -> None:
    """DNS rebinding: rebound.test served its page, then made its name resolve to 127.0.0.1
    (here chromium's resolver maps it, and the page comes from a route). Its scripts then call
    the service as their own origin; only the Host header still names rebound.test."""
    target = open_to_any_host if answers_any_name else server
    port = target.rsplit(":", 1)[1]
    rebound = browser.browser_type.launch(  # type: ignore[attr-defined]
        executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
        headless=True,
        args=[
            "--disable-gpu",
            "--host-resolver-rules=MAP rebound.test 127.0.0.1",
            # Chromium's own guard, which asks the user before a page of the internet calls
            # this machine, is off: as in Firefox and Safari, or once the user said yes.
            "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,"
            "PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults",
        ],
    )
    try:
        page = rebound.new_page()
        site = f"http://rebound.test:{port}"
        page.route(
            f"{site}/",
            lambda route: route.fulfill(content_type="text/html", body="<p>a cat picture</p>"),
        )
        page.goto(f"{site}/")
        png = base64.b64encode((EXAMPLES / "star.png").read_bytes()).decode()
        answers = page.evaluate(FROM_THE_REBOUND_SITE, png)
        if answers_any_name:  # the attack, where the service answers any name
            assert answers == {"models": [200, "ok"], "explain": [200, "ok"]}
        else:
            refused = [403, "host_not_allowed"]
            assert answers == {"models": refused, "explain": refused}
            # The service's own page by this machine's names still works.
            assert page.goto(f"http://localhost:{port}/").status == 200  # type: ignore[union-attr]
    finally:
        rebound.close()
