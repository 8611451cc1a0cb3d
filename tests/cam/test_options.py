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


@pytest.mark.parametrize("huge", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_a_number_past_floats_and_str_is_refused_by_its_bounds(huge):
    """JSON carries integers of any size: ``math.isfinite`` and ``float`` overflowed on 10**400
    (a 500 over OIP and KServe v1), and ``repr`` refuses an int of over 4,300 digits. Now the
    bounds refuse it, and the message gives its size, not its digits."""
    for option in (SSCAM.option("num_samples"), SSCAM.option("std")):
        with pytest.raises(
            ValueError, match=r"must lie in .*got (a negative|an) integer of about"
        ) as info:
            option.check(huge)
        assert len(str(info.value)) < 120
    with pytest.raises(ValueError, match="must lie in"):
        FinerCAM.option("comparison_idx").check([-abs(huge)])
    with pytest.raises(TypeError, match="a list holding a number too long to show"):
        FinerCAM.option("comparison_idx").check(["x", 10**5000])


def test_find_method_is_case_insensitive_and_suggests():
    assert find_method(" gradcampp ") == ("GradCAMpp", METHODS["GradCAMpp"])
    with pytest.raises(UnknownMethod, match="Did you mean ScoreCAM") as info:
        find_method("scorecma")
    assert info.value.suggestion == "ScoreCAM"
    assert did_you_mean("layr4", ["layer4", "fc"]) == " Did you mean layer4?"
    assert did_you_mean("zzz", ["layer4"]) == ""
