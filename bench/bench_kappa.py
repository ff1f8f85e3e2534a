"""kappa speed, precision and BN-mode agreement (PROTOCOLS 5, "BatchNorm while scoring",
"Precision").

Side by side on the same NATS net (C=8, N=1), the same batch of augmented embedded-dataset
images and the `arch` weight parameters:

* reference: the EVAS way, ``torch.autograd.functional.jacobian`` once per sample of the whole
  train-mode batch output (coupled BN semantics, N forwards + N x C backwards);
* ours, ``coupled``: one forward, N x C vector-Jacobian products vectorised with ``vmap``;
* ours, ``fixed-stats``: per-sample Jacobians, ``vmap(jacrev)``.

Also: the float32-vs-float64 kernel error, and the Spearman rank correlation of kappa between
the two BN modes over random archs.

    .venv/bin/python bench/bench_kappa.py            # ~1-3 min on 2 cores
    .venv/bin/python bench/bench_kappa.py --archs 100 --batch 96 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time

import torch
from scipy.stats import spearmanr
from torch.func import functional_call

from nasrisk.trials.data import load_dataset, to_float
from nasrisk.trials.data.augment import augment
from nasrisk.trials.metrics.ntk import condition_number, kappa
from nasrisk.trials.metrics.ntk_kernel import Composed, arch_weight_names, logit_kernel
from nasrisk.trials.models.nats import TinyNetwork, sample_archs
from nasrisk.trials.models.wrapper import Normalized

REFERENCE_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def reference_kernel(
    classifier: torch.nn.Module, x: torch.Tensor, *, samples: int | None = None
) -> torch.Tensor:
    """The reference's way: for each sample n, the Jacobian of row n of the whole batch's
    train-mode output w.r.t. the arch weights (``torch.autograd.functional.jacobian``, one
    backward per logit), then K = mean_n J_n J_n^T in float64. ``samples``: only the first
    ``samples`` rows (every row costs the same, so its time extrapolates linearly)."""
    composed = Composed(copy.deepcopy(classifier)).train()
    names = arch_weight_names(classifier, prefix="classifier.")
    state = dict(composed.named_parameters())
    rest = {
        k: v.detach()
        for k, v in {**state, **dict(composed.named_buffers())}.items()
        if k not in names
    }
    for m in composed.modules():  # batch statistics without touching running stats
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    params = tuple(state[k].detach() for k in names)
    n = x.shape[0] if samples is None else samples
    k = None
    for i in range(n):

        def row(*ps: torch.Tensor, i: int = i) -> torch.Tensor:
            return functional_call(composed, {**rest, **dict(zip(names, ps, strict=True))}, (x,))[i]

        jac = torch.autograd.functional.jacobian(row, params)
        j = torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1).double()
        k = j @ j.T if k is None else k + j @ j.T
    return k / n


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="scoring batch for the speed section")
    ap.add_argument(
        "--small-batch",
        type=int,
        default=8,
        help="batch for the precision and agreement sections (coupled costs N^2)",
    )
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--N", type=int, default=1)
    ap.add_argument("--archs", type=int, default=12, help="random archs for the BN-mode agreement")
    ap.add_argument(
        "--ref-samples",
        type=int,
        default=4,
        help="samples the reference loop runs (time extrapolated to the batch); 0 = all",
    )
    ap.add_argument("--repeats", type=int, default=1, help="timing repeats (min is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    data = load_dataset("embedded")
    gen = torch.Generator().manual_seed(args.seed)
    x_all = augment(
        to_float(data.x_train[: max(args.batch, args.small_batch)]), "crop_flip", generator=gen
    )
    x, xs = x_all[: args.batch], x_all[: args.small_batch]

    def build(arch: str, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = TinyNetwork(arch, C=args.C, N=args.N, num_classes=data.info.num_classes)
        return Normalized(net, data.info.mean, data.info.std)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpu_count={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} torch={torch.__version__} "
        f"python={platform.python_version()} loadavg={os.getloadavg()[0]:.1f}"
    )
    net = build(REFERENCE_ARCH, args.seed)
    names = arch_weight_names(net, prefix="classifier.")
    n_par = sum(dict(Composed(net).named_parameters())[k].numel() for k in names)
    print(
        f"net: NATS C={args.C} N={args.N} {REFERENCE_ARCH}; arch weights P={n_par}; "
        f"logits C={data.info.num_classes}"
    )

    # warm-up (functorch dispatch, allocator) so the first timed call is not penalised
    kappa(net, xs[:4], params="arch", bn_mode="fixed-stats")
    kappa(net, xs[:4], params="arch", bn_mode="coupled")
    n_ref = args.ref_samples if 0 < args.ref_samples < args.batch else args.batch
    t_ref, k_ref = timed(lambda: reference_kernel(net, x, samples=n_ref), args.repeats)
    t_ref *= args.batch / n_ref
    t_cpl, r_cpl = timed(lambda: kappa(net, x, params="arch", bn_mode="coupled"), args.repeats)
    t_fix, r_fix = timed(lambda: kappa(net, x, params="arch", bn_mode="fixed-stats"), args.repeats)
    print(f"\n== speed: batch N={args.batch}, arch weights, min of {args.repeats} ==")
    how = "measured" if n_ref == args.batch else f"extrapolated from {n_ref} samples"
    print(
        f"reference loop (autograd.functional.jacobian per sample, coupled): {t_ref:8.2f} s ({how})"
    )
    print(f"ours coupled     (vjp + vmap over N*C cotangents):                  {t_cpl:8.2f} s")
    print(f"ours fixed-stats (vmap(jacrev) over samples):                       {t_fix:8.2f} s")
    print(
        f"speed-up vs reference: coupled x{t_ref / t_cpl:.1f}, fixed-stats x{t_ref / t_fix:.1f}; "
        f"fixed-stats vs coupled x{t_cpl / t_fix:.1f}"
    )
    print(f"kappa: coupled {r_cpl.kappa:.6g}, fixed-stats {r_fix.kappa:.6g}")
    if n_ref == args.batch:
        kap_ref = condition_number(k_ref).kappa
        print(
            f"reference kappa {kap_ref:.6g}; ours coupled rel diff "
            f"{abs(r_cpl.kappa - kap_ref) / kap_ref:.2e}"
        )

    print(f"\n== precision (PROTOCOLS 5): batch N={args.small_batch}, vs an all-float64 model ==")
    composed = Composed(net)
    gold_net = Composed(build(REFERENCE_ARCH, args.seed).double())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).norm() / b.norm())

    for mode in ("coupled", "fixed-stats"):
        k64 = logit_kernel(composed, xs, names, bn_mode=mode)
        k32 = logit_kernel(composed, xs, names, bn_mode=mode, kernel_dtype=torch.float32)
        gold = logit_kernel(gold_net, xs.double(), names, bn_mode=mode)
        kap64, kap32 = condition_number(k64).kappa, condition_number(k32).kappa
        kapg = condition_number(gold).kappa
        print(
            f"{mode:11s}: kernel rel err: float32-accumulated {rel(k32, gold):.2e}, "
            f"float64-accumulated {rel(k64, gold):.2e}, f32 vs f64 accumulation {rel(k32, k64):.2e}; "
            f"kappa rel err {abs(kap32 - kapg) / kapg:.2e} vs {abs(kap64 - kapg) / kapg:.2e}"
        )

    print(
        f"\n== BN-mode agreement: {args.archs} random archs, batch N={args.small_batch}, "
        "arch weights, no generator =="
    )
    fixed, coupled, flagged = [], [], 0
    t0 = time.perf_counter()
    for i, arch in enumerate(sample_archs(args.archs, seed=args.seed)):
        m = build(arch, args.seed + i)
        a = kappa(m, xs, params="arch", bn_mode="fixed-stats")
        b = kappa(m, xs, params="arch", bn_mode="coupled")
        flagged += a.flagged or b.flagged
        fixed.append(a.kappa)
        coupled.append(b.kappa)
    rho = spearmanr(fixed, coupled).statistic
    finite = [(a, b) for a, b in zip(fixed, coupled, strict=True) if math.isfinite(a * b)]
    ratio = statistics.median(b / a for a, b in finite) if finite else math.nan
    print(
        f"Spearman(fixed-stats, coupled) = {rho:.3f}; median kappa ratio coupled/fixed = "
        f"{ratio:.3f}; flagged archs {flagged}; {time.perf_counter() - t0:.1f} s"
    )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
