"""Content negotiation (RFC 9110, 12.5.1): which of two media types a request's Accept prefers.

One rule for every route that can answer in more than one form: ``/explain`` (JSON or the
overlay as ``image/png``) and ``/`` (the page as ``text/html`` or KServe v1's liveness JSON).
"""

from __future__ import annotations

from starlette.requests import Request


def media_ranges(accept: str) -> list[tuple[str, float]]:
    """An Accept header's media ranges with their quality (``q``, 1 by default), in order; a
    range whose ``q`` is not a number from 0 to 1 is left out."""
    ranges = []
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if media and 0.0 <= quality <= 1.0:
            ranges.append((media, quality))
    return ranges


def preference(ranges: list[tuple[str, float]], media: str) -> tuple[float, bool, int]:
    """How much the client wants ``media``: the quality of the most specific range that covers
    it, whether that range names its type (``*/*`` does not), and its place (earlier first)."""
    covering = (media, media.split("/")[0] + "/*", "*/*")
    found = [
        (covering.index(range_), -place, quality)
        for place, (range_, quality) in enumerate(ranges)
        if range_ in covering
    ]
    if not found:
        return (0.0, False, 0)
    specificity, place, quality = min(found, key=lambda f: (f[0], -f[1]))
    return (quality, specificity < 2, place)


def prefers(request: Request, media: str, over: str) -> bool:
    """Whether the request's Accept prefers ``media`` to ``over``: the higher quality wins, then
    a range that names the type over ``*/*``, then the range listed first; ``over`` when it
    takes neither or ties (so a client that sends ``*/*`` or no Accept gets ``over``)."""
    ranges = media_ranges(", ".join(request.headers.getlist("accept")))
    wanted = preference(ranges, media)
    return wanted[0] > 0 and wanted > preference(ranges, over)
