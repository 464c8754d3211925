"""The retrieval task end to end: train on digits, beat random weights, evaluate the saved run, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def retrieval_config(**overrides):
    from vitkit.train import TrainConfig

    base = dict(
        model="vitkit_nano_p4_16",
        data="digits",
        task="retrieval",
        epochs=10,
        batch_size=64,
        lr=3e-3,
        precision="fp32",
        tensorboard=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory) -> Path:
    """vitkit_nano_p4_16 trained 10 epochs on digits with the supervised contrastive loss."""
    from vitkit.api import train_model

    out = tmp_path_factory.mktemp("runs") / "retrieval"
    train_model(retrieval_config(), out, quiet=True)
    return out


def random_weights_map_at_r(digits, seed: int, task_spec: str = "retrieval") -> float:
    from vitkit.models import create_model
    from vitkit.tasks import get_task

    task = get_task(task_spec)
    torch.manual_seed(seed)
    model = create_model("vitkit_nano_p4_16", num_classes=task.options.bits or 0)
    return task.evaluate(model, digits.val)["map_at_r"]


@pytest.mark.slow
def test_trained_embedding_beats_random_weights(retrieval_run, digits):
    """Random nano features give mAP@R ~0.06 on digits' validation split; ten epochs of the
    contrastive loss give ~0.5."""
    from vitkit.runs import read_metrics

    m = read_metrics(retrieval_run)
    random = max(random_weights_map_at_r(digits, s) for s in (0, 1, 2))
    assert random < 0.15
    assert m["map_at_r"] > random + 0.25, (m["map_at_r"], random)
    assert m["recall_at_1"] > 0.55 and m["recall_at_1"] <= m["recall_at_5"] <= m["recall_at_10"]
    assert m["search"] == "cosine" and m["dim"] == 32 and m["queries"] == len(digits.val)
    assert (retrieval_run / "recall_at_k.png").is_file() and not (
        retrieval_run / "confusion_matrix.png"
    ).exists()
    doc = json.loads((retrieval_run / "model.json").read_text())
    assert doc["task"] == "retrieval" and doc["base"]["kwargs"]["num_classes"] == 0


@pytest.mark.slow
def test_evaluate_run_reproduces_training_metrics(retrieval_run, tmp_path):
    from vitkit.api import evaluate_run
    from vitkit.runs import load, read_metrics

    model = load(retrieval_run)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 32)  # the pre-logits features
    metrics, out = evaluate_run(retrieval_run, output=tmp_path / "eval")
    train = read_metrics(retrieval_run)
    for k in ("map_at_r", "r_precision", "recall_at_1", "recall_at_5", "recall_at_10"):
        assert metrics[k] == pytest.approx(train[k], abs=1e-6), k
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "recall_at_k.png"]


@pytest.mark.slow
def test_hash_codes_from_a_trained_embedding_search_by_hamming(retrieval_run, tmp_path, digits):
    """A 16-bit hash head on the trained embedding run's backbone (build_head swaps timm's head and
    keeps the manifest true), trained with the tanh continuation: Hamming search on sign codes beats
    random-weight codes. (From scratch, nano hash training waits on a seed-dependent plateau.)"""
    from vitkit.api import train_model
    from vitkit.runs import load
    from vitkit.tasks import get_task

    task = get_task("retrieval:bits=16")
    model = task.build_head(load(retrieval_run), 16)
    model.train()
    cfg = retrieval_config(task="retrieval:bits=16", epochs=4)
    run = train_model(cfg, tmp_path / "hash", model=model, quiet=True)
    m = run.metrics
    assert m["search"] == "hamming" and m["dim"] == 16 and m["task"] == "retrieval:bits=16"
    random = max(random_weights_map_at_r(digits, s, "retrieval:bits=16") for s in (0, 1, 2))
    assert m["map_at_r"] > random + 0.2, (m["map_at_r"], random)
    loaded = load(tmp_path / "hash")  # rebuilt from model.json: the 16-wide head
    assert loaded.vitkit_run.task == "retrieval:bits=16"
    again = get_task(loaded.vitkit_run.task).evaluate(loaded, digits.val)
    assert again["map_at_r"] == pytest.approx(m["map_at_r"], abs=1e-6)
    sig = task.export_signature(loaded).to_dict()
    assert sig["outputs"][0]["name"] == "code_logits" and sig["outputs"][0]["shape"] == ("B", 16)
    assert "Hamming" in sig["postprocess"]


def test_export_signatures_name_inputs_and_outputs():
    from vitkit.models import create_model
    from vitkit.tasks import get_task

    model = create_model("vitkit_nano_p4_16", num_classes=10)
    cls = get_task("classification").export_signature(model)
    assert cls.inputs[0].name == "image" and cls.inputs[0].shape == ("B", 3, 16, 16)
    assert cls.outputs[0].name == "logits" and cls.outputs[0].shape == ("B", 10)
    emb = get_task("retrieval:embed_dim=8").export_signature(create_model("vitkit_nano_p4_16", num_classes=8))
    assert emb.outputs[0].name == "embedding" and emb.outputs[0].shape == ("B", 8)


def test_task_specs_are_canonical_and_validated():
    from vitkit.errors import VitkitError
    from vitkit.tasks import get_task, known_tasks
    from vitkit.train import TrainConfig

    assert {"classification", "multilabel", "retrieval"} <= set(known_tasks())
    assert get_task("multiclass").name == "classification"  # model.json of older runs
    assert get_task("retrieval:temperature=0.1,bits=8").spec == "retrieval:bits=8"
    assert TrainConfig(task="multiclass").task == "classification"
    for bad, message in [
        ("detection3d", "unknown task 'detection3d'"),
        ("retrieval:bits=8,embed_dim=4", "not both"),
        ("retrieval:bitz=8", "unknown field 'bitz'"),
        ("retrieval:bits", "not key=value"),
    ]:
        with pytest.raises(VitkitError, match=message):
            get_task(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--task", "retrieval", "--data", "mosaic:digits"],
            "task 'retrieval' cannot train on 'mosaic:digits'",
        ),
        (["--task", "multilabel", "--data", "digits"], "task 'multilabel' cannot train on 'digits'"),
        (["--task", "retrieval", "--mixup", "0.2"], "mixup/cutmix blend labels"),
        (["--task", "retrieval", "--loss", "ce"], "drop --loss ce"),
        (["--task", "video"], "unknown task 'video'"),
    ],
)
def test_bad_task_options_fail_in_one_line(bad_input, tmp_path, argv, message):
    bad_input(
        ["train", "-o", tmp_path / "r", "--model", "vitkit_nano_p4_16", "--epochs", "1", *argv],
        message,
        workdir=tmp_path,
    )


@pytest.mark.slow
def test_cli_train_and_evaluate_retrieval(tmp_path, capsys):
    from vitkit.cli import main

    out = tmp_path / "r"
    argv = ["train", "--task", "retrieval", "--data", "digits", "-o", str(out)]
    argv += ["--model", "vitkit_nano_p4_16", "--epochs", "2", "--precision", "fp32", "--no-tensorboard", "-q"]
    assert main(argv) == 0
    text = capsys.readouterr()
    assert "map_at_r" in text.out + text.err
    assert main(["evaluate", str(out)]) == 0
    text = capsys.readouterr()
    assert "recall_at_10" in text.out + text.err and "recall_at_k.png" in text.out + text.err
    assert json.loads((out / "eval-digits" / "metrics.json").read_text())["task"] == "retrieval"
