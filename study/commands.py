"""Commands nasrisk prints for the user to type: they must work as printed."""

from __future__ import annotations

import sys
from pathlib import Path


def shell_command(name: str) -> str:
    """``name`` (``mlflow``, ``nasrisk``) as a printed command that works in a fresh shell:
    the absolute path of this interpreter's copy when the shell's PATH would find another one
    or none (a venv that is not activated), else the bare name."""
    import shlex
    import shutil

    mine = Path(sys.executable).parent / name  # not resolved: a venv's python is a symlink
    if not mine.is_file():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == mine.resolve():
        return name
    return shlex.quote(str(mine.absolute()))
