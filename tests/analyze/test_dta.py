import torch
import torch.nn.functional as F

from vitkit.analyze.common import PixelModel
from vitkit.analyze.dta import DTAConfig, block_features, cosine_attack, measure_dta


def test_the_feature_attack_lowers_the_cosine_at_its_block(micro, val_pixels):
    pm = PixelModel(micro)
    x = val_pixels[0][:32]
    cfg = DTAConfig(steps=5)
    xa = cosine_attack(pm, x, 1, cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block_features(micro, pm.normalize(x), 1)
        noisy = (x + (torch.rand_like(x) * 2 - 1) * cfg.eps).clamp(0, 1)
        cos_adv = F.cosine_similarity(block_features(micro, pm.normalize(xa), 1), ref).mean()
        cos_noise = F.cosine_similarity(block_features(micro, pm.normalize(noisy), 1), ref).mean()
    assert (xa - x).abs().max() <= cfg.eps + 1e-6
    assert cos_adv < cos_noise - 0.05


def test_dta_searches_every_block_and_beats_noise_on_a_downstream_model(micro, digits):
    res = measure_dta(
        micro,
        {"self": micro},
        digits.val,
        DTAConfig(n=64, steps=10, alpha=2 / 255, search_n=16, search_steps=2),
    )
    assert sorted(res.layer_scores) == [0, 1, 2, 3]
    assert res.layer == max(res.layer_scores, key=res.layer_scores.get)
    r = res.downstream["self"]
    assert r["dta"]["attack_success_rate"] > r["uniform_noise"]["attack_success_rate"] + 0.2


def test_dta_at_the_last_block_is_exactly_the_last_layer_baseline(micro, digits):
    res = measure_dta(micro, {"self": micro}, digits.val, DTAConfig(n=16, steps=2, layer=-1))
    r = res.downstream["self"]
    assert res.layer == 3 and res.layer_scores == {}
    assert r["dta"] == r["last_layer"]


def test_layer_search_picks_the_best_scoring_block_even_when_it_is_not_the_last(micro, digits):
    import copy

    from vitkit.analyze.common import pixel_transform
    from vitkit.analyze.dta import split_search

    # a pre-trained model whose last block adds a large constant to every token: its mean feature
    # barely turns under any attack, so block 3 must score lowest and an earlier block must win
    pre = copy.deepcopy(micro)
    with torch.no_grad():
        pre.blocks[3].mlp.fc2.bias += 50.0
    cfg = DTAConfig(n=16, steps=2, search_n=16, search_steps=3, search_score="block", per_block=True)
    res = measure_dta(pre, {"self": micro}, digits.val, cfg)
    # the score is the cosine drop at the attacked block itself, recomputed here independently
    search, _ = split_search(digits.val, cfg)
    x = pixel_transform(pre)(search.images, search.targets)[0]
    pm = PixelModel(pre)
    for li, score in res.layer_scores.items():
        xa = cosine_attack(pm, x, li, cfg, steps=3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cos = F.cosine_similarity(
                block_features(pre, pm.normalize(xa), li), block_features(pre, pm.normalize(x), li)
            )
        assert abs(float((1 - cos).mean()) - score) < 1e-5
    assert res.layer == max(res.layer_scores, key=res.layer_scores.get)
    assert res.layer != 3 and res.layer_scores[3] < 0.5 * res.layer_scores[res.layer], res.layer_scores
    r = res.downstream["self"]
    assert sorted(k for k in r if k.startswith("block_")) == ["block_0", "block_1", "block_2", "block_3"]
    assert r[f"block_{res.layer}"] == r["dta"] and r["block_3"] == r["last_layer"]


def test_bad_search_score_is_one_line(micro, digits):
    import pytest

    from vitkit.errors import VitkitError

    with pytest.raises(VitkitError, match="search_score must be final or block"):
        measure_dta(micro, {"self": micro}, digits.val, DTAConfig(n=8, search_score="middle"))
