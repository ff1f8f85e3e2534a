"""What an ``ATTACKS`` entry is: a frozen :class:`AttackEntry` that runs the attack part of an
``attack`` trial (:mod:`nasrisk.trials.kinds.attack`), with its typed options and the metric
names it produces, so the kind dispatches by name and a new attack is one module holding one
registration (``trials/attacks/__init__`` imports every module of the package).

The kind hands an entry's :attr:`AttackEntry.run`:

* ``model``: the victim in eval mode, on its device, mapping [0, 1] inputs to logits;
* ``inputs``: an :class:`AttackInputs` chosen by the entry's :attr:`AttackEntry.inputs` rule:
  ``"correct"`` = ``n_inputs`` random test inputs the victim classifies correctly, drawn by
  ``seed`` (PROTOCOLS 4; :func:`~.targets.select_correct`), so the PGD and NES trials of one
  victim and seed attack the same inputs; ``"fixed"`` = ``n_inputs`` test indices drawn by
  ``seed`` alone (:func:`fixed_indices`), the same for every model of a dataset, with the
  victim's clean verdict per input in ``inputs.correct`` (the overlap study needs masks that
  line up across models; an input the victim already misclassifies is not attacked);
* ``common``: the :class:`AttackCommon` settings every attack trial has (parameter set, seed,
  batch size);
* ``options``: the entry's own options, an instance of :attr:`AttackEntry.options`
  (validated before Ray starts; ``attack_options: {<attack>: {...}}`` in a study);
* ``ctx`` and ``key``: the trial context and the state key under which the entry saves each
  finished part (:func:`cached_part`), so a retried trial does not redo it.

It returns ``(metrics, arrays)``: exactly the scalar metrics :attr:`AttackEntry.metrics`
names, and per-input tensors for the trial's ``.npz`` artifact (the kind adds ``indices``, and
``correct`` for ``"fixed"`` inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .targets import AttackResult

ParamSet = Literal["paper", "artifact"]
InputRule = Literal["correct", "fixed"]


class NoOptions(BaseModel):
    """The options of an attack that has none (any key is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class AttackCommon:
    """The settings every attack trial has: the PROTOCOLS 4 parameter set, the seed (inputs,
    random starts, NES samples) and the batch size of the attack's forward passes."""

    params: ParamSet = "paper"
    seed: int = 0
    batch_size: int = 256


@dataclass(frozen=True)
class AttackInputs:
    """The inputs an attack trial attacks: ``x`` float in [0, 1], ``y`` labels, ``indices``
    their positions in the test split, ``correct`` the victim's clean verdict per input (all
    True for the ``"correct"`` rule)."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    correct: torch.Tensor


RunAttack = Callable[[nn.Module, AttackInputs, AttackCommon, Any, Any, str],
                     tuple[dict[str, float], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class AttackEntry:
    """One attack of the ``attack`` trial kind (see the module docstring).

    ``threat`` / ``norm`` / ``source`` say what the attacker sees and where the setting comes
    from; ``artifact`` is the ``.npz`` file name (``""`` = ``<attack name>.npz``).
    """

    run: RunAttack
    metrics: tuple[str, ...]
    options: type[BaseModel] = NoOptions
    inputs: InputRule = "correct"
    threat: str = ""
    norm: str = "linf"
    source: str = ""
    artifact: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.inputs not in ("correct", "fixed"):
            raise ValueError(f"inputs must be 'correct' or 'fixed', got {self.inputs!r}")
        if len(set(self.metrics)) != len(self.metrics) or not self.metrics:
            raise ValueError(f"metrics must be distinct names, got {self.metrics}")

    def artifact_name(self, name: str) -> str:
        return self.artifact or f"{name}.npz"


def fixed_indices(n_test: int, n_inputs: int, seed: int) -> torch.Tensor:
    """The model-independent test indices of the ``"fixed"`` input rule: ``n_inputs`` of
    ``range(n_test)`` drawn by ``seed`` alone, sorted (PROTOCOLS 4 "PGD overlap")."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_test, generator=gen)[:n_inputs].sort().values


def cached_part(ctx: Any, key: str, part: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per trial: its result is saved under ``key``/``part`` through
    ``ctx.save_state`` (its finite scalars also as metrics) and reused by a retried attempt."""
    state = ctx.load_state(key) or {}
    if part in state:
        return state[part]
    res = compute()
    scalars = {k: v for k, v in res.items() if isinstance(v, float) and math.isfinite(v)}
    ctx.save_state(key, {**state, part: res}, metrics=scalars)
    return res


def split(res: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """A part's result as (scalars, tensors)."""
    return ({k: v for k, v in res.items() if not isinstance(v, torch.Tensor)},
            {k: v for k, v in res.items() if isinstance(v, torch.Tensor)})


def masks(r: AttackResult, suffix: str = "") -> dict[str, torch.Tensor]:
    """The per-input arrays of a result for the artifact: ``success``, and ``targets`` /
    ``queries`` where the attack has them, each name followed by ``suffix``."""
    out: dict[str, torch.Tensor] = {f"success{suffix}": r.success.bool()}
    if r.targets is not None:
        out[f"targets{suffix}"] = r.targets.long()
    if r.queries is not None:
        out[f"queries{suffix}"] = r.queries.long()
    return out


def mean(x: torch.Tensor) -> float:
    """The mean as a float, NaN for an empty tensor."""
    return x.float().mean().item() if len(x) else math.nan
