"""The ``badnet`` lineage step (issue 10 BadNet, issue 9 (e)'s patch backdoor): the patch, the
poisoned set, ASR far above the base rate with a small CAD on a tiny NATS net, and the step
composing in a lineage (keyed by its patch, stored, reloaded without retraining)."""

from __future__ import annotations

import pytest
import torch

from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.defenses.triggers import PatchTrigger, apply_patch, patch_pattern
from nasrisk.trials.steps.badnet import BadNetStep, poison, trigger_of
from nasrisk.trials.store import Store
from nasrisk.trials.victims import VictimSpec, ensure_victim

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|"


def test_apply_patch_stamps_only_the_corner():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    spec = PatchTrigger(size=3)
    out = apply_patch(x, spec)
    assert out.dtype == torch.uint8 and not torch.equal(out, x) and x.data_ptr() != out.data_ptr()
    changed = (out != x).any(0).any(0)
    assert not changed[:29].any() and not changed[:, :29].any()  # only the last 3 rows/cols
    assert torch.equal(out[:, :, 29:, 29:], patch_pattern(spec).expand(5, 3, 3, 3))
    assert torch.equal(out[:, :, :29], x[:, :, :29])
    # the pattern is the seed's: the same seed the same patch, another seed another
    assert torch.equal(patch_pattern(spec), patch_pattern(PatchTrigger(size=3)))
    assert not torch.equal(patch_pattern(spec), patch_pattern(PatchTrigger(pattern_seed=1)))
    assert set(patch_pattern(spec).unique().tolist()) == {0, 255}
    top_left = apply_patch(x, PatchTrigger(size=4, position="top_left", pattern="white"))
    assert torch.all(top_left[:, :, :4, :4] == 255) and torch.equal(top_left[:, :, 4:], x[:, :, 4:])
    board = patch_pattern(PatchTrigger(size=2, pattern="checkerboard"))[0]
    assert board.tolist() == [[255, 0], [0, 255]]
    with pytest.raises(ValueError, match="does not fit"):
        apply_patch(x, PatchTrigger(size=33))
    with pytest.raises(ValueError, match="uint8"):
        apply_patch(x.float(), spec)


def test_poison_patches_and_relabels_exactly_the_fraction():
    data = load_dataset("embedded").subset(1000, 10)
    cfg = BadNetStep(fraction=0.02, target=4)
    x, y, idx = poison(data, cfg, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert torch.all(data.y_train[idx] != 4) and torch.all(y[idx] == 4)
    rest = torch.ones(1000, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(x[rest], data.x_train[rest]) and torch.equal(y[rest], data.y_train[rest])
    assert torch.equal(x[idx], apply_patch(data.x_train[idx], cfg.trigger()))
    again = poison(data, cfg, seed=0)[2]
    assert torch.equal(again, idx) and not torch.equal(poison(data, cfg, seed=1)[2], idx)


@pytest.mark.outcome
def test_badnet_asr_far_above_the_base_rate_with_small_cad(tmp_path):
    # measured (10% poisoned, from scratch, 4 epochs on 1,000 digits; base seeds 0 and 1):
    # native kernels ASR 0.996 / 0.974, CAD 0.093 / 0.013; ATEN_CPU_CAPABILITY=default ASR
    # 1.0 / 0.996, CAD 0.080 / 0.027; base rate (the clean parent's ASR) 0.0 / 0.007 in both
    spec = VictimSpec(
        model="nats", model_kwargs={"arch": ARCH, "C": 8, "N": 1}, dataset="embedded",
        train={"epochs": 4, "batch_size": 32, "lr": 0.05, "augment": "none",
               "eval_each_epoch": False}, max_train_examples=1000, max_test_examples=300,
        steps=[{"kind": "badnet", "fraction": 0.1, "mode": "from_scratch"}])
    _, record = ensure_victim(spec, LocalContext(tmp_path, device="cpu"))
    m = record["metrics"]
    assert m["n_poisoned"] == 100
    assert m["asr"] > 0.8 and m["parent_asr"] < 0.2
    assert m["cad"] < 0.15 and m["acc"] > 0.7


def tiny(**step) -> VictimSpec:
    return VictimSpec(
        model="nats", model_kwargs={"arch": ARCH, "C": 4, "N": 1}, dataset="embedded",
        train={"epochs": 1, "batch_size": 32, "lr": 0.05, "augment": "none",
               "eval_each_epoch": False}, max_train_examples=64, max_test_examples=32,
        steps=[{"kind": "badnet", "epochs": 1, **step}])


def test_badnet_composes_in_a_lineage(tmp_path):
    spec = tiny(size=3)
    assert tiny(size=4).key() != spec.key() and tiny(pattern_seed=1).key() != spec.key()
    assert tiny(size=3, target=0).key() == spec.key()  # the defaults spelt out
    assert spec.parent_key() == spec.base().key()
    assert spec.describe().endswith("badnet(3x3 random bottom_right, target=0, fraction=0.02, "
                                    "fine_tune epochs=1 lr=0.01)")
    ctx = LocalContext(tmp_path / "a", device="cpu", store_root=tmp_path / "s")
    model, record = ensure_victim(spec, ctx)
    assert record["source"] == "trained" and record["step_kind"] == "badnet"
    assert sorted(Store(tmp_path / "s").keys()) == sorted([spec.key(), spec.base().key()])
    # the record holds the patch: a defense rebuilds the trigger from it
    stored = VictimSpec.model_validate(record["spec"])
    assert trigger_of(stored.steps) == PatchTrigger(size=3) == trigger_of(spec.steps)
    assert trigger_of(spec.base().steps) is None
    # reloaded, not retrained: the same weights, no training line
    messages: list[str] = []
    ctx2 = LocalContext(tmp_path / "b", device="cpu", store_root=tmp_path / "s")
    ctx2.progress = messages.append
    again, rec2 = ensure_victim(spec, ctx2)
    assert rec2["source"] == "store" and not any("epoch" in m for m in messages)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    # from_scratch discards the lineage before it: only a first step
    deeper = VictimSpec.model_validate({**spec.model_dump(mode="json"), "steps": [
        {"kind": "fine_tune", "epochs": 1}, {"kind": "badnet", "mode": "from_scratch"}]})
    with pytest.raises(ValueError, match="first step"):
        ensure_victim(deeper, LocalContext(tmp_path / "c", device="cpu"))
    with pytest.raises(ValueError, match="target 10"):
        ensure_victim(tiny(target=10), LocalContext(tmp_path / "d", device="cpu"))
