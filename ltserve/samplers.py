"""Stage-1 (and stage-2) samplers: instance-, class-, square-root- and progressively-balanced, DDP-aware.

Kang et al. (ICLR 2020) sample class j with probability p_j = n_j^q / sum_i n_i^q:

- ``ib`` instance-balanced, q = 1: a plain shuffle of the training set.
- ``cb`` class-balanced, q = 0, the official variant: walk a shuffled class list (reshuffled after each pass) and
  take ``images_per_class`` consecutive images of each chosen class, cycling through that class's shuffled images.
- ``sr`` square-root, q = 1/2: draw a class with p_j, then an image uniformly within it.
- ``pb`` progressively-balanced: p_j(t) = (1 - lambda) p_j^IB + lambda p_j^CB, lambda = t / (T - 1) for epoch
  t = 0..T-1 (T = 1: lambda = 0), then an image uniformly within the class.

Every epoch has the same length whatever the sampler: floor(N / B) batches of B, with B the global batch
(``batch_size * num_replicas``), at least one batch. With DDP each replica takes its ``batch_size`` slice of every
global batch, so the replicas' shares are disjoint, equal, and together cover the epoch; every rank builds the same
sequence from (seed, epoch), so no communication is needed. Call ``set_epoch`` before each epoch.

The index sequence is usable without a DataLoader (stage 2 draws feature batches this way):
``sampler.epoch_indices()`` gives a NumPy array, ``list(sampler)`` the same as Python ints. NumPy only: a torch
DataLoader takes any sized iterable of indices as its sampler, so stage 1 uses these objects directly and stage 2
(which trains on cached features) needs no torch to plan its batches.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np

SamplerKind = Literal["ib", "cb", "sr", "pb"]
SAMPLER_Q = {"ib": 1.0, "cb": 0.0, "sr": 0.5}


def class_probabilities(counts: Sequence[int] | np.ndarray, q: float) -> np.ndarray:
    """p_j = n_j^q / sum_i n_i^q over the classes with n_j > 0 (empty classes get 0).

    Args:
        counts: (C,) images per class.
        q: 1 instance-balanced, 0 class-balanced, 1/2 square-root.

    Returns:
        (C,) float64 probabilities summing to 1.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n < 0).any() or not (n > 0).any():
        raise ValueError(f"class counts must be a 1-D array of non-negative counts with at least one > 0, got {n}")
    weights = np.where(n > 0, np.power(n, q, where=n > 0, out=np.zeros_like(n)), 0.0)
    return weights / weights.sum()


def progressive_probabilities(counts: Sequence[int] | np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    """Progressively-balanced p_j(t) = (1 - t/(T-1)) p_j^IB + t/(T-1) p_j^CB (T = 1: pure IB); (C,) float64."""
    lam = epoch / (total_epochs - 1) if total_epochs > 1 else 0.0
    lam = min(max(lam, 0.0), 1.0)
    return (1.0 - lam) * class_probabilities(counts, 1.0) + lam * class_probabilities(counts, 0.0)


class EpochSampler:
    """Base: a fixed-length, seeded, per-epoch index sequence, sharded across DDP replicas.

    Subclasses implement `_generate(rng, length) -> (length,) int64` for the whole (global) epoch.

    Args:
        labels: (N,) int class labels of the data set the indices point into.
        batch_size: per-replica batch size B_r; the global batch is B_r * num_replicas.
        seed: same on every rank.
        num_replicas, rank: DDP world size and this process's rank.
        epoch: the first epoch (`set_epoch` changes it).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, epoch: int = 0) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError("labels must be non-negative integers")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < num_replicas (got batch_size={batch_size}, "
                             f"rank={rank}, num_replicas={num_replicas})")
        self.labels = labels.astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = int(epoch)
        self.counts = np.bincount(self.labels)
        # Members of each class, in index order (shuffled per epoch where needed).
        order = np.argsort(self.labels, kind="stable")
        self.class_members = np.split(order, np.cumsum(self.counts)[:-1])
        global_batch = self.batch_size * self.num_replicas
        self.steps = max(1, len(self.labels) // global_batch)

    @property
    def total_size(self) -> int:
        """Samples per epoch over all replicas: steps * batch_size * num_replicas."""
        return self.steps * self.batch_size * self.num_replicas

    def __len__(self) -> int:
        """Samples per epoch for this replica: steps * batch_size."""
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sequence the next iteration yields (call it before every epoch)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        # (seed, epoch) -> an independent stream per epoch, identical on every rank.
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))

    def _generate(self, rng: np.random.Generator, length: int) -> np.ndarray:
        raise NotImplementedError

    def global_indices(self) -> np.ndarray:
        """(total_size,) int64: the whole epoch's sequence, before sharding (the same on every rank)."""
        seq = np.asarray(self._generate(self._rng(), self.total_size), dtype=np.int64)
        assert len(seq) == self.total_size  # internal invariant of _generate, not user input
        return seq

    def epoch_indices(self) -> np.ndarray:
        """(len(self),) int64: this replica's indices of the current epoch, in order.

        Replica r takes the r-th slice of size batch_size of every global batch, so each step's batches are
        disjoint across replicas and together form the global batch.
        """
        seq = self.global_indices().reshape(self.steps, self.num_replicas, self.batch_size)
        return np.ascontiguousarray(seq[:, self.rank, :]).reshape(-1)

    def batches(self) -> np.ndarray:
        """(steps, batch_size) int64: this replica's epoch as index batches (stage 2 draws features this way)."""
        return self.epoch_indices().reshape(self.steps, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N={len(self.labels)}, classes={int((self.counts > 0).sum())}, "
                f"batch_size={self.batch_size}, steps={self.steps}, seed={self.seed}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.num_replicas})")


class InstanceBalancedSampler(EpochSampler):
    """q = 1: a plain shuffle (without replacement; reshuffled to fill an epoch longer than the data set)."""

    def _generate(self, rng: np.random.Generator, length: int) -> np.ndarray:
        n = len(self.labels)
        reps = -(-length // n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:length]


class ClassBalancedSampler(EpochSampler):
    """q = 0, the official class-aware sampler.

    Classes are visited in a shuffled order (reshuffled after every pass over all non-empty classes); each visit
    yields `images_per_class` consecutive images of that class, taken from a shuffled cycle over its images
    (reshuffled when exhausted). Batches of 512 with 4 images per class hold 128 classes.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, images_per_class: int = 4, **kwargs) -> None:
        super().__init__(labels, **kwargs)
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        self.images_per_class = int(images_per_class)

    def _generate(self, rng: np.random.Generator, length: int) -> np.ndarray:
        classes = np.flatnonzero(self.counts > 0)
        visits = -(-length // self.images_per_class)
        passes = -(-visits // len(classes))
        class_seq = np.concatenate([rng.permutation(classes) for _ in range(passes)])[:visits]
        # How many images each class must yield this epoch; build its cycle of shuffled passes once.
        need = np.bincount(class_seq, minlength=len(self.counts)) * self.images_per_class
        streams: dict[int, np.ndarray] = {}
        for cls in classes:
            members = self.class_members[cls]
            reps = -(-int(need[cls]) // len(members))
            streams[int(cls)] = np.concatenate([rng.permutation(members) for _ in range(max(reps, 1))])
        taken = dict.fromkeys(streams, 0)
        out = np.empty(visits * self.images_per_class, dtype=np.int64)
        k = self.images_per_class
        for v, cls in enumerate(class_seq.tolist()):
            start = taken[cls]
            out[v * k:(v + 1) * k] = streams[cls][start:start + k]
            taken[cls] = start + k
        return out[:length]


class ClassProbabilitySampler(EpochSampler):
    """Draw a class with probability p_j (with replacement), then an image uniformly within that class.

    Used for square-root (p from q = 1/2) and, with per-epoch p, progressively-balanced sampling.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, probabilities: np.ndarray | None = None,
                 **kwargs) -> None:
        super().__init__(labels, **kwargs)
        self.probabilities = None if probabilities is None else self._check_probabilities(probabilities)

    def _check_probabilities(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if p.shape != self.counts.shape or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"probabilities must be ({len(self.counts)},) non-negative and sum to 1")
        if (p[self.counts == 0] > 0).any():
            raise ValueError("probabilities give weight to a class with no images")
        return p

    def current_probabilities(self) -> np.ndarray:
        """(C,) class probabilities of the current epoch."""
        if self.probabilities is None:
            raise ValueError(f"{type(self).__name__} needs probabilities")
        return self.probabilities

    def _generate(self, rng: np.random.Generator, length: int) -> np.ndarray:
        p = self.current_probabilities()
        classes = rng.choice(len(p), size=length, p=p)
        # Uniform image within each drawn class: a random offset into that class's member list.
        offsets = np.floor(rng.random(length) * self.counts[classes]).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        order = np.concatenate(self.class_members)
        return order[starts[classes] + offsets]


class ProgressivelyBalancedSampler(ClassProbabilitySampler):
    """p_j(t) = (1 - t/(T-1)) n_j/N + (t/(T-1)) / C: pure IB at the first epoch, pure CB at the last."""

    def __init__(self, labels: Sequence[int] | np.ndarray, *, total_epochs: int, **kwargs) -> None:
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        super().__init__(labels, **kwargs)
        self.total_epochs = int(total_epochs)

    def current_probabilities(self) -> np.ndarray:
        return progressive_probabilities(self.counts, self.epoch, self.total_epochs)


def build_sampler(kind: SamplerKind, labels: Sequence[int] | np.ndarray, *, batch_size: int, epoch: int = 0,
                  total_epochs: int = 1, seed: int = 0, images_per_class: int = 4, num_replicas: int = 1,
                  rank: int = 0) -> EpochSampler:
    """The sampler named by `kind` ("ib", "cb", "sr", "pb"); see the module docstring.

    Args:
        kind: ib | cb | sr | pb (`train.sampler` in the config).
        labels: (N,) int training labels.
        batch_size: per-replica batch size; each epoch has max(1, floor(N / (batch_size * num_replicas))) steps.
        epoch: first epoch (use `set_epoch` afterwards); total_epochs: T for progressive balancing.
        seed: same on every rank; images_per_class: consecutive images per class visit (cb).
        num_replicas, rank: DDP world size and rank.

    Raises:
        ValueError: an unknown kind (the valid ones are listed) or invalid sizes.
    """
    common = dict(batch_size=batch_size, seed=seed, num_replicas=num_replicas, rank=rank, epoch=epoch)
    if kind == "ib":
        return InstanceBalancedSampler(labels, **common)
    if kind == "cb":
        return ClassBalancedSampler(labels, images_per_class=images_per_class, **common)
    if kind == "sr":
        counts = np.bincount(np.asarray(labels, dtype=np.int64))
        return ClassProbabilitySampler(labels, probabilities=class_probabilities(counts, 0.5), **common)
    if kind == "pb":
        return ProgressivelyBalancedSampler(labels, total_epochs=total_epochs, **common)
    raise ValueError(f"sampler {kind!r} is not one of ib, cb, sr, pb")
