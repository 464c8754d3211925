"""The image-text task: CLIP-style training from CSV pairs and streamed shards, zero-shot evaluation,
DataComp's filters, the image tower reused by the rest of vitkit, and bad input."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from vitkit.data import load_eval_data
from vitkit.data.imagetext import ShardStream, load_shards, readable_class_name
from vitkit.data.pool import build_pool, write_pool, write_shards
from vitkit.data.sources import VitkitDataWarning
from vitkit.errors import VitkitError
from vitkit.stages.filter import filter_pool, text_filter
from vitkit.stages.train import train_model
from vitkit.tasks.imagetext import pair_retrieval_metrics, tokenize, zero_shot_metrics

TASK = "image-text:context_length=16,text_layers=1"


def clip_config(data: str, **kw):
    base = dict(
        model="vitkit_micro_p4_16", data=data, task=TASK, epochs=8, batch_size=64, lr=2e-3,
        warmup_epochs=1, threads=1, tensorboard=False,
    )  # fmt: skip
    return {**base, **kw}


@pytest.fixture
def cli(capsys):
    """``vitkit ARGV`` in-process: (exit code, output)."""
    from vitkit.cli import main

    def run(*argv):
        rc = main([str(a) for a in argv])
        cap = capsys.readouterr()
        return rc, cap.out + cap.err

    return run


@pytest.fixture
def bad_input(cli):
    """A user error: exit 2 and one ``error:`` line matching ``message``, no traceback."""

    def check(argv, message):
        rc, text = cli(*argv)
        lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in text, text
        assert message in lines[0], lines[0]

    return check


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """1,200 pairs: 40% corrupted captions, 10% duplicates, 20% digits; also as 3 shards."""
    out = tmp_path_factory.mktemp("pool")
    return write_pool(out, 1200, corrupt=0.4, duplicates=0.1, off_target=0.2, seed=0, shards=3)


@pytest.fixture(scope="module")
def clip_run(pool, tmp_path_factory):
    """The micro ViT + a 1-block text tower trained 8 epochs on the noisy pool (the scorer): loss
    4.34 -> 3.73, zero-shot Fashion-MNIST 0.33 when it was written."""
    out = tmp_path_factory.mktemp("runs") / "clip"
    return train_model(clip_config(f"imagetext:{pool}"), out, quiet=True)


@pytest.fixture(scope="module")
def fmnist_val():
    data = load_eval_data("fashion-mnist")
    return data.subset(torch.arange(1000))


# -- metrics ----------------------------------------------------------------------------------------
def test_pair_recall_counts_equal_captions_once():
    # three pairs, the first two with the same caption text: image 0's nearest caption is "b" (wrong),
    # then "a"; text->image for caption "a" finds image 1 (relevant: same text) first
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    txt = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    m = pair_retrieval_metrics(img, txt, ["a", "a", "b"], ks=(1, 2))
    # i2t over distinct captions ("a" = [0,1], "b" = [1,0]): image 0 -> b first (miss), image 1 -> a
    # (hit), image 2 -> tie a/b, ties by index: a first (miss: image 2's caption is b)
    assert m["i2t_recall_at_1"] == pytest.approx(1 / 3)
    assert m["i2t_recall_at_2"] == pytest.approx(1.0)
    # t2i: captions 0 and 1 ("a") -> image 1 (score 1) first: hit; caption 2 ("b") -> image 0: miss
    assert m["t2i_recall_at_1"] == pytest.approx(2 / 3)
    assert m["distinct_captions"] == 2


def test_tokenizer_is_open_clips_and_cuts_to_context():
    t = tokenize(["a photo of a trouser", "x " * 100], 16)
    assert t.shape == (2, 16) and t.dtype == torch.long
    assert t[0, 0] == 49406 and 49407 in t[0].tolist()  # start and end of text
    assert t[1, -1] == 49407  # a long caption is cut and still ends with end-of-text


def test_readable_class_names():
    assert readable_class_name("T-shirt/top") == "t-shirt or top"
    assert readable_class_name("7") == "digit 7"


# -- pool ------------------------------------------------------------------------------------------
def test_pool_has_the_asked_noise_mix():
    _, rows = build_pool(400, corrupt=0.5, duplicates=0.1, off_target=0.25, seed=1)
    assert len(rows) == 400
    kinds = {k: sum(r.noise == k for r in rows) for k in ("clean", "mismatch", "garbled", "duplicate")}
    assert kinds["duplicate"] == 40
    assert kinds["mismatch"] + kinds["garbled"] == 180  # half of the 360 unique pairs
    assert sum(r.source == "digits" for r in rows if r.noise != "duplicate") == 90
    for r in rows:  # a clean caption names its own class; a mismatched one another class
        name = readable_class_name(r.label)
        if r.noise == "clean":
            assert name in r.caption
        elif r.noise == "mismatch":
            assert name not in r.caption.replace(f"{name}s", "")


# -- training and zero-shot --------------------------------------------------------------------------
def test_clip_training_learns_pairs_and_zero_shot(clip_run, fmnist_val):
    m = clip_run.metrics
    hist = clip_run.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.3
    # 60% of the pool's captions are right: retrieval among the ~200 distinct val captions (every
    # garbled one is unique) is well above chance (5 / 200)
    assert m["i2t_recall_at_5"] > 0.07, m
    z = zero_shot_metrics(clip_run.model, fmnist_val)
    assert z["zero_shot_top1"] > 0.22, z["zero_shot_top1"]  # chance 0.1


def test_clip_run_round_trips_and_exports(clip_run, tmp_path, fmnist_val):
    import vitkit
    from vitkit.models import get_manifest
    from vitkit.stages.export import export_run

    loaded = vitkit.load(clip_run.path)
    assert get_manifest(loaded).head["head"] == "clip"
    x = torch.rand(4, 3, 16, 16)
    tokens = tokenize(["a photo of a bag"] * 4, 16)
    with torch.no_grad():
        a = clip_run.model.eval()(x, tokens)
        b = loaded(x, tokens)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b))
    doc = export_run(clip_run.path, images=64).doc
    assert doc["max_abs_logit_diff"] < 1e-4, doc


def test_evaluate_zero_shot_cli(clip_run, tmp_path, cli):
    out = tmp_path / "zs"
    rc, text = cli("evaluate", clip_run.path, "--zero-shot", "digits", "-o", out)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["zero_shot_per_class"]) == 10 and (out / "zero_shot.png").is_file()


def test_zero_shot_refuses_a_classifier_run(tmp_path, quick):
    from vitkit.stages.evaluate import zero_shot_run

    run = train_model(quick(epochs=1, train_size=128, val_size=64), tmp_path / "cls", quiet=True)
    with pytest.raises(VitkitError, match="zero-shot needs an image-text run"):
        zero_shot_run(run.path, "digits")


# -- shards ----------------------------------------------------------------------------------------
def test_shards_stream_and_resume_mid_epoch_exactly(pool, tmp_path):
    import os
    import signal

    from vitkit.tasks.imagetext import ImageTextObjective
    from vitkit.train import TrainingInterrupted

    uri = f"shards:{pool.parent}/shards/pool-{{00000..00002}}.tar"
    cfg = clip_config(uri, epochs=2, model="vitkit_nano_p4_16")
    full = train_model(cfg, tmp_path / "full", quiet=True)
    assert full.metrics["data_description"]["streamed"] is True
    assert full.metrics["pairs"] == 400  # the last shard is the validation split

    class CtrlCAt(ImageTextObjective):
        calls = 0

        def __call__(self, model, images, tokens):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(model, images, tokens)

    with pytest.raises(TrainingInterrupted) as info:
        train_model(cfg, tmp_path / "cut", objective=CtrlCAt(), quiet=True)
    assert (info.value.epoch, info.value.step) == (0, 3)
    resumed = train_model(cfg, tmp_path / "cut", resume=True, quiet=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_is_deterministic_and_covers_every_sample(pool):
    train, val = load_shards(f"{pool.parent}/shards/pool-{{00000..00002}}.tar", 16)
    assert isinstance(train, ShardStream) and len(train) == 800 and len(val) == 400
    first = [c for _, (_, cs) in zip(range(25), train.stream_batches(7, 32, 0)) for c in cs]
    again = [c for _, (_, cs) in zip(range(25), train.stream_batches(7, 32, 0)) for c in cs]
    assert first == again
    with open(pool) as f:
        rows = list(csv.DictReader(f))
    # one pass of the stream holds exactly the training shards' captions (as a multiset)
    assert sorted(first) == sorted(r["caption"] for r in rows[:800])
    later = [c for _, (_, cs) in zip(range(5), train.stream_batches(7, 32, 20)) for c in cs]
    assert later == first[20 * 32 :]  # starting at step 20 skips exactly what was consumed
    two_ranks = [next(train.stream_batches(7, 16, 0, rank=r, world_size=2))[1] for r in (0, 1)]
    assert two_ranks[0] == first[0:32:2] and two_ranks[1] == first[1:32:2]


def test_truncated_shard_and_undecodable_image_are_counted(pool, tmp_path):
    pairs = [(pool.parent / f"images/{i:06d}.png", f"caption {i}") for i in range(60)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    pairs[5] = (bad, "an undecodable image")
    shards = write_shards(tmp_path / "s", pairs, 3)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2 + 100])  # cut mid-file
    with pytest.warns(VitkitDataWarning, match=r"truncated or corrupt .* read its first \d+ whole sample"):
        train, _val = load_shards(f"{tmp_path}/s/pool-{{00000..00002}}.tar", 16)
    assert 0 < train.counts[0] < 20 and train.counts[1] == 20
    assert train.info["truncated_shards"] == 1
    with pytest.warns(VitkitDataWarning, match="does not decode"):
        seen = [c for _, (_, cs) in zip(range(3), train.stream_batches(0, 16, 0)) for c in cs]
    assert "an undecodable image" not in seen and train.skipped == 1
    with pytest.raises(VitkitError, match="truncated or corrupt"):
        load_shards(f"{tmp_path}/s/pool-{{00000..00002}}.tar", 16, strict=True)


def test_shards_need_two(tmp_path, pool):
    write_shards(tmp_path / "one", [(pool.parent / "images/000000.png", "x")], 1)
    with pytest.raises(VitkitError, match="give 2 or more"):
        load_shards(f"{tmp_path}/one/pool-00000.tar", 16)
    with pytest.raises(VitkitError, match="does not exist"):
        load_shards(f"{tmp_path}/none-{{0..1}}.tar", 16)


# -- bad CSV input -----------------------------------------------------------------------------------
def test_csv_without_captions(tmp_path, pool, bad_input):
    rows = [["path", "caption"], [str(pool.parent / "images/000000.png"), "a bag"],
            [str(pool.parent / "images/000001.png"), ""], [str(pool.parent / "images/000002.png"), "a coat"]]  # fmt: skip
    p = tmp_path / "pairs.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    from vitkit.data.imagetext import load_imagetext_csv

    with pytest.warns(VitkitDataWarning, match=r"skipped 1 row\(s\) without a caption \(first: line 3\)"):
        data = load_imagetext_csv(str(p), 16)
    assert len(data) == 2 and data.info["skipped_no_caption"] == 1
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("path,label\nx.png,bag\n")
    bad_input(["train", "--task", "image-text", "--data", f"imagetext:{nocol}", "-o", str(tmp_path / "r")],
              "no caption column")  # fmt: skip
    bad_input(["train", "--task", "image-text", "--data", "digits", "-o", str(tmp_path / "r2")],
              "cannot train on 'digits'")  # fmt: skip


# -- DataComp filters --------------------------------------------------------------------------------
def _noise_share(report, key):
    counts = report[key]  # corrupted share among the unique (not duplicated) pairs
    return 1 - counts.get("clean", 0) / max(1, sum(v for k, v in counts.items() if k != "duplicate"))


def test_text_filter_keeps_captions_naming_a_target_class():
    keep = text_filter(["a photo of a bag", "handbag", "t-shirt", "a handwritten digit 3", "ankle boots"],
                       ["T-shirt/top", "Bag", "Ankle boot"])  # fmt: skip
    assert keep.tolist() == [True, False, True, False, False]


def test_datacomp_filters_remove_noise(pool, clip_run, tmp_path):
    reports = {}
    for by in ("none", "clip-score", "text", "image-cluster", "clip-score+image-cluster"):
        out = tmp_path / f"{by}.csv"
        reports[by] = filter_pool(
            pool,
            out,
            by,
            top=0.3,
            scorer=clip_run.path,
            target="fashion-mnist",
            clusters=200,
            target_size=200,
        )
        assert out.is_file() and out.with_suffix(".json").is_file()
    assert reports["none"]["kept"] == 1200
    assert reports["clip-score"]["kept"] == pytest.approx(360, abs=2)
    before = _noise_share(reports["none"], "noise_after")
    assert 0.35 < before < 0.45
    # CLIP score drops the captions about another class: their share falls to under half the pool's.
    # (Garbled captions are another matter for a scorer trained on this very pool: it learned them as
    # "any image" and scores them near the clean ones; docs/imagetext.md and the bench show it.)
    share = {k: r["noise_after"].get("mismatch", 0) / r["kept"] for k, r in reports.items()}
    assert share["clip-score"] < 0.5 * share["none"], share
    # the text filter keeps no garbled caption and no caption about digits
    with open(tmp_path / "text.csv") as f:
        kept = list(csv.DictReader(f))
    assert not any(r["noise"] == "garbled" for r in kept)
    assert not any("digit" in r["caption"] for r in kept)
    # image clusters near Fashion-MNIST images drop digit images: 20% of the pool, ~10% of what is kept
    # (this weak 8-epoch scorer's embeddings put some Fashion-MNIST images nearest to digit clusters;
    # DataComp's 100k clusters of CLIP L/14 embeddings are far finer)
    with open(tmp_path / "image-cluster.csv") as f:
        kept = list(csv.DictReader(f))
    digits_share = sum(r["source"] == "digits" for r in kept) / len(kept)
    assert digits_share < 0.15, digits_share
    both = reports["clip-score+image-cluster"]
    assert both["kept"] <= min(reports["clip-score"]["kept"], reports["image-cluster"]["kept"])
    # the filtered CSV trains: its paths are relative to it
    from vitkit.data.imagetext import load_imagetext_csv

    assert len(load_imagetext_csv(str(tmp_path / "clip-score.csv"), 16)) == reports["clip-score"]["kept"]


def test_filter_bad_options(pool, tmp_path, bad_input):
    bad_input(["filter", str(pool), "-o", str(tmp_path / "x.csv"), "--by", "clipscore"], "expected one of")
    bad_input(["filter", str(pool), "-o", str(tmp_path / "x.csv"), "--by", "clip-score"], "need --scorer")
    bad_input(["filter", str(pool), "-o", str(tmp_path / "x.csv"), "--by", "text"], "need --target")


# -- the image tower in the rest of vitkit -----------------------------------------------------------
@pytest.fixture(scope="module")
def tower_run(clip_run, tmp_path_factory):
    """The CLIP run's image tower fine-tuned 3 epochs on digits (a plain timm ViT classifier run)."""
    from vitkit.stages.finetune import finetune

    out = tmp_path_factory.mktemp("runs") / "tower"
    return finetune(clip_run.path, out, {"data": "digits", "epochs": 3, "batch_size": 64, "lr": 3e-3,
                                         "threads": 1, "tensorboard": False}, recipe="none", quiet=True)  # fmt: skip


def test_finetune_takes_the_image_tower(clip_run, tower_run, tmp_path, monkeypatch):
    import vitkit.stages.finetune as ft

    handed = {}

    def capture(cfg, output, *, model, **kw):  # what fine-tuning would train, before it trains
        handed["model"] = model
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "train_model", capture)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(clip_run.path, tmp_path / "x", {"data": "digits"}, recipe="none", quiet=True)
    got, src = handed["model"].state_dict(), clip_run.model.visual.state_dict()
    assert set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) for k in src if not k.startswith("head."))  # the tower, exactly
    assert got["head.weight"].shape == (10, src["head.weight"].shape[1])  # a new 10-class head
    assert tower_run.metrics["top1"] > 0.15  # and it trains (chance 0.1; 3 short epochs)


@pytest.mark.parametrize("technique", ["lora", "quantize", "tome", "export"])
def test_image_tower_takes_classification_techniques(technique, clip_run, tower_run, tmp_path):
    """DataComp on the rest of vitkit: the tower of a CLIP run works with every classification-side
    technique: LoRA fine-tuning, post-training quantization, ToMe token merging, ONNX export."""
    if technique == "lora":
        from vitkit.stages.finetune import finetune

        run = finetune(clip_run.path, tmp_path / "lora", {"data": "digits", "epochs": 2, "batch_size": 64,
                       "lr": 5e-3, "threads": 1, "tensorboard": False}, peft="lora", quiet=True)  # fmt: skip
        assert run.metrics["trainable_fraction"] < 0.5 and run.metrics["top1"] > 0.2
    elif technique == "quantize":
        from vitkit.stages.quantize import quantize_run

        metrics, _ = quantize_run(tower_run.path, tmp_path / "q", w_bits=8, a_bits=8)
        assert abs(metrics["quant_top1"] - tower_run.metrics["top1"]) < 0.05, metrics
    elif technique == "tome":
        from vitkit.stages.compress import reduce_tokens_run

        result = reduce_tokens_run(tower_run.path, tmp_path / "tome", method="tome", r=2, quiet=True)
        assert abs(result.metrics["top1"] - tower_run.metrics["top1"]) < 0.1
    else:
        from vitkit.stages.export import export_run

        doc = export_run(tower_run.path, images=64).doc
        assert doc["max_abs_logit_diff"] < 1e-4, doc


def test_data_splits_of_pairs(pool):
    from vitkit.data import load_splits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = load_splits(f"imagetext:{pool}", val_fraction=0.25, seed=3, img_size=16)
    assert len(s.train) == 900 and len(s.val) == 300 and s.train.images.shape[-1] == 16
    assert not set(s.train.targets.tolist()) & set(s.val.targets.tolist())


def test_vitamin_is_an_image_tower(pool, tmp_path):
    """ViTamin (conv stages, then a ViT) trains in the image-text task; its transformer stage's
    attention is vitkit's, so attention maps come out of the image tower of the CLIP run."""
    import vitkit
    from vitkit.models.attention import attention_maps

    cfg = clip_config(
        f"imagetext:{pool}", model="vitkit_vitamin_nano_16", epochs=2, train_size=256, val_size=64
    )
    run = train_model(cfg, tmp_path / "vitamin", quiet=True)
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    loaded = vitkit.load(tmp_path / "vitamin")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), attention_maps(loaded.visual) as maps:
        emb = loaded(x)
    assert torch.allclose(emb, run.model.eval()(x), atol=1e-6)
    assert maps.layers == [0, 1] and maps[1].shape[-2:] == (16, 16)  # 2 blocks over the 4x4 token grid


@pytest.mark.slow
def test_ddp_on_shards_ends_with_identical_weights(pool, tmp_path):
    """torchrun, 2 processes on shards (each takes every other sample of the stream; the CLIP loss
    gathers both processes' embeddings): the run completes and both processes hold the same weights."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    uri = f"shards:{pool.parent}/shards/pool-{{00000..00002}}.tar"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitkit", "train", "--task", TASK, "--data", uri, "--model", "vitkit_nano_p4_16", "--epochs", "1",
           "--batch-size", "32", "--no-tensorboard", "--quiet", "--threads", "1", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from vitkit.io import read_json

    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2
    a, b = metrics["weight_checksums"]
    assert a == b


def test_train_samples_fixes_the_samples_seen(pool):
    """DataComp's fixed recipe: --train-samples resamples any training split to that many per epoch."""
    from vitkit.data import load_splits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = load_splits(f"imagetext:{pool}", val_fraction=0.5, img_size=16, train_samples=1000)
        streamed = load_splits(
            f"shards:{pool.parent}/shards/pool-{{00000..00002}}.tar", img_size=16, train_samples=1000
        )
    assert len(small.train) == 1000 and small.description["train_unique"] == 600
    counts = torch.bincount(small.train.targets)
    assert set(counts[counts > 0].tolist()) <= {1, 2}  # every pair once, 400 of them twice
    assert len(set(small.train.targets.tolist())) == 600
    assert len(streamed.train) == 1000 and streamed.description["train_samples"] == 1000


def test_a_tampered_text_tower_is_refused_in_one_line(clip_run, tmp_path):
    import shutil

    import vitkit

    run = tmp_path / "run"
    shutil.copytree(clip_run.path, run)
    doc = json.loads((run / "model.json").read_text())
    doc["head"]["layers"] = 1000
    (run / "model.json").write_text(json.dumps(doc))
    with pytest.raises(VitkitError, match=r"model.json 'head': option 'layers'"):
        vitkit.load(run)
