import pytest
import torch

from vitkit.analyze.attention import AttentionConfig, measure_attention, plot_attention, rollout
from vitkit.errors import VitkitError
from vitkit.models import create_model


def test_rollout_of_uniform_attention_matches_the_closed_form_and_rows_sum_to_one():
    n = 5
    u = torch.full((2, 3, n, n), 1 / n)
    r = rollout([u, u, u])
    assert torch.allclose(r.sum(-1), torch.ones(2, n, dtype=torch.float64))
    # each layer is 0.5·U + 0.5·I (residual); U is idempotent, so three layers give 0.125·I + 0.875·U
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(r, (0.125 * eye + 0.875 / n).expand(2, n, n))
    eye = torch.eye(n).expand(2, 3, n, n)
    assert torch.allclose(rollout([eye, eye]), torch.eye(n, dtype=torch.float64).expand(2, n, n))


def test_maps_of_a_trained_vit_for_chosen_layers_and_heads(micro, digits, tmp_path):
    res = measure_attention(micro, digits.val, AttentionConfig(layers=(0, -1), heads="all", n=4))
    assert res.layers == [0, 3]
    assert res.maps[3].shape == (4, 4, 4, 4)  # images, heads, grid
    for li in res.layers:
        share = res.stats["per_layer"][li]["patch_to_prefix_share"]
        assert 0 <= share <= 1
    assert res.rollout.shape == (4, 4, 4)
    plot_attention(res, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "name,kwargs,prefix",
    [
        ("vitkit_micro_distilled_p4_16", {}, 2),
        (
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8, "depth": 2, "reg_tokens": 4, "class_token": True},
            5,
        ),
    ],
)
def test_distilled_and_register_models_keep_every_prefix_token_out_of_the_map(digits, name, kwargs, prefix):
    m = create_model(name, num_classes=10, **kwargs).eval()
    assert m.num_prefix_tokens == prefix
    res = measure_attention(
        m, digits.val, AttentionConfig(layers=(-1,), n=2, query=prefix - 1 if prefix == 2 else 0)
    )
    gh, gw = m.patch_embed.grid_size
    assert res.maps[res.layers[0]].shape == (2, 1, gh, gw)
    # attention to patches + attention to prefix tokens of the query row = 1
    assert float(res.maps[res.layers[0]].sum((-2, -1)).max()) < 1.0
    with pytest.raises(VitkitError, match="not a prefix token"):
        measure_attention(m, digits.val, AttentionConfig(n=2, query=prefix))
