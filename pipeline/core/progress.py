"""Progress bars on stderr."""

from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any, enabled: bool = True, **kw: Any) -> Any:
    """A tqdm bar on stderr; refreshed every 10 s (not 0.1 s) when stderr is not a terminal, so
    logs of batch jobs stay readable."""
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0, **kw)
