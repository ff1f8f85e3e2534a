"""ProgressPrinter (study/progress.py) driven by synthetic Tune callback events, no Ray run:
one line per event, an ETA from running trials' epochs as soon as one epoch finished, never
'?', no wild jumps."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from nasrisk.study.progress import ProgressPrinter
from nasrisk.study.trainable import TuneContext


@dataclass
class FakeTrial:
    trial_id: str
    last_result: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.trial_id


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _printer(total: int, slots: int = 2):
    clock, out = Clock(), io.StringIO()
    p = ProgressPrinter("s.train", total, every=30.0, stream=out, clock=clock)
    return p, clock, out


def _lines(out: io.StringIO) -> list[str]:
    return [ln for ln in out.getvalue().splitlines() if ln]


def test_durations_read_at_a_glance():
    from nasrisk.study.progress import fmt_duration

    assert [fmt_duration(s) for s in (59, 61, 3 * 3600 + 120, 3 * 86400 + 7200)] == [
        "0m59s", "1m01s", "3h02m", "3d02h"]


def _eta_minutes(line: str) -> float:
    eta = line.rsplit("ETA ", 1)[1].lstrip("~")
    if "h" in eta:
        h, m = eta.rstrip("m").split("h")
        return int(h) * 60 + int(m)
    m, s = eta.rstrip("s").split("m")
    return int(m) + int(s) / 60


def test_a_completion_is_one_line_and_its_replacement_starting_adds_none():
    p, clock, out = _printer(total=4)
    a, b, c = FakeTrial("a"), FakeTrial("b"), FakeTrial("c")
    p.on_trial_start(0, [], a)
    p.on_trial_start(0, [], b)
    p.on_step_end(0, [])
    assert len(_lines(out)) == 1  # the first trials starting: one line between them
    clock.t += 5
    p.on_step_end(1, [])
    assert len(_lines(out)) == 1  # nothing happened, no heartbeat yet
    clock.t += 10
    a.last_result = {"trial_done": 1.0}
    p.on_trial_complete(2, [], a)
    p.on_trial_start(2, [], c)  # the slot is refilled at once (reused actor)
    p.on_step_end(2, [])
    p.on_step_end(3, [])
    lines = _lines(out)
    assert len(lines) == 2
    assert "1/4 done" in lines[1]
    clock.t += 31
    p.on_step_end(4, [])
    assert len(_lines(out)) == 3 and "2 running" in _lines(out)[2]  # heartbeat


def test_eta_after_the_first_epoch_from_running_trials_progress():
    # 2 slots, 6 trials of 10 epochs at 60 s per epoch: each trial takes 600 s, so the stage
    # takes 3 rounds = 1800 s; after the first epoch 1740 s are left
    p, clock, out = _printer(total=6)
    trials = [FakeTrial(f"t{i}") for i in range(6)]
    p.on_trial_start(0, [], trials[0])
    p.on_trial_start(0, [], trials[1])
    p.on_step_end(0, [])
    assert "?" not in _lines(out)[0] and "ETA after the first epoch" in _lines(out)[0]
    clock.t += 60
    for t in trials[:2]:
        p.on_trial_result(1, [], t, {"epoch": 1.0, "epochs_total": 10.0})
    clock.t += 30  # heartbeat
    p.on_step_end(1, [])
    line = _lines(out)[-1]
    assert "?" not in line
    eta = _eta_minutes(line) * 60
    assert abs(eta - (1800 - 90)) < 60, line


def test_eta_is_smoothed_and_never_jumps_wildly():
    # one slot, 3 trials of 10 epochs; trial 0's epochs alternate 30 s / 90 s (mean 60 s):
    # the printed ETA moves by less than a quarter of itself from one line to the next
    p, clock, out = _printer(total=3)
    t0 = FakeTrial("t0")
    p.on_trial_start(0, [], t0)
    etas = []
    for e in range(1, 10):
        clock.t += 30 if e % 2 else 90
        p.on_trial_result(e, [], t0, {"epoch": float(e), "epochs_total": 10.0})
        etas.append(p.eta_seconds())
    assert all(x is not None for x in etas)
    for before, after in zip(etas[2:-1], etas[3:], strict=True):
        assert abs(after - before) < 0.25 * before, etas
    # and ends near the truth: 1 epoch + 2 trials of 600 s left at t=540 s
    assert abs(etas[-1] - (60 + 1200)) < 0.25 * 1260, etas


def test_finished_trials_durations_feed_the_eta_without_epoch_reports():
    p, clock, out = _printer(total=4)
    trials = [FakeTrial(f"t{i}") for i in range(4)]
    p.on_trial_start(0, [], trials[0])
    clock.t += 100
    trials[0].last_result = {"trial_done": 1.0}
    p.on_trial_complete(1, [], trials[0])
    p.on_trial_start(1, [], trials[1])
    line = _lines(out)[-1]
    # 3 trials of ~100 s left on one slot (the finish estimate is first set here)
    assert abs(_eta_minutes(line) * 60 - 300) < 2, line


def test_tune_context_reports_epochs_of_its_progress_messages():
    ctx = TuneContext.__new__(TuneContext)
    ctx.steps, ctx._state, ctx.epochs_total, ctx.verbose = None, {}, None, False
    assert ctx.progress_keys() == {}
    ctx._state["train"] = {"epoch": 2}
    ctx.epochs_total = 5
    assert ctx.progress_keys() == {"epoch": 2.0, "epochs_total": 5.0}
    ctx.progress("poison_epoch 3/50 loss 0.1 acc 0.5")
    assert ctx.progress_keys() == {"epoch": 3.0, "epochs_total": 50.0}
    ctx.progress("iteration 7/20: best 0.3")
    assert ctx.progress_keys() == {"epoch": 7.0, "epochs_total": 20.0}
