"""The compression verbs end to end on a trained run, and their bad-input exits (code 2, one line)."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import main
from vitkit.io import read_json


def test_reduce_prune_reparam_compare(trained_run, tmp_path):
    a = str(trained_run)
    assert (
        main(
            [
                "reduce-tokens",
                a,
                "--method",
                "evit",
                "--keep",
                "0.9",
                "--at",
                "1,2",
                "-o",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    assert main(["reduce-tokens", a, "--method", "tome", "--r", "2", "-o", str(tmp_path / "t")]) == 0
    assert main(["prune", a, "--method", "dimap", "--sparsity", "0.3", "-o", str(tmp_path / "d")]) == 0
    e = read_json(tmp_path / "e" / "metrics.json")
    assert e["transforms"] == ["evit"] and e["at"] == [1, 2] and e["top1"] > 0.8
    assert (tmp_path / "t" / "stage.yaml").is_file()
    d = read_json(tmp_path / "d" / "metrics.json")
    assert d["sparsity"] == pytest.approx(0.3, abs=1e-3)
    out = tmp_path / "cmp"
    runs = [a, str(tmp_path / "e"), str(tmp_path / "t"), str(tmp_path / "d")]
    assert main(["compare", *runs, "--repeats", "1", "--batch", "16", "-o", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["transforms"] for r in rows] == [["-"], ["evit"], ["tome"], ["dimap"]]
    assert rows[0]["throughput_ratio"] == 1.0 and "sparse_flops" in rows[3]
    assert rows[2]["flops"] < rows[0]["flops"]  # ToMe runs fewer tokens
    assert (out / "compare.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["reduce-tokens", "RUN", "--keep", "0", "-o", "OUT"], "keep rate must be in (0, 1]"),
        (["reduce-tokens", "RUN", "--keep", "1.5", "-o", "OUT"], "keep rate must be in (0, 1]"),
        (["prune", "RUN", "--heads", "0.9", "-o", "OUT"], "would keep none"),
        (["prune", "RUN", "--heads", "1.0", "-o", "OUT"], "must be in [0, 1)"),
        (["reduce-tokens", "RUN", "--method", "foo", "-o", "OUT"], "expected evit, tome or pvc"),
        (["evaluate", "RUN", "--exit-threshold", "0.9"], "has no exit heads"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(trained_run, tmp_path, capsys, args, message):
    args = [str(trained_run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_tome_r_beyond_the_tokens_is_clamped_with_one_warning_line(trained_run, tmp_path, capsys):
    """As the official ToMe code: r larger than half the patch tokens left is clamped (16 tokens: 8),
    and the CLI says so in one line."""
    out = tmp_path / "t9"
    assert main(["reduce-tokens", str(trained_run), "--method", "tome", "--r", "9", "-o", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "ToMe r clamped" in err and "block 0: 9 -> 8" in err and "Traceback" not in err
    assert (out / "metrics.json").is_file()


def test_train_with_exits_beyond_the_depth(tmp_path, capsys):
    out = tmp_path / "x"
    assert (
        main(["train", "--model", "vitkit_nano_p4_16", "--exits", "2", "--epochs", "1", "-o", str(out)]) == 2
    )
    assert "the model has 2 blocks" in " ".join(capsys.readouterr().err.split())
    assert not out.exists()
