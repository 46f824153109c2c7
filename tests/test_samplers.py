"""ltserve.samplers: each sampler's class distribution against its formula (and against the wrong ones), the
official class-balanced structure, fixed epoch length, seeding, DDP shards."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from ltserve.data import longtail_counts
from ltserve.samplers import (
    ClassBalancedSampler,
    build_sampler,
    class_probabilities,
    progressive_probabilities,
)

COUNTS = longtail_counts(1000, 100, 10)  # [1000, 599, ..., 10], N = 2478
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), COUNTS))
BATCH = 64
EPOCHS = 20  # 20 x 2432 = 48,640 draws per test
# Reject at p < 1e-6: a correct sampler fails by chance once in a million runs; the wrong formulas below exceed
# this threshold by orders of magnitude (checked in every test), so the test has the power to tell them apart.
CRIT = chi2.ppf(1 - 1e-6, df=len(COUNTS) - 1)


def _class_counts(kind: str, *, epoch: int | None = None, total_epochs: int = 1, seed: int = 0) -> np.ndarray:
    """Class histogram of EPOCHS epochs (or EPOCHS draws of one fixed epoch's distribution for pb)."""
    sampler = build_sampler(kind, LABELS, batch_size=BATCH, total_epochs=total_epochs, seed=seed)
    hist = np.zeros(len(COUNTS), dtype=np.int64)
    for e in range(EPOCHS):
        if epoch is None:
            sampler.set_epoch(e)
        else:
            # Same epoch number (same mixing weight) under different seeds: independent draws of one p(t).
            sampler.seed, sampler.epoch = seed * 1000 + e, epoch
        hist += np.bincount(LABELS[sampler.epoch_indices()], minlength=len(COUNTS))
    return hist


def _chi2(hist: np.ndarray, p: np.ndarray) -> float:
    expected = hist.sum() * p
    return float(((hist - expected) ** 2 / expected).sum())


def _assert_matches(hist: np.ndarray, right: np.ndarray, wrong: list[np.ndarray]) -> None:
    stat = _chi2(hist, right)
    assert stat < CRIT, f"chi2 {stat:.1f} >= {CRIT:.1f}: distribution {hist / hist.sum()} != formula {right}"
    for p in wrong:
        stat_wrong = _chi2(hist, p)
        assert stat_wrong > 10 * CRIT, f"the test cannot tell {right} from {p} (chi2 {stat_wrong:.1f})"


P_IB = class_probabilities(COUNTS, 1.0)
P_CB = class_probabilities(COUNTS, 0.0)
P_SR = class_probabilities(COUNTS, 0.5)


def test_class_probabilities_formula():
    assert np.allclose(class_probabilities([4, 1], 0.5), [2 / 3, 1 / 3])
    assert np.allclose(class_probabilities([4, 1], 1.0), [0.8, 0.2])
    assert np.allclose(class_probabilities([4, 0, 1], 0.0), [0.5, 0.0, 0.5])  # an empty class is never drawn
    assert np.allclose(progressive_probabilities([3, 1], 0, 5), [0.75, 0.25])
    assert np.allclose(progressive_probabilities([3, 1], 4, 5), [0.5, 0.5])
    assert np.allclose(progressive_probabilities([3, 1], 2, 5), [0.625, 0.375])
    assert np.allclose(progressive_probabilities([3, 1], 0, 1), [0.75, 0.25])  # T = 1: pure IB


def test_instance_balanced_distribution_and_shuffle():
    _assert_matches(_class_counts("ib"), P_IB, [P_SR, P_CB])
    sampler = build_sampler("ib", LABELS, batch_size=BATCH)
    idx = sampler.epoch_indices()
    assert len(np.unique(idx)) == len(idx)  # a shuffle: no image twice in an epoch
    assert not np.array_equal(idx, np.sort(idx))


def test_square_root_distribution():
    _assert_matches(_class_counts("sr"), P_SR, [P_IB, P_CB])


def test_class_balanced_distribution():
    _assert_matches(_class_counts("cb"), P_CB, [P_SR, P_IB])


@pytest.mark.parametrize("t,total", [(0, 5), (2, 5), (4, 5), (0, 1)])
def test_progressively_balanced_distribution(t, total):
    right = progressive_probabilities(COUNTS, t, total)
    lam = t / (total - 1) if total > 1 else 0.0
    # Wrong formulas: the other end of the schedule, and lambda = t/T (the off-by-one that never reaches CB).
    wrong = [P_CB if lam < 0.5 else P_IB]
    if 0 < lam:
        wrong.append((1 - t / total) * P_IB + (t / total) * P_CB)
    hist = _class_counts("pb", epoch=t, total_epochs=total)
    _assert_matches(hist, right, wrong)
    if t == 0:
        _assert_matches(hist, P_IB, [P_CB])  # first epoch: pure instance-balanced
    if total > 1 and t == total - 1:
        _assert_matches(hist, P_CB, [P_IB])  # last epoch: pure class-balanced


def test_progressive_weights_change_with_set_epoch():
    sampler = build_sampler("pb", LABELS, batch_size=BATCH, total_epochs=3)
    sampler.set_epoch(2)
    assert np.allclose(sampler.current_probabilities(), P_CB)
    sampler.set_epoch(0)
    assert np.allclose(sampler.current_probabilities(), P_IB)


def test_square_root_uniform_within_class():
    labels = np.repeat([0, 1], [6, 3])
    sampler = build_sampler("sr", labels, batch_size=9)
    hits = np.zeros(9, dtype=np.int64)
    for e in range(3000):
        sampler.set_epoch(e)
        hits += np.bincount(sampler.epoch_indices(), minlength=9)
    for members in (np.arange(6), np.arange(6, 9)):
        h = hits[members]
        stat = _chi2(h, np.full(len(h), 1 / len(h)))
        assert stat < chi2.ppf(1 - 1e-6, len(h) - 1)
        skewed = np.linspace(1, 2, len(h)) / np.linspace(1, 2, len(h)).sum()
        assert _chi2(h, skewed) > chi2.ppf(1 - 1e-6, len(h) - 1)


def test_class_balanced_official_structure():
    k = 4
    sampler = ClassBalancedSampler(LABELS, images_per_class=k, batch_size=BATCH, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        idx = sampler.epoch_indices()
        classes = LABELS[idx].reshape(-1, k)
        assert (classes == classes[:, :1]).all(), "each visit takes k consecutive images of one class"
        visits = classes[:, 0]
        for start in range(0, len(visits) - 9, 10):
            # Each pass walks a shuffled list of all 10 classes: no class twice within a pass.
            assert sorted(visits[start:start + 10].tolist()) == list(range(10))
        assert not np.array_equal(visits[:10], np.arange(10))
        # Within a class, images cycle through a shuffled list: the first n_j picks of class j are distinct.
        for j in range(10):
            picks = idx[LABELS[idx] == j]
            first = picks[:COUNTS[j]]
            assert len(np.unique(first)) == len(first)
            assert set(picks) <= set(np.flatnonzero(LABELS == j))
    rare = idx[LABELS[idx] == 9]
    assert len(rare) > COUNTS[9] and len(np.unique(rare)) == COUNTS[9]  # the 10 rare images all cycle


@pytest.mark.parametrize("kind", ["ib", "cb", "sr", "pb"])
def test_epoch_length_seeding_and_iteration(kind):
    sampler = build_sampler(kind, LABELS, batch_size=BATCH, total_epochs=4, seed=1)
    expected = (len(LABELS) // BATCH) * BATCH
    assert len(sampler) == expected == len(sampler.epoch_indices())
    first = list(iter(sampler))  # usable without a DataLoader (stage 2)
    assert first == sampler.epoch_indices().tolist() and all(isinstance(i, int) for i in first[:5])
    assert sampler.batches().shape == (len(LABELS) // BATCH, BATCH)
    assert list(build_sampler(kind, LABELS, batch_size=BATCH, total_epochs=4, seed=1)) == first
    assert list(build_sampler(kind, LABELS, batch_size=BATCH, total_epochs=4, seed=2)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert min(first) >= 0 and max(first) < len(LABELS)


def test_small_data_gets_one_batch():
    sampler = build_sampler("ib", [0, 1, 1], batch_size=8)
    idx = sampler.epoch_indices()
    assert len(idx) == 8 and set(idx.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("kind", ["ib", "cb", "sr", "pb"])
def test_ddp_shards_disjoint_equal_and_covering(kind):
    replicas = 3
    shards = [build_sampler(kind, LABELS, batch_size=16, total_epochs=3, epoch=1, seed=4, num_replicas=replicas,
                            rank=r) for r in range(replicas)]
    steps = len(LABELS) // (16 * replicas)
    whole = shards[0].global_indices()
    assert len(whole) == steps * 16 * replicas
    per_rank = [s.epoch_indices() for s in shards]
    assert all(len(p) == steps * 16 == len(s) for p, s in zip(per_rank, shards))
    # Every step, the ranks' batches are disjoint slices that together make the global batch.
    glued = np.stack([p.reshape(steps, 16) for p in per_rank], axis=1).reshape(-1)
    assert np.array_equal(glued, whole)
    if kind == "ib":
        sets = [set(p.tolist()) for p in per_rank]
        assert all(not (sets[a] & sets[b]) for a in range(replicas) for b in range(a + 1, replicas))
        assert set().union(*sets) == set(whole.tolist())


def test_build_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="not one of ib, cb, sr, pb"):
        build_sampler("square", LABELS, batch_size=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        build_sampler("ib", LABELS, batch_size=8, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-negative"):
        build_sampler("ib", [0, -1], batch_size=8)
