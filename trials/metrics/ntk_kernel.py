"""The NTK kernels behind kappa (PROTOCOLS 5, "Score kappa", "BatchNorm while scoring",
"The arch parameter set", "Precision"): BatchNorm handling, parameter-set selection, and the
C x C (per-logit) and N x N (TE-NAS) kernels, vectorised with :mod:`torch.func`.

Three BatchNorm semantics (PROTOCOLS 5, "BatchNorm while scoring"):

* ``eval`` (the default): every BatchNorm layer in eval mode on its current running
  statistics. At a fresh initialisation these are mean 0, variance 1, so each BN is
  ``gamma x / sqrt(1 + eps) + beta``: the reference's scoring of every NATS arch (the data of
  EVAS's kappa-vs-ASR figure: ``model.eval()`` after re-initialising, generators built in eval
  mode). Samples are independent: ``vmap(jacrev(...))`` over samples.
* ``coupled``: the reference's *search* script. The arch (the ``classifier`` of a
  :class:`Composed`; the whole module otherwise) has its BatchNorm layers in train mode, so each
  Jacobian also flows through the batch statistics; the generator stays in eval mode on its
  running statistics. One forward of the batch, then N x C vector-Jacobian products of the batch
  output, vectorised over cotangents.
* ``fixed-stats`` (nasrisk's own): the statistics of every BatchNorm layer, generator and arch,
  are computed on the scoring batch (one train-mode forward) and then held fixed, so each
  sample's Jacobian is its own (``vmap(jacrev(...))``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, jacrev, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError

BNMode = Literal["eval", "fixed-stats", "coupled"]
ParamSet = Literal["generator", "arch", "all"]
ParamFilter = Callable[[str, torch.Tensor], bool]

BN_MODES: tuple[str, ...] = ("eval", "fixed-stats", "coupled")
PARAM_SETS: tuple[str, ...] = ("generator", "arch", "all")

# Working memory (Jacobian rows + the activation gradients of the vectorised backward passes)
# aimed at per chunk of samples; bounds memory for large parameter sets (the EVAS generator
# has ~10^6 weights) and for the coupled mode, whose every cotangent spans the whole batch.
_CHUNK_BUDGET_BYTES = 512 * 2**20


class Composed(nn.Module):
    """``classifier(generator(x))``, or ``classifier(x)`` without a generator. Parameter names
    are prefixed ``generator.`` / ``classifier.``."""

    def __init__(self, classifier: nn.Module, generator: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is not None:
            x = self.generator(x)
        return self.classifier(x)


def _batchnorms(module: nn.Module) -> Iterator[_BatchNorm]:
    return (m for m in module.modules() if isinstance(m, _BatchNorm))


def _bn_train_only(module: nn.Module) -> None:
    """BatchNorm layers in train mode, everything else (dropout, ...) in eval mode, so the
    score is deterministic."""
    module.eval()
    for bn in _batchnorms(module):
        bn.train()


def freeze_batch_stats(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``module`` in eval mode whose BatchNorm layers normalise with the statistics of
    the batch ``x`` (``fixed-stats``): ``copy(x) == module.train()(x)``, but the copy is
    per-sample, so Jacobians can be vectorised over samples. ``module`` is not modified.

    The statistics are obtained with BatchNorm's own running-stat update (momentum ``None``,
    i.e. a cumulative average, after a reset: exactly the batch's statistics). BatchNorm stores
    the *unbiased* variance in ``running_var`` but normalises in train mode with the *biased*
    one, so ``running_var`` is rescaled by ``(n - 1) / n``, ``n`` the number of values per
    channel. Layers built with ``track_running_stats=False`` get buffers in the copy.

    Raises ``UserError`` if a BatchNorm layer is applied more than once per forward (its
    statistics would be an average over the calls, not the batch's).
    """
    frozen = copy.deepcopy(module)
    seen: dict[int, list[int]] = {}  # id(bn) -> [values per channel, calls]
    handles = []
    for bn in _batchnorms(frozen):
        if bn.running_mean is None:
            like = bn.weight if bn.weight is not None else x
            kw = {"dtype": like.dtype, "device": like.device}
            bn.register_buffer("running_mean", torch.zeros(bn.num_features, **kw))
            bn.register_buffer("running_var", torch.ones(bn.num_features, **kw))
            bn.register_buffer("num_batches_tracked", torch.tensor(0, device=like.device))
        bn.track_running_stats = True  # also where buffers exist but tracking was switched off
        bn.reset_running_stats()
        bn.momentum = None
        seen[id(bn)] = [0, 0]

        def count(m: nn.Module, args: tuple) -> None:
            seen[id(m)][0] = args[0].numel() // args[0].shape[1]
            seen[id(m)][1] += 1

        handles.append(bn.register_forward_pre_hook(count))
    _bn_train_only(frozen)
    with torch.no_grad():
        frozen(x)
    for h in handles:
        h.remove()
    for bn in _batchnorms(frozen):
        n, calls = seen[id(bn)]
        if calls > 1:
            raise UserError(
                f"a BatchNorm layer ({bn}) is applied {calls} times per forward; fixed-stats "
                "scoring needs each BatchNorm applied once (use bn_mode='coupled')"
            )
        if calls == 1:
            bn.running_var.mul_((n - 1) / n)
    frozen.eval()
    return frozen


def eval_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode (``eval``): every BatchNorm layer normalises with its
    running statistics, so the output of a sample does not depend on the rest of the batch.

    Raises ``UserError`` if a BatchNorm layer has no running statistics (built with
    ``track_running_stats=False``): in eval mode PyTorch would normalise it with the batch's
    statistics, which is neither this mode nor per-sample.
    """
    _require_running_stats(module, "bn_mode='eval'")
    return copy.deepcopy(module).eval()


def _require_running_stats(module: nn.Module, what: str) -> None:
    for bn in _batchnorms(module):
        if bn.running_mean is None or bn.running_var is None:
            raise UserError(
                f"a BatchNorm layer ({bn}) has no running statistics; {what} scores it in "
                "eval mode and needs them (use bn_mode='fixed-stats')"
            )


def coupled_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for ``coupled`` scoring, the reference's search script: the arch's
    BatchNorm layers use the batch statistics of whatever batch they see (train mode, running
    statistics untouched); a :class:`Composed`'s generator stays in eval mode on its running
    statistics, as the reference's generators were built. Without a generator (or for a module
    that is not a :class:`Composed`) every BatchNorm layer is in train mode."""
    coupled = copy.deepcopy(module)
    coupled.eval()
    arch = coupled.classifier if isinstance(coupled, Composed) else coupled
    for bn in _batchnorms(arch):
        bn.train()
        bn.track_running_stats = False
    if isinstance(coupled, Composed) and coupled.generator is not None:
        _require_running_stats(coupled.generator, "bn_mode='coupled' (generator)")
    return coupled


def scoring_copy(module: nn.Module, x: torch.Tensor, bn_mode: str) -> nn.Module:
    """The copy of ``module`` that ``bn_mode`` scores (PROTOCOLS 5 "BatchNorm while scoring");
    ``module`` is not modified."""
    if bn_mode not in BN_MODES:
        raise UserError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    if bn_mode == "eval":
        return eval_copy(module)
    if bn_mode == "fixed-stats":
        return freeze_batch_stats(module, x)
    return coupled_copy(module)


def arch_weight_names(classifier: nn.Module, *, prefix: str = "") -> list[str]:
    """Names of the classifier's parameters whose name contains ``weight`` (PROTOCOLS 5, "The
    arch parameter set"): conv weights, BN gammas and linear weights, no biases or BN betas,
    exactly the reference's ``{n: p for n, p in model.named_parameters() if 'weight' in n}``.
    The one home of this rule (TinyNetwork's own list, which held the final linear bias, is
    gone)."""
    return [prefix + n for n, _ in classifier.named_parameters() if "weight" in n]


def select_params(
    composed: Composed, params: ParamSet, param_filter: ParamFilter | None = None
) -> list[str]:
    """Names (in ``composed``) of the parameter set to differentiate, after ``param_filter``
    (called with the prefixed name and the tensor)."""
    if params not in PARAM_SETS:
        raise UserError(f"unknown parameter set {params!r}; valid: {', '.join(PARAM_SETS)}")
    if params == "generator":
        if composed.generator is None:
            raise UserError("params='generator' needs a generator")
        names = [n for n, _ in composed.named_parameters() if n.startswith("generator.")]
    elif params == "arch":
        names = arch_weight_names(composed.classifier, prefix="classifier.")
    else:
        names = [n for n, _ in composed.named_parameters()]
    if param_filter is not None:
        table = dict(composed.named_parameters())
        names = [n for n in names if param_filter(n, table[n])]
    if not names:
        raise UserError(f"the parameter set {params!r} is empty")
    return names


def _split(
    module: nn.Module, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(differentiated parameters, everything else detached) for ``functional_call``."""
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    primal = {n: state[n].detach() for n in names}
    rest = {n: t.detach() for n, t in state.items() if n not in primal}
    return primal, rest


def _n_params(primal: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in primal.values())


def _activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs of one forward of ``x`` (no grad): a proxy for the
    activation gradients one backward pass of that batch holds."""
    total = [0]

    def add(_m: nn.Module, _a: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(add) for m in leaves]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _auto_chunk(n_logits: int, n_params: int, elem: int, per_cotangent_act: int) -> int:
    """Samples per chunk: each sample costs ``n_logits`` Jacobian rows plus as many backward
    passes' activation gradients."""
    per_sample = n_logits * (n_params * elem + per_cotangent_act)
    return max(1, _CHUNK_BUDGET_BYTES // max(1, per_sample))


def _flat_rows(jac: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    """Concatenate per-parameter Jacobians ``(*lead_shape, *param_shape)`` into ``(..., P)``."""
    return torch.cat([j.reshape(*j.shape[:lead], -1) for j in jac.values()], dim=-1)


def logit_kernel(
    module: nn.Module,
    x: torch.Tensor,
    names: list[str],
    *,
    bn_mode: BNMode = "eval",
    kernel_dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``K = mean_n J_n J_n^T`` (C x C), ``J_n`` the Jacobian of the C logits of
    ``module(x)[n]`` w.r.t. the parameters ``names`` (PROTOCOLS 5, Eq. 6 of the EVAS paper).

    ``bn_mode`` as in the module docstring: ``eval`` and ``fixed-stats`` take per-sample
    Jacobians (``vmap(jacrev)``), ``coupled`` the rows of the batch output's Jacobian. ``J`` is
    computed in the module's dtype; ``K`` is accumulated, in float64 by default
    (``kernel_dtype``, PROTOCOLS 5 "Precision"). ``chunk_size`` samples are processed at once (default:
    as many as fit ~512 MiB of Jacobian rows and activation gradients). ``module`` is not
    modified.
    """
    scored = scoring_copy(module, x, bn_mode)
    primal, rest = _split(scored, names)
    n = x.shape[0]
    per_sample_mode = bn_mode != "coupled"
    if per_sample_mode:
        with torch.no_grad():
            c = scored(x[:1]).shape[-1]
        if chunk_size is None:
            act = _activation_bytes(scored, x[:1])  # a per-sample backward
    else:
        out, pullback = vjp(lambda p: functional_call(scored, {**rest, **p}, (x,)), primal)
        c = out.shape[-1]
        if chunk_size is None:
            act = _activation_bytes(scored, x)  # every cotangent's backward spans the batch
    if chunk_size is None:
        chunk_size = _auto_chunk(c, _n_params(primal), x.element_size(), act)
    kernel = torch.zeros(c, c, dtype=kernel_dtype, device=x.device)

    if per_sample_mode:

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(scored, {**rest, **p}, (xi.unsqueeze(0),)).squeeze(0)

        per_sample = vmap(jacrev(one), in_dims=(None, 0))
        for start in range(0, n, chunk_size):
            rows = _flat_rows(per_sample(primal, x[start : start + chunk_size]), 2).to(kernel_dtype)
            kernel += torch.einsum("ncp,ndp->cd", rows, rows)
    else:
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            # one-hot cotangents e_(i, j) for the samples i of this chunk and every logit j
            cot = torch.zeros((stop - start) * c, n * c, dtype=out.dtype, device=out.device)
            cot[torch.arange(cot.shape[0]), torch.arange(start * c, stop * c)] = 1
            (jac,) = vmap(pullback)(cot.view(-1, n, c))
            rows = _flat_rows(jac, 1).view(stop - start, c, -1).to(kernel_dtype)
            kernel += torch.einsum("ncp,ndp->cd", rows, rows)
    return kernel / n


def sample_kernel(
    module: nn.Module,
    x: torch.Tensor,
    names: list[str],
    *,
    bn_mode: BNMode = "coupled",
    kernel_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """TE-NAS's NTK (Chen et al., ICLR 2021, Eq. 3 with summed logits as their code does):
    ``K[i, j] = <g_i, g_j>``, ``g_i`` the gradient of ``sum_c module(x)[i, c]`` w.r.t. the
    parameters ``names`` (N x N), under ``bn_mode`` as :func:`logit_kernel`. Holds all N
    gradients at once (N x P floats)."""
    scored = scoring_copy(module, x, bn_mode)
    primal, rest = _split(scored, names)
    if bn_mode != "coupled":

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(scored, {**rest, **p}, (xi.unsqueeze(0),)).sum()

        grads = vmap(torch.func.grad(one), in_dims=(None, 0))(primal, x)
    else:
        out, pullback = vjp(lambda p: functional_call(scored, {**rest, **p}, (x,)), primal)
        n = x.shape[0]
        cot = torch.eye(n, dtype=out.dtype, device=out.device)[:, :, None].expand(
            n, n, out.shape[-1]
        )
        (grads,) = vmap(pullback)(cot)
    rows = _flat_rows(grads, 1).to(kernel_dtype)
    return rows @ rows.T
