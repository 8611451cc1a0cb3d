"""JSON answers made a slice at a time: the same JSON as FastAPI's default path."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from app.http import answers
from app.pipeline import answers as slicing


class Picture(BaseModel):
    label: str
    overlay: str | None = None
    score: float


class Answer(BaseModel):
    model: str
    pictures: list[Picture]
    extra: dict[str, str]


def body_of(model: BaseModel) -> tuple[bytes, dict[str, str]]:
    async def run() -> tuple[bytes, dict[str, str]]:
        response = await answers.json_answer(model, headers={"X-Test": "1"})
        chunks = [chunk async for chunk in response.body_iterator]
        return b"".join(chunks), dict(response.headers)  # type: ignore[arg-type]

    return asyncio.run(run())


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slicing, "LONG_STRING", 8)
    monkeypatch.setattr(slicing, "SLICE", 5)


@pytest.mark.usefixtures("small_slices")
def test_long_strings_go_out_in_slices_as_the_same_json() -> None:
    answer = Answer(
        model="shapes",
        pictures=[
            Picture(label="étoile", overlay="QUJDREVGR0hJSktMTU5PUA==" * 3, score=0.25),
            Picture(label="x", overlay=None, score=1e-7),
            # Long, ASCII, but needing escapes: the serializer escapes it.
            Picture(label='say "hi"\\ \n\t and more', overlay='a\x01b"c\\d' * 4, score=-2.5),
        ],
        extra={"long non-ascii": "ü" * 20, "short": "ok"},
    )
    body, headers = body_of(answer)
    assert json.loads(body) == answer.model_dump(mode="json")
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"] == "application/json"
    assert headers["x-test"] == "1"


@pytest.mark.usefixtures("small_slices")
def test_a_string_that_looks_like_the_mark_is_left_alone() -> None:
    answer = Answer(model="camserve-long-0000-0.", pictures=[], extra={"k": "camserve-long-"})
    body, _ = body_of(answer)
    assert json.loads(body) == answer.model_dump(mode="json")


def test_the_loop_runs_between_the_slices_of_a_long_string(
    small_slices: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    yields = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal yields
        yields += 1
        await real_sleep(delay)

    monkeypatch.setattr(slicing.asyncio, "sleep", counting_sleep)
    overlay = "A" * 50  # 10 slices of 5
    body, _ = body_of(
        Answer(model="m", pictures=[Picture(label="l", overlay=overlay, score=0)], extra={})
    )
    assert json.loads(body)["pictures"][0]["overlay"] == overlay
    assert yields == 10
