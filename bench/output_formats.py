"""Encode time, size and fidelity of the output-image formats for CAM overlays and heatmaps.

    python bench/output_formats.py                        # 7 rounds, 128x128, 640x480, 1024x768
    python bench/output_formats.py --quick                # a smoke run
    python bench/output_formats.py --photo-dir DIR        # take the photo from DIR (coffee.png...)

Two kinds of picture are encoded at each size:

* ``overlay``: a photo blended 50/50 with a jet-coloured smooth map (a 16x16 random map,
  bilinear-upsampled, coloured through a 256-entry LUT built with ``app.cam.apply_colormap``);
* ``heatmap``: the coloured map alone, as RGB and as a palette ("P") image with the same LUT.

The photo is scikit-image's ``coffee.png`` (600x400, shipped in the scikit-image wheel under
``skimage/data``; pass ``--photo-dir`` or have ``skimage`` importable), centre-cropped to the
target aspect and resized with Lanczos. Without it a synthetic photo-like picture (smooth shapes,
textures, noise) is used and the report says so.

Every round visits every picture and, for each one, every candidate encoder in a fresh random
order, so that drift on a shared machine hits all candidates alike; each timing is the mean of
enough back-to-back calls to last ``--min-ms``. The tables give medians over rounds and the ratio
to the service's current path (Pillow PNG, ``compress_level=3``) measured in the same rounds.
Every output is decoded with Pillow: lossless candidates must give back the source exactly,
lossy ones report PSNR and the largest absolute error against the uint8 source.

Optional encoders are used when importable: ``imagecodecs`` (libpng / libspng), ``fpng``
(py-fpng-nb) and ``fpng_py``; missing ones are listed in the report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cam import apply_colormap  # noqa: E402

SIZES = [(128, 128), (640, 480), (1024, 768)]
BASELINE = "pil-png l3"
RESULTS = Path(__file__).resolve().parent / "results"

try:  # optional, candidates for adoption
    import imagecodecs
except ImportError:  # pragma: no cover - depends on the environment
    imagecodecs = None
try:  # optional, measured only (py-fpng-nb)
    import fpng
except ImportError:  # pragma: no cover
    fpng = None
try:  # optional, measured only
    import fpng_py
except ImportError:  # pragma: no cover
    fpng_py = None


@dataclass
class Picture:
    """One thing to encode: the uint8 source and the PIL image the encoders get."""

    name: str
    array: np.ndarray  # (H, W, 3) uint8: what a decoder must give back
    image: Image.Image  # RGB, or P with the LUT as palette


@dataclass
class Candidate:
    name: str
    lossless: bool
    encode: Callable[[Picture], bytes]
    modes: tuple[str, ...] = ("RGB",)
    note: str = ""


@dataclass
class Row:
    picture: str
    candidate: str
    times_ms: list[float] = field(default_factory=list)
    nbytes: int = 0
    lossless: bool = True
    exact: bool | None = None
    psnr_db: float = math.inf
    max_abs_err: int = 0


def _pil(fmt: str, **params) -> Callable[[Picture], bytes]:
    def encode(picture: Picture) -> bytes:
        buffer = io.BytesIO()
        picture.image.save(buffer, format=fmt, **params)
        return buffer.getvalue()

    return encode


def candidates() -> tuple[list[Candidate], list[str]]:
    """Every encoder to try, and a note per optional encoder that is missing."""
    png = ("RGB", "P")
    found = [
        Candidate("pil-png l0", True, _pil("PNG", compress_level=0), png),
        Candidate("pil-png l1", True, _pil("PNG", compress_level=1), png),
        Candidate(BASELINE, True, _pil("PNG", compress_level=3), png, "current service path"),
        Candidate("pil-png l6", True, _pil("PNG", compress_level=6), png),
        Candidate("pil-png default", True, _pil("PNG"), png, "no options: zlib default (6)"),
        Candidate("pil-png optimize", True, _pil("PNG", optimize=True), png, "level 9"),
        Candidate("pil-png l1 rle", True, _pil("PNG", compress_level=1, compress_type=3), png),
        Candidate("pil-png l1 huffman", True, _pil("PNG", compress_level=1, compress_type=2), png),
        Candidate("pil-png l3 rle", True, _pil("PNG", compress_level=3, compress_type=3), png),
    ]
    missing = []
    if imagecodecs is not None:
        ic = imagecodecs

        def _png(level, **kw):
            return lambda p: ic.png_encode(p.array, level=level, **kw)

        def _spng(level):
            return lambda p: ic.spng_encode(p.array, level=level)

        found += [
            Candidate("ic-png l1", True, _png(1)),
            Candidate(
                "ic-png l1 rle sub", True, _png(1, strategy=3, filter=16), note="OpenCV-like"
            ),
            Candidate("ic-png l3", True, _png(3)),
            Candidate("ic-png l6", True, _png(6)),
            Candidate("ic-spng l1", True, _spng(1)),
            Candidate("ic-spng l6", True, _spng(6)),
        ]
    else:
        missing.append("imagecodecs (pip install imagecodecs)")
    if fpng is not None:
        found.append(Candidate("fpng (py-fpng-nb)", True, lambda p: fpng.from_ndarray(p.array)))
    else:
        missing.append("fpng (py-fpng-nb)")
    if fpng_py is not None:

        def _fpng_py(p: Picture) -> bytes:
            h, w, c = p.array.shape
            return fpng_py.fpng_encode_image_to_memory(p.array.tobytes(), w, h, c)

        found.append(Candidate("fpng_py", True, _fpng_py))
    else:
        missing.append("fpng_py")
    for quality in (85, 90):
        for label, sub in (("444", 0), ("420", 2)):
            found.append(
                Candidate(
                    f"jpeg q{quality} {label}",
                    False,
                    _pil("JPEG", quality=quality, subsampling=sub),
                )
            )
    found += [
        Candidate("webp q80 m0", False, _pil("WEBP", quality=80, method=0)),
        Candidate("webp q80 m4", False, _pil("WEBP", quality=80, method=4)),
        Candidate("webp lossless m0", True, _pil("WEBP", lossless=True, quality=0, method=0)),
    ]
    return found, missing


# ---------------------------------------------------------------- pictures


def jet_lut() -> np.ndarray:
    """(256, 3) uint8: the service's jet colormap sampled at 256 levels."""
    return apply_colormap(np.linspace(0.0, 1.0, 256, dtype=np.float32), "jet")


def smooth_map(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 levels: a 16x16 uniform random map, bilinear-upsampled and stretched."""
    coarse = Image.fromarray(rng.random((16, 16), dtype=np.float32), mode="F")
    values = np.asarray(coarse.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / max(high - low, 1e-6)
    return np.rint(values * 255).astype(np.uint8)


def synthetic_photo(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Photo-like stand-in: gradients, blobs, a stripe texture and sensor-like noise."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 1 - x / width], axis=-1) * 160 + 40
    for _ in range(12):
        cx, cy, r = rng.random() * width, rng.random() * height, (0.05 + rng.random() * 0.2) * width
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        base += blob * (rng.random(3) * 160 - 80)
    base += 12 * np.sin(x * 0.35 + 3 * np.sin(y * 0.05))[..., None]
    base += rng.normal(0, 4, base.shape)
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def load_photo(photo_dir: Path | None, name: str) -> tuple[Image.Image | None, str]:
    dirs = [photo_dir] if photo_dir else []
    try:
        import skimage

        dirs.append(Path(skimage.__file__).parent / "data")
    except ImportError:
        pass
    for folder in dirs:
        path = folder / name
        if path.is_file():
            return Image.open(path).convert("RGB"), f"scikit-image data/{name} ({path})"
    return None, "synthetic (gradients, blobs, stripes, noise): no scikit-image photo found"


def fit(photo: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop ``photo`` to the aspect of ``size`` and resize to it (Lanczos)."""
    width, height = photo.size
    target = size[0] / size[1]
    if width / height > target:
        new_w = round(height * target)
        box = ((width - new_w) // 2, 0, (width - new_w) // 2 + new_w, height)
    else:
        new_h = round(width / target)
        box = (0, (height - new_h) // 2, width, (height - new_h) // 2 + new_h)
    return np.asarray(photo.crop(box).resize(size, Image.Resampling.LANCZOS))


def pictures(photo: Image.Image | None, sizes, seed: int) -> list[Picture]:
    lut = jet_lut()
    out = []
    for size in sizes:
        rng = np.random.default_rng(seed)
        levels = smooth_map(size, rng)
        colored = lut[levels]
        base = fit(photo, size) if photo is not None else synthetic_photo(size, rng)
        blend = np.rint(0.5 * base.astype(np.float32) + 0.5 * colored.astype(np.float32))
        blend = blend.astype(np.uint8)
        tag = f"{size[0]}x{size[1]}"
        palette = Image.fromarray(levels, mode="L")
        palette.putpalette(lut.tobytes())  # L + palette -> P, no pixel copy
        out += [
            Picture(f"overlay {tag}", blend, Image.fromarray(blend, mode="RGB")),
            Picture(f"heatmap {tag}", colored, Image.fromarray(colored, mode="RGB")),
            Picture(f"heatmap-P {tag}", colored, palette),
        ]
    return out


# ---------------------------------------------------------------- measuring


def fidelity(data: bytes, picture: Picture) -> tuple[bool, float, int]:
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    array = np.asarray(decoded.convert("RGB"))
    if array.shape != picture.array.shape:
        raise AssertionError(f"decoded shape {array.shape} != source {picture.array.shape}")
    diff = array.astype(np.int16) - picture.array.astype(np.int16)
    max_err = int(np.abs(diff).max())
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    return max_err == 0, psnr, max_err


def calibrate(fn: Callable[[], bytes], min_ms: float) -> int:
    start = time.perf_counter()
    fn()
    once = (time.perf_counter() - start) * 1000
    return max(1, min(200, math.ceil(min_ms / max(once, 1e-3))))


def timed(fn: Callable[[], bytes], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1000 / repeats


def run(args: argparse.Namespace) -> dict:
    sizes = [(128, 128), (640, 480)] if args.quick else SIZES
    photo, photo_source = load_photo(args.photo_dir, args.photo)
    pics = pictures(photo, sizes, args.seed)
    cands, missing = candidates()
    rows: dict[tuple[str, str], Row] = {}
    plan: dict[str, list[tuple[Candidate, int]]] = {}
    for pic in pics:
        plan[pic.name] = []
        for cand in cands:
            if pic.image.mode not in cand.modes:
                continue
            if args.only and not any(s in cand.name for s in args.only):
                continue
            data = cand.encode(pic)
            exact, psnr, max_err = fidelity(data, pic)
            if cand.lossless and not exact:
                raise AssertionError(f"{cand.name} on {pic.name} is not lossless ({max_err})")
            rows[pic.name, cand.name] = Row(
                pic.name, cand.name, [], len(data), cand.lossless, exact, psnr, max_err
            )
            plan[pic.name].append((cand, calibrate(lambda c=cand, p=pic: c.encode(p), args.min_ms)))
    shuffle = random.Random(args.seed)
    for round_no in range(args.rounds):
        for pic in pics:
            order = plan[pic.name][:]
            shuffle.shuffle(order)
            for cand, repeats in order:
                ms = timed(lambda c=cand, p=pic: c.encode(p), repeats)
                rows[pic.name, cand.name].times_ms.append(ms)
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    results = []
    for pic in pics:
        # palette heatmaps are compared with the RGB heatmap as the service encodes it today
        base = rows.get((pic.name.replace("heatmap-P", "heatmap"), BASELINE))
        base_ms = statistics.median(base.times_ms) if base else math.nan
        for cand, _ in plan[pic.name]:
            row = rows[pic.name, cand.name]
            med = statistics.median(row.times_ms)
            results.append(
                {
                    "picture": pic.name,
                    "mode": pic.image.mode,
                    "candidate": cand.name,
                    "note": cand.note,
                    "lossless": cand.lossless,
                    "decoded_equal": row.exact,
                    "median_ms": med,
                    "min_ms": min(row.times_ms),
                    "max_ms": max(row.times_ms),
                    "ratio_to_baseline": med / base_ms if base else None,
                    "bytes": row.nbytes,
                    "bytes_ratio_to_baseline": row.nbytes / base.nbytes if base else None,
                    "base64_chars": 4 * math.ceil(row.nbytes / 3),
                    "psnr_db": None if math.isinf(row.psnr_db) else round(row.psnr_db, 2),
                    "max_abs_err": row.max_abs_err,
                    "times_ms": row.times_ms,
                }
            )
    return {
        "meta": environment(photo_source, missing, args),
        "results": results,
    }


def _version(module, dist: str) -> str | None:
    if module is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return getattr(module, "__version__", "present")


def environment(photo_source: str, missing: list[str], args: argparse.Namespace) -> dict:
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "pillow": PIL.__version__,
        "pillow_zlib": features.version("zlib"),
        "pillow_zlib_ng": features.version("zlib_ng"),
        "pillow_jpeg": features.version("libjpeg_turbo"),
        "pillow_webp": features.version("webp"),
        "numpy": np.__version__,
        "imagecodecs": _version(imagecodecs, "imagecodecs"),
        "fpng (py-fpng-nb)": _version(fpng, "fpng"),
        "fpng_py": _version(fpng_py, "fpng_py"),
        "missing": missing,
        "photo": photo_source,
        "rounds": args.rounds,
        "min_ms_per_timing": args.min_ms,
        "seed": args.seed,
        "baseline": BASELINE,
    }


# ---------------------------------------------------------------- reporting


def _fmt_psnr(row: dict) -> str:
    return "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Output formats: encode time, size and fidelity",
        "",
        f"Photo: {meta['photo']}. Rounds: {meta['rounds']} (medians; candidates interleaved "
        f"in random order each round). Baseline for ratios: `{meta['baseline']}` "
        "(the service's current PNG path); `heatmap-P` rows are compared with it on the RGB "
        "heatmap of the same size.",
        "",
        f"Pillow {meta['pillow']} (zlib-ng {meta['pillow_zlib_ng']}, libjpeg-turbo "
        f"{meta['pillow_jpeg']}, libwebp {meta['pillow_webp']}), numpy {meta['numpy']}, "
        f"imagecodecs {meta['imagecodecs']}, fpng (py-fpng-nb) {meta['fpng (py-fpng-nb)']}, "
        f"fpng_py {meta['fpng_py']}; Python {meta['python']} on {meta['cpus']} CPUs "
        f"({meta['machine']}).",
    ]
    if meta["missing"]:
        lines += ["", f"Not measured (not importable): {', '.join(meta['missing'])}."]
    pictures_seen: list[str] = []
    for row in report["results"]:
        if row["picture"] not in pictures_seen:
            pictures_seen.append(row["picture"])
    for name in pictures_seen:
        rows = sorted(
            (r for r in report["results"] if r["picture"] == name), key=lambda r: r["median_ms"]
        )
        lines += [
            "",
            f"## {name}",
            "",
            "| candidate | ms (median) | x baseline time | KiB | x baseline size | PSNR dB "
            "| max err | lossless ok |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
            size_ratio = (
                ""
                if r["bytes_ratio_to_baseline"] is None
                else f"{r['bytes_ratio_to_baseline']:.2f}"
            )
            ok = ("yes" if r["decoded_equal"] else "NO") if r["lossless"] else "lossy"
            lines.append(
                f"| {r['candidate']} | {r['median_ms']:.2f} | {ratio} | {r['bytes'] / 1024:.1f} "
                f"| {size_ratio} | {_fmt_psnr(r)} | {r['max_abs_err']} | {ok} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, two small sizes, no files")
    parser.add_argument("--min-ms", type=float, default=20.0, help="time per timing (repeats)")
    parser.add_argument("--photo-dir", type=Path, default=None)
    parser.add_argument("--photo", default="coffee.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="substrings of candidate names to keep")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.min_ms = min(args.min_ms, 5.0)
    report = run(args)
    text = markdown(report)
    print(text)
    if not (args.no_write or args.quick):  # a smoke run keeps the stored results
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "output_formats.json").write_text(json.dumps(report, indent=2) + "\n")
        md = RESULTS / "output_formats.md"
        extra = ""
        if md.is_file() and "\n## Recommendation" in md.read_text():
            extra = md.read_text().split("\n## Recommendation", 1)[1]
            extra = "\n## Recommendation" + extra
        md.write_text(text + extra)


if __name__ == "__main__":
    main()
