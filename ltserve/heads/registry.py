"""The head registry: every head name, once, with everything the stages need to know about it.

    name -> method class (its settings class is the `rebalance.<section>` of a recipe), config section, base head,
            whether it trains on batches, reference (unfolded) logits, the parameters it records in model.json,
            its checks at export, and what val chose for it (in words)

`ltserve.config` validates `rebalance.heads` and each method's section against it; `ltserve.rebalance` fits each
head on its base with its method; `ltserve.export` checks a head with its entry's `check`, verifies the folded graph
against its `reference` (exactly, or up to a per-row constant where `exact` says so) and records its `params`;
`ltserve.evaluate` reports its `chosen` values. None of them compares head names. Adding a method means its own file
(settings, fit, reference, params) and one line in `HEADS`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ltserve.errors import ConfigError, unknown_choice
from ltserve.heads import crt, joint, la, lws, ncm, sgd, tau_norm
from ltserve.heads.common import HeadFitter, MethodSettings
from ltserve.heads.head import CalibratedHead

Reference = Callable[[CalibratedHead, CalibratedHead, np.ndarray, Sequence[int]], np.ndarray]
"""(head, the run's joint head, features (N, D), training counts (C,)) -> logits (N, C) float64, computed from the
method's definition and the head's recorded parameters, before the target prior and the temperature."""

Params = Callable[[CalibratedHead], dict[str, Any]]
"""head -> the method's own parameters for model.json's `head.params` (JSON-able: tau, scales summary, ...; no
sweep curves or per-epoch logs). Export adds what every head has (method, transform, target prior, calibration)."""

Check = Callable[[CalibratedHead, Sequence[str]], list[str]]
"""(head, class names (C,)) -> warnings the package records (`verification["warnings"]`), run by export before the
slow steps; raises `ltserve.errors.PackageError` when the head must not be exported (the message gives the fix)."""

Exact = Callable[[CalibratedHead], bool]
"""head -> whether its folded layer equals its reference logits exactly (False: only up to a constant per row, the
same for every class, so export compares rows after centring them)."""

Chosen = Callable[[Mapping[str, Any]], list[str]]
"""a head's meta -> what val chose for it, in words (["tau=0.7"], ["epoch 8/10"]); [] when nothing was chosen."""


def no_params(head: CalibratedHead) -> dict[str, Any]:
    """A method with nothing of its own to record (joint)."""
    return {}


def no_check(head: CalibratedHead, class_names: Sequence[str]) -> list[str]:
    """A method whose heads export as they are."""
    return []


def always_exact(head: CalibratedHead) -> bool:
    """A method whose folded layer is its definition."""
    return True


def nothing_chosen(meta: Mapping[str, Any]) -> list[str]:
    """A method that chooses nothing on val (joint, ncm)."""
    return []


@dataclass(frozen=True)
class HeadMethod:
    """One registered head.

    Attributes:
        name: the head name everywhere (CLI, files, reports, model packages).
        method: the class that fits it (a `HeadFitter`); None for joint, which stage 1 trains.
        section: the recipe's `rebalance.<section>` holding the method's settings (several heads may share one).
        base: the head it is fitted on (None for joint).
        trains: it trains on batches of features, so `--no-cache` can feed it augmented images.
        reference: its unfolded logits (see `Reference`), what export checks the folded graph against.
        params: its parameters in model.json (see `Params`).
        check: its checks at export (see `Check`).
        exact: whether the folded layer equals the reference exactly (see `Exact`).
        chosen: what val chose for it, for the reports (see `Chosen`).
    """

    name: str
    reference: Reference
    method: type[HeadFitter] | None = None
    section: str | None = None
    base: str | None = None
    trains: bool = False
    params: Params = no_params
    check: Check = no_check
    exact: Exact = always_exact
    chosen: Chosen = nothing_chosen

    @property
    def settings(self) -> type[MethodSettings] | None:
        """The settings class of the method (the schema and defaults of its config section)."""
        return self.method.Settings if self.method is not None else None


class Registry:
    """Head methods by name, in registration order (the order of every table and report)."""

    def __init__(self, methods: Sequence[HeadMethod]) -> None:
        self._methods: dict[str, HeadMethod] = {}
        for m in methods:
            self.register(m)

    def names(self) -> list[str]:
        """Every head name, joint first."""
        return list(self._methods)

    def stage2(self) -> list[str]:
        """The heads stage 2 fits (all but the ones stage 1 trains)."""
        return [n for n, m in self._methods.items() if m.method is not None]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def get(self, name: str) -> HeadMethod:
        """The entry of `name`.

        Raises:
            ConfigError: an unknown name (the closest registered one is suggested).
        """
        if name not in self._methods:
            raise ConfigError(unknown_choice("head", name, self.names()))
        return self._methods[name]

    def sections(self) -> dict[str, type[MethodSettings]]:
        """{config section: settings class} of every registered method."""
        return {m.section: m.settings for m in self._methods.values() if m.section is not None and m.settings}

    def register(self, method: HeadMethod) -> None:
        """Add a head.

        Raises:
            ValueError: the name is taken, the base is not registered, or the section is already used with other
                settings.
        """
        if method.name in self._methods:
            raise ValueError(f"head {method.name!r} is already registered")
        if method.base is not None and method.base not in self._methods:
            raise ValueError(f"head {method.name!r}: base {method.base!r} is not registered (register it first)")
        if method.method is not None and method.section is None:
            raise ValueError(f"head {method.name!r}: a fitted method needs a config section")
        taken = self.sections().get(method.section) if method.section else None
        if taken is not None and taken is not method.settings:
            raise ValueError(f"head {method.name!r}: section {method.section!r} already holds {taken.__name__}")
        self._methods[method.name] = method

    def unregister(self, name: str) -> None:
        """Remove a head (and nothing that builds on it may remain)."""
        users = [m.name for m in self._methods.values() if m.base == name]
        if users:
            raise ValueError(f"head {name!r} is the base of {', '.join(users)}; unregister those first")
        self._methods.pop(name, None)

    @contextlib.contextmanager
    def registered(self, method: HeadMethod) -> Iterator[HeadMethod]:
        """`with HEADS.registered(entry):` the head exists inside the block only (tests, experiments)."""
        self.register(method)
        try:
            yield method
        finally:
            self.unregister(method.name)


def adjusted(base: HeadMethod) -> HeadMethod:
    """The entry of logit adjustment on `base` (`ltserve.heads.la`): named la (on joint) or <base>+la, fitted on the
    base head; the base's reference, parameters and checks hold for it, with tau_la on top."""
    return HeadMethod(la.adjusted_method(base.name), la.adjusted(base.reference), la.LogitAdjustment, "la",
                      base=base.name, params=la.adjusted_params(base.params), check=base.check,
                      exact=base.exact, chosen=la.adjusted_chosen(base.chosen))


_JOINT = HeadMethod("joint", joint.reference)
_TAU_NORM = HeadMethod("tau_norm", tau_norm.reference, tau_norm.TauNorm, "tau_norm", base="joint",
                       params=tau_norm.params, chosen=tau_norm.chosen)
_LWS = HeadMethod("lws", lws.reference, lws.LWS, "lws", base="joint", trains=True, params=lws.params,
                  check=lws.check, chosen=sgd.chosen)

HEADS = Registry([
    _JOINT,
    HeadMethod("crt", crt.reference, crt.CRT, "crt", base="joint", trains=True, params=sgd.params, chosen=sgd.chosen),
    _TAU_NORM,
    _LWS,
    HeadMethod("ncm", ncm.reference, ncm.NCM, "ncm", base="joint", params=ncm.params, exact=ncm.exact),
    adjusted(_JOINT),
    adjusted(_TAU_NORM),
    adjusted(_LWS),
])
"""Every head ltserve knows, in report order: one line per head."""
