"""Render the README's gallery from real service answers.

Usage (from the repository root)::

    .venv/bin/python tools/gallery.py              # writes docs/gallery-methods.png, -examples.png
    .venv/bin/python tools/gallery.py --out /tmp   # somewhere else

Starts the app in-process on ``model_store/`` (CPU), sends ``examples/star.png`` once with every
method that applies to the default model in one request, and each of the four examples with
GradCAM, and lays the overlays out side by side, each labelled with its method, the class it
explains and the milliseconds its map took (``timings.cam_ms_by_method`` of the answer, after one
warm-up request).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.http.app import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

logger = logging.getLogger("gallery")

EXAMPLES = ("star", "circle", "cross", "ring")
TILE = 160
CAPTION = 34
COLUMNS = 5


def _explain(client: TestClient, image: Path, methods: list[str]) -> dict:
    with image.open("rb") as handle:
        response = client.post(
            "/explain",
            files=[("file", (image.name, handle.read(), "image/png"))],
            data={"method": ",".join(methods), "size": str(TILE), "image_format": "png"},
        )
    if response.status_code != 200:
        raise SystemExit(f"/explain answered {response.status_code}: {response.text}")
    return response.json()


def _tile(picture: Image.Image, lines: list[str], font: ImageFont.ImageFont) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(picture.convert("RGB").resize((TILE, TILE)), (0, 0))
    draw = ImageDraw.Draw(tile)
    for number, line in enumerate(lines):
        draw.text((4, TILE + 2 + 15 * number), line, fill=(20, 20, 20), font=font)
    return tile


def _sheet(tiles: list[Image.Image], columns: int) -> Image.Image:
    rows = -(-len(tiles) // columns)
    gap = 4
    width = min(columns, len(tiles)) * (TILE + gap) - gap
    sheet = Image.new("RGB", (width, rows * (TILE + CAPTION + gap) - gap), "white")
    for number, tile in enumerate(tiles):
        row, column = divmod(number, columns)
        sheet.paste(tile, (column * (TILE + gap), row * (TILE + CAPTION + gap)))
    return sheet


def _overlays(answer: dict, font: ImageFont.ImageFont) -> list[Image.Image]:
    tiles = []
    times = answer["timings"]["cam_ms_by_method"]
    for explanation in answer["results"][0]["explanations"]:
        picture = Image.open(io.BytesIO(base64.b64decode(explanation["maps"][-1]["overlay"])))
        lines = [
            explanation["method"],
            f"{explanation['label']} {explanation['probability']:.2f} · "
            f"{times[explanation['method']]:.1f} ms",
        ]
        tiles.append(_tile(picture, lines, font))
    return tiles


def _save(sheet: Image.Image, path: Path) -> None:
    # 256 colours keep the files small; the overlays are smooth colour maps over flat shapes.
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    logger.info("wrote %s (%d x %d, %d KB)", path, *sheet.size, path.stat().st_size // 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="output folder")
    parser.add_argument("--store", type=Path, default=REPO / "model_store", help="model store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=12)

    settings = Settings(model_store=args.store, device="cpu", ui=False)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the models did not load in 120 s")
            time.sleep(0.1)
        model = client.get("/models").json()["default_model"]
        methods = client.get(f"/models/{model}").json()["methods"]
        star = REPO / "examples" / "star.png"
        _explain(client, star, methods)  # warm-up: the first request pays one-time setup

        answer = _explain(client, star, methods)
        original = _tile(Image.open(star), ["star.png", f"model {model}"], font)
        sheet = _sheet([original, *_overlays(answer, font)], COLUMNS)
        _save(sheet, args.out / "gallery-methods.png")

        tiles = []
        for name in EXAMPLES:
            answer = _explain(client, REPO / "examples" / f"{name}.png", ["GradCAM"])
            tiles += _overlays(answer, font)
        _save(_sheet(tiles, len(tiles)), args.out / "gallery-examples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
