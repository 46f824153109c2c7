"""Fixtures shared by the whole suite: one tiny trained run, re-balanced and exported once per test session.

Training (configs/tiny.yaml, a few seconds on 2 cores) happens at most once per pytest process; tests that only
read the run use `tiny_run`; tests that change a run copy it first (`copy_run`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

os.environ.setdefault("OMP_NUM_THREADS", "2")
# a spinning OpenMP pool steals the other core from the servers and workers the tests start
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_config():
    from ltserve.config import load_config

    return load_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config) -> Path:
    """A finished stage-1 run of configs/tiny.yaml (read-only: copy it before changing it)."""
    from ltserve.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config, out)
    return out


@pytest.fixture(scope="session")
def tiny_rebalanced_run(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` copied, with every stage-2 head fitted (read-only)."""
    from ltserve.rebalance import rebalance

    out = tmp_path_factory.mktemp("runs") / "tiny_rebalanced"
    shutil.copytree(tiny_run, out)
    rebalance(out)
    return out


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_rebalanced_run) -> Path:
    """A verified model package of the tiny run's tau_norm head (read-only)."""
    from ltserve.export import export_package

    out = tmp_path_factory.mktemp("models") / "tiny-tau_norm"
    export_package(tiny_rebalanced_run, "tau_norm", out)
    return out


@pytest.fixture()
def copy_run(tmp_path):
    """Copy a run directory into this test's tmp folder: `copy_run(src) -> Path`."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        return dst

    return _copy
