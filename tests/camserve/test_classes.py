"""Several classes from the command line and the client: one explanation per class and method,
one file per method and class, every explanation in results.jsonl."""

from __future__ import annotations

from pathlib import Path

from camserve import Client
from tests.camserve.conftest import API_KEY
from tests.camserve.test_cli import camserve, in_process, lines


def test_the_cli_writes_a_file_per_method_and_class(
    store: Path, images: Path, tmp_path: Path
) -> None:
    result = camserve(
        "explain", images / "a.png", "-m", "GradCAM", "-O", "classes=2,0", "--raw",
        "-o", tmp_path, *in_process(store),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [summary] = [line for line in result.output.splitlines() if line.startswith(str(images))]
    assert summary.count("GradCAM: ") == 2  # both classes, not the first alone
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "a.GradCAM.class0.jpg",
        "a.GradCAM.class0.npy",
        "a.GradCAM.class2.jpg",
        "a.GradCAM.class2.npy",
        "results.jsonl",
    ]
    [line] = lines(tmp_path)
    assert [(e["class_idx"], e["overlay"]) for e in line["explanations"]] == [
        (2, "a.GradCAM.class2.jpg"),
        (0, "a.GradCAM.class0.jpg"),
    ]
    assert line["timings"]["forwards"] == 1


def test_the_client_sends_top_classes(server: str, images: Path) -> None:
    with Client(server, api_key=API_KEY) as client:
        explained = client.explain(images / "b.png", "GradCAM", top_classes=2, top_k=3)
    ranked = [p.class_idx for p in explained.predictions[:2]]
    assert [m.class_idx for m in explained.explanations] == ranked
    assert explained["GradCAM"].class_idx == ranked[0]  # a method's first class
    with Client(server, api_key=API_KEY) as client:
        listed = client.explain(images / "b.png", "GradCAM", classes=[1, 2])
    assert [m.class_idx for m in listed.explanations] == [1, 2]
