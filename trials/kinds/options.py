"""Per-entry options of a trial kind that dispatches through a registry (``attack_options``,
``defense_options``): one mapping keyed by entry name, so a stage-wide setting for one entry
neither changes the other entries' trial keys nor shows up among their params."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError


def options_error(field: str, name: str, e: ValidationError) -> ValueError:
    """``field.name: loc: msg; ...`` of a failed options validation, in one line."""
    errs = "; ".join((f"{'.'.join(map(str, x['loc']))}: " if x["loc"] else "")
                     + x["msg"].removeprefix("Value error, ") for x in e.errors())
    return ValueError(f"{field}.{name}: {errs}")


def own_options(field: str, options: Mapping[str, Mapping[str, Any]], chosen: str, *,
                check: Callable[[str], str],
                model_of: Callable[[str], type[BaseModel]]) -> dict[str, Any]:
    """The ``chosen`` entry's options, validated and completed with their defaults. Every
    entry named in ``options`` is checked (``check`` raises ValueError for an unknown name)
    and validated, so a typo fails every trial of the stage, not only that entry's."""
    own: dict[str, Any] | None = None
    for name, opts in options.items():
        try:
            check(name)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        try:
            valid = model_of(name).model_validate(opts)
        except ValidationError as e:
            raise options_error(field, name, e) from None
        if name == chosen:
            own = valid.model_dump(mode="json")
    return own if own is not None else model_of(chosen)().model_dump(mode="json")
