import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.analyze.mil import GatedAttentionMIL, MILConfig, fit_mil, pad_bags, read_bags_csv, synthetic_bags
from vitkit.errors import VitkitError


@pytest.fixture
def head():
    torch.manual_seed(0)
    return GatedAttentionMIL(8, hidden=16).eval()


def test_attention_sums_to_one_and_ignores_order_padding_and_duplication(head):
    h = torch.randn(1, 5, 8)
    logit, a = head(h)
    assert torch.allclose(a.sum(1), torch.ones(1))
    perm = torch.randperm(5)
    logit_p, a_p = head(h[:, perm])
    assert torch.allclose(logit_p, logit, atol=1e-6) and torch.allclose(a_p, a[:, perm], atol=1e-6)
    padded = torch.cat([h, torch.randn(1, 3, 8) * 100], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    logit_m, a_m = head(padded, mask)
    assert torch.allclose(logit_m, logit, atol=1e-6) and torch.all(a_m[:, 5:] == 0)
    logit_d, _ = head(torch.cat([h, h], 1))  # every instance twice: the same pooled z
    assert torch.allclose(logit_d, logit, atol=1e-6)
    _, a1 = head(h[:, :1])
    assert torch.equal(a1, torch.ones(1, 1))


def test_pad_bags_marks_real_instances():
    feats = torch.arange(12.0).view(6, 2)
    x, mask = pad_bags(feats, [[0, 1, 2], [5]])
    assert x.shape == (2, 3, 2) and mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(x[1, 0], feats[5])


def test_gated_mil_on_frozen_vit_features_finds_the_positive_instances(micro, digits):
    from vitkit.analyze.mil import embed_images

    bags = synthetic_bags(digits.val, positive_class=7, num_bags=120, bag_size=(8, 32), seed=0)
    feats = embed_images(micro, digits.val.images)
    res = fit_mil(feats, bags, MILConfig(epochs=60, seed=0))
    assert res.val_auc > 0.9
    assert res.top_instance_hit_rate > 0.8
    for entry in res.attention:
        assert sum(entry["attention"]) == pytest.approx(1.0, abs=1e-4)


def _write_bag_csv(tmp_path, rows):
    for name in {r[1] for r in rows}:
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / name)
    lines = ["bag_id,path,label"] + [",".join(map(str, r)) for r in rows]
    (tmp_path / "bags.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "bags.csv"


def test_bag_csv_is_read_and_a_bag_with_mixed_labels_is_one_clear_error(tmp_path):
    good = _write_bag_csv(tmp_path, [("a", "x.png", 1), ("a", "y.png", 1), ("b", "x.png", 0)])
    bags = read_bags_csv(f"csv:{good}")
    assert bags.ids == ["a", "b"] and bags.members == [[0, 1], [2]] and bags.labels.tolist() == [1.0, 0.0]
    assert bags.images.shape == (3, 3, 8, 8)
    bad = _write_bag_csv(tmp_path, [("a", "x.png", 1), ("b", "x.png", 0), ("a", "y.png", 0)])
    with pytest.raises(VitkitError, match=r"line 4: bag 'a' has mixed labels \(1 on line 2, 0 here\)"):
        read_bags_csv(bad)
