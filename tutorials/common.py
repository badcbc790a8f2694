"""What every tutorial shares: the small-size switch, the output folder and figure saving.

``LEARNSPARSE_SMALL=1`` makes every tutorial run in well under a minute on two
CPU cores (fewer epochs, smaller models); the test suite runs them that way.
Figures go to ``LEARNSPARSE_TUTORIAL_OUT`` (default ``tutorials/output``), one
folder per tutorial, and are shown inline when the tutorial runs as a notebook.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["SMALL", "output_dir", "pick", "save_figure"]

SMALL = os.environ.get("LEARNSPARSE_SMALL", "0") not in ("", "0")


def pick(full: Any, small: Any) -> Any:
    """``small`` under ``LEARNSPARSE_SMALL=1``, else ``full`` (epochs, sizes, seeds...)."""
    return small if SMALL else full


def output_dir(tutorial: str) -> Path:
    """The folder this tutorial writes its figures to, created if needed."""
    root = Path(os.environ.get("LEARNSPARSE_TUTORIAL_OUT", Path(__file__).resolve().parent / "output"))
    path = root / tutorial
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as ``path``; show it inline in a notebook, close it in a script."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    if "ipykernel" in sys.modules:
        plt.show()
    else:
        plt.close(fig)
    print(f"saved {path}")
    return path
