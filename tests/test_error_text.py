"""Issue 25 item 8: upstream error text is shortened at a sentence or word, and a file-system error
during an ONNX export is not blamed on the exporter."""

from __future__ import annotations

import collections

import pytest
import torch

from vitkit.errors import VitkitError, upstream_reason


def test_upstream_reason_cuts_at_a_sentence_or_a_word():
    long = (
        "Weights only load failed. This file can still be loaded, to do so you have two options, do "
        "those steps only if you trust the source of the checkpoint. In PyTorch 2.6 the default changed"
    )
    assert upstream_reason(RuntimeError(long), 30) == "Weights only load failed."
    # a sentence end too early to keep enough of the text: cut at a word, marked
    assert upstream_reason(RuntimeError(long), 100).endswith("two options, do those…")
    assert upstream_reason(RuntimeError(long)).endswith("source of the checkpoint.")
    words = RuntimeError(" ".join(["unsupported"] * 40))
    got = upstream_reason(words, 60)
    assert got.endswith("…") and len(got) <= 61
    assert all(w == "unsupported" for w in got[:-1].split())  # no word cut in half
    assert upstream_reason(RuntimeError("\n\n  short one\nmore")) == "short one"


def test_an_unloadable_checkpoint_names_the_reason_in_whole_words(tmp_path):
    from vitkit.train.checkpoint import load_checkpoint

    p = tmp_path / "checkpoint.pt"
    # An OrderedDict subclass is refused by weights_only=True with a paragraph-long message.
    torch.save({"version": 1, "x": _Foreign()}, p)
    with pytest.raises(VitkitError) as info:
        load_checkpoint(p)
    msg = str(info.value)
    assert msg.startswith(f"'{p}' is not a readable vitkit checkpoint (")
    reason = msg.split(" checkpoint (", 1)[1][:-1]
    assert reason.endswith((".", "…")) and len(reason) <= 161, reason


class _Foreign(collections.OrderedDict):
    pass


def test_export_blames_the_file_system_not_the_exporter(tmp_path):
    from vitkit.deploy.onnx import export_onnx
    from vitkit.models import create_model, model_input_size

    model = create_model("vitkit_nano_p4_16", num_classes=10)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VitkitError) as info:
        export_onnx(model, tmp_path / "file.txt" / "model.onnx", model_input_size(model))
    assert str(info.value).startswith(f"cannot write '{tmp_path}/file.txt/model.onnx': ")
    assert "ONNX export" not in str(info.value)
