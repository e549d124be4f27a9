"""SetBatchSampler: [P1, C1, P2, C2, ...] layout, purity, matched controls, padding, seeding; plus a
hypothesis property test of grouping -> split -> sampling."""

from __future__ import annotations

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None


from perturbdiff_scvi.data import CellGroups, SetBatchSampler, group_cells, split_groups

CONTROL = 0


def _codes(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, n), rng.integers(0, 3, n), rng.integers(0, 2, n)


def _key_of(groups) -> dict[int, tuple]:
    return {int(r): k for k, members in groups.members.items() for r in members}


def _check_batches(batches, groups, set_size, sets_per_batch):
    """Layout, purity and control matching of one epoch; returns the perturbed rows served."""
    key_of = _key_of(groups)
    served = []
    for rows in batches:
        assert isinstance(rows, list) and all(isinstance(r, int) for r in rows)
        assert len(rows) % (2 * set_size) == 0
        n_sets = len(rows) // (2 * set_size)
        assert 1 <= n_sets <= sets_per_batch
        blocks = np.asarray(rows).reshape(n_sets, 2, set_size)
        for p_block, c_block in blocks:
            keys = {key_of.get(int(r)) for r in p_block}
            assert len(keys) == 1 and None not in keys, "perturbed block must be one group's members"
            (key,) = keys
            assert np.isin(c_block, groups.controls[key]).all(), "controls must come from the group's pool"
            served.extend(p_block.tolist())
    return served


@pytest.mark.parametrize("set_size,sets_per_batch", [(4, 3), (8, 1), (5, 100)])
def test_layout_purity_controls_and_len(set_size, sets_per_batch):
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    sampler = SetBatchSampler(groups, set_size, sets_per_batch, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    served = _check_batches(batches, groups, set_size, sets_per_batch)
    n_sets = sum(-(-len(m) // set_size) for m in groups.members.values())
    assert len(served) == n_sets * set_size
    assert sum(len(b) for b in batches) == 2 * n_sets * set_size
    assert all(len(b) == 2 * set_size * sets_per_batch for b in batches[:-1])
    # every member of every group is served at least once per epoch; padding repeats only own cells
    assert set(served) == set(_all_rows(groups))
    # controls are control cells
    for rows in batches:
        blocks = np.asarray(rows).reshape(-1, 2, set_size)
        assert (pert[blocks[:, 1]] == CONTROL).all()
        for p_block, c_block in blocks:
            assert (ctx[c_block] == ctx[p_block[0]]).all() and (batch[c_block] == batch[p_block[0]]).all()


def _all_rows(groups) -> np.ndarray:
    return np.concatenate(list(groups.members.values()))


def test_small_group_is_padded_with_its_own_cells():
    members = {(1, 0, 0): np.array([10, 11, 12]), (2, 0, 0): np.arange(20, 36)}
    controls = {(1, 0, 0): np.array([0, 1]), (2, 0, 0): np.array([2, 3, 4])}
    groups = CellGroups(members, controls, dict.fromkeys(members, "matched"))
    sampler = SetBatchSampler(groups, set_size=8, sets_per_batch=1, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 1 + 2
    small = [np.asarray(b[:8]) for b in batches if b[0] in (10, 11, 12)]
    assert len(small) == 1
    block = small[0]
    assert set(block.tolist()) == {10, 11, 12}  # all own cells, padded with repeats of them only
    assert len(block) == 8
    ctrl = [np.asarray(b[8:]) for b in batches if b[0] in (10, 11, 12)][0]
    assert set(ctrl.tolist()) <= {0, 1}
    big = [np.asarray(b[:8]) for b in batches if b[0] >= 20]
    assert sorted(np.concatenate(big).tolist()) == list(range(20, 36))  # exact multiple: no padding


def test_same_seed_reproduces_epoch():
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    a = list(SetBatchSampler(groups, 4, 3, seed=5))
    b = list(SetBatchSampler(groups, 4, 3, seed=5))
    c = list(SetBatchSampler(groups, 4, 3, seed=6))
    assert a == b
    assert a != c


def test_fixed_replays_and_unfixed_changes():
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    fixed = SetBatchSampler(groups, 4, 3, seed=5, fixed=True)
    assert list(fixed) == list(fixed) == list(fixed)
    moving = SetBatchSampler(groups, 4, 3, seed=5)
    e0, e1 = list(moving), list(moving)
    assert e0 != e1
    assert e0 == list(fixed)  # epoch 0 of a seeded sampler is the fixed epoch
    assert list(SetBatchSampler(groups, 4, 3, seed=None)) != list(SetBatchSampler(groups, 4, 3, seed=None))


@pytest.mark.parametrize("set_size,sets_per_batch", [(0, 1), (4, 0), (-1, 2)])
def test_invalid_sizes(set_size, sets_per_batch):
    groups = group_cells(*_codes(), CONTROL)
    with pytest.raises(ValueError, match=rf"must be >= 1; got {set_size} and {sets_per_batch}\."):
        SetBatchSampler(groups, set_size, sets_per_batch)


def test_empty_groups_yield_nothing():
    sampler = SetBatchSampler(CellGroups(), 4, 2, seed=0)
    assert len(sampler) == 0
    assert list(sampler) == []


if given is not None:

    @st.composite
    def _scenario(draw):
        n_ctx, n_batch = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        keys = draw(
            st.lists(
                st.tuples(st.integers(1, 4), st.integers(0, n_ctx - 1), st.integers(0, n_batch - 1)),
                min_size=1,
                max_size=6,
                unique=True,
            )
        )
        sizes = draw(st.lists(st.integers(1, 25), min_size=len(keys), max_size=len(keys)))
        # control cells: a random subset of (ctx, batch) cells, at least one somewhere
        ctrl_cells = draw(
            st.lists(
                st.tuples(st.integers(0, n_ctx - 1), st.integers(0, n_batch - 1), st.integers(1, 6)),
                min_size=1,
                max_size=4,
            )
        )
        pert, ctx, batch = [], [], []
        for (p, c, b), n in zip(keys, sizes, strict=True):
            pert += [p] * n
            ctx += [c] * n
            batch += [b] * n
        for c, b, n in ctrl_cells:
            pert += [CONTROL] * n
            ctx += [c] * n
            batch += [b] * n
        order = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(pert))
        return (
            np.asarray(pert)[order],
            np.asarray(ctx)[order],
            np.asarray(batch)[order],
            draw(st.integers(1, 8)),
            draw(st.integers(1, 4)),
            draw(st.sampled_from(["set", "cell", "group"])),
            draw(st.sampled_from([0.0, 0.2, 0.5, 0.8])),
            draw(st.booleans()),
            draw(st.integers(0, 1000)),
        )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_scenario())
    def test_property_purity_matching_no_leak(scenario):
        pert, ctx, batch, set_size, sets_per_batch, split, val_size, include_controls, seed = scenario
        groups = group_cells(pert, ctx, batch, CONTROL, include_controls=include_controls)
        for (p, c, b), members in groups.members.items():
            assert (pert[members] == p).all() and (ctx[members] == c).all() and (batch[members] == b).all()
            pool, level = groups.controls[(p, c, b)], groups.fallback[(p, c, b)]
            assert len(pool) and (pert[pool] == CONTROL).all()
            expected = {
                "matched": (ctx == c) & (batch == b),
                "same_context": ctx == c,
                "same_batch": batch == b,
                "all_controls": np.ones_like(ctx, dtype=bool),
            }[level] & (pert == CONTROL)
            np.testing.assert_array_equal(np.sort(pool), np.flatnonzero(expected))
        train, val = split_groups(groups, val_size, split=split, set_size=set_size, rng=np.random.default_rng(seed))
        tr = _all_rows(train) if train.keys else np.array([], dtype=np.int64)
        va = _all_rows(val) if val.keys else np.array([], dtype=np.int64)
        assert len(np.intersect1d(tr, va)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.sort(_all_rows(groups)))
        if split == "set":
            assert all(len(m) % set_size == 0 for m in val.members.values())
        if split != "group":  # set and cell splits leave training cells in every group
            assert set(train.keys) == set(groups.keys)
        served = {}
        for name, part in (("train", train), ("val", val)):
            sampler = SetBatchSampler(part, set_size, sets_per_batch, seed=seed)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            served[name] = set(_check_batches(batches, part, set_size, sets_per_batch))
            assert served[name] == set(_all_rows(part).tolist() if part.keys else [])
        assert served["train"].isdisjoint(served["val"])

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_purity_matching_no_leak():
        pass


# ------------------------------------------------------------------------------------- sharding over processes
def _perturbed_sets(batches, set_size):
    return [tuple(b) for rows in batches for b in np.asarray(rows).reshape(-1, 2, set_size)[:, 0].tolist()]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fixed", [False, True])
def test_sharded_sets_are_disjoint_equal_and_from_the_shared_epoch(world, fixed):
    pert, ctx, batch = _codes()
    groups = group_cells(pert, ctx, batch, CONTROL)
    full = SetBatchSampler(groups, 4, 3, seed=5, fixed=fixed)
    epochs_full = [_perturbed_sets(list(full), 4) for _ in range(2)]
    shards = [SetBatchSampler(groups, 4, 3, seed=5, fixed=fixed, num_replicas=world, rank=r) for r in range(world)]
    for epoch in range(2):
        per_rank = []
        for sampler in shards:
            batches = list(sampler)
            assert len(batches) == len(sampler) == sampler.n_batches(world) == full.n_batches(world)
            _check_batches(batches, groups, 4, 3)
            per_rank.append(_perturbed_sets(batches, 4))
        assert len({len(sets) for sets in per_rank}) == 1 and len(per_rank[0]) == full.n_sets // world
        # Rank r serves sets r, r + world, ... of the epoch every rank draws from the shared seed.
        kept = epochs_full[epoch][: full.n_sets - full.n_sets % world]
        for r, sets in enumerate(per_rank):
            assert sets == kept[r::world]
        assert sorted(s for sets in per_rank for s in sets) == sorted(kept)  # disjoint, nothing lost but the rest
    assert len(full) == full.n_batches(1)


def test_shard_arguments_checked():
    groups = group_cells(*_codes(), CONTROL)
    with pytest.raises(ValueError, match="both num_replicas and rank"):
        SetBatchSampler(groups, 4, 3, seed=0, num_replicas=2)
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        SetBatchSampler(groups, 4, 3, seed=0, num_replicas=2, rank=2)
    unseeded = SetBatchSampler(groups, 4, 3, seed=None, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="seed shared by all"):
        list(unseeded)
    assert SetBatchSampler(groups, 4, 3, seed=0).shard() == (0, 1)  # no process group: one process
