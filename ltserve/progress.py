"""Progress bars for long work: a tqdm bar on a terminal, nothing when output is not one (CI, log files).

Long stages log one line per epoch or stage themselves, so a log reads the same with bars on or off; the bars add
the live view on a terminal. Every command's `--no-progress` turns them off.
"""

from __future__ import annotations

from typing import Any, Iterable


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, leave: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar over `iterable` (or updated by hand), drawn only when stderr is a terminal and `enabled`.

    Returns:
        a tqdm object (disabled bars still count and can be updated, at no cost).
    """
    from tqdm import tqdm

    # disable=None is tqdm's "only on a TTY": CI logs and redirected output get no redrawn bars
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=None if enabled else True, **kwargs)
