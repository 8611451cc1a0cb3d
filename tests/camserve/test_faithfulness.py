"""Faithfulness in the client and the command line: the scores /explain gives, in results.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from camserve import Client
from tests.camserve.conftest import API_KEY
from tests.camserve.test_cli import camserve, in_process, lines, remote
from tests.camserve.test_client import explain_over_http


def _expected(server: str, path: Path, **form: str) -> dict:
    answer = explain_over_http(server, path, method="GradCAM", output="raw", **form)
    maps = answer["results"][0]["explanations"][0]["maps"]
    return {m["layer"]: {k: v for k, v in m["faithfulness"].items() if v is not None} for m in maps}


def test_the_client_passes_faithfulness_and_reads_the_scores(server: str, images: Path) -> None:
    path = images / "a.png"
    with Client(server, api_key=API_KEY) as client:
        explained = client.explain(
            path, "GradCAM", faithfulness=["deletion", "insertion"], faithfulness_steps=8
        )
        plain = client.explain(path, "GradCAM")
    scores = explained.first.faithfulness
    assert scores == _expected(
        server, path, faithfulness="deletion,insertion", faithfulness_steps="8"
    )
    assert set(next(iter(scores.values()))) == {"deletion_auc", "insertion_auc", "steps"}
    assert plain.first.faithfulness is None


@pytest.mark.parametrize("where", ["in-process", "url"])
def test_the_cli_writes_the_scores_to_results_jsonl(
    where: str, store: Path, server: str, images: Path, tmp_path: Path
) -> None:
    path = images / "a.png"
    place = in_process(store) if where == "in-process" else remote(server)
    result = camserve(
        "explain", path, "-m", "GradCAM", "--faithfulness", "deletion,insertion",
        "-O", "faithfulness_steps=4", "-o", tmp_path, "--jobs", "never", *place,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [line] = lines(tmp_path)
    [explanation] = line["explanations"]
    expected = _expected(server, path, faithfulness="deletion,insertion", faithfulness_steps="4")
    assert explanation["faithfulness"].keys() == expected.keys()
    for layer, scores in expected.items():
        assert explanation["faithfulness"][layer] == pytest.approx(scores, abs=1e-5)


def test_the_cli_refuses_an_unknown_metric_with_the_allowed_ones(
    store: Path, images: Path, tmp_path: Path
) -> None:
    result = camserve(
        "explain", images / "a.png", "--faithfulness", "sufficiency", "-o", tmp_path,
        *in_process(store),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "deletion, insertion, confidence, road" in result.output
    assert "Traceback" not in result.output


def test_road_goes_to_a_job_on_a_server(server: str, images: Path, tmp_path: Path) -> None:
    result = camserve(
        "explain", images / "a.png", "-m", "GradCAM", "--faithfulness", "road",
        "-o", tmp_path, *remote(server),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [line] = lines(tmp_path)
    assert line["via"] == "job"
    [scores] = line["explanations"][0]["faithfulness"].values()
    assert 0 <= scores["road_morf"] <= 1 and 0 <= scores["road_lerf"] <= 1
