"""Check a running camserve over HTTP: health, readiness, models, a real /explain, errors.

Standard library only (it runs with whatever Python the host has), so that tools/docker_smoke.sh
can call it against the container it started:

    python tools/smoke_api.py PORT [EXAMPLES_DIR]

Exits non-zero with ``check failed: ...`` on the first check that fails.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

Answer = tuple[int, str, bytes, dict[str, str]]
PICTURE_MAGIC = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8", "image/webp": b"RIFF"}


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return (
                response.status,
                response.headers.get("content-type", ""),
                response.read(),
                {k.lower(): v for k, v in response.headers.items()},
            )
    except urllib.error.HTTPError as error:
        lowered = {k.lower(): v for k, v in error.headers.items()}
        return error.code, error.headers.get("content-type", ""), error.read(), lowered


def show(name: str, answer: Answer, limit: int = 600) -> None:
    status, ctype, raw, _ = answer
    text = raw.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[:limit] + f"... [{len(raw)} bytes]"
    print(f"{name}: HTTP {status} {ctype}\n  {text}")


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"check failed: {message}")


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, str, bytes]]
) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    for name, (filename, ctype, data) in files.items():
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def example_image(examples: Path | None) -> tuple[str, bytes]:
    found = sorted(
        p for p in (examples.glob("*") if examples else []) if p.suffix.lower() in {".png", ".jpg"}
    )
    if found:
        return found[0].name, found[0].read_bytes()
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).ellipse((24, 24, 104, 104), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "generated-circle.png", buffer.getvalue()


def run(port: int, examples: Path | None) -> None:
    base = f"http://127.0.0.1:{port}"

    answer = call(base, "GET", "/health", headers={"X-Request-ID": "smoke-1"})
    show("GET /health", answer)
    check(answer[0] == 200 and answer[1].startswith("application/json"), "/health is not JSON 200")
    check(json.loads(answer[2]).get("status") == "ok", "/health does not say ok")
    check(answer[3].get("x-request-id") == "smoke-1", "/health does not echo X-Request-ID")

    answer = call(base, "GET", "/ready")
    show("GET /ready", answer)
    check(answer[0] == 200, "/ready is not 200")

    answer = call(base, "GET", "/models")
    show("GET /models", answer)
    check(answer[0] == 200 and answer[1].startswith("application/json"), "/models is not JSON 200")
    models = json.loads(answer[2])
    ready = [m["name"] for m in models.get("models", []) if m.get("status") == "ready"]
    check(bool(ready), f"no model is ready: {models}")
    model = models.get("default_model") if models.get("default_model") in ready else ready[0]

    image_name, image = example_image(examples)
    print(f"image: {image_name} ({len(image)} bytes), model: {model}")
    image_type = "image/png" if image_name.lower().endswith(".png") else "image/jpeg"
    body, headers = multipart({"model": model}, {"file": (image_name, image_type, image)})
    answer = call(base, "POST", "/explain", body, headers)
    show("POST /explain", answer)
    check(answer[0] == 200 and answer[1].startswith("application/json"), "/explain not JSON 200")
    explained = json.loads(answer[2])
    result = explained["results"][0]
    explanation = result["explanations"][0]
    overlay = base64.b64decode(explanation["maps"][-1]["overlay"])
    magic = PICTURE_MAGIC.get(explained["media_type"], b"?")
    check(overlay.startswith(magic), f"the overlay is not {explained['media_type']}")
    print(
        f"  model={explained['model']} device={explained['device']} "
        f"method={explained['method']} layers={explained['target_layers']}\n"
        f"  top-1: {result['predictions'][0]}\n"
        f"  explained class {explanation['class_idx']} ({explanation['label']}), overlay "
        f"{explained['media_type']} {len(overlay)} bytes, timings {explained['timings']}"
    )
    stem = Path(image_name).stem
    top1 = result["predictions"][0]["label"]
    print(f"  top-1 label matches the file name ({stem}): {top1 == stem}")

    answer = call(base, "POST", "/explain", body, {**headers, "Accept": "image/png"})
    print(
        f"POST /explain (Accept: image/png): HTTP {answer[0]} {answer[1]}, {len(answer[2])} bytes"
    )
    check(answer[0] == 200 and answer[2].startswith(b"\x89PNG"), "Accept: image/png gave no PNG")

    infer = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode()],
            }
        ]
    }
    answer = call(
        base,
        "POST",
        f"/v2/models/{model}/infer",
        json.dumps(infer).encode(),
        {"Content-Type": "application/json"},
    )
    show(f"POST /v2/models/{model}/infer", answer, limit=300)
    check(answer[0] == 200, "the Open Inference Protocol route did not answer 200")

    answer = call(base, "GET", "/metrics")
    print(f"GET /metrics: HTTP {answer[0]} {answer[1]}, {len(answer[2])} bytes")
    check(answer[0] == 200 and b"camserve_requests_total" in answer[2], "/metrics has no counts")

    body, headers = multipart({}, {"file": ("junk.png", "image/png", b"not an image")})
    answer = call(base, "POST", "/explain", body, headers)
    show("POST /explain (not an image)", answer, limit=300)
    check(400 <= answer[0] < 500, "a file that is not an image should be a 4xx, not a crash")
    print("API checks passed")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    run(int(argv[1]), Path(argv[2]) if len(argv) == 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
