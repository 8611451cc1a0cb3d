"""Progress reports and the stop check between chunks of extra forwards."""

from __future__ import annotations

import pytest
import torch

from app.cam import ISCAM, METHODS, SSCAM, CamInterrupted, ScoreCAM, SmoothGradCAMpp

CHUNKED = {
    ScoreCAM: {"batch_size": 2},
    SSCAM: {"batch_size": 4, "num_samples": 3, "seed": 0},
    ISCAM: {"batch_size": 4, "num_samples": 3},
    SmoothGradCAMpp: {"num_samples": 5, "seed": 0},
}


class CountingForwards(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def _call(method, model, x, **call_kwargs):
    with method(model, "model.feat", **CHUNKED.get(method, {})) as extractor:
        scores = model(x)
        return extractor([0, 1], scores, **call_kwargs)


@pytest.mark.parametrize("method", list(CHUNKED), ids=lambda m: m.__name__)
def test_progress_counts_every_input_up_to_the_total(tiny_net, method):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reports: list[tuple[int, int]] = []
    maps = _call(
        method, CountingForwards(tiny_net), x, progress=lambda d, t: reports.append((d, t))
    )
    plain = _call(method, CountingForwards(tiny_net), x)
    torch.testing.assert_close(maps[0], plain[0])
    totals = {total for _, total in reports}
    assert len(totals) == 1
    (total,) = totals
    options = CHUNKED[method]
    # 2 images x 4 channels x variants for the Score family; 2 images x draws for SmoothGrad.
    expected = (
        2 * options["num_samples"]
        if method is SmoothGradCAMpp
        else 2 * 4 * options.get("num_samples", 1)
    )
    assert total == expected
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert len(reports) >= 3  # reported between chunks, not only at the end


@pytest.mark.parametrize("method", list(CHUNKED), ids=lambda m: m.__name__)
def test_should_stop_ends_the_call_after_the_current_chunk(tiny_net, method):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    counting = CountingForwards(tiny_net)
    with method(counting, "model.feat", **CHUNKED[method]) as extractor:
        scores = counting(x)
        before = counting.calls
        with pytest.raises(CamInterrupted):
            extractor([0, 1], scores, should_stop=lambda: counting.calls > before)
        assert counting.calls - before == 1  # one chunk ran, the rest did not
        # The extractor stays usable.
        assert extractor([0, 1], scores, retain_graph=False)[0].shape == (2, 4, 4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_stop_asked_before_the_call_runs_nothing(tiny_net, name):
    method = METHODS[name]
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    counting = CountingForwards(tiny_net)
    with method(counting, "model.feat", **CHUNKED.get(method, {})) as extractor:
        scores = counting(x)
        before = counting.calls
        with pytest.raises(CamInterrupted):
            extractor([0, 1], scores, should_stop=lambda: True)
        assert counting.calls == before
