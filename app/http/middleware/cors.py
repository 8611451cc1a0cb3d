"""CORS for the pages that ``CAMSERVE_CORS_ORIGINS`` lists: Starlette's middleware, with a
refused preflight answered in the service's JSON error shape, naming what was refused and the
fix, like every other refusal (Starlette answers it in plain text: "Disallowed CORS origin")."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from app.errors import PreflightRefused, error_body

__all__ = ["Cors"]


class Cors(CORSMiddleware):
    """Starlette's CORS, its refused preflights as ``400 preflight_refused``."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        error = self.refusal(request_headers)
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name.lower() not in ("content-length", "content-type")
        }
        return JSONResponse(
            error_body(error.code, error.message, error.details),
            status_code=error.status_code,
            headers=headers,
        )

    def refusal(self, request_headers: Headers) -> PreflightRefused:
        """What of the preflight is refused, each part with its fix."""
        origin = request_headers.get("origin", "")
        method = request_headers.get("access-control-request-method", "")
        asked = request_headers.get("access-control-request-headers")
        reasons: list[str] = []
        details: dict[str, object] = {}
        if not self.is_allowed_origin(origin=origin):
            reasons.append(
                f"the page's origin {origin[:200]!r} is not in CAMSERVE_CORS_ORIGINS "
                "(add it there, or serve the page from this service)"
            )
            details["origin"] = origin[:200]
        if method not in self.allow_methods:
            allowed = sorted(set(self.allow_methods) - {"OPTIONS"})
            reasons.append(
                f"the method {method[:40]!r} is not one a page may use here ({', '.join(allowed)})"
            )
            details["allowed_methods"] = allowed
        if asked is not None and not self.allow_all_headers:
            refused = sorted(
                {h.strip() for h in asked.lower().split(",") if h.strip()} - set(self.allow_headers)
            )
            if refused:
                allowed_headers = sorted(self.allow_headers)
                reasons.append(
                    f"the header(s) {', '.join(h[:60] for h in refused[:10])} may not be sent "
                    f"across origins (allowed: {', '.join(allowed_headers)})"
                )
                details["refused_headers"] = refused[:10]
                details["allowed_headers"] = allowed_headers
        if request_headers.get("access-control-request-private-network") is not None and not (
            self.allow_private_network
        ):
            reasons.append(
                "a public site's page may not call this service on a private network "
                "(Private Network Access); serve the page from an origin on that network"
            )
        message = "The browser's preflight is refused: " + "; ".join(reasons or ["not allowed"])
        return PreflightRefused(message + ".", details=details or None)
