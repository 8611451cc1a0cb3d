"""Method options declared once: names, defaults, bounds; the method-name lookup."""

from __future__ import annotations

import inspect

import pytest

from app.cam import METHODS, SSCAM, FinerCAM, UnknownMethod, did_you_mean, find_method


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_defaults_are_the_constructors(name):
    cls = METHODS[name]
    parameters = inspect.signature(cls).parameters
    for option in cls.options:
        if option.at == "call":
            assert option.name in inspect.signature(cls.__call__).parameters
            continue
        assert parameters[option.name].default == option.default, option.name
    assert cls.option_names == tuple(o.name for o in cls.options)


def test_option_checks_type_and_bounds():
    samples = SSCAM.option("num_samples")
    assert samples.default == 35 and samples.check(3) == 3
    with pytest.raises(ValueError, match=r"num_samples must lie in \[1, 64\]"):
        samples.check(65)
    with pytest.raises(TypeError):
        samples.check(2.5)
    assert SSCAM.option("std").check(1) == 1.0
    with pytest.raises(ValueError, match="finite"):
        SSCAM.option("std").check(float("nan"))
    comparison = FinerCAM.option("comparison_idx")
    assert comparison.at == "call" and comparison.check([3, 4]) == (3, 4)
    with pytest.raises(ValueError):
        comparison.check([-1])
    assert SSCAM.option("fc_layer") is None


def test_find_method_is_case_insensitive_and_suggests():
    assert find_method(" gradcampp ") == ("GradCAMpp", METHODS["GradCAMpp"])
    with pytest.raises(UnknownMethod, match="Did you mean ScoreCAM") as info:
        find_method("scorecma")
    assert info.value.suggestion == "ScoreCAM"
    assert did_you_mean("layr4", ["layer4", "fc"]) == " Did you mean layer4?"
    assert did_you_mean("zzz", ["layer4"]) == ""
