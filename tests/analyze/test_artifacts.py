import torch
import torch.nn.functional as F

from vitkit.analyze.artifacts import (
    ArtifactConfig,
    decompose_views,
    high_norm_tokens,
    measure_artifacts,
    position_artifact_score,
    position_map,
    sample_field,
    view_offsets,
)


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_the_diagnostic_recovers_a_planted_position_pattern():
    g = torch.Generator().manual_seed(0)
    n, h, w, d = 200, 8, 8, 32
    content = torch.randn(n, h, w, d, generator=g, dtype=torch.float64)
    pattern = 0.5 * torch.randn(h, w, d, generator=g, dtype=torch.float64)
    f = content + pattern
    ghat = position_map(f)
    assert _cos(ghat, pattern - pattern.mean((0, 1))) > 0.99
    expected = (pattern - pattern.mean((0, 1))).pow(2).sum() / ((f - f.mean((0, 1, 2))).pow(2).sum() / n)
    assert abs(position_artifact_score(f) - float(expected)) < 0.02


def test_the_diagnostic_reports_about_zero_without_a_pattern():
    f = torch.randn(200, 8, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert position_artifact_score(f) < 0.05
    assert high_norm_tokens(f)["fraction"] < 0.01


def test_the_shift_decomposition_separates_content_from_position_exactly():
    g = torch.Generator().manual_seed(2)
    n, gh, gw, d, s = 6, 5, 5, 8, 1
    offsets = view_offsets(s)
    field = torch.randn(n, gh + 2 * s, gw + 2 * s, d, generator=g, dtype=torch.float64)
    pos = torch.randn(gh, gw, d, generator=g, dtype=torch.float64)
    pos -= pos.mean((0, 1))
    feats = sample_field(field, offsets, gh, gw) + pos  # f[i, v, p] = F_i(p + o_v) + G(p)
    est_field, est_pos = decompose_views(feats, offsets, iters=300)
    assert torch.allclose(est_pos, pos, atol=1e-3)
    assert torch.allclose(sample_field(est_field, offsets, gh, gw) + est_pos, feats, atol=1e-3)


def test_measure_artifacts_on_a_trained_vit(micro, digits):
    res = measure_artifacts(micro, digits.val, ArtifactConfig(n=12, max_shift=1, holdout=0.25))
    assert res.grid == (4, 4) and res.num_prefix_tokens == 1
    assert 0 <= res.pas <= 1 and 0 <= res.pas_decomposed <= 1
    assert res.g_hat.shape == (4, 4, 64)
    assert -1 <= res.shift["position_locked"] <= 1 and -1 <= res.shift["content_aligned"] <= 1
    # subtracting Ĝ fitted on other images removes most position-locked variance of held-out ones
    assert res.pas_heldout_corrected < res.pas


def test_the_learned_denoiser_removes_a_planted_pattern_from_unseen_features():
    from vitkit.analyze.artifacts import train_denoiser

    g = torch.Generator().manual_seed(3)
    h, w, d = 4, 4, 64
    pattern = torch.randn(h, w, d, generator=g)
    content = torch.randn(160, h, w, d, generator=g)
    fit, test = content[:128], content[128:]
    den = train_denoiser(fit + pattern, fit, steps=150, lr=3e-3, batch_size=16, seed=0)
    with torch.no_grad():
        out = den(test + pattern)
    before = F.mse_loss(test + pattern, test)
    after = F.mse_loss(out, test)
    assert after < 0.2 * before  # a denoiser that ignored positions could not beat ~1.0x
