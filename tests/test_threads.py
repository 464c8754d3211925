"""The torch thread choice (vitkit.threads): a table of cores / load / parameters / env → threads."""

from __future__ import annotations

import pytest
import torch

from vitkit.threads import ThreadChoice, choose_threads, set_threads_for

M = 1_000_000


@pytest.mark.parametrize(
    ("params", "cores", "load", "requested", "env", "threads", "source"),
    [
        (300_000, 2, 1.3, None, {}, 1, "auto"),  # the demo's model on a busy 2-core machine
        (300_000, 2, 0.0, None, {}, 1, "auto"),  # small: 1 even on an idle machine
        (300_000, 16, 0.0, None, {}, 1, "auto"),
        (4_999_999, 8, 0.0, None, {}, 1, "auto"),
        (5 * M, 8, 0.0, None, {}, 8, "auto"),  # large and idle: every core
        (22 * M, 2, 1.3, None, {}, 1, "auto"),  # 2 - 1.3 = 0.7 → 1
        (22 * M, 2, 0.4, None, {}, 2, "auto"),  # 1.6 → 2
        (22 * M, 2, 5.0, None, {}, 1, "auto"),  # overloaded: at least 1
        (22 * M, 16, 3.6, None, {}, 12, "auto"),
        (22 * M, 4, None, None, {}, 4, "auto"),  # no load average (Windows): all cores
        (None, 4, 1.0, None, {}, 3, "auto"),  # unknown model size: the free cores
        (22 * M, 2, 0.0, 3, {"OMP_NUM_THREADS": "4"}, 3, "requested"),  # --threads wins over everything
        (300_000, 2, 1.9, 2, {}, 2, "requested"),
        (300_000, 2, 0.0, None, {"OMP_NUM_THREADS": "2"}, 2, "OMP_NUM_THREADS"),
        (22 * M, 8, 0.0, None, {"OMP_NUM_THREADS": "3"}, 3, "OMP_NUM_THREADS"),
        (22 * M, 8, 0.0, None, {"OMP_NUM_THREADS": "junk"}, 8, "auto"),  # ignored, as torch does
        (22 * M, 8, 0.0, None, {"OMP_NUM_THREADS": "0"}, 8, "auto"),
    ],
)
def test_choose_threads_table(params, cores, load, requested, env, threads, source):
    c = choose_threads(params, cores=cores, load=load, requested=requested, env=env)
    assert (c.threads, c.source) == (threads, source)


def test_describe_is_one_line():
    line = ThreadChoice(1, "auto", 2, 1.26, 300_000).describe()
    assert line == "threads: 1 (2 cores, load 1.3, model 0.3 M params)"
    assert "from --threads" in ThreadChoice(3, "requested", 2, 0.1, None).describe()


def test_set_threads_for_applies_and_prints_once(monkeypatch, capsys):
    import vitkit.threads as th

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "_announced", None)
    before = torch.get_num_threads()
    try:
        small = torch.nn.Linear(10, 10)
        assert set_threads_for(small).threads == 1 and torch.get_num_threads() == 1
        set_threads_for(small)  # the same choice again: not printed again
        assert set_threads_for(small, 2, quiet=True).threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert err.count("threads: 1 (") == 1 and "threads: 2" not in err
