"""load_int8_program refuses .pt2 archives that would make torch.export.load run code (issue 25, item 1).

Each crafted archive starts from a genuine torch.export.save of a tiny module; one entry is rewritten
so that torch.export.load would run the attacker's code (create a marker file). The refusal must come
before torch reads the archive: the marker must not exist afterwards. For the pickle paths the test
also checks that plain torch.export.load does create the marker, so the archive really is an exploit.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from vitkit.errors import VitkitError

pytest.importorskip("torchao")  # load_int8_program registers torchao's lowerings first


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("shift", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.shift + torch.tensor([1.0, 2.0])  # a lifted tensor constant too


class _Touch:
    """Unpickling it opens (creates) ``path``: what an attacker's payload would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def genuine() -> tuple[bytes, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(4, 3)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    with torch.no_grad():
        return buf.getvalue(), x, model(x)


def _rewrite(data: bytes, edit: Callable[[dict[str, bytes]], None]) -> bytes:
    """The archive with its entries (names without the root folder) changed by ``edit``."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        entries = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    edit(entries)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in entries.items():
            zf.writestr(f"{root}/{name}", payload)
    return out.getvalue()


def _json_edit(entry: str, change: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def edit(entries: dict[str, bytes]) -> None:
        doc = json.loads(entries[entry])
        change(doc)
        entries[entry] = json.dumps(doc).encode()

    return edit


def _pickled_weight(marker: Path):
    def edit(entries: dict[str, bytes]) -> None:
        _json_edit(
            "data/weights/model_weights_config.json",
            lambda d: d["config"]["lin.weight"].update(use_pickle=True),
        )(entries)
        name = json.loads(entries["data/weights/model_weights_config.json"])["config"]["lin.weight"][
            "path_name"
        ]
        entries[f"data/weights/{name}"] = pickle.dumps(_Touch(marker))

    return edit


def _pickled_constant(marker: Path):
    def edit(entries: dict[str, bytes]) -> None:
        _json_edit(
            "data/constants/model_constants_config.json",
            lambda d: next(iter(d["config"].values())).update(use_pickle=True),
        )(entries)
        name = next(
            iter(json.loads(entries["data/constants/model_constants_config.json"])["config"].values())
        )
        entries[f"data/constants/{name['path_name']}"] = pickle.dumps(_Touch(marker))

    return edit


def _opaque_constant(marker: Path):
    def edit(entries: dict[str, bytes]) -> None:
        # opaque_obj_* constants go to pickle.loads whatever their use_pickle flag says
        def change(d: dict) -> None:
            meta = next(iter(d["config"].values()))
            meta["path_name"] = "opaque_obj_0"
            meta["use_pickle"] = True  # so that torch does not first read it as a raw tensor

        _json_edit("data/constants/model_constants_config.json", change)(entries)
        entries["data/constants/opaque_obj_0"] = pickle.dumps(_Touch(marker))

    return edit


def _sample_inputs(marker: Path):
    def edit(entries: dict[str, bytes]) -> None:
        # torch retries a failed weights_only load of the sample inputs with weights_only=False
        entries["data/sample_inputs/model.pt"] = pickle.dumps(_Touch(marker))

    return edit


def _guards_code(marker: Path):
    return _json_edit(
        "models/model.json", lambda d: d.update(guards_code=[f"open({str(marker)!r}, 'w') is not None"])
    )


def _sym_expr(marker: Path):
    def change(d: dict) -> None:
        # the first symbolic size of the graph becomes Python code for sympy.sympify's eval
        text = json.dumps(d)
        evil = f"__import__('builtins').open({str(marker)!r}, 'w') and Symbol('s77', integer=True)"
        text = re.sub(r'"expr_str": "[^"]*"', lambda m: json.dumps({"expr_str": evil})[1:-1], text, count=1)
        d.clear()
        d.update(json.loads(text))

    return _json_edit("models/model.json", change)


def _os_target(marker: Path):
    def change(d: dict) -> None:
        node = d["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"

    return _json_edit("models/model.json", change)


def _os_argument(marker: Path):
    def change(d: dict) -> None:
        # an argument deserialized as an operator resolves any torch.* attribute path the same way
        node = next(n for n in d["graph_module"]["graph"]["nodes"] if n["inputs"])
        node["inputs"][0]["arg"] = {"as_operator": "torch.os.system"}

    return _json_edit("models/model.json", change)


def _extra_entry(name: str):
    def make(marker: Path):
        def edit(entries: dict[str, bytes]) -> None:
            entries[name] = pickle.dumps(_Touch(marker))

        return edit

    return make


# (case, how the archive is made hostile, entry named in the error, torch alone runs it)
CASES = [
    ("weight use_pickle", _pickled_weight, r"model_weights_config\.json.*lin\.weight.*use_pickle", True),
    ("constant use_pickle", _pickled_constant, r"model_constants_config\.json.*use_pickle", True),
    ("opaque_obj constant", _opaque_constant, r"data/constants/opaque_obj_0", True),
    ("sample inputs pickle", _sample_inputs, r"data/sample_inputs/model\.pt.*weights_only=True", True),
    ("guards_code", _guards_code, r"models/model\.json.*guards_code", True),
    ("sympy expr", _sym_expr, r"models/model\.json.*symbolic expression", True),
    ("node target", _os_target, r"models/model\.json.*torch\.os\.system", False),
    ("operator argument", _os_argument, r"models/model\.json.*torch\.os\.system", False),
    ("legacy weights .pt", _extra_entry("data/weights/model.pt"), r"data/weights/model\.pt", False),
    ("raw .pkl entry", _extra_entry("data/evil.pkl"), r"data/evil\.pkl", False),
    (
        "aotinductor",
        _extra_entry("data/aotinductor/model/model.so"),
        r"data/aotinductor/model/model\.so",
        False,
    ),
]


@pytest.mark.parametrize(("case", "make", "message", "torch_runs_it"), CASES, ids=[c[0] for c in CASES])
def test_hostile_pt2_refused_before_torch_reads_it(genuine, tmp_path, case, make, message, torch_runs_it):
    from vitkit.deploy.x86 import load_int8_program

    marker = tmp_path / "pwned"
    path = tmp_path / "model_int8_x86.pt2"
    path.write_bytes(_rewrite(genuine[0], make(marker)))
    with pytest.raises(VitkitError) as err:
        load_int8_program(path, compile=False)
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text
    assert re.search(message, text), text
    assert not marker.exists(), f"{case}: the payload ran before the refusal"
    if torch_runs_it:  # the archive is a real exploit: torch alone runs the payload
        with contextlib.suppress(Exception):  # the payload runs before torch notices anything odd
            torch.export.load(path).module()(genuine[1])  # guards_code runs on the first call
        assert marker.exists(), f"{case}: the crafted archive does not run its payload in torch"


def test_duplicate_entry_refused(genuine, tmp_path):
    from vitkit.deploy.x86 import load_int8_program

    with zipfile.ZipFile(io.BytesIO(genuine[0])) as zf:
        names = zf.namelist()
        entries = [(n, zf.read(n)) for n in names]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for n, payload in [*entries, entries[0]]:
            zf.writestr(n, payload)
    path = tmp_path / "dup.pt2"
    path.write_bytes(out.getvalue())
    with pytest.raises(VitkitError, match="occurs twice"):
        load_int8_program(path, compile=False)


def test_nul_in_an_entry_name_refused(genuine, tmp_path):
    """zipfile cuts a name at NUL (it would see weight_9), torch's reader keeps the whole name."""
    from vitkit.deploy.x86 import load_int8_program

    data = _rewrite(genuine[0], _extra_entry("data/weights/weight_9Z.pkl")(tmp_path / "pwned"))
    assert data.count(b"weight_9Z.pkl") == 2  # local header and central directory
    path = tmp_path / "nul.pt2"
    path.write_bytes(data.replace(b"weight_9Z.pkl", b"weight_9\x00.pkl"))  # same length: offsets hold
    with pytest.raises(VitkitError, match="contains a NUL byte"):
        load_int8_program(path, compile=False)


def test_not_a_zip_is_one_line_error(tmp_path):
    from vitkit.deploy.x86 import load_int8_program

    path = tmp_path / "junk.pt2"
    path.write_bytes(pickle.dumps(_Touch(tmp_path / "pwned")))
    with pytest.raises(VitkitError, match="not a zip archive"):
        load_int8_program(path, compile=False)
    assert not (tmp_path / "pwned").exists()


def test_genuine_and_rewritten_archives_still_load(genuine, tmp_path):
    """The check lets through what torch.export.save writes (also after a harmless zip rewrite)."""
    from vitkit.deploy.x86 import load_int8_program

    data, x, want = genuine
    for name, payload in (("a.pt2", data), ("b.pt2", _rewrite(data, lambda entries: None))):
        path = tmp_path / name
        path.write_bytes(payload)
        with torch.no_grad():
            torch.testing.assert_close(load_int8_program(path, compile=False)(x), want, rtol=0, atol=0)
            assert load_int8_program(path, compile=False)(x[:1]).shape == (1, 2)  # dynamic batch kept
