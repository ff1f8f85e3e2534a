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


def reference_kernel(classifier: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's way: for each sample n, the Jacobian of row n of the whole batch's
    train-mode output w.r.t. the arch weights (``torch.autograd.functional.jacobian``, one
    backward per logit), then K = mean_n J_n J_n^T in float64."""
    composed = Composed(classifier).train()
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
    n = x.shape[0]
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
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--N", type=int, default=1)
    ap.add_argument("--archs", type=int, default=16, help="random archs for the BN-mode agreement")
    ap.add_argument("--repeats", type=int, default=1, help="timing repeats (min is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("embedded")
    gen = torch.Generator().manual_seed(args.seed)
    x = augment(to_float(data.x_train[: args.batch]), "crop_flip", generator=gen)

    def build(arch: str, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = TinyNetwork(arch, C=args.C, N=args.N, num_classes=data.info.num_classes)
        return Normalized(net, data.info.mean, data.info.std)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpu_count={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} torch={torch.__version__} python={platform.python_version()}"
    )
    net = build(REFERENCE_ARCH, args.seed)
    names = arch_weight_names(net, prefix="classifier.")
    n_par = sum(dict(Composed(net).named_parameters())[k].numel() for k in names)
    print(
        f"net: NATS C={args.C} N={args.N} {REFERENCE_ARCH}; arch weights P={n_par}; "
        f"batch N={args.batch}, logits C={data.info.num_classes}"
    )

    # warm-up (functorch dispatch, allocator) so the first timed call is not penalised
    kappa(net, x[:4], params="arch", bn_mode="fixed-stats")
    kappa(net, x[:4], params="arch", bn_mode="coupled")
    t_ref, k_ref = timed(lambda: reference_kernel(net, x), args.repeats)
    t_cpl, r_cpl = timed(lambda: kappa(net, x, params="arch", bn_mode="coupled"), args.repeats)
    t_fix, r_fix = timed(lambda: kappa(net, x, params="arch", bn_mode="fixed-stats"), args.repeats)
    kap_ref = condition_number(k_ref).kappa
    print("\n== speed (arch weights, min of repeats) ==")
    print(
        f"reference loop (autograd.functional.jacobian per sample, coupled): {t_ref:8.3f} s  kappa={kap_ref:.6g}"
    )
    print(
        f"ours coupled     (vjp + vmap over N*C cotangents):                  {t_cpl:8.3f} s  kappa={r_cpl.kappa:.6g}"
    )
    print(
        f"ours fixed-stats (vmap(jacrev) over samples):                       {t_fix:8.3f} s  kappa={r_fix.kappa:.6g}"
    )
    print(f"speed-up vs reference: coupled x{t_ref / t_cpl:.1f}, fixed-stats x{t_ref / t_fix:.1f}")
    print(f"ours coupled vs reference kappa: rel diff {abs(r_cpl.kappa - kap_ref) / kap_ref:.2e}")

    print("\n== precision (PROTOCOLS 5) ==")
    composed = Composed(net)
    for mode in ("coupled", "fixed-stats"):
        k64 = logit_kernel(composed, x, names, bn_mode=mode)
        k32 = logit_kernel(composed, x, names, bn_mode=mode, kernel_dtype=torch.float32)
        gold = logit_kernel(
            Composed(build(REFERENCE_ARCH, args.seed).double()), x.double(), names, bn_mode=mode
        )
        kap64, kap32 = condition_number(k64).kappa, condition_number(k32).kappa
        kapg = condition_number(gold).kappa
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
        print(
            f"{mode:11s}: kernel rel err float32-accumulated {rel(k32, gold):.2e}, "
            f"float64-accumulated {rel(k64, gold):.2e} (vs an all-float64 model); "
            f"kappa rel err {abs(kap32 - kapg) / kapg:.2e} vs {abs(kap64 - kapg) / kapg:.2e}"
        )

    print(f"\n== BN-mode agreement over {args.archs} random archs (arch weights, no generator) ==")
    fixed, coupled, flagged = [], [], 0
    t0 = time.perf_counter()
    for i, arch in enumerate(sample_archs(args.archs, seed=args.seed)):
        m = build(arch, args.seed + i)
        a = kappa(m, x, params="arch", bn_mode="fixed-stats")
        b = kappa(m, x, params="arch", bn_mode="coupled")
        flagged += a.flagged or b.flagged
        fixed.append(a.kappa)
        coupled.append(b.kappa)
    rho = spearmanr(fixed, coupled).statistic
    ratios = [
        b / a
        for a, b in zip(fixed, coupled, strict=True)
        if a != float("inf") and b != float("inf")
    ]
    print(
        f"Spearman(fixed-stats, coupled) = {rho:.3f}; median kappa ratio coupled/fixed = "
        f"{statistics.median(ratios):.3f}; flagged archs {flagged}; {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
