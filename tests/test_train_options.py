"""Training options of the one loop (PROTOCOLS 1.2, 3): the DARTS auxiliary-head loss of the
`paper` set, and mixed precision, off by default everywhere (the references trained in
float32), turned on by ``--amp bf16`` / a study's ``amp`` field and recorded in the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nasrisk.study.plan import RunOptions, build_plan
from nasrisk.study.spec import builtin_names, load_spec
from nasrisk.study.tracking import flatten
from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.errors import UserError
from nasrisk.trials.models.darts import build_network
from nasrisk.trials.models.darts.genotypes import DARTS_V2
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.registry import TRIAL_KINDS
from nasrisk.trials.train import (
    DARTS_ARTIFACT,
    DARTS_PAPER,
    NATS_RECIPE,
    POISON_RETRAIN,
    TrainConfig,
    train,
    training_loss,
)
from nasrisk.trials.victims import VictimSpec


def _tiny(auxiliary: bool, seed: int = 0) -> torch.nn.Module:
    # 3 cells (both reductions), C=4, 8x8 inputs; no drop-path, so the forward is deterministic
    torch.manual_seed(seed)
    return build_network(DARTS_V2, num_classes=10, input_size=8, C=4, layers=3,
                         auxiliary=auxiliary, drop_path=0.0)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_aux_loss_is_added_with_its_weight_and_changes_the_gradient() -> None:
    net = _tiny(auxiliary=True).double().train()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    # brute force: CE(logits) + 0.4 CE(aux logits), from the network's own two outputs
    logits, aux = net.forward_aux(x)
    ref = _grads(net, F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y))
    got = _grads(net, training_loss(net, x, y, aux_weight=0.4))
    assert got.keys() == ref.keys()
    assert all(torch.allclose(got[k], ref[k], rtol=0, atol=1e-12) for k in ref)
    # the weight matters: the stem (before the head's branch point) gets another gradient
    plain = _grads(net, training_loss(net, x, y, aux_weight=0.0))
    assert (got["stem.0.weight"] - plain["stem.0.weight"]).abs().max() > 1e-6
    assert not any(k.startswith("auxiliary_head") for k in plain)
    # weight 0 is the same net without a head (shared weights copied over)
    bare = _tiny(auxiliary=False).double().train()
    missing, unexpected = bare.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("auxiliary_head") for k in unexpected)
    none = _grads(bare, training_loss(bare, x, y, aux_weight=0.4))
    assert none.keys() == plain.keys()
    assert all(torch.allclose(none[k], plain[k], rtol=0, atol=1e-12) for k in plain)
    # in eval mode the head does not run: the plain cross-entropy
    net.eval()
    with torch.no_grad():
        assert training_loss(net, x, y).item() == pytest.approx(
            F.cross_entropy(net(x), y).item(), abs=1e-12)


def test_the_training_loop_trains_on_the_aux_loss_through_a_wrapper() -> None:
    data = load_dataset("embedded").subset(48, 8)
    info = data.info

    def run(auxiliary: bool, weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = build_network(DARTS_V2, num_classes=10, input_size=info.image_size, C=4,
                            layers=3, auxiliary=auxiliary, drop_path=0.0)
        if not auxiliary:  # the same initial weights as the net with a head
            missing, _ = net.load_state_dict(_init_with_head, strict=False)
            assert not missing
        model = Normalized(net, info.mean, info.std)
        cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, augment="none", aux_weight=weight,
                          eval_each_epoch=False)
        train(model, data, cfg, seed=0, ctx=TrialContext(device="cpu"))
        return {k: v for k, v in net.state_dict().items() if not k.startswith("auxiliary_head")}

    torch.manual_seed(0)
    _init_with_head = build_network(DARTS_V2, num_classes=10, input_size=info.image_size, C=4,
                                    layers=3, auxiliary=True, drop_path=0.0).state_dict()
    with_aux, zero, bare = run(True, 0.4), run(True, 0.0), run(False, 0.4)
    assert with_aux.keys() == zero.keys() == bare.keys()
    assert any(not torch.equal(with_aux[k], zero[k]) for k in zero)
    assert all(torch.allclose(zero[k], bare[k], atol=1e-6) for k in zero)


def _amps(d: object, out: set) -> set:
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "amp":
                out.add(v)
            _amps(v, out)
    return out


def _victim(trial) -> VictimSpec | None:
    """The victim a planned victim/attack trial trains (None for other kinds)."""
    if trial.kind == "victim":
        return TRIAL_KINDS.get("victim").config_model.model_validate(trial.config).spec()
    if isinstance(trial.config.get("victim"), dict):
        return VictimSpec.model_validate(trial.config["victim"])
    return None


def test_mixed_precision_is_off_by_default_everywhere() -> None:
    assert TrainConfig(epochs=1).amp == "off"
    for preset in (NATS_RECIPE, DARTS_PAPER, DARTS_ARTIFACT, POISON_RETRAIN):
        assert preset.amp == "off"
    assert VictimSpec(model="darts").resolved_train().amp == "off"
    assert VictimSpec(model="darts", params="artifact").resolved_train().amp == "off"
    # booleans of older configs still validate; anything else is refused
    assert TrainConfig(epochs=1, amp=False).amp == "off"
    assert TrainConfig(epochs=1, amp=True).amp == "bf16"
    with pytest.raises(ValueError):
        TrainConfig(epochs=1, amp="fp16")
    # the resolved config of every built-in study, under every profile
    for name in builtin_names():
        spec = load_spec(name)
        for profile in spec.profiles:
            plan = build_plan(spec, RunOptions(profile=profile, num_archs=2))
            for stage in plan.stages:
                for t in stage.trials:
                    assert _amps(t.config, set()) <= {"off"}, (name, profile, t.name)
                    victim = _victim(t)
                    assert victim is None or victim.resolved_train().amp == "off"


def test_amp_option_turns_bf16_on_in_every_training_config_and_is_logged() -> None:
    for name, stage_kinds in (("automl-risks", {"victim", "attack"}), ("evas-kappa", {"evas"})):
        plan = build_plan(load_spec(name), RunOptions(profile="smoke", num_archs=2, amp="bf16"))
        kinds = set()
        for stage in plan.stages:
            for t in stage.trials:
                amps = _amps(t.config, set())
                if amps:
                    kinds.add(t.kind)
                    assert amps == {"bf16"}, (name, t.name)
                    logged = flatten(t.config)  # the trial config is what MLflow logs as params
                    assert "bf16" in {v for k, v in logged.items() if k.endswith("amp")}
                    victim = _victim(t)
                    assert victim is None or victim.resolved_train().amp == "bf16"
        assert stage_kinds <= kinds
    with pytest.raises(UserError, match="--amp"):
        RunOptions(amp="fp8")
    # a study file's field does the same: amp in a victim's config
    spec = VictimSpec(model="darts", amp="bf16", train={"epochs": 1})
    assert spec.train.amp == "bf16" and spec.resolved_train().amp == "bf16"
    assert spec.key() != VictimSpec(model="darts", train={"epochs": 1}).key()


def test_run_command_has_the_amp_option() -> None:
    from typer.testing import CliRunner

    from nasrisk.study.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--amp" in out.output
