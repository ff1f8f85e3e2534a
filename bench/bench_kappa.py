"""kappa speed, precision and BatchNorm-mode agreement (PROTOCOLS 5, "Score kappa", "BatchNorm
while scoring", "Precision"), at the `evas-kappa` smoke size by default: NATS C=8 N=1, a batch
of 16 augmented embedded-dataset images chosen as the trial chooses it, the trigger generator
at the smoke widths (8, 16, 32).

1. Speed, side by side on the same nets and batch, ``eval`` mode (the default):
   * reference: the EVAS scoring script's call, ``torch.autograd.functional.jacobian`` of the
     whole batch output (N x C backward passes, each through the batch's graph);
   * reference-style loop: ``torch.autograd.functional.jacobian`` once per sample (valid in
     ``eval`` mode, where samples are independent: C backward passes of a 1-sample graph);
   * ours: ``vmap(jacrev)`` over samples.
   The same for ``coupled`` (the reference's search script: the whole-batch call with the arch
   in train mode, the generator in eval mode) against ours (one forward, vmap over N x C vjps).
2. Precision: the float32 error of the kernel and of kappa against an all-float64 model, with
   the kernel accumulated in float32 or in float64 (ours), for each mode.
3. Agreement: kappa of ``--archs`` random NATS archs in every mode (the study's
   ``kappa_scores``, ``--n-init`` initialisations); Spearman of each mode pair with a bootstrap
   95% CI, per variant; a markdown table for the README.
4. Control (``--retest-archs``): each mode against itself over two initialisations of the same
   archs, the agreement a mode has with itself.

    nice -n 10 .venv/bin/python bench/bench_kappa.py              # 100 archs: ~1 h on 2 busy cores
    .venv/bin/python bench/bench_kappa.py --archs 10 --repeats 1  # a few minutes
    .venv/bin/python bench/bench_kappa.py --skip-speed --archs 0 --retest-archs 40  # the control
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import math
import os
import platform
import time

import numpy as np
import torch
from scipy.stats import rankdata
from torch.func import functional_call

from nasrisk.trials.data import load_dataset, to_float
from nasrisk.trials.data.augment import augment
from nasrisk.trials.metrics.ntk import condition_number, kappa_scores
from nasrisk.trials.metrics.ntk_kernel import Composed, logit_kernel, scoring_copy, select_params
from nasrisk.trials.models.generator import TriggerGenerator
from nasrisk.trials.models.nats import TinyNetwork, sample_archs
from nasrisk.trials.models.wrapper import Normalized

REFERENCE_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
MODES = ("eval", "fixed-stats", "coupled")
VARIANTS = ("generator", "arch", "bare")


def _jac_rows(jac: tuple[torch.Tensor, ...], lead: int) -> torch.Tensor:
    return torch.cat([j.reshape(*j.shape[:lead], -1) for j in jac], dim=-1).double()


def reference_kernel(scored: torch.nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The reference's call: the Jacobian (N, C, P) of the whole batch output w.r.t. the
    parameters, ``torch.autograd.functional.jacobian`` (one backward per output element), then
    ``K = mean_n J_n J_n^T`` in float64. ``scored`` is already in the mode to score."""
    state = {**dict(scored.named_parameters()), **dict(scored.named_buffers())}
    rest = {k: v.detach() for k, v in state.items() if k not in names}
    params = tuple(state[k].detach() for k in names)

    def out(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(scored, {**rest, **dict(zip(names, ps, strict=True))}, (x,))

    j = _jac_rows(torch.autograd.functional.jacobian(out, params), 2)  # (N, C, P)
    return torch.einsum("ncp,ndp->cd", j, j) / x.shape[0]


def per_sample_loop_kernel(
    scored: torch.nn.Module, x: torch.Tensor, names: list[str]
) -> torch.Tensor:
    """``torch.autograd.functional.jacobian`` of each sample's C logits on its own (a 1-sample
    forward): the plain-loop way for ``eval`` mode, whose samples are independent."""
    state = {**dict(scored.named_parameters()), **dict(scored.named_buffers())}
    rest = {k: v.detach() for k, v in state.items() if k not in names}
    params = tuple(state[k].detach() for k in names)
    k = torch.zeros((), dtype=torch.float64)
    for i in range(x.shape[0]):

        def out(*ps: torch.Tensor, i: int = i) -> torch.Tensor:
            table = {**rest, **dict(zip(names, ps, strict=True))}
            return functional_call(scored, table, (x[i : i + 1],))[0]

        j = _jac_rows(torch.autograd.functional.jacobian(out, params), 1)  # (C, P)
        k = k + j @ j.T
    return k / x.shape[0]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def spearman_ci(
    a: list[float], b: list[float], *, resamples: int, seed: int
) -> tuple[float, float, float]:
    """Spearman rho of paired scores (+inf ranks last, ties averaged) and a percentile
    bootstrap 95% CI over archs."""
    a_, b_ = np.asarray(a), np.asarray(b)

    def rho(idx: np.ndarray) -> float:
        ra, rb = rankdata(a_[idx]), rankdata(b_[idx])
        if ra.std() == 0 or rb.std() == 0:
            return math.nan
        return float(np.corrcoef(ra, rb)[0, 1])

    rng = np.random.default_rng(seed)
    n = len(a_)
    boots = np.array([rho(rng.integers(0, n, n)) for _ in range(resamples)])
    boots = boots[np.isfinite(boots)]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (math.nan, math.nan)
    return rho(np.arange(n)), float(lo), float(hi)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", type=int, default=100, help="random archs for the agreement")
    ap.add_argument("--n-init", type=int, default=1, help="initialisations per arch (median)")
    ap.add_argument("--batch", type=int, default=16, help="scoring batch (smoke: 16)")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--N", type=int, default=1)
    ap.add_argument("--gen-channels", type=int, nargs=3, default=[8, 16, 32])
    ap.add_argument("--variants", default="generator,arch,bare", help="agreement variants")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (min is reported)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--retest-archs",
        type=int,
        default=0,
        help="control: Spearman of each mode with itself over two initialisations, on this "
        "many archs (0: skip)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = tuple(v for v in args.variants.split(",") if v)
    t_start = time.perf_counter()

    # the smoke trial's kappa batch: subset, seeded permutation, crop_flip (trials/kinds/evas.py)
    data = load_dataset("embedded").subset(1500, 500)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.y_train), generator=gen)[: args.batch]
    x = augment(to_float(data.x_train[idx]), "crop_flip", generator=gen)
    n_classes = data.info.num_classes
    channels = tuple(args.gen_channels)

    def builder(arch: str):
        def build() -> torch.nn.Module:
            net = TinyNetwork(arch, C=args.C, N=args.N, num_classes=n_classes)
            return Normalized(net, data.info.mean, data.info.std)

        return build

    def build_generator() -> torch.nn.Module:
        return TriggerGenerator(channels=channels)

    print(
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {cpu_name()}, "
        f"cpu_count={os.cpu_count()}, torch_threads={torch.get_num_threads()}, "
        f"torch={torch.__version__}, python={platform.python_version()}, "
        f"loadavg={os.getloadavg()[0]:.1f}, ATEN_CPU_CAPABILITY="
        f"{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"
    )
    torch.manual_seed(args.seed)
    net = builder(REFERENCE_ARCH)()
    torch.manual_seed(args.seed)
    g = build_generator()
    setups = {  # variant -> (composed module, parameter names)
        "generator": Composed(net, g),
        "bare": Composed(net),
    }
    names = {
        "generator": select_params(setups["generator"], "generator"),
        "bare": select_params(setups["bare"], "arch"),
    }
    for v, m in setups.items():
        n_par = sum(dict(m.named_parameters())[k].numel() for k in names[v])
        print(f"  {v}: P={n_par} differentiated parameters")
    print(
        f"net: NATS C={args.C} N={args.N} {REFERENCE_ARCH}; generator widths {channels}; "
        f"batch N={args.batch}; logits C={n_classes}"
    )

    if not args.skip_speed:
        print(f"\n== 1. speed (min of {args.repeats}), same nets and batch ==")
        for v in ("generator", "bare"):
            m, nm = setups[v], names[v]
            logit_kernel(m, x[:2], nm, bn_mode="eval")  # warm-up (functorch dispatch)
            scored = scoring_copy(m, x, "eval")
            # (each lambda runs inside timed(), before the loop moves on: B023 does not apply)
            t_ref, k_ref = timed(lambda: reference_kernel(scored, x, nm), args.repeats)  # noqa: B023
            t_loop, k_loop = timed(lambda: per_sample_loop_kernel(scored, x, nm), args.repeats)  # noqa: B023
            t_ours, k_ours = timed(lambda: logit_kernel(m, x, nm, bn_mode="eval"), args.repeats)  # noqa: B023
            print(
                f"{v:9s} eval:    reference whole-batch jacobian {t_ref:7.2f} s | per-sample "
                f"jacobian loop {t_loop:7.2f} s | ours vmap(jacrev) {t_ours:7.2f} s | speed-up "
                f"x{t_ref / t_ours:.1f} vs reference, x{t_loop / t_ours:.1f} vs loop | kernel rel "
                f"diff {rel(k_ours, k_ref):.1e} / {rel(k_loop, k_ref):.1e}"
            )
            cscored = scoring_copy(m, x, "coupled")
            t_cref, kc_ref = timed(lambda: reference_kernel(cscored, x, nm), args.repeats)  # noqa: B023
            t_cours, kc = timed(lambda: logit_kernel(m, x, nm, bn_mode="coupled"), args.repeats)  # noqa: B023
            t_fix, _ = timed(lambda: logit_kernel(m, x, nm, bn_mode="fixed-stats"), args.repeats)  # noqa: B023
            print(
                f"{v:9s} coupled: reference whole-batch jacobian {t_cref:7.2f} s | ours vmap(vjp) "
                f"{t_cours:7.2f} s | x{t_cref / t_cours:.1f} | kernel rel diff "
                f"{rel(kc, kc_ref):.1e}; fixed-stats ours {t_fix:7.2f} s"
            )

    print(f"\n== 2. precision: batch N={args.batch}, vs an all-float64 model ==")
    for v in ("generator", "bare"):
        m, nm = setups[v], names[v]
        gold_m = copy.deepcopy(m).double()
        for mode in MODES:
            k64 = logit_kernel(m, x, nm, bn_mode=mode)
            k32 = logit_kernel(m, x, nm, bn_mode=mode, kernel_dtype=torch.float32)
            gold = logit_kernel(gold_m, x.double(), nm, bn_mode=mode)
            kap64, kap32 = condition_number(k64).kappa, condition_number(k32).kappa
            kapg = condition_number(gold).kappa
            print(
                f"{v:9s} {mode:11s}: kernel rel err f32-accumulated {rel(k32, gold):.1e}, "
                f"f64-accumulated {rel(k64, gold):.1e}; kappa {kapg:.5g}, rel err "
                f"{abs(kap32 - kapg) / kapg:.1e} (f32) vs {abs(kap64 - kapg) / kapg:.1e} (f64)"
            )

    if args.archs > 0:
        print(
            f"\n== 3. BN-mode agreement: {args.archs} random NATS archs (seed {args.seed}), "
            f"n_init={args.n_init}, batch N={args.batch} =="
        )
        scores: dict[str, dict[str, list[float]]] = {md: {v: [] for v in variants} for md in MODES}
        flagged = {md: {v: 0 for v in variants} for md in MODES}
        t0 = time.perf_counter()
        archs = sample_archs(args.archs, seed=args.seed)
        for i, arch in enumerate(archs):
            for mode in MODES:
                s = kappa_scores(
                    builder(arch),
                    x,
                    build_generator=build_generator,
                    variants=variants,
                    n_init=args.n_init,
                    seed=args.seed + i,
                    bn_mode=mode,
                )
                for v in variants:
                    scores[mode][v].append(s[f"kappa_{v}"])
                    flagged[mode][v] += s[f"kappa_{v}_flagged"] > 0
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{len(archs)} archs, {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"agreement took {time.perf_counter() - t0:.0f} s")

        print("\n| variant | modes | Spearman rho | 95% CI (bootstrap) |")
        print("|---|---|---|---|")
        for v in variants:
            for a, b in itertools.combinations(MODES, 2):
                rho, lo, hi = spearman_ci(
                    scores[a][v], scores[b][v], resamples=args.resamples, seed=args.seed
                )
                print(f"| {v} | {a} vs {b} | {rho:.3f} | [{lo:.3f}, {hi:.3f}] |")
        print("\n| variant | mode | median kappa | flagged archs |")
        print("|---|---|---|---|")
        for v in variants:
            for mode in MODES:
                med = float(np.median(scores[mode][v]))
                print(f"| {v} | {mode} | {med:.4g} | {flagged[mode][v]}/{len(archs)} |")

    if args.retest_archs > 0:
        print(
            f"\n== 4. control: each mode against itself, initialisations seed+i vs "
            f"seed+i+10000, {args.retest_archs} archs =="
        )
        t0 = time.perf_counter()
        pair: dict[str, dict[str, tuple[list[float], list[float]]]] = {
            md: {v: ([], []) for v in variants} for md in MODES
        }
        for i, arch in enumerate(sample_archs(args.retest_archs, seed=args.seed)):
            for mode in MODES:
                for side, off in enumerate((0, 10000)):
                    s = kappa_scores(
                        builder(arch),
                        x,
                        build_generator=build_generator,
                        variants=variants,
                        n_init=args.n_init,
                        seed=args.seed + i + off,
                        bn_mode=mode,
                    )
                    for v in variants:
                        pair[mode][v][side].append(s[f"kappa_{v}"])
        print(f"control took {time.perf_counter() - t0:.0f} s")
        print("\n| variant | mode | Spearman rho, init vs init | 95% CI (bootstrap) |")
        print("|---|---|---|---|")
        for v in variants:
            for mode in MODES:
                a, b = pair[mode][v]
                rho, lo, hi = spearman_ci(a, b, resamples=args.resamples, seed=args.seed)
                print(f"| {v} | {mode} | {rho:.3f} | [{lo:.3f}, {hi:.3f}] |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
