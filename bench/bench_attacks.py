"""Targeted L-inf PGD: our batched torch implementation vs ART's ProjectedGradientDescentPyTorch,
side by side on the same model and inputs (STYLE "Benchmarks"; PROTOCOLS 4, PGD targeted).

Prints, per setting, wall time of each, the ratio ART / ours, ASR of each, and agreement: the
fraction of inputs on which the success verdict matches and the max |x_adv(ours) - x_adv(ART)|
(without random start both are deterministic and should coincide up to float rounding). ART
judges the last iterate, so ours runs with ``stop_at_success=False`` for this comparison; the
``ASR any`` column is ours with the protocol's criterion (success at any iteration, kept at
the first), which can only be higher.

Run: ``.venv/bin/python bench/bench_attacks.py [--n 200] [--device cpu]``
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from nasrisk.trials.attacks.pgd import pgd
from nasrisk.trials.attacks.targets import clean_logits, is_success, select_correct, select_targets
from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.train import TrainConfig, train


def build_victim(device: str) -> tuple[nn.Module, object]:
    data = load_dataset("embedded")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))
    model = Normalized(net, data.info.mean, data.info.std)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.1, augment="none", eval_each_epoch=False)
    res = train(model, data.subset(2000, 500), cfg, seed=0, ctx=TrialContext(device=device))
    print(f"victim: small CNN, test acc {res['test_acc']:.3f} after {res['seconds']:.1f}s training")
    return model.eval(), data


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    model, data = build_victim(args.device)
    x, y, _ = select_correct(model, data.x_test, data.y_test, args.n, seed=0)
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type=(
                                       "gpu" if args.device.startswith("cuda") else "cpu"))
    eps, step = 8 / 255, 2 / 255
    print(f"{'setting':<28}{'ours s':>9}{'ART s':>9}{'ART/ours':>10}{'ASR ours':>10}"
          f"{'ASR ART':>9}{'agree':>7}{'max|dx|':>10}{'ASR any':>9}")
    for case, iters, restarts in [("most", 3, 1), ("least", 7, 1), ("least", 7, 5)]:
        t = select_targets(clean_logits(model, x), case)
        random_start = restarts > 1
        kw = dict(eps=eps, step=step, iters=iters, targeted=True, targets=t,
                  random_start=random_start, restarts=restarts, batch_size=256)
        ours, t_ours = timed(pgd, model, x, y, stop_at_success=False, **kw)
        any_iter = pgd(model, x, y, **kw)
        attack = ProjectedGradientDescentPyTorch(
            classifier, norm=np.inf, eps=eps, eps_step=step, max_iter=iters, targeted=True,
            num_random_init=restarts if random_start else 0, batch_size=256, verbose=False)
        onehot = np.eye(10, dtype=np.float32)[t.numpy()]
        x_art, t_art = timed(attack.generate, x=x.numpy(), y=onehot)
        x_art = torch.from_numpy(x_art)
        with torch.no_grad():
            ok_art = is_success(clean_logits(model, x_art), y, targets=t)
        agree = (ok_art == ours.success).float().mean().item()
        dx = (x_art - ours.x_adv).abs().max().item()
        name = f"{case} it{iters} r{restarts}{' rs' if random_start else ''}"
        print(f"{name:<28}{t_ours:>9.2f}{t_art:>9.2f}{t_art / t_ours:>10.2f}{ours.asr:>10.3f}"
              f"{ok_art.float().mean().item():>9.3f}{agree:>7.3f}{dx:>10.2e}{any_iter.asr:>9.3f}")
    print("(random-start rows differ in their random draws, so only ASR should agree there; "
          "ART keeps the last successful restart, ours the first)")


if __name__ == "__main__":
    main()
