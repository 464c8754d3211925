"""Property tests of the data loaders: whatever is on disk, loading ends in a dataset or in one
VitkitError (one line), never in another exception (issue 25).

Inputs are random bytes as image files (plus real images with bytes flipped or cut off, which reach
deeper into PIL's decoders than pure noise), random CSV text and bytes, and random npz shapes, dtypes
and values. Each example gets a fresh directory; hypothesis's database replays failures.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vitkit.data import ImageDataset, load_splits
from vitkit.data.sources import IMAGE_EXTENSIONS, load_csv, load_folder, load_npz
from vitkit.errors import VitkitError

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def outcome(load: Callable[[], object]) -> object | VitkitError:
    """Run a loader; return its result or its VitkitError. Any other exception fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load()
        except VitkitError as e:
            msg = str(e)
            # splitlines: also \v, \f, \x1c-\x1e, \x85, \u2028/9 (a terminal or log reader may break there)
            assert len(msg.splitlines()) == 1 and msg.strip(), repr(msg)
            return e
    for w in caught:  # our own warnings are one line too (the CLI prints each as one line)
        if w.category.__module__.startswith("vitkit"):
            assert len(str(w.message).splitlines()) == 1, repr(str(w.message))
    return result


def check_dataset(d: ImageDataset) -> None:
    assert d.images.dtype.is_floating_point is False and d.images.ndim == 4 and len(d) > 0
    assert d.images.shape[1] in (1, 3) and len(d.targets) == len(d)
    if d.multilabel:
        assert d.targets.shape[1] == d.num_classes and bool(((d.targets == 0) | (d.targets == 1)).all())
    else:
        assert int(d.targets.min()) >= 0 and int(d.targets.max()) < d.num_classes


def _encoded(fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    shape = (6, 5) if mode == "L" else (6, 5, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


VALID = [_encoded(f, m) for f in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM") for m in ("L", "RGB")]


@st.composite
def damaged_image(draw: st.DrawFn) -> bytes:
    """Noise, or a real encoded image truncated and/or with some bytes overwritten."""
    if rarely(draw, 3):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@SETTINGS
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "line\u2028break"]),  # names reach messages: one line still
            st.sampled_from(["", "\n", "\x0b"]),
            st.sampled_from(sorted(IMAGE_EXTENSIONS)),
            damaged_image(),
        ),
        min_size=1,
        max_size=6,
    ),
    good_per_class=st.integers(0, 2),
    strict=st.booleans(),
    img_size=st.sampled_from([None, 8]),
)
def test_folder_of_random_files_loads_or_fails_in_one_line(files, good_per_class, strict, img_size):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for cls in ("a", "b"):
            (root / cls).mkdir()
            for j in range(good_per_class):
                (root / cls / f"good{j}.png").write_bytes(VALID[0])
        for i, (cls, odd, ext, data) in enumerate(files):
            (root / cls).mkdir(exist_ok=True)
            (root / cls / f"f{i}{odd}{ext}").write_bytes(data)
        got = outcome(lambda: load_folder(str(root), img_size=img_size, strict=strict))
        if not isinstance(got, VitkitError):
            check_dataset(got["all"])
            if img_size is not None:
                split = outcome(lambda: load_splits(f"folder:{root}", img_size=img_size, strict=strict))
                if not isinstance(split, VitkitError):
                    assert len(split.train) > 0 and len(split.val) > 0


def rarely(draw: st.DrawFn, one_in: int) -> bool:
    # A middle value: hypothesis favours the ends of a range (and its first choice), which would make
    # "rare" branches the common ones.
    return draw(st.sampled_from(range(one_in))) == one_in // 2


_CELL = st.one_of(
    st.sampled_from(
        [
            *(
                "good.png",
                "good.png",
                "a",
                "b",
                "a|b",
                "0",
                "1",
                "2",
                "",
                " ",
                "nan",
                "-1",
                "1e400",
                "x;y",
                "|",
            ),
            *("\u2028", "a\x0bb", "[/x]"),  # line breaks other than \n; rich markup
        ]
    ),
    st.text(max_size=8),
)
_LAYOUTS = [["path", "label"], ["file", "labels"], ["image", "cat", "dog"], ["Path", "Label", "extra"]]


@st.composite
def csv_bytes(draw: st.DrawFn) -> bytes:
    """CSV-like text, mostly in a valid layout with odd cells, sometimes ragged, in Latin-1 or raw bytes."""
    if rarely(draw, 10):
        return draw(st.binary(max_size=200))
    if rarely(draw, 6):
        header = draw(
            st.lists(
                st.one_of(st.sampled_from(["path", "label", "cat", ""]), st.text(max_size=6)),
                min_size=1,
                max_size=4,
            )
        )
    else:
        header = draw(st.sampled_from(_LAYOUTS))
    width = len(header)
    row = st.tuples(st.just("good.png"), st.lists(_CELL, min_size=width - 1, max_size=width - 1)).map(
        lambda t: [t[0], *t[1]]
    )
    if rarely(draw, 3):  # any cells, any count: a ragged file
        row = st.lists(_CELL, max_size=width + 1)
    rows = [header, *draw(st.lists(row, min_size=1, max_size=6))]
    sep = "," if not rarely(draw, 8) else ";"
    text = "\n".join(sep.join(r) for r in rows) + draw(st.sampled_from(["", "\n", '\n"unclosed']))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


@SETTINGS
@given(data=csv_bytes(), strict=st.booleans())
def test_random_csv_loads_or_fails_in_one_line(data, strict):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "good.png").write_bytes(VALID[0])
        (root / "a").write_bytes(b"not an image")  # a path that exists but is no image
        (root / "d.csv").write_bytes(data)
        got = outcome(lambda: load_csv(str(root / "d.csv"), img_size=8, strict=strict))
        if not isinstance(got, VitkitError):
            check_dataset(got)
            outcome(lambda: load_splits(f"csv:{root / 'd.csv'}", img_size=8, strict=strict))


_DTYPES = st.sampled_from(
    [np.uint8, np.int8, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_, np.complex64, "U2"]
)


def _array(shape_st: st.SearchStrategy) -> st.SearchStrategy:
    """Arrays of any listed dtype; floats include NaN, inf and values far outside [0, 1]."""
    return _DTYPES.flatmap(lambda dt: hnp.arrays(dt, shape_st))


@st.composite
def npz_bytes(draw: st.DrawFn) -> bytes:
    if rarely(draw, 10):  # not an npz at all, or a damaged one
        junk = draw(st.binary(max_size=200))
        return draw(st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY"])) + junk
    n = draw(st.sampled_from(range(7)))
    x_shape = draw(
        st.one_of(
            st.sampled_from([(n, 4, 4), (n, 4, 4, 3), (n, 1, 4, 4), (n, 3, 5, 2), (n, 4, 4, 1), (n, 0, 4)]),
            hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
        )
    )
    y_shape = draw(
        st.one_of(
            st.sampled_from([(n,), (n, 2), (n, 3), (n, 0), (n + 1,)]),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        )
    )
    # Mostly well-typed, so the checks after the dtype checks (ranges, NaN, 0/1, classes) are reached.
    unit = st.one_of(st.floats(0, 1, width=32), st.sampled_from([float("nan"), float("inf"), 1.5, 255.0]))
    x = draw(
        st.one_of(
            hnp.arrays(np.uint8, x_shape), hnp.arrays(np.float32, x_shape, elements=unit), _array(x_shape)
        )
    )
    y = draw(
        st.one_of(
            hnp.arrays(np.int64, y_shape, elements=st.integers(-1, 3)),
            hnp.arrays(np.float32, y_shape, elements=st.sampled_from([0.0, 1.0, 0.5, float("nan")])),
            _array(y_shape),
        )
    )
    arrays = {"x": x, "y": y}
    if draw(st.booleans()):
        arrays["classes"] = draw(
            st.one_of(
                hnp.arrays("U3", st.sampled_from([(1,), (2,), (3,), (4,), (2, 2), ()])),
                hnp.arrays(np.int64, st.sampled_from([(2,), (3,)])),
            )
        )
    if rarely(draw, 8):
        del arrays[draw(st.sampled_from(["x", "y"]))]
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    data = buf.getvalue()
    if rarely(draw, 8):  # a damaged archive
        data = data[: draw(st.integers(0, len(data)))]
    return data


@SETTINGS
@given(data=npz_bytes())
def test_random_npz_loads_or_fails_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        path.write_bytes(data)
        got = outcome(lambda: load_npz(str(path)))
        if not isinstance(got, VitkitError):
            check_dataset(got)
            split = outcome(lambda: load_splits(f"npz:{path}"))
            if not isinstance(split, VitkitError):
                assert len(split.train) > 0 and len(split.val) > 0


def test_outcome_helper_rejects_other_exceptions_and_multiline_errors():
    """The property above can fail: a stray exception or a two-line VitkitError is caught."""
    with pytest.raises(ZeroDivisionError):
        outcome(lambda: 1 / 0)
    with pytest.raises(AssertionError):
        outcome(lambda: (_ for _ in ()).throw(VitkitError("two\nlines")))
