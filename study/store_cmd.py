"""`nasrisk store ls|verify`: the content-addressed store of a workdir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  help="List or check the stored models (as lineages) and objects.")

WorkdirOpt = Annotated[Path | None, typer.Option(
    "--workdir", help="The workdir whose store/ to read. [default: ./nasrisk-runs or "
                      "$NASRISK_WORKDIR]")]


@app.command("ls")
def ls(workdir: WorkdirOpt = None) -> None:
    """List the stored models as lineages, and the stored objects.

    One block per base model, its derived models indented under it (base -> step -> step);
    each line: key prefix, kind, size, lineage, accuracy, the MLflow run that made it."""
    raise NotImplementedError


@app.command("verify")
def verify(workdir: WorkdirOpt = None) -> None:
    """Re-check every stored file; exit 1 if one is corrupt.

    Size, SHA-256 and a weights-only torch.load of every entry; one line per bad entry."""
    raise NotImplementedError
