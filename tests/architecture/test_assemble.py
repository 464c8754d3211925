"""Deep Model Assembling: the split and the module copies are exact, modules train only themselves,
the assembled model is the modules' blocks, the stage runs end to end (and under torchrun shares the
modules out), resumes complete phases, and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.stages.assemble import Split, assemble, copy_module, hybrid_split, split_depth

QUICK = {"model": "vitkit_micro_p4_16", "data": "digits", "batch_size": 64, "lr": 3e-3, "threads": 1,
         "tensorboard": False}  # fmt: skip


def test_split_and_parameter_ownership():
    assert split_depth(8, 4) == (2, 2, 2, 2) and split_depth(7, 3) == (3, 2, 2)
    s = Split((2, 2))
    assert s.module_of("patch_embed.proj.weight") == (0, None)
    assert s.module_of("pos_embed") == (0, None) and s.module_of("cls_token") == (0, None)
    assert s.module_of("blocks.1.attn.qkv.weight") == (0, 1)
    assert s.module_of("blocks.2.mlp.fc1.bias") == (1, 0)
    assert s.module_of("norm.weight") == (1, None) and s.module_of("head.bias") == (1, None)
    assert hybrid_split(Split((2, 2, 2)), 1).depths == (1, 2, 1)
    with pytest.raises(VitkitError, match="--modules 5"):
        split_depth(4, 5)


def test_hybrid_and_assembly_copy_exactly_their_modules():
    target = Split((2, 2))  # micro: 4 blocks
    meta = create_model("vitkit_micro_p4_16", num_classes=10, depth=2)
    hybrids = []
    for k in range(2):
        split = hybrid_split(target, k)
        h = create_model("vitkit_micro_p4_16", num_classes=10, depth=sum(split.depths))
        copy_module(h, split, meta, Split((1, 1)), 1 - k)
        hybrids.append((h, split))
    # hybrid 0 = target module 0 (2 blocks + embeddings) then meta block 1 + norm + head
    h0 = hybrids[0][0].state_dict()
    assert torch.equal(h0["blocks.2.attn.qkv.weight"], meta.state_dict()["blocks.1.attn.qkv.weight"])
    assert torch.equal(h0["head.weight"], meta.state_dict()["head.weight"])
    model = create_model("vitkit_micro_p4_16", num_classes=10)
    for k, (h, split) in enumerate(hybrids):
        copy_module(model, target, h, split, k)
    m, h1 = model.state_dict(), hybrids[1][0].state_dict()
    assert torch.equal(m["pos_embed"], h0["pos_embed"]) and torch.equal(
        m["blocks.1.norm1.weight"], h0["blocks.1.norm1.weight"]
    )
    assert torch.equal(
        m["blocks.2.mlp.fc2.weight"], h1["blocks.1.mlp.fc2.weight"]
    )  # hybrid 1: meta block, then target's
    assert torch.equal(m["blocks.3.attn.proj.bias"], h1["blocks.2.attn.proj.bias"])
    assert torch.equal(m["head.weight"], h1["head.weight"])


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    out = tmp_path_factory.mktemp("asm") / "run"
    report = assemble(QUICK, out, modules=2, meta_epochs=3, module_epochs=2, finetune_epochs=2, quiet=True)
    return out, report


def test_assemble_end_to_end(assembled):
    import vitkit

    out, r = assembled
    assert r["split"] == [2, 2] and r["epochs"] == {"meta": 3, "module": 2, "finetune": 2}
    assert r["top1"] > 0.18, r  # digits, chance 0.1 (0.27 when written: 7 short epochs in all)
    model = vitkit.load(out)  # the run in OUTPUT is the fine-tuned target: a plain 4-block micro ViT
    assert len(model.blocks) == 4
    assert (out / "assemble.json").is_file() and (out / "phases" / "module-1" / "model.json").is_file()
    # a module's training changed only that module: the hybrid's other blocks are the meta model's
    meta = vitkit.load(out / "phases" / "meta").state_dict()
    h1 = vitkit.load(out / "phases" / "module-1").state_dict()
    assert torch.equal(h1["blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.weight"])
    assert torch.equal(h1["patch_embed.proj.weight"], meta["patch_embed.proj.weight"])
    assert not torch.equal(h1["head.weight"], meta["head.weight"])  # module 1 owns the head


def test_assemble_resume_reuses_complete_phases(assembled):
    out, first = assembled
    again = assemble(
        QUICK, out, modules=2, meta_epochs=3, module_epochs=2, finetune_epochs=2, quiet=True, resume=True
    )
    assert (
        again["meta"]["reused"] and all(m["reused"] for m in again["modules"]) and again["finetune"]["reused"]
    )
    assert again["top1"] == first["top1"]


def test_assemble_bad_input(tmp_path, assembled):
    with pytest.raises(VitkitError, match="not a plain timm ViT"):
        assemble({**QUICK, "model": "resnet18"}, tmp_path / "x", modules=2)
    with pytest.raises(VitkitError, match="--modules 9"):
        assemble(QUICK, tmp_path / "y", modules=9)
    with pytest.raises(VitkitError, match="already exists and is not empty"):
        assemble(QUICK, assembled[0], modules=2)


@pytest.mark.slow
def test_torchrun_trains_the_modules_in_parallel_processes(tmp_path):
    import os
    import subprocess
    import sys

    from vitkit.io import read_json

    out = tmp_path / "asm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitkit",
           "assemble", "--model", "vitkit_nano_p4_16", "--modules", "2", "--epochs", "4", "--threads", "1", "-q",
           "-o", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read_json(out / "assemble.json")
    assert r["world_size"] == 2 and all(m is not None for m in r["modules"])
    # each module was trained by one process on its own (not DDP): its run says world size 1
    assert all(
        read_json(out / "phases" / f"module-{k}" / "metrics.json")["world_size"] == 1 for k in range(2)
    )
    assert read_json(out / "metrics.json")["world_size"] == 2  # meta and fine-tuning ran data-parallel
