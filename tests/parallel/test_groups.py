"""ParallelLayout validation (torch only; process groups are exercised in cpu_checks.py and the
4-rank launch of tests/models)."""

from __future__ import annotations

import pytest

from megarl.parallel.groups import ParallelLayout, free_port


def test_layout_sizes():
    layout = ParallelLayout(tp=2, pp=2, vpp=2)
    assert layout.model_parallel_size == 4 and layout.num_chunks == 2
    assert layout.data_parallel_size(8) == 2
    assert ParallelLayout().num_chunks == 1
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp = 2\\*2"):
        layout.data_parallel_size(6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=0), "tp must be an int >= 1"),
        (dict(pp=1.5), "pp must be an int >= 1"),
        (dict(pp=2, vpp=1), "vpp must be None or an int >= 2"),
        (dict(vpp=2), "needs pp >= 2"),
        (dict(sequence_parallel=True), "needs tp >= 2"),
    ],
)
def test_layout_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


def test_free_port():
    assert 0 < free_port() < 65536
