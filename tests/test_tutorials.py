"""Every tutorial runs as a script at the small size, its asserts hold and its figures are written.

Each tutorial is run in a fresh interpreter (as a reader would run it), with
``LEARNSPARSE_SMALL=1`` and the figures sent to a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def test_the_tutorials_are_all_listed_in_their_readme():
    readme = (ROOT / "tutorials" / "README.md").read_text()
    assert len(TUTORIALS) == 7, [p.name for p in TUTORIALS]
    for path in TUTORIALS:
        assert path.name in readme, f"tutorials/README.md does not mention {path.name}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_at_the_small_size(path, tmp_path):
    pytest.importorskip("matplotlib", reason="the tutorials draw with matplotlib")
    env = dict(
        os.environ,
        LEARNSPARSE_SMALL="1",
        LEARNSPARSE_TUTORIAL_OUT=str(tmp_path),
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{path.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    figures = list((tmp_path / path.stem).glob("*.png"))
    assert figures, f"{path.name} wrote no figure into {tmp_path / path.stem}"
