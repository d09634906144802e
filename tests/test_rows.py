"""The row-count rule and its checks (d2sm_loss.rows), tested as functions: how many rows a
group needs, what each caller does below it, and the one KL formula and reduction that the
function, the module and the queue share."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss.checks import InputSizeError
from d2sm_loss.functional import reduce_rows
from d2sm_loss.ops.reference import kl_from_log_conditionals, log_conditionals
from d2sm_loss.rows import (
    MIN_LOCATIONS,
    LayerRows,
    check_group_rows,
    check_layer_rows,
    check_locations,
    check_pool_locations,
    min_rows,
)


def test_min_rows():
    assert min_rows(True) == 2 and min_rows(False) == 3


@pytest.mark.parametrize("count", [1, 2])
def test_the_function_refuses_too_few_rows_without_the_diagonal(count):
    with pytest.raises(ValueError, match=f"at least 3 rows per group, got N={count}"):
        check_group_rows(count, include_self=False)
    check_group_rows(count, include_self=True)  # computed: 0 for a single row
    check_group_rows(3, include_self=False)


def _rows(count: int, queue_size: int = 0) -> LayerRows:
    rows = LayerRows("4", 1.0, torch.zeros(count, 5), torch.zeros(count, 5), count)
    if queue_size:
        rows.queue = type("Queue", (), {"size": queue_size})()  # only its capacity is read
    return rows


def _check(rows: LayerRows, warned: set[str] | None = None, **options) -> bool:
    options = {"granularity": "image", "include_self": True, "trains": True, "queue_size": 0, **options}
    return check_layer_rows(rows, warned=set() if warned is None else warned, **options)


def test_the_module_rule_per_case():
    assert _check(_rows(2)) and _check(_rows(3), include_self=False)
    assert _check(_rows(1, queue_size=1))  # one row and a queue: the queue fills
    with pytest.raises(InputSizeError, match="2 images per group.*identically 0") as pair:
        _check(_rows(2), include_self=False)
    assert pair.value.remedy == "batch"
    with pytest.raises(InputSizeError, match="identically 0"):  # 1 row + a queue of 1, forever
        _check(_rows(1, queue_size=1), include_self=False, queue_size=1)
    with pytest.raises(InputSizeError, match="single image") as single:
        _check(_rows(1))
    assert single.value.remedy == "batch"
    with pytest.raises(InputSizeError, match="single location") as location:
        _check(_rows(1), granularity="location", trains=False)
    assert location.value.remedy == "image"


def test_a_single_row_outside_training_is_zero_warned_once():
    warned: set[str] = set()
    with pytest.warns(UserWarning, match="nothing to compare, the loss is 0"):
        assert not _check(_rows(1), warned, trains=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _check(_rows(1), warned, trains=False)


def test_pool_locations():
    check_pool_locations((1, 2), include_self=True)
    check_pool_locations((1, 3), include_self=False)
    with pytest.raises(ValueError, match=r"pool_size=\(1, 2\).*identically 0.*at least 3"):
        check_pool_locations((1, 2), include_self=False)
    with pytest.raises(ValueError, match="nothing to compare; use a pool_size of at least 2"):
        check_pool_locations((1, 1), include_self=True)


def test_few_locations_warn_once_per_layer_from_the_minimum():
    warned: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_locations("a", 2, (8, 8), include_self=False, warned=warned)  # below the minimum: an error elsewhere
        check_locations("a", MIN_LOCATIONS, (8, 8), include_self=True, warned=warned)
    with pytest.warns(UserWarning, match="layer 'a' has only 2 locations on 8x8"):
        check_locations("a", 2, (8, 8), include_self=True, warned=warned)
    with pytest.warns(UserWarning, match="layer 'b' has only 3 locations"):
        check_locations("b", 3, (8, 8), include_self=False, warned=warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_locations("a", 5, (8, 8), include_self=True, warned=warned)


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 11)])
def test_the_shared_kl_against_a_float64_sum(shape):
    generator = torch.Generator().manual_seed(0)
    lx, ly = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    columns = torch.rand(shape, generator=generator) > 0.3
    columns[..., 0, :] = False  # a row without columns: 0
    got = kl_from_log_conditionals(log_conditionals(lx, columns), log_conditionals(ly, columns), columns)
    px = torch.where(columns, lx.exp(), 0.0)
    py = torch.where(columns, ly.exp(), 0.0)
    px, py = px / px.sum(-1, keepdim=True), py / py.sum(-1, keepdim=True)
    terms = torch.where(columns, py * (py.log() - px.log()), 0.0)
    want = torch.nan_to_num(terms, nan=0.0).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[..., 0] == 0).all()
    full = kl_from_log_conditionals(log_conditionals(lx), log_conditionals(ly))  # no mask: every column
    pxf, pyf = lx.softmax(-1), ly.softmax(-1)
    torch.testing.assert_close(full, (pyf * (pyf.log() - pxf.log())).sum(-1), rtol=1e-12, atol=1e-12)


def test_reduce_rows():
    rows = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    assert reduce_rows(rows, "none") is rows
    assert reduce_rows(rows, "sum").item() == 10.0
    assert reduce_rows(rows, "mean").item() == 10.0 / 6
    assert reduce_rows(rows, "mean", torch.tensor(4)).item() == 2.5  # unfilled entries do not count
