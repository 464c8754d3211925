import numpy as np
import pytest
import torch

from vitkit.analyze.similarity import (
    SimilarityConfig,
    cka,
    gram_linear,
    linear_cka,
    measure_similarity,
    minibatch_cka,
    rbf_cka,
    rsa,
)
from vitkit.errors import VitkitError


def _numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: Gram matrices, explicit centring matrix H, HSIC ratio."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h  # noqa: E741
    return float(np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l)))


def test_linear_cka_matches_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    for n, p, q in [(50, 10, 30), (40, 100, 5), (30, 60, 70)]:
        x, y = rng.normal(size=(n, p)), rng.normal(size=(n, q)) + rng.normal(size=(n, 1))
        ref = _numpy_linear_cka(x, y)
        assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, abs=1e-8)
        assert cka(gram_linear(torch.from_numpy(x)), gram_linear(torch.from_numpy(y))) == pytest.approx(
            ref, abs=1e-8
        )


def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale_but_not_to_any_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    for fn in (linear_cka, rbf_cka, lambda a, b: linear_cka(a, b, debiased=True)):
        assert fn(x, x) == pytest.approx(1.0, abs=1e-10)
        assert fn(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-6)
    a = torch.diag(torch.logspace(0, 4, 16, dtype=torch.float64))  # ill-conditioned
    assert linear_cka(x, x @ a) < 0.9
    assert minibatch_cka(x, 2 * x @ q, batch_size=20) == pytest.approx(1.0, abs=1e-10)


def test_debiased_cka_of_independent_gaussians_is_near_zero_while_biased_is_not():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 1000, generator=g, dtype=torch.float64)
    y = torch.randn(500, 1000, generator=g, dtype=torch.float64)
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    assert linear_cka(x, y) > 0.5


def test_rsa_is_one_on_itself_and_rank_based():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    assert rsa(x, x) == pytest.approx(1.0)
    y = torch.randn(30, 12, generator=g, dtype=torch.float64)
    assert abs(rsa(x, y)) < 0.3


def test_fewer_than_four_samples_for_debiased_cka_is_one_clear_error():
    x = torch.randn(3, 5)
    with pytest.raises(VitkitError, match="at least 4 samples"):
        linear_cka(x, x, debiased=True)


def test_layer_heatmap_of_a_model_with_itself_has_a_unit_diagonal(micro, digits):
    res = measure_similarity(micro, micro, digits.val, SimilarityConfig(metrics=("cka-linear", "rsa"), n=64))
    for m in ("cka-linear", "rsa"):
        mat = np.array(res.metrics[m])
        assert mat.shape == (4, 4)
        assert np.allclose(np.diag(mat), 1.0, atol=1e-6)
        assert np.allclose(mat, mat.T, atol=1e-6)
    assert res.to_dict()["diagonal_dominance"]["cka-linear"] == 1.0


def test_models_with_different_input_sizes_are_resized_or_refused(micro, digits):
    from vitkit.models import create_model

    other = create_model("vitkit_tiny_p4_32", num_classes=10, depth=2).eval()
    with pytest.raises(VitkitError, match="different input sizes"):
        measure_similarity(micro, other, digits.val, SimilarityConfig(n=8, resize=False))
    res = measure_similarity(micro, other, digits.val, SimilarityConfig(n=8))
    assert "resized" in res.notes[0]
    assert np.array(res.metrics["cka-linear"]).shape == (4, 2)
