"""Deep Feature Factorization: the NMF, the concepts' scores and maps, and the bad inputs."""

from __future__ import annotations

import pytest
import torch

from app.cam import DFF, nmf, normalize_maps
from app.cam.dff import relative_error


def _low_rank(batch: int = 2, rows: int = 30, cols: int = 8, rank: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    w = torch.rand(batch, rows, rank, generator=generator)
    h = torch.rand(batch, rank, cols, generator=generator)
    return w @ h


def test_nmf_factors_are_non_negative_and_the_error_never_grows() -> None:
    v = _low_rank()
    factors = nmf(v, 3, iterations=300, check_every=1)
    assert (factors.w >= 0).all() and (factors.h >= 0).all()
    assert factors.w.shape == (2, 30, 3) and factors.h.shape == (2, 3, 8)
    errors = torch.stack(factors.errors)  # (iterations, batch)
    assert errors.shape == (300, 2)
    assert (errors[1:] <= errors[:-1] + 1e-6).all()
    assert (errors[-1] < errors[0]).all()
    # A matrix of rank 3 is all but reconstructed by 3 concepts.
    assert (errors[-1] < 0.05).all()
    torch.testing.assert_close(errors[-1], relative_error(v, factors.w, factors.h))


def test_nmf_of_a_matrix_does_not_depend_on_its_batch() -> None:
    v = _low_rank(batch=3)
    batch = nmf(v, 2, iterations=50)
    alone = nmf(v[1:2], 2, iterations=50)
    torch.testing.assert_close(batch.w[1:2], alone.w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batch.h[1:2], alone.h, rtol=1e-4, atol=1e-6)


def test_nmf_refuses_negative_values_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        nmf(-_low_rank(), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        nmf(_low_rank(), 0)
    with pytest.raises(ValueError, match=r"\(N, P, C\)"):
        nmf(_low_rank()[0], 2)


def _run(model, x, classes, **options):  # type: ignore[no-untyped-def]
    with DFF(model, "feat", input_shape=tuple(x.shape[1:]), **options) as extractor:
        with torch.inference_mode():
            scores = model(x)
        maps = extractor(classes, scores, normalized=False)
    return maps, extractor.concepts


def test_concepts_are_the_nmf_of_the_layer_and_their_scores_are_the_head_of_each(tiny_net):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    maps, (concepts,) = _run(tiny_net, x, [0, 2], n_components=3, iterations=80)
    with torch.no_grad():
        activation = torch.relu(tiny_net.conv(x))  # layer feat, (2, 4, 8, 8)
    v = activation.flatten(2).transpose(1, 2)
    direct = nmf(v, 3, iterations=80)
    assert concepts.layer == "feat"
    assert concepts.maps.shape == (2, 3, 8, 8) and concepts.embeddings.shape == (2, 3, 4)
    torch.testing.assert_close(concepts.maps, direct.w.transpose(1, 2).reshape(2, 3, 8, 8))
    torch.testing.assert_close(concepts.embeddings, direct.h)
    with torch.no_grad():
        torch.testing.assert_close(concepts.scores, tiny_net.fc(concepts.embeddings))
    # The map served for class c is the concept whose score for c is highest.
    for i, c in enumerate([0, 2]):
        best = int(concepts.scores[i, :, c].argmax())
        torch.testing.assert_close(maps[0][i], concepts.maps[i, best])


def test_the_normalised_map_is_the_chosen_concept_normalised(tiny_net):
    x = torch.randn(1, 3, 16, 16)
    raw, (concepts,) = _run(tiny_net, x, [1])
    with DFF(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        with torch.inference_mode():
            scores = tiny_net(x)
        normalized = extractor([1], scores)[0]
    torch.testing.assert_close(normalized, normalize_maps(raw[0]))


def test_more_concepts_than_channels_is_refused(tiny_net):
    with pytest.raises(ValueError, match="n_components=5 is more concepts than the target layer"):
        _run(tiny_net, torch.randn(1, 3, 16, 16), [0], n_components=5)
    assert DFF.option_problem([(1, 4, 8, 8)], {"n_components": 4}) is None
    assert "from 1 to 4" in (DFF.option_problem([(1, 4, 8, 8)], {"n_components": 5}) or "")


def test_dff_reads_the_head_and_takes_one_layer(tiny_net):
    with pytest.raises(ValueError, match="DFF reads the model's head as CAM does"):
        DFF(tiny_net, ["conv", "feat"], input_shape=(3, 16, 16))
    assert sum(len(m._forward_hooks) for m in tiny_net.modules()) == 0
    with pytest.raises(ValueError, match="n_components must be a positive int"):
        DFF(tiny_net, "feat", input_shape=(3, 16, 16), n_components=0)
