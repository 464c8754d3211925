"""The technique registry: one registration per technique, and everything derived from it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from vitkit.errors import VitkitError
from vitkit.registry import (
    ExportRule,
    Technique,
    check_order,
    known_train_transforms,
    known_transforms,
    markdown_table,
    parse_config,
    register,
    technique,
    techniques,
    unregister,
)

ROOT = Path(__file__).resolve().parents[1]
# Registrations without a single paper, and why (everything else must cite "Title (year)").
NO_PAPER = {
    "prune_structured": "vitkit's own importance-based head/channel pruning baseline",
    "quantize": "one transform for several papers' quantizers; each method module cites its own",
}
ALL = known_transforms()


def test_every_manifest_name_is_registered_once_with_its_module():
    # the names runs made by earlier vitkit versions carry (the old central table): all still load
    legacy = {"gmm", "ewa", "ewa_merge", "stem", "attention_temperature", "dist_token", "lora", "lora-qv",
              "vpt", "dvpt", "explora", "tome", "evit", "exits", "repavit", "repavit_reparam",
              "prune_structured", "lpvit", "dimap", "linear_attention", "quantize"}  # fmt: skip
    assert legacy <= set(ALL)
    for t in techniques():
        assert t.module.startswith("vitkit."), t
        assert technique(t.name) is t


@pytest.mark.parametrize("name", ALL)
def test_registration_is_complete(name):
    t = technique(name)
    assert t.summary and len(t.summary) < 110 and not t.summary.endswith(".")
    assert t.family and t.verb
    if name in NO_PAPER:
        assert not t.paper
    else:
        assert re.search(r'".+" \((19|20)\d\d\)$', t.paper), f"{name}: cite 'Author, \"Title\" (year)'"
    assert callable(t.replay_fn())
    assert isinstance(t.export, ExportRule)
    if t.export.prepare is not None:
        assert callable(t.export.resolve())
    assert t.quantize is None or (isinstance(t.quantize, str) and t.quantize)
    for r in t.requires:
        technique(r)
    if t.config is None:
        assert t.requires, f"{name}: only a follow-up step (requires=...) may have no options"
    else:
        assert issubclass(t.config, BaseModel) or dataclasses.is_dataclass(t.config)
        defaults = parse_config(t.config, {}, name)  # every option has a usable default
        assert isinstance(defaults, t.config)
        with pytest.raises(
            VitkitError, match=rf"{re.escape(name)}: unknown option 'no_such_option' \(known: "
        ):
            parse_config(t.config, {"no_such_option": 1}, name)
        for field, _, _, _ in t.config_fields():
            assert field.isidentifier()


def test_parse_config_converts_and_names_the_field():
    tome = technique("tome")
    assert parse_config(tome.config, {"r": "3", "prop_attn": "false"}, "tome").r == 3
    with pytest.raises(VitkitError, match=r"tome: option 'prop_attn'.*'maybe'"):
        parse_config(tome.config, {"prop_attn": "maybe"}, "tome")
    gmm = technique("gmm")
    with pytest.raises(VitkitError, match=r"gmm: option 'k'"):
        parse_config(gmm.config, {"k": "many"}, "gmm")


def test_train_transforms_come_from_the_registrations():
    assert set(known_train_transforms()) >= {"gmm", "ewa", "stem"}
    assert all(technique(n).train is not None for n in known_train_transforms())


def test_unknown_name_and_order():
    with pytest.raises(
        VitkitError,
        match=r"transform .nope., which this vitkit does not know \(known: attention_temperature, dimap",
    ):
        technique("nope")
    check_order(["repavit", "repavit_reparam"])
    with pytest.raises(VitkitError, match=r"'repavit_reparam' needs repavit applied before it"):
        check_order(["repavit_reparam"])


def test_a_name_registered_twice_from_two_modules_is_a_bug():
    t = Technique(name="test_dup", summary="x", replay="a.b:c", export=ExportRule(), module="tests.one")
    register(t)
    try:
        register(t)  # the same module again (a re-import): fine
        with pytest.raises(ValueError, match="registered twice"):
            register(dataclasses.replace(t, module="tests.two"))
    finally:
        unregister("test_dup")


def test_docs_table_is_generated_from_the_registrations():
    text = (ROOT / "docs/techniques.md").read_text()
    assert markdown_table() in text, (
        "docs/techniques.md is stale: regenerate with `vitkit techniques --markdown`"
    )


def test_registry_imports_no_torch_and_discovers_everything():
    code = (
        "import sys, vitkit.registry as r; assert 'torch' not in sys.modules, 'registry imported torch';"
        "print(','.join(r.known_transforms()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == ALL
