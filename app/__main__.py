"""``python -m app``: serve the model store with uvicorn, configured from CAMSERVE_* variables."""

from __future__ import annotations

import sys
from typing import Any

from app.observability.logs import configure_logging
from app.settings import ConfigurationError, load_settings


def main(**overrides: Any) -> int:
    """Validate the settings (``overrides`` win over the environment), set up logging and run
    the server until interrupted."""
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as error:
        print(f"camserve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from app.http.server import build_server

    build_server(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
