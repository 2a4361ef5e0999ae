"""DataLoader workers start under any launcher: a non-standard default start method (a joblib worker's loky
context) is replaced by a standard one."""

from __future__ import annotations

import multiprocessing

import pytest

from latentdyn.data import workers


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver", None])
def test_the_default_context_is_kept_when_it_is_standard(monkeypatch, method) -> None:
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: method)
    assert workers.worker_context(2) is None


def test_a_loky_default_is_replaced_and_no_workers_need_no_context(monkeypatch) -> None:
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "loky")
    ctx = workers.worker_context(1)
    assert ctx is not None and ctx.get_start_method() in workers.STANDARD_METHODS
    assert workers.worker_context(0) is None
