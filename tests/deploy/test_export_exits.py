"""`vitkit export` on an LGViT early-exit run: the full-path graph plus one ONNX graph per exit."""

from __future__ import annotations

import pytest
import torch

from vitkit.cli import main
from vitkit.compress.exits import ExitPath, early_exit_forward
from vitkit.deploy import OnnxModel
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.runs import load


@pytest.fixture(scope="module")
def exits_run(tmp_path_factory):
    from vitkit.stages.compress import train_with_exits
    from vitkit.train import TrainConfig

    # exits after 1 block (conv head) and 3 blocks (global attention head, stride 2) of 4
    cfg = TrainConfig(model="vitkit_micro_p4_16", data="digits", epochs=6, batch_size=64, lr=2e-3,
                      warmup_epochs=1, tensorboard=False)  # fmt: skip
    out = tmp_path_factory.mktemp("exits") / "ex"
    train_with_exits(cfg, out, exits=[1, 3], distill_epochs=1, quiet=True)
    return out


def test_export_writes_and_validates_every_exit(exits_run, capsys):
    code = main(["export", str(exits_run), "--images", "359"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = read_json(exits_run / "export.json")
    assert doc["max_abs_logit_diff"] < 1e-4
    rows = {e["blocks"]: e for e in doc["exits"]}
    assert sorted(rows) == [1, 3] and [rows[1]["head"], rows[3]["head"]] == ["local", "global"]
    metrics = read_json(exits_run / "metrics.json")
    for k, e in rows.items():
        assert (exits_run / e["file"]).is_file()
        assert e["max_abs_logit_diff"] < 1e-4 and e["bound"] == 1e-4
        # a trained exit (chance 0.1), identical predictions in onnxruntime, the run's own exit accuracy
        assert e["top1_onnx"] == e["top1_pytorch"] > 0.5
        assert e["top1_pytorch"] == pytest.approx(metrics["exit_top1"][str(k)], abs=1e-6)
    # the exit-1 graph holds one block, not the whole backbone
    assert rows[1]["size_bytes"] < 0.6 * doc["size_bytes"]
    # dynamic batch; exit 1 equals early exit at threshold 0 (everything leaves at the first head)
    model = load(exits_run)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = early_exit_forward(model, x, 0.0).logits
    assert (OnnxModel(exits_run / rows[1]["file"], threads=1)(x) - ref).abs().max() < 1e-4


def test_a_wrong_exit_graph_fails_and_leaves_nothing(exits_run, tmp_path, monkeypatch):
    import shutil

    from vitkit.stages.export import export_run

    run = tmp_path / "copy"
    shutil.copytree(exits_run, run)
    for f in run.glob("*.onnx"):
        f.unlink()
    (run / "export.json").unlink(missing_ok=True)
    forward = ExitPath.forward
    monkeypatch.setattr(
        ExitPath, "forward", lambda self, x: forward(self, x) + 1e-2 * (self.blocks_before == 3)
    )
    with pytest.raises(
        VitkitError, match=r"exit after 3 blocks: onnxruntime logits differ from PyTorch by 1\.00e-02"
    ):
        export_run(run, images=32)
    assert not list(run.glob("*.onnx")) and not (run / "export.json").exists()


def test_exit_path_refuses_a_missing_exit(exits_run):
    with pytest.raises(VitkitError, match=r"no exit after 2 blocks \(exits: \[1, 3\]\)"):
        ExitPath(load(exits_run), 2)
