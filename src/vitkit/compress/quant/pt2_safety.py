"""Inspect a ``.pt2`` archive before ``torch.export.load`` opens it.

``torch.export.load`` (torch 2.14) is documented as unsafe for untrusted files, and it is: an archive
can make it run code in several ways, all of which are decided by the archive's own contents
(read in ``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py`` and
``torch/export/_unlift.py``):

* a weight or constant whose entry in ``data/weights/<model>_weights_config.json`` /
  ``data/constants/<model>_constants_config.json`` says ``"use_pickle": true`` is read with
  ``torch.load(weights_only=False)``;
* a constant stored under ``custom_obj_*`` (``torch._C._pickle_load_obj``) or ``opaque_obj_*``
  (``pickle.loads``);
* legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` files and the sample inputs
  ``data/sample_inputs/<model>.pt`` go through ``deserialize_torch_artifact``, which retries with
  ``torch.load(weights_only=False)`` when the weights-only load fails;
* ``data/aotinductor/`` holds compiled shared libraries that are loaded (native code);
* the graph (``models/<model>.json``): every symbolic shape ``expr_str`` is parsed with
  ``sympy.sympify`` (which calls ``eval``), ``guards_code`` lines are ``exec``-ed by ``.module()``,
  and a node ``target`` can name any attribute path under ``torch``/``operator``/``math`` (e.g.
  ``torch.os.system``), which the program then calls.

vitkit only loads what ``vitkit quantize --deploy torch-x86`` writes, so the check is an allow-list
of that layout: raw tensor payloads, JSON, and a sample-inputs file that loads with
``weights_only=True``. Everything else is refused with a :class:`VitkitError` naming the file and the
entry. The caller must hand torch the same bytes that were inspected (no second read of the path).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import PurePosixPath
from typing import Any

import torch

from vitkit.errors import VitkitError

MODEL = "model"  # the only program name torch.export.save writes (and the one torch.export.load returns)

# Entries (relative to the archive's root folder) that torch.export.save writes for one program.
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    f"models/{MODEL}.json",
    f"data/weights/{MODEL}_weights_config.json",
    f"data/constants/{MODEL}_constants_config.json",
    f"data/sample_inputs/{MODEL}.pt",
}
_WEIGHT = re.compile(r"weight_\d+")
_TENSOR = re.compile(r"tensor_\d+")
_EXTRA = re.compile(r"extra/[\w.-]+")  # read by torch as text only

# Graph node targets: operator overloads of these namespaces, and the symbolic-size helpers that an
# export with a dynamic batch can contain. Anything else could be an arbitrary callable.
_OP_NAMESPACES = {"aten", "prims", "quantized_decomposed", "quantized", "onednn", "torchao"}
_OP_TARGET = re.compile(r"torch\.ops\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_OTHER_TARGETS = {
    f"_operator.{n}"
    for n in (
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "truediv",
        "mod",
        "neg",
        "pow",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "not_",
    )
} | {
    f"torch.{n}"
    for n in (
        "sym_float",
        "sym_int",
        "sym_max",
        "sym_min",
        "sym_not",
        "sym_ite",
        "sym_sqrt",
        "_sym_sqrt",
        "sym_sum",
    )
}

# Symbolic shape expressions go to sympy.sympify, i.e. eval: allow only tokens that cannot reach
# anything but sympy's arithmetic (no attribute access, subscripts, braces, or free-form strings).
_SYM_TOKEN = re.compile(
    r"\s+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|'[a-z]{1,3}\d+'|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|==|!=|<=|>=|[-+*/%(),<>=]"
)
_SYM_SYMBOL = re.compile(r"[a-z]{1,3}\d+")  # s0, s77, u0, ...
_SYM_NAMES = {
    # sympy constructors and torch.utils._sympy.functions names that torch itself serializes
    "Symbol",
    "Integer",
    "Float",
    "Rational",
    "Max",
    "Min",
    "Mod",
    "Abs",
    "floor",
    "ceiling",
    "sqrt",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "And",
    "Or",
    "Not",
    "Piecewise",
    "oo",
    "True",
    "False",
    "FloorDiv",
    "ModularIndexing",
    "Where",
    "PythonMod",
    "CleanDiv",
    "CeilToInt",
    "FloorToInt",
    "CeilDiv",
    "LShift",
    "RShift",
    "PowByNatural",
    "FloatPow",
    "FloatTrueDiv",
    "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat",
    "TruncToInt",
    "RoundToInt",
    "RoundDecimal",
    "ToFloat",
    "Identity",
    "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or",
    # Symbol(...) assumptions
    "positive",
    "negative",
    "nonnegative",
    "nonpositive",
    "integer",
    "real",
    "finite",
    "nonzero",
    "commutative",
}


def _refuse(path: object, entry: str, why: str) -> VitkitError:
    return VitkitError(
        f"'{path}': refusing to load entry '{entry}': {why} (expected a {MODEL} program "
        "written by vitkit quantize --deploy torch-x86: raw tensors and JSON only)"
    )


def _entries(data: bytes, path: object) -> tuple[zipfile.ZipFile, str, list[str]]:
    """The zip, its single root folder and the entry names under it (as torch's reader sees them)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise VitkitError(f"'{path}' is not a torch.export program (not a zip archive: {e})") from None
    for info in infos:
        if info.orig_filename != info.filename:
            # zipfile cuts names at a NUL byte; torch's reader does not: they would disagree on it
            raise _refuse(path, repr(info.orig_filename), "the entry name contains a NUL byte")
    names = [i.filename for i in infos]
    if not names:
        raise VitkitError(f"'{path}' is not a torch.export program (empty archive)")
    # Python's zipfile and torch's reader could pick different copies of a duplicated name.
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _refuse(path, dup, "the name occurs twice in the archive")
    root = names[0].split("/", 1)[0]
    rel = []
    for n in names:
        parts = PurePosixPath(n).parts
        if "/" not in n or n.split("/", 1)[0] != root or ".." in parts or n.startswith("/") or "\\" in n:
            raise _refuse(path, n, f"outside the archive's root folder '{root}/'")
        rel.append(n.split("/", 1)[1])
    return zf, root, rel


def _payload_config(
    zf: zipfile.ZipFile, root: str, entry: str, prefix: re.Pattern, path: object, present: set[str]
) -> None:
    try:
        config = json.loads(zf.read(f"{root}/{entry}"))["config"]
        items = config.items()
    except Exception as e:  # bad JSON, missing key, wrong type: all one kind of user error
        raise _refuse(path, entry, f"not a payload config ({type(e).__name__})") from None
    folder = entry.rsplit("/", 1)[0]
    for fqn, meta in items:
        if not isinstance(meta, dict):
            raise _refuse(path, entry, f"'{fqn}' is not an object")
        name = meta.get("path_name")
        if not isinstance(name, str) or not prefix.fullmatch(name):
            # custom_obj_* / opaque_obj_* constants are pickles too
            raise _refuse(
                path, entry, f"'{fqn}' points to '{name}', expected a raw tensor file {prefix.pattern}"
            )
        if meta.get("use_pickle") is not False:
            # torch reads such a payload with torch.load(weights_only=False): arbitrary code
            raise _refuse(path, entry, f"'{fqn}' is flagged use_pickle (a pickled payload)")
        if f"{folder}/{name}" not in present:
            raise _refuse(path, entry, f"'{fqn}' points to '{name}', which is missing")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(path, entry, f"'{fqn}' has no tensor_meta")


def _walk(obj: Any, found: list[tuple[str, Any]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("target", "as_operator", "expr_str"):
                found.append((k, v))
            _walk(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, found)


def _check_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in _OTHER_TARGETS:
        return True
    m = _OP_TARGET.fullmatch(target)
    return bool(m) and m.group(1) in _OP_NAMESPACES and not any(g.startswith("__") for g in m.groups())


def _check_sym_expr(expr: Any) -> bool:
    if not isinstance(expr, str) or len(expr) > 10_000:
        return False
    pos = 0
    while pos < len(expr):
        m = _SYM_TOKEN.match(expr, pos)
        if m is None:
            return False
        tok = m.group()
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _SYM_NAMES and not _SYM_SYMBOL.fullmatch(tok):
            return False
        pos = m.end()
    return True


def _check_program(zf: zipfile.ZipFile, root: str, entry: str, path: object) -> None:
    try:
        program = json.loads(zf.read(f"{root}/{entry}"))
        guards = program.get("guards_code", [])
    except Exception as e:
        raise _refuse(path, entry, f"not a serialized program ({type(e).__name__})") from None
    if guards:
        # ExportedProgram.module() exec()s these lines as Python code
        raise _refuse(path, entry, f"guards_code is not empty ({len(guards)} lines of Python code)")
    found: list[tuple[str, Any]] = []
    _walk(program, found)
    for key, value in found:
        if key in ("target", "as_operator") and not _check_target(value):
            raise _refuse(path, entry, f"node target {str(value)[:80]!r} is not an allowed operator")
        if key == "expr_str" and not _check_sym_expr(value):
            # sympy.sympify evaluates the string with eval()
            raise _refuse(
                path, entry, f"symbolic expression {str(value)[:80]!r} is not a plain size expression"
            )


def check_pt2_archive(data: bytes, path: object) -> None:
    """Raise :class:`VitkitError` unless ``data`` (the bytes of ``path``) is a ``.pt2`` that
    ``torch.export.load`` can open without unpickling, loading native code or evaluating Python."""
    zf, root, rel = _entries(data, path)
    present = set(rel)
    for name in rel:
        folder, _, base = name.rpartition("/")
        ok = (
            name in _FIXED
            or (folder == "data/weights" and _WEIGHT.fullmatch(base))
            or (folder == "data/constants" and _TENSOR.fullmatch(base))
            or _EXTRA.fullmatch(name)
        )
        if not ok:
            raise _refuse(
                path,
                name,
                "not a raw tensor or JSON entry of a single-program archive "
                "(pickles, compiled libraries and other programs are not loaded)",
            )
    for required in (
        f"models/{MODEL}.json",
        f"data/weights/{MODEL}_weights_config.json",
        f"data/constants/{MODEL}_constants_config.json",
        f"data/sample_inputs/{MODEL}.pt",
    ):
        if required not in present:
            raise VitkitError(f"'{path}' is not a torch.export program (missing entry '{required}')")
    _payload_config(zf, root, f"data/weights/{MODEL}_weights_config.json", _WEIGHT, path, present)
    _payload_config(zf, root, f"data/constants/{MODEL}_constants_config.json", _TENSOR, path, present)
    sample = f"data/sample_inputs/{MODEL}.pt"
    try:
        # torch tries weights_only=True first and falls back to a full unpickle when it fails:
        # only an archive whose sample inputs pass the weights-only load is handed to torch.
        torch.load(io.BytesIO(zf.read(f"{root}/{sample}")), weights_only=True)  # exactly torch's call
    except Exception as e:
        raise _refuse(path, sample, f"does not load with weights_only=True ({type(e).__name__})") from None
    _check_program(zf, root, f"models/{MODEL}.json", path)
