"""Every Python snippet of the README and docs/ runs, and prints what the page shows after it.

A snippet that cannot run on its own says so with a comment on the line before its fence,
``<!-- fragment: needs X -->``; it must still compile. A ``text`` block right after a snippet is its
output, compared line by line; ``<!-- output: a subsequence (why) -->`` before it means a run
prints some of those lines, in that order, and the same last line (a job's progress counts
depend on when its stream is joined). A ``console`` block with ``<!-- checked: ... -->`` before
it is a shell session against the service: its ``$`` commands run in one bash (``camserve`` on
the PATH), in order (after the assignments, such as ``B64=...``, of the page's checked blocks
above it), and each one's answer (stdout and stderr) must match the lines shown after it, up to
what varies between runs: numbers, request ids (shown or cut), white space, the cache's ``hit``
or ``miss``, and whatever the page elides as ``...``. The snippets and sessions that call a
service get a real ``python -m app`` on the shipped model store (the outputs are the default
model's), on a free loopback port in place of the documented 8000 (and gRPC's 8001), and run in
a folder with examples/ and star.png. Each snippet runs in a Python process of its own, as a
reader runs it: some client libraries cannot be imported together (the kserve SDK and
tritonclient.grpc both register the protobuf package ``inference``), and a snippet must not lean
on another's imports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.models.zoo.shapes_dataset import generate_sample
from tests.http.test_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCUMENTED_HTTP = ("127.0.0.1:8000", "localhost:8000")
DOCUMENTED_GRPC = ("127.0.0.1:8001", "localhost:8001")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
COMMENT = re.compile(r"<!--\s*(?P<kind>fragment|output|checked):\s*(?P<text>.*?)\s*-->", re.DOTALL)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    comment: tuple[str, str] | None  # (kind, text) of an HTML comment just before the fence


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    fragment: str | None
    output: list[str] | None
    subsequence: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(text: str) -> Iterator[Block]:
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        opened = FENCE.match(lines[number])
        if not opened:
            number += 1
            continue
        indent, start = opened["indent"], number
        end = start + 1
        while not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        body = [line[len(indent) :] for line in lines[start + 1 : end]]
        before = "\n".join(lines[:start]).rstrip()
        comment = None
        if before.endswith("-->"):
            found = COMMENT.search(before[before.rfind("<!--") :])
            comment = (found["kind"], found["text"]) if found else None
        yield Block(opened["lang"], "\n".join(body) + "\n", start + 1, comment)
        number = end + 1


def snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        listed = list(blocks(page.read_text()))
        for index, block in enumerate(listed):
            if block.lang != "python":
                continue
            after = listed[index + 1] if index + 1 < len(listed) else None
            output = None
            if after is not None and after.lang == "text" and _adjacent(page, block, after):
                output = after.code.splitlines()
            fragment = block.comment[1] if block.comment and block.comment[0] == "fragment" else ""
            subsequence = bool(after and after.comment and after.comment[0] == "output")
            found.append(
                Snippet(page, block.line, block.code, fragment or None, output, subsequence)
            )
    return found


def _adjacent(page: Path, block: Block, after: Block) -> bool:
    """Only blank lines, or an output comment, between the end of one block and the next."""
    lines = page.read_text().splitlines()
    closing = block.line + len(block.code.splitlines())  # the index of the closing fence
    between = "\n".join(lines[closing + 1 : after.line - 1])
    return COMMENT.sub("", between).strip() == ""


@dataclass(frozen=True)
class Command:
    line: str
    """the command, continuation lines included"""
    shown: str
    """the answer the page shows after it"""


@dataclass(frozen=True)
class Session:
    page: Path
    line: int
    setup: tuple[str, ...]
    """the assignments of the page's checked sessions above this one"""
    commands: tuple[Command, ...]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def commands(code: str) -> list[Command]:
    """A console block's ``$`` commands, each with the lines after it up to the next one."""
    found: list[tuple[list[str], list[str]]] = []
    continued = False
    for line in code.splitlines():
        if continued:
            found[-1][0].append(line)
        elif line.startswith("$ "):
            found.append(([line[2:]], []))
        elif found:
            found[-1][1].append(line)
        continued = line.endswith("\\")
    return [Command("\n".join(cmd), "\n".join(shown).strip()) for cmd, shown in found]


def sessions() -> list[Session]:
    found = []
    for page in PAGES:
        setup: list[str] = []
        for block in blocks(page.read_text()):
            if block.lang != "console" or not block.comment or block.comment[0] != "checked":
                continue
            listed = commands(block.code)
            found.append(Session(page, block.line, tuple(setup), tuple(listed)))
            setup += [c.line for c in listed if ASSIGNMENT.match(c.line)]
    return found


VARIES = [
    (re.compile(r',\s*"request_id":\s*"[^"]*"'), ""),  # shown, or cut
    (re.compile(r'"cache":\s*"(hit|miss)"'), '"cache":"miss"'),
    (re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?"), "#"),
    (re.compile(r"\s+"), ""),
]


def steady(text: str) -> str:
    """``text`` without what varies between runs (numbers, request ids, white space)."""
    for pattern, replacement in VARIES:
        text = pattern.sub(replacement, text)
    return text


def matches(shown: str, answer: str) -> bool:
    """The answer is what the page shows, ``...`` standing for anything."""
    pattern = ".*?".join(re.escape(part) for part in steady(shown).split("..."))
    return re.fullmatch(pattern, steady(answer), re.DOTALL) is not None


SNIPPETS = snippets()
RUNNABLE = [s for s in SNIPPETS if s.fragment is None]
FRAGMENTS = [s for s in SNIPPETS if s.fragment is not None]
SESSIONS = sessions()


@dataclass(frozen=True)
class Service:
    http: str
    """host:port of its HTTP server"""
    grpc: str
    """host:port of its gRPC server"""

    def place(self, code: str) -> str:
        """``code`` with the documented addresses replaced by this service's."""
        for documented in DOCUMENTED_HTTP:
            code = code.replace(documented, self.http)
        for documented in DOCUMENTED_GRPC:
            code = code.replace(documented, self.grpc)
        return code


def calls_a_service(code: str) -> bool:
    return any(address in code for address in (*DOCUMENTED_HTTP, *DOCUMENTED_GRPC))


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    grpc_port = free_port()
    process, url = start_server(
        ROOT / "model_store",
        CAMSERVE_DEFAULT_MODEL="shapes",
        CAMSERVE_LOG_LEVEL="WARNING",
        CAMSERVE_GRPC_PORT=str(grpc_port),
    )
    try:
        yield Service(http=url.removeprefix("http://"), grpc=f"127.0.0.1:{grpc_port}")
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/, and star.png as the README makes it."""
    folder = tmp_path_factory.mktemp("snippets")
    shutil.copytree(ROOT / "examples", folder / "examples")
    star = generate_sample(np.random.default_rng(1)).image
    Image.fromarray(star).save(folder / "star.png")
    return folder


def run(snippet: Snippet, folder: Path, service: Service | None) -> str:
    """What ``snippet`` prints, run by a Python process of its own in ``folder``."""
    code = snippet.code if service is None else service.place(snippet.code)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{snippet.name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_pages_have_python_snippets() -> None:
    assert len(RUNNABLE) >= 6 and {s.page.name for s in RUNNABLE} >= {"README.md", "python.md"}


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.name)
def test_a_snippet_runs_and_prints_what_the_page_shows(
    snippet: Snippet, folder: Path, request: pytest.FixtureRequest
) -> None:
    service = request.getfixturevalue("service") if calls_a_service(snippet.code) else None
    printed = run(snippet, folder, service).splitlines()
    if snippet.output is None:
        return
    if not snippet.subsequence:
        assert printed == snippet.output
        return
    assert printed and printed[-1] == snippet.output[-1], printed
    shown = iter(snippet.output)
    assert all(line in shown for line in printed), (printed, snippet.output)


@pytest.mark.parametrize("snippet", FRAGMENTS, ids=lambda s: s.name)
def test_a_fragment_says_what_it_needs_and_compiles(snippet: Snippet) -> None:
    assert snippet.fragment is not None and snippet.fragment.startswith("needs ")
    compile(snippet.code, snippet.name, "exec")


def test_the_pages_have_checked_sessions() -> None:
    names = {s.page.name for s in SESSIONS}
    assert len(SESSIONS) >= 6 and names >= {"README.md", "api.md", "parameters.md", "clients.md"}


@pytest.mark.parametrize("session", SESSIONS, ids=lambda s: s.name)
def test_a_checked_session_answers_what_the_page_shows(
    session: Session, folder: Path, service: Service
) -> None:
    marker = "=== camserve docs: the next command ==="
    script = [*session.setup]
    for command in session.commands:
        script += [f"echo '{marker}'", command.line]
    # camserve on the PATH as in `make shell`, its in-process runs on the shipped store, and
    # its tables as wide as a terminal's 80 columns
    bin_folder = str(Path(sys.executable).parent)
    done = subprocess.run(
        ["bash", "-c", service.place("\n".join(script))],
        cwd=folder,
        env={
            **os.environ,
            "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "CAMSERVE_MODEL_STORE": str(ROOT / "model_store"),
            "CAMSERVE_DEVICE": "cpu",
            "COLUMNS": "80",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    answers = done.stdout.split(marker + "\n")[1:]
    assert len(answers) == len(session.commands), done.stdout
    for command, answer in zip(session.commands, answers, strict=True):
        assert matches(command.shown, answer), (
            f"{session.name}: $ {command.line}\nthe page shows:\n{command.shown}\n"
            f"the service answered:\n{answer}"
        )


def test_a_session_is_read_as_a_reader_runs_it() -> None:
    code = (
        "$ B64=$(base64 -w0 star.png)\n$ curl -s localhost:8000/a \\\n    -d x\n"
        '{"error":"no", "request_id":"f6"}\n\n$ curl -s localhost:8000/b\n[1.5, ...]\n'
    )
    first, second, third = commands(code)
    assert (first.line, first.shown) == ("B64=$(base64 -w0 star.png)", "")
    assert second.line == "curl -s localhost:8000/a \\\n    -d x"
    assert matches(second.shown, '{"error": "no", "request_id": "0a1b"}\n')
    assert not matches(second.shown, '{"error": "yes", "request_id": "0a1b"}')
    assert matches(third.shown, "[2.25, 3, 4]") and not matches(third.shown, '{"a": 1}')


def test_the_reader_finds_indented_blocks_comments_and_outputs() -> None:
    page = (
        "- item\n\n  <!-- fragment: needs a model -->\n  ```python\n  x = 1\n  ```\n\n"
        "```python\nprint(2)\n```\n\n<!-- output: a subsequence (why) -->\n```text\n2\n```\n"
    )
    first, second, third = blocks(page)
    assert (first.lang, first.code) == ("python", "x = 1\n")
    assert first.comment == ("fragment", "needs a model")
    assert (second.code, second.comment) == ("print(2)\n", None)
    assert (third.lang, third.comment) == ("text", ("output", "a subsequence (why)"))
