"""What a repository load or unload may carry: nothing a load would have to apply."""

from __future__ import annotations

import pytest

from app.errors import BadRequest
from app.protocols.repository import check_parameters


def test_nothing_to_apply_passes() -> None:
    check_parameters(None, "load")
    check_parameters({}, "load")
    check_parameters({"unload_dependents": False}, "unload")  # tritonclient's unload sends it


@pytest.mark.parametrize(
    ("parameters", "action", "words"),
    [
        ({"config": "{}"}, "load", "takes no 'config'.*model.toml"),
        ({"file:1/model.pt": "AAAA"}, "load", "no file overrides"),
        ({"unload_dependents": True}, "load", "A load takes no parameter 'unload_dependents'"),
        ({"force": True}, "unload", "An unload takes no parameter 'force'"),
    ],
)
def test_a_config_or_any_other_parameter_is_refused(
    parameters: dict, action: str, words: str
) -> None:
    with pytest.raises(BadRequest, match=words):
        check_parameters(parameters, action)  # type: ignore[arg-type]
