"""Grouping cells by (perturbation, context, batch), matched control pools and train/validation splits."""

from __future__ import annotations

import numpy as np
import pytest

from perturbdiff_scvi.data import FALLBACK_ORDER, CellGroups, control_pool, group_cells, split_groups

CONTROL = 0


def _codes(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, n), rng.integers(0, 3, n), rng.integers(0, 2, n)


def _all_members(groups) -> np.ndarray:
    return np.concatenate(list(groups.members.values())) if groups.members else np.array([], dtype=np.int64)


@pytest.mark.parametrize("include_controls", [True, False])
def test_groups_pure_and_cover_rows_once(include_controls):
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL, include_controls=include_controls)
    for (p, c, b), members in groups.members.items():
        assert len(members) > 0
        assert np.all(pert[members] == p) and np.all(ctx[members] == c) and np.all(batch[members] == b)
    rows = _all_members(groups)
    assert len(rows) == len(np.unique(rows))
    expected = np.arange(len(pert)) if include_controls else np.flatnonzero(pert != CONTROL)
    np.testing.assert_array_equal(np.sort(rows), expected)
    assert groups.n_cells == len(expected)
    has_control_group = any(k[0] == CONTROL for k in groups.keys)
    assert has_control_group == include_controls
    assert set(groups.keys) == set(groups.controls) == set(groups.fallback)


def test_control_pools_are_matched():
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    for (_, c, b), pool in groups.controls.items():
        assert groups.fallback[(_, c, b)] == "matched"
        expected = np.flatnonzero((pert == CONTROL) & (ctx == c) & (batch == b))
        assert len(expected) > 0
        np.testing.assert_array_equal(np.sort(pool), expected)


def test_rows_subset_groups_only_those_rows_but_pools_use_all_controls():
    pert, ctx, batch = _codes()
    rows = np.arange(0, 300, 3)
    groups = group_cells(pert, ctx, batch, CONTROL, include_controls=False, rows=rows)
    members = _all_members(groups)
    np.testing.assert_array_equal(np.sort(members), rows[pert[rows] != CONTROL])
    for (_, c, b), pool in groups.controls.items():
        np.testing.assert_array_equal(np.sort(pool), np.flatnonzero((pert == CONTROL) & (ctx == c) & (batch == b)))


def _fallback_case(control_cells: list[tuple[int, int]]):
    """Perturbed cells (code 1) at (ctx 0, batch 0) plus control cells at the given (ctx, batch)."""
    pert = [1, 1, 1] + [CONTROL] * len(control_cells)
    ctx = [0, 0, 0] + [c for c, _ in control_cells]
    batch = [0, 0, 0] + [b for _, b in control_cells]
    return np.array(pert), np.array(ctx), np.array(batch)


@pytest.mark.parametrize(
    "controls,level,pool",
    [
        ([(0, 0), (0, 1), (1, 0)], "matched", [3]),
        ([(0, 1), (0, 1), (1, 0), (1, 1)], "same_context", [3, 4]),  # same context preferred over same batch
        ([(1, 0), (1, 1), (2, 0)], "same_batch", [3, 5]),
        ([(1, 1), (2, 1)], "all_controls", [3, 4]),
    ],
)
def test_fallback_order(controls, level, pool):
    pert, ctx, batch = _fallback_case(controls)
    groups = group_cells(pert, ctx, batch, CONTROL, include_controls=False)
    assert groups.keys == [(1, 0, 0)]
    assert groups.fallback[(1, 0, 0)] == level
    np.testing.assert_array_equal(np.sort(groups.controls[(1, 0, 0)]), pool)
    rows, lvl = control_pool(pert, ctx, batch, CONTROL, 0, 0)
    assert lvl == level
    np.testing.assert_array_equal(np.sort(rows), pool)
    assert FALLBACK_ORDER == ("matched", "same_context", "same_batch", "all_controls")


def test_no_controls_raises():
    pert, ctx, batch = np.array([1, 2, 3]), np.array([0, 0, 1]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="There are no control cells at all"):
        group_cells(pert, ctx, batch, CONTROL)
    with pytest.raises(ValueError, match="There are no control cells at all"):
        control_pool(pert, ctx, batch, CONTROL, 0, 0)


def _split_check(groups, train, val):
    tr, va = _all_members(train), _all_members(val)
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.sort(_all_members(groups)))
    for part in (train, val):
        for k, members in part.members.items():
            assert len(members) > 0
            np.testing.assert_array_equal(part.controls[k], groups.controls[k])
            assert part.fallback[k] == groups.fallback[k]
    for k in groups.keys:
        got = np.concatenate(
            [train.members.get(k, np.array([], dtype=np.int64)), val.members.get(k, np.array([], dtype=np.int64))]
        )
        np.testing.assert_array_equal(np.sort(got), np.sort(groups.members[k]))


@pytest.mark.parametrize("split", ["set", "cell", "group"])
@pytest.mark.parametrize("validation_size", [0.2, 0.5])
def test_split_no_leak_and_union(split, validation_size):
    pert, ctx, batch = _codes(600)
    groups = group_cells(pert, ctx, batch, CONTROL)
    train, val = split_groups(groups, validation_size, split=split, set_size=4, rng=np.random.default_rng(0))
    _split_check(groups, train, val)
    assert val.n_cells > 0 and train.n_cells > 0


def test_set_split_moves_whole_sets():
    pert, ctx, batch = _codes(600)
    groups = group_cells(pert, ctx, batch, CONTROL)
    s = 5
    train, val = split_groups(groups, 0.3, split="set", set_size=s, rng=np.random.default_rng(1))
    n_blocks = {k: len(m) // s for k, m in groups.members.items()}
    n_val_blocks = 0
    for k in groups.keys:
        n_val = len(val.members.get(k, []))
        assert n_val % s == 0  # whole sets only
        assert n_val // s <= max(n_blocks[k] - 1, 0)  # never a group's only (or first) block
        assert len(train.members[k]) >= min(len(groups.members[k]), s)  # every group keeps training cells
        n_val_blocks += n_val // s
    n_candidates = sum(max(n - 1, 0) for n in n_blocks.values())
    assert n_val_blocks == min(round(0.3 * sum(n_blocks.values())), n_candidates)
    assert n_val_blocks > 0
    # a group with a single block stays entirely in training
    small = CellGroups({(1, 0, 0): np.arange(7)}, {(1, 0, 0): np.array([10])}, {(1, 0, 0): "matched"})
    tr, va = split_groups(small, 0.5, split="set", set_size=5, rng=np.random.default_rng(0))
    assert va.n_cells == 0 and tr.n_cells == 7


def test_cell_split_keeps_a_training_cell_per_group():
    pert, ctx, batch = _codes(600)
    groups = group_cells(pert, ctx, batch, CONTROL)
    train, val = split_groups(groups, 0.9, split="cell", rng=np.random.default_rng(2))
    assert set(train.keys) == set(groups.keys)
    for k, members in groups.members.items():
        assert len(val.members.get(k, [])) == min(round(0.9 * len(members)), len(members) - 1)


def test_group_split_keeps_groups_whole():
    pert, ctx, batch = _codes(600)
    groups = group_cells(pert, ctx, batch, CONTROL)
    train, val = split_groups(groups, 0.25, split="group", rng=np.random.default_rng(3))
    assert set(train.keys).isdisjoint(val.keys)
    assert set(train.keys) | set(val.keys) == set(groups.keys)
    assert len(val.keys) == round(0.25 * len(groups.keys))
    for part in (train, val):
        for k, members in part.members.items():
            np.testing.assert_array_equal(members, groups.members[k])
    # never everything in validation
    train, val = split_groups(groups, 0.99, split="group", rng=np.random.default_rng(3))
    assert len(train.keys) >= 1


@pytest.mark.parametrize("split", ["set", "cell", "group"])
def test_zero_validation_size(split):
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    train, val = split_groups(groups, 0.0, split=split, set_size=4, rng=np.random.default_rng(0))
    assert val.n_cells == 0 and val.keys == []
    assert train.n_cells == groups.n_cells


def test_split_is_seeded():
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    a = split_groups(groups, 0.3, split="cell", rng=np.random.default_rng(7))[1]
    b = split_groups(groups, 0.3, split="cell", rng=np.random.default_rng(7))[1]
    assert a.keys == b.keys and all(np.array_equal(a.members[k], b.members[k]) for k in a.keys)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation_size": 1.0}, r"validation_size must be in \[0, 1\); got 1\.0"),
        ({"validation_size": -0.1}, r"validation_size must be in \[0, 1\); got -0\.1"),
        ({"validation_size": 0.2, "split": "bogus"}, r"split must be 'set', 'cell' or 'group'; got 'bogus'"),
    ],
)
def test_split_invalid_arguments(kwargs, match):
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    with pytest.raises(ValueError, match=match):
        split_groups(groups, rng=np.random.default_rng(0), **kwargs)
