"""Training the EVAS input-aware trigger generator against a frozen classifier (PROTOCOLS 5,
"Generator training"), and its ASR.

EVAS (Pang et al., ICLR 2023, Sec. 3.2 and App. B) measures how backdoor-prone an
architecture is by training the input-aware dynamic trigger of Nguyen & Tran ("Input-Aware
Dynamic Backdoor Attack", NeurIPS 2020, Alg. 1) against the *clean, frozen* trained model:
only the generator learns, so a high ASR means the architecture lets an input-dependent
trigger take it over without touching its weights.

Two phases, as the reference (EVAS's TrojanZoo-based code) ran them:

1. mask generator (``mask_epochs``; `paper` 25, the EVAS paper's Table 6; `artifact` 10, the
   reference scripts): ``L = lambda_norm * mean(relu(m(x) - density))
   + lambda_div * L_div(x, x', m(x), m(x'))``; the pattern generator is idle;
2. pattern generator (``pattern_epochs``, 10 in both sets) with the mask generator frozen
   (eval mode, no gradient): in each batch of ``b`` inputs the first ``n_bd`` carry their own
   trigger and the target label, the next ``n_cross`` carry the trigger of another input and
   keep their true label, the rest stay clean; ``n_bd`` is ``p_backdoor * b`` rounded
   stochastically (floor, plus one with probability the fractional part: 9.6 -> 10 with
   probability 0.6, else 9; expectation exactly ``p_backdoor * b``), ``n_cross`` likewise
   from ``p_cross``, as the reference does; ``L = CE(f(batch), labels)
   + lambda_div * L_div(x~_bd, x~_cross, mark(x), mark(x'))`` over the first
   ``k = min(n_bd, n_cross)`` pairs.

``L_div`` is the diversity loss of Nguyen & Tran (Eq. 4) with the reference's L2 norms:

    L_div(a, a', g, g') = (1/K) sum_k ||a_k - a'_k||_2 / (||g_k - g'_k||_2 + 1e-5),

each norm over all channels and pixels of one sample (``a``: 3 channels; a mask ``g``: 1
channel, a pattern: 3). In the mask phase ``a, a'`` are the two clean inputs; in the pattern
phase they are the *blended trigger inputs* (the backdoor input and the cross-trigger input),
not the clean ones. It keeps the generator from collapsing to one fixed trigger.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from ..context import TrialContext
from ..data.augment import augment
from ..data.base import ImageData, to_float
from ..models.generator import TriggerGenerator
from ..train import evaluate

# Added to the trigger distance, as in the reference: two identical triggers give a large
# finite ratio.
_DIV_EPS = 1e-5
#: generator epochs (mask, pattern) per parameter set (PROTOCOLS 5): the EVAS paper's Table 6
#: says 25 mask epochs; the reference scripts ran 10 (``--train_mask_epochs 10 --epochs 10``).
GENERATOR_EPOCHS = {"paper": (25, 10), "artifact": (10, 10)}


class GeneratorConfig(BaseModel):
    """Generator training as EVAS ran it (PROTOCOLS 5); every default is the reference value
    except ``augment``.

    ``mask_epochs`` / ``pattern_epochs`` left unset come from ``params``
    (:data:`GENERATOR_EPOCHS`: `paper` 25 / 10, `artifact` 10 / 10); the validated config
    always holds the numbers. ``augment`` is applied to each training batch before the
    trigger (the reference trained on its training loader, which random-crops and flips CIFAR
    images).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: Literal["paper", "artifact"] = "paper"
    mask_epochs: int = Field(ge=0, le=100_000)
    pattern_epochs: int = Field(ge=0, le=100_000)
    batch_size: int = Field(96, ge=2)
    lr: float = Field(0.01, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    lambda_div: float = Field(1.0, ge=0)
    lambda_norm: float = Field(100.0, ge=0)
    mask_density: float = Field(0.032, ge=0, le=1)
    p_backdoor: float = Field(0.1, gt=0, le=1)
    p_cross: float = Field(0.1, ge=0, le=1)
    max_acc_drop: float = Field(0.05, ge=0, le=1)
    target: int = Field(0, ge=0)
    augment: Literal["none", "crop_flip", "crop_flip_cutout"] = "crop_flip"
    #: encoder widths of both generator nets (PROTOCOLS 5: 32, 64, 128); smaller at `smoke`
    channels: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 64, 128)

    @model_validator(mode="before")
    @classmethod
    def _epochs_from_params(cls, data: object) -> object:
        if isinstance(data, Mapping):
            mask, pattern = GENERATOR_EPOCHS.get(data.get("params", "paper"), (None, None))
            if mask is not None:  # an unknown set is reported by the field's validation
                data = {"mask_epochs": mask, "pattern_epochs": pattern, **data}
        return data

    @model_validator(mode="after")
    def _fractions(self) -> GeneratorConfig:
        if self.p_backdoor + self.p_cross > 1:
            raise ValueError("p_backdoor + p_cross must be at most 1")
        return self


def diversity_loss(a1: torch.Tensor, a2: torch.Tensor, g1: torch.Tensor,
                   g2: torch.Tensor) -> torch.Tensor:
    """Nguyen & Tran (2020), Eq. 4, as the EVAS reference computes it:
    ``mean_k ||a1_k - a2_k||_2 / (||g1_k - g2_k||_2 + 1e-5)``, each L2 norm over all entries
    of one sample (channels x pixels), then the mean over the pairs.

    ``a1, a2``: the paired inputs (clean inputs in the mask phase, the blended trigger inputs
    in the pattern phase); ``g1, g2``: their masks or patterns.

    Deviations: none from the reference. (Nguyen & Tran's own code uses root-mean-square
    distances, which divide each norm by the square root of its entry count and so weight
    the 1-channel mask phase differently; EVAS's code, which we follow, uses plain norms.)
    """
    d_a = (a1 - a2).flatten(1).norm(p=2, dim=1)
    d_g = (g1 - g2).flatten(1).norm(p=2, dim=1)
    return (d_a / (d_g + _DIV_EPS)).mean()


def stochastic_share(fraction: float, batch: int, generator: torch.Generator) -> int:
    """``fraction * batch`` rounded stochastically, as the reference sizes the backdoor and
    cross-trigger shares of a batch: the floor, plus one with probability equal to the
    fractional part (9.6 -> 9 with probability 0.4, 10 with probability 0.6), so the expected
    share is exactly ``fraction * batch``. One uniform draw from ``generator`` (a CPU
    generator)."""
    whole, frac = divmod(fraction * batch, 1.0)
    u = float(torch.rand((), generator=generator))
    return int(whole) + (u < frac)


@torch.no_grad()
def attack_success_rate(classifier: nn.Module, generator: TriggerGenerator, x_uint8: torch.Tensor,
                        y: torch.Tensor, *, target: int, device: torch.device | str,
                        batch_size: int = 500) -> float:
    """Fraction of trigger inputs ``generator(x)`` that ``classifier`` labels ``target``, over
    the inputs whose true label is not ``target`` (PROTOCOLS 5). Both models run in eval mode
    (their modes are restored). NaN when no input qualifies.

    Deviations: the EVAS reference counted target-class inputs too, which adds their clean
    accuracy to the ASR; an input already of the target class says nothing about the trigger.
    """
    device = torch.device(device)
    keep = (y != target).nonzero().flatten().cpu()
    if len(keep) == 0:
        return float("nan")
    modes = (classifier.training, generator.training)
    classifier.eval()
    generator.eval()
    hits = 0
    try:
        for i in range(0, len(keep), batch_size):
            xb = x_uint8[keep[i:i + batch_size]].to(device)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            hits += int((classifier(generator(xb)).argmax(1) == target).sum())
    finally:
        classifier.train(modes[0])
        generator.train(modes[1])
    return hits / len(keep)


@torch.no_grad()
def _cross_accuracy(classifier: nn.Module, generator: TriggerGenerator, x_uint8: torch.Tensor,
                    y: torch.Tensor, *, device: torch.device, batch_size: int = 500) -> float:
    """Accuracy on inputs carrying the trigger of another input (the next one, cyclically):
    Nguyen & Tran's cross-trigger accuracy, which the cross loss keeps high."""
    classifier.eval()
    generator.eval()
    x2_all = x_uint8.roll(1, 0)
    hits = 0
    for i in range(0, len(y), batch_size):
        xb = to_float(x_uint8[i:i + batch_size].to(device))
        x2 = to_float(x2_all[i:i + batch_size].to(device))
        hits += int((classifier(generator.cross(xb, x2)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    return hits / max(len(y), 1)


def _adam(module: nn.Module, cfg: GeneratorConfig, epochs: int):
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=cfg.betas)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))


def _copy(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def train_generator(
    classifier: nn.Module,
    data: ImageData,
    cfg: GeneratorConfig,
    *,
    seed: int,
    ctx: TrialContext,
    state_key: str = "generator",
    max_train: int | None = None,
    generator: TriggerGenerator | None = None,
) -> dict:
    """Train an input-aware trigger generator against the frozen ``classifier`` (a module on
    [0, 1] images) on ``data.x_train`` (the first ``max_train`` images when given) and return
    ``{"acc", "asr", "cross_acc", "mask_density", "best_epoch", "seconds", "history",
    "generator"}``: the classifier's clean test accuracy, the ASR / cross-trigger accuracy /
    mean mask of the kept generator on ``data.x_test``, the kept pattern epoch (1-based, 0
    when ``pattern_epochs`` is 0) and the trained :class:`TriggerGenerator` (the kept epoch's
    weights; ``generator`` is trained in place when given, else one is built under ``seed``).

    Selection (PROTOCOLS 5): the pattern epoch with the best test ASR among those whose clean
    accuracy dropped at most ``max_acc_drop``. Checkpoints every epoch through
    ``ctx.save_state(state_key, ...)``; a finished state returns at once. Logs ``gen_loss``
    every epoch and ``gen_asr``, ``gen_cross_acc`` every pattern epoch (step = epoch over
    both phases).

    Frozen classifier: eval mode (BatchNorm uses its running statistics, which stay
    untouched) and ``requires_grad`` off for its parameters during training; both are restored
    on return. Its clean accuracy is still measured every pattern epoch and the selection rule
    applied to it; with a frozen eval-mode classifier it cannot drop, so the rule keeps the
    best-ASR epoch.

    Deviations: the reference (TrojanZoo-based) may have left the classifier's BatchNorm
    layers in train mode, letting trigger batches shift their running statistics; that would
    be a change to the model, which EVAS's threat model (the architecture is fixed and
    trained on clean data) rules out, so we keep the statistics fixed. ASR excludes
    target-class inputs (see :func:`attack_success_rate`).
    """
    device = ctx.device
    classifier.to(device)
    if cfg.target >= data.info.num_classes:
        raise ValueError(f"target {cfg.target} is not a class of {data.info.name}")
    if generator is None:
        torch.manual_seed(seed)
        generator = TriggerGenerator(channels=cfg.channels)
    generator.to(device)
    x_train, y_train = data.x_train[:max_train], data.y_train[:max_train]
    total_epochs = cfg.mask_epochs + cfg.pattern_epochs
    opt_m, sched_m = _adam(generator.mask, cfg, cfg.mask_epochs)
    opt_p, sched_p = _adam(generator.pattern, cfg, cfg.pattern_epochs)

    def evaluate_kept() -> dict:
        asr = attack_success_rate(classifier, generator, data.x_test, data.y_test,
                                  target=cfg.target, device=device)
        cross = _cross_accuracy(classifier, generator, data.x_test, data.y_test, device=device)
        with torch.no_grad():
            generator.eval()
            dens = float(torch.cat([generator.mask_of(to_float(data.x_test[i:i + 500].to(device)))
                                    .mean((1, 2, 3)).cpu()
                                    for i in range(0, len(data.x_test), 500)]).mean())
        return {"asr": asr, "cross_acc": cross, "mask_density": dens}

    start, history, seconds = 0, [], 0.0
    best = {"epoch": 0, "asr": -1.0, "state": None}
    saved = ctx.load_state(state_key)
    if saved is not None:
        generator.load_state_dict(saved["generator"])
        if saved.get("done"):
            return {**{k: saved[k] for k in ("acc", "asr", "cross_acc", "mask_density",
                                             "best_epoch", "seconds", "history")},
                    "generator": generator}
        for obj, key in ((opt_m, "opt_m"), (sched_m, "sched_m"), (opt_p, "opt_p"),
                         (sched_p, "sched_p")):
            obj.load_state_dict(saved[key])
        start, history, seconds = saved["epoch"], saved["history"], saved["seconds"]
        best = {"epoch": saved["best_epoch"], "asr": saved["best_asr"],
                "state": saved["best_state"]}

    acc0 = evaluate(classifier, data.x_test, data.y_test, device=device)
    modes = (classifier.training, [p.requires_grad for p in classifier.parameters()])
    classifier.eval()
    classifier.requires_grad_(False)
    n = len(y_train)
    rng = torch.Generator(device=device)
    share_rng = torch.Generator()  # the stochastic rounding of the per-batch shares
    try:
        for epoch in range(start, total_epochs):
            t0 = time.perf_counter()
            rng.manual_seed(seed * 100_003 + epoch)
            share_rng.manual_seed(seed * 100_043 + epoch)
            torch.manual_seed(seed * 100_019 + epoch)
            mask_phase = epoch < cfg.mask_epochs
            perm1 = torch.randperm(n, device=device, generator=rng).cpu()
            perm2 = torch.randperm(n, device=device, generator=rng).cpu()
            total, count = 0.0, 0
            for i in range(0, n, cfg.batch_size):
                i1, i2 = perm1[i:i + cfg.batch_size], perm2[i:i + cfg.batch_size]
                x1 = augment(to_float(x_train[i1].to(device)), cfg.augment, generator=rng)
                x2 = augment(to_float(x_train[i2].to(device)), cfg.augment, generator=rng)
                if mask_phase:
                    loss = _mask_step(generator, x1, x2, cfg, opt_m)
                else:
                    loss = _pattern_step(classifier, generator, x1, y_train[i1].to(device), x2,
                                         cfg, opt_p, share_rng)
                total += loss * len(i1)
                count += len(i1)
            (sched_m if mask_phase else sched_p).step()
            row = {"epoch": epoch + 1, "phase": "mask" if mask_phase else "pattern",
                   "gen_loss": total / max(count, 1)}
            if not mask_phase:
                ev = evaluate_kept()
                row.update(gen_asr=ev["asr"], gen_cross_acc=ev["cross_acc"],
                           gen_mask_density=ev["mask_density"])
                acc = evaluate(classifier, data.x_test, data.y_test, device=device)
                row["gen_clean_acc"] = acc
                if acc0 - acc <= cfg.max_acc_drop and ev["asr"] > best["asr"]:
                    best = {"epoch": epoch + 1 - cfg.mask_epochs, "asr": ev["asr"],
                            "state": _copy(generator.state_dict())}
            seconds += time.perf_counter() - t0
            history.append(row)
            metrics = {k: float(v) for k, v in row.items() if k.startswith("gen_")}
            ctx.log_metrics(metrics, step=epoch + 1)
            ctx.progress(f"generator epoch {epoch + 1}/{total_epochs} "
                         + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            ctx.save_state(state_key, {
                "epoch": epoch + 1, "generator": generator.state_dict(),
                "opt_m": opt_m.state_dict(), "sched_m": sched_m.state_dict(),
                "opt_p": opt_p.state_dict(), "sched_p": sched_p.state_dict(),
                "history": history, "seconds": seconds, "best_epoch": best["epoch"],
                "best_asr": best["asr"], "best_state": best["state"],
            }, metrics=metrics)

        if best["state"] is not None:
            generator.load_state_dict(best["state"])
        result = {"acc": acc0, **evaluate_kept(), "best_epoch": best["epoch"],
                  "seconds": seconds, "history": history}
    finally:
        classifier.train(modes[0])
        for p, flag in zip(classifier.parameters(), modes[1], strict=True):
            p.requires_grad_(flag)
    generator.eval()
    ctx.save_state(state_key, {"done": True, "generator": generator.state_dict(), **result},
                   metrics={k: result[k] for k in ("acc", "asr", "cross_acc")})
    return {**result, "generator": generator}


def _mask_step(generator: TriggerGenerator, x1: torch.Tensor, x2: torch.Tensor,
               cfg: GeneratorConfig, opt: torch.optim.Optimizer) -> float:
    """One mask-generator step (Nguyen & Tran, Alg. 1 lines 2-6): density + diversity."""
    generator.mask.train()
    m1, m2 = generator.mask_of(x1), generator.mask_of(x2)
    loss = (cfg.lambda_norm * F.relu(m1 - cfg.mask_density).mean()
            + cfg.lambda_div * diversity_loss(x1, x2, m1, m2))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _pattern_step(classifier: nn.Module, generator: TriggerGenerator, x1: torch.Tensor,
                  y1: torch.Tensor, x2: torch.Tensor, cfg: GeneratorConfig,
                  opt: torch.optim.Optimizer, share_rng: torch.Generator) -> float:
    """One pattern-generator step (Nguyen & Tran, Alg. 1 lines 8-16 with the classifier
    frozen; EVAS's reference loop): ``n_bd`` backdoor + ``n_cross`` cross-trigger + clean
    cross-entropy over the whole batch, plus diversity between the first ``min(n_bd,
    n_cross)`` backdoor inputs and cross-trigger inputs (numerator on these blended inputs,
    denominator on their patterns). The shares are rounded stochastically
    (:func:`stochastic_share`) and may be 0, as in the reference; a batch without trigger
    inputs gives the generator no gradient and takes no step.

    The clean part is constant for the generator; it is computed without a graph and kept in
    the loss (as the reference's whole-batch mean) so the backdoor/cross terms keep their
    relative weight ``p * CE`` against ``lambda_div`` and the logged loss is the reference's.
    """
    generator.mask.eval()
    generator.pattern.train()
    b = len(y1)
    n_bd = min(stochastic_share(cfg.p_backdoor, b, share_rng), b)
    n_cross = min(stochastic_share(cfg.p_cross, b, share_rng), b - n_bd, len(x2))
    parts, labels = [], []
    loss_div = torch.zeros((), device=x1.device)
    with torch.no_grad():
        mask_bd = generator.mask_of(x1[:n_bd]) if n_bd else None
        mask_cross = generator.mask_of(x2[:n_cross]) if n_cross else None
    if n_bd:
        mark_bd = generator.mark(x1[:n_bd])
        parts.append(generator.blend(x1[:n_bd], mark_bd, mask_bd))
        labels.append(torch.full((n_bd,), cfg.target, dtype=y1.dtype, device=y1.device))
    if n_cross:
        mark_cross = generator.mark(x2[:n_cross])
        parts.append(generator.blend(x1[n_bd:n_bd + n_cross], mark_cross, mask_cross))
        labels.append(y1[n_bd:n_bd + n_cross])
    if n_bd and n_cross:
        k = min(n_bd, n_cross)
        loss_div = diversity_loss(parts[0][:k], parts[1][:k], mark_bd[:k], mark_cross[:k])
    ce_sum = (F.cross_entropy(classifier(torch.cat(parts)), torch.cat(labels), reduction="sum")
              if parts else torch.zeros((), device=x1.device))
    with torch.no_grad():
        rest = x1[n_bd + n_cross:]
        ce_clean = (F.cross_entropy(classifier(rest), y1[n_bd + n_cross:], reduction="sum")
                    if len(rest) else torch.zeros((), device=x1.device))
    loss = (ce_sum + ce_clean) / b + cfg.lambda_div * loss_div
    if parts:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def save_trigger_examples(generator: TriggerGenerator, x_uint8: torch.Tensor, path: str | Path,
                          n: int = 8) -> Path:
    """Write a PNG grid (row 1: clean inputs, row 2: their trigger inputs, row 3: the masks)
    of the first ``n`` images of ``x_uint8`` for the trial's artifacts; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        x = to_float(x_uint8[:n].to(device))
        x_t, mask = generator(x).cpu(), generator.mask_of(x).cpu()
    generator.train(was_training)
    x = x.cpu()
    k = len(x)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.2), squeeze=False)
    rows = [("clean", x), ("trigger", x_t), ("mask", mask.expand(-1, 3, -1, -1))]
    for r, (name, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy(), vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
