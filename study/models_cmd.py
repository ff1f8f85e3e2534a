"""`nasrisk models`: every registered model with family and parameter count; `--stats`: the
architecture statistics of the NAS genotypes (PROTOCOLS 1.3)."""

from __future__ import annotations

import typer

from nasrisk.trials.data import dataset_info


def print_models(dataset: str, stats: bool) -> None:
    from nasrisk.trials.models.darts.stats import model_table, stats_table

    if stats:
        rows = stats_table()
    else:
        info = dataset_info(dataset)
        rows = model_table(num_classes=info.num_classes, input_size=info.image_size)
    if not rows:
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        typer.echo("  ".join(_fmt(r[c]).ljust(width[c]) for c in cols))


def _fmt(v: object) -> str:
    if v is None:
        return "(needs an arch)"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
