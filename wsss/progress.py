"""Progress bars that suit where they are shown.

A bar is drawn on a terminal and in a Jupyter kernel (``tqdm.auto`` picks the widget
there). When stderr is a file or a pipe (a log, CI, ``nohup``), the bars are off: their
carriage-return redraws would fill the log with thousands of lines, and every stage
already logs one line per epoch or per stage. ``WSSS_PROGRESS=1`` forces bars on,
``WSSS_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bars_wanted() -> bool:
    forced = os.environ.get("WSSS_PROGRESS")
    if forced is not None:
        return forced.strip().lower() not in ("0", "false", "no", "")
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled where bars are not wanted (module docstring)."""
    return tqdm(iterable, disable=disable or not bars_wanted(), dynamic_ncols=True, **kwargs)
