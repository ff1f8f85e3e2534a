"""`nasrisk store ls|verify`: the content-addressed store of a workdir (``<workdir>/store``,
:mod:`nasrisk.trials.store`).

``ls`` reads only the JSON commit markers (no torch, no hashing): one block per base model
with its derived models indented under their parents (base -> step -> step), then the stored
objects. ``verify`` re-checks every entry as a load would (size, SHA-256, a weights-only
``torch.load``), deleting nothing: one line per bad entry, exit 1 if there is one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from nasrisk.trials.errors import UserError

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
    for line in store_lines(store_root(workdir)):
        typer.echo(line)


@app.command("verify")
def verify(workdir: WorkdirOpt = None) -> None:
    """Re-check every stored file; exit 1 if one is corrupt.

    Size, SHA-256 and a weights-only torch.load of every entry; one line per bad entry."""
    lines, bad = verify_lines(store_root(workdir))
    for line in lines:
        typer.echo(line)
    if bad:
        raise typer.Exit(1)


def store_root(workdir: str | Path | None) -> Path:
    """``<workdir>/store``; UserError (one line) when the workdir or its store is missing or
    cannot be read."""
    from .workdir import Workdir

    wd = Workdir.at(workdir)
    if not wd.root.is_dir():
        raise UserError(f"no workdir at {wd.root}"
                        + (" (it is a file)" if wd.root.exists() else "")
                        + "; pass --workdir or set $NASRISK_WORKDIR")
    store = wd.store
    if not store.is_dir():
        raise UserError(f"workdir {wd.root} has no store ({store} is missing): no trial has "
                        "stored a model there yet")
    try:
        os.listdir(store)
    except OSError as e:
        raise UserError(f"cannot read the store {store}: {e.strerror or e}") from None
    return store


def _meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _words(record: dict[str, Any]) -> str:
    """The lineage in words; records from before lineages existed have only a ``spec``."""
    if record.get("describe"):
        return str(record["describe"])
    spec = record.get("spec") or {}
    words = f"{spec.get('model', '?')}@{spec.get('dataset', '?')}"
    p = spec.get("poison_fraction") or 0
    if p:  # a poisoned victim under its pre-lineage key, moved on first use
        return f"{words} -> label_flip(fraction={p:g}) (pre-lineage key)"
    return words


def store_lines(root: Path) -> list[str]:
    """What ``nasrisk store ls`` prints for the store at ``root``."""
    entries: dict[str, dict[str, Any]] = {}
    for marker in sorted(root.glob("*.json")):
        meta = _meta(marker)
        if meta is None or not marker.with_suffix(".pt").is_file():
            continue  # not committed (verify names it)
        record = meta.get("record") if isinstance(meta.get("record"), dict) else {}
        entries[marker.stem] = {"key": marker.stem,
                                "kind": str(meta.get("kind") or record.get("kind") or "model"),
                                "size": meta.get("size"), "record": record}
    models = {k: e for k, e in entries.items() if e["kind"] == "model"}
    objects = {k: e for k, e in entries.items() if e["kind"] != "model"}
    total = sum(int(e["size"] or 0) for e in entries.values())
    lines = [f"store {root}: {len(models)} models, {len(objects)} objects, {_size(total)}"]
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for k, e in models.items():
        parent = str(e["record"].get("parent_key") or "")
        if parent and parent in models:
            children.setdefault(parent, []).append(k)
        else:
            roots.append(k)

    width = max([len(e["kind"]) for e in entries.values()] or [5])

    def line(e: dict[str, Any], depth: int, words: str) -> str:
        r = e["record"]
        acc = f"  acc {r['acc']:.4f}" if isinstance(r.get("acc"), (int, float)) else ""
        run = f"  run {r['run_id']}" if r.get("run_id") else "  run -"
        return (f"{e['key'][:8]}  {e['kind']:<{width}}  {_size(e['size']):>9}  "
                f"{'    ' * depth}{words}{acc}{run}")

    def walk(k: str, depth: int) -> None:
        e = models[k]
        words = _words(e["record"])
        if depth:
            words = "-> " + words.rsplit(" -> ", 1)[-1]
        elif e["record"].get("parent_key"):
            words += f" (parent {str(e['record']['parent_key'])[:8]} not stored)"
        lines.append(line(e, depth, words))
        for child in sorted(children.get(k, []), key=lambda c: _words(models[c]["record"])):
            walk(child, depth + 1)

    for k in sorted(roots, key=lambda k: (_words(models[k]["record"]), k)):
        lines.append("")
        walk(k, 0)
    if objects:
        lines += ["", "objects:"]
        for k in sorted(objects, key=lambda k: (objects[k]["kind"], k)):
            e = objects[k]
            words = str(e["record"].get("describe") or e["kind"])
            lines.append(line(e, 0, words))
    return lines


def verify_lines(root: Path) -> tuple[list[str], int]:
    """What ``nasrisk store verify`` prints, and how many entries are corrupt."""
    from nasrisk.trials.store import Store

    store = Store(root)
    keys = store.all_keys()
    bad = 0
    lines: list[str] = []
    for key in keys:
        problem = store.problem(key)
        if problem is not None:
            bad += 1
            lines.append(f"corrupt {key}: {problem}")
    lines.append(f"store {root}: {len(keys)} entries checked, {bad} corrupt"
                 + ("" if bad else ", all good"))
    return lines, bad
