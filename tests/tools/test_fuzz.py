"""The fuzzer of `make fuzz` (tools/fuzz.py), on a short budget: no failure of any check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import fuzz

#: Seconds of fuzzing in `make test` (all phases share them); `make fuzz` runs 600.
BUDGET_S = 50


@pytest.mark.timeout(BUDGET_S + 240)
def test_schemathesis_finds_nothing(store: Path) -> None:
    assert fuzz.main(["--max-time", str(BUDGET_S), "--store", str(store)]) == 0
