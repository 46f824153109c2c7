"""The head registry: every head name, once, with everything the stages need to know about it.

    name -> method class (its settings class is the `rebalance.<section>` of a recipe), config section, base head,
            whether it trains on batches, reference (unfolded) logits

`ltserve.config` validates `rebalance.heads` and each method's section against it; `ltserve.rebalance` fits each
head on its base with its method; `ltserve.evaluate` and `ltserve.export` read names, order and reference logits
from it. Adding a method means its own file (settings, fit, reference) and one line in `HEADS` below.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ltserve.errors import ConfigError, unknown_choice
from ltserve.heads import crt, joint, la, lws, ncm, tau_norm
from ltserve.heads.common import HeadFitter, MethodSettings
from ltserve.heads.head import CalibratedHead

Reference = Callable[[CalibratedHead, CalibratedHead, np.ndarray, Sequence[int]], np.ndarray]
"""(head, the run's joint head, features (N, D), training counts (C,)) -> logits (N, C) float64, computed from the
method's definition and the head's recorded parameters, before the target prior and the temperature."""


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
    """

    name: str
    reference: Reference
    method: type[HeadFitter] | None = None
    section: str | None = None
    base: str | None = None
    trains: bool = False

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


HEADS = Registry([
    HeadMethod("joint", joint.reference),
    HeadMethod("crt", crt.reference, crt.CRT, "crt", base="joint", trains=True),
    HeadMethod("tau_norm", tau_norm.reference, tau_norm.TauNorm, "tau_norm", base="joint"),
    HeadMethod("lws", lws.reference, lws.LWS, "lws", base="joint", trains=True),
    HeadMethod("ncm", ncm.reference, ncm.NCM, "ncm", base="joint"),
    HeadMethod("la", la.adjusted(joint.reference), la.LogitAdjustment, "la", base="joint"),
    HeadMethod("tau_norm+la", la.adjusted(tau_norm.reference), la.LogitAdjustment, "la", base="tau_norm"),
    HeadMethod("lws+la", la.adjusted(lws.reference), la.LogitAdjustment, "la", base="lws"),
])
"""Every head ltserve knows, in report order: one line per head."""
