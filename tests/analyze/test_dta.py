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
