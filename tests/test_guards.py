"""Divergence detection (opd_lit.guards): each rule fires on what it is for and stays quiet on a
healthy run; the stop option; the config section and the validation agree with the defaults."""

from __future__ import annotations

import logging

import pytest
import yaml
from e2e import REPO

from opd_lit.guards import METRIC, DivergenceGuard, DivergenceSpec, spec_from_config

# Measured on the first embedded toy (2 CPU cores, seed 0, 20 / 30 steps, eval off):
#   python -m opd_lit.train optim.lr=1e3 trainer.max_steps=20 ...   (the lr=1e3 run)
#   python -m opd_lit.train method=opd trainer.max_steps=30 optim.lr=1e-4 ...  (then the default, first toy)
LR_1E3 = {
    "loss": [-1.49, -1.022, -32.035, -30.051, -31.153, -31.925, -30.557, -31.502, -30.873, -31.204,
             -29.789, -30.169, -30.201, -29.448, -30.008, -31.522, -31.662, -30.714, -31.962, -30.671],
    "grad_norm": [9.097] + [0.0] * 19,
}
LR_1E4 = {
    "loss": [-1.49, -1.691, -1.612, -1.148, -2.016, -1.684, -1.433, -1.689, -1.427, -1.469, -1.36,
             -1.055, -1.472, -1.66, -1.704, -1.47, -1.679, -1.483, -1.776, -1.225, -1.499, -1.868],
    "grad_norm": [9.097, 10.654, 8.619, 7.872, 10.427, 10.857, 9.155, 9.681, 7.125, 8.521, 9.383,
                  8.158, 8.537, 9.638, 8.841, 8.006, 8.397, 11.053, 12.299, 7.868, 8.216, 10.592],
}


def replay(guard, run, tokens=100):
    return [guard.update(s, loss, g, tokens) for s, (loss, g) in enumerate(zip(run["loss"], run["grad_norm"]))]


def test_the_lr_1e3_collapse_is_flagged_from_step_2_and_the_healthy_run_never(caplog):
    with caplog.at_level(logging.WARNING, logger="opd_lit.guards"):
        bad = replay(DivergenceGuard(), LR_1E3)
    flags = [v.metrics[METRIC] for v in bad]
    assert flags == [0.0, 0.0] + [1.0] * 18  # zero gradients twice in a row, then stays diverged
    assert "zero" in bad[2].reasons[0] and "divergence.zero_grad_steps=2" in bad[2].reasons[0]
    assert any("step 2: training diverged" in r.getMessage() for r in caplog.records)
    assert not any(v.stop for v in bad)  # stop_after=0: warn only
    good = replay(DivergenceGuard(), LR_1E4)
    assert [v.metrics[METRIC] for v in good] == [0.0] * len(LR_1E4["loss"])


def test_stop_after_stops_at_the_nth_diverged_step_in_a_row():
    verdicts = replay(DivergenceGuard({"stop_after": 3}), LR_1E3)
    first = next(v for v in verdicts if v.stop)
    assert first.step == 4 and "stopping (divergence.stop_after=3)" in first.message
    assert first.message.startswith("step 4: training diverged: gradient norm 0 (zero) on 4 supervised")
    assert [v.stop for v in verdicts[:4]] == [False] * 4


def test_loss_and_gradient_spikes_and_absolute_bounds():
    guard = DivergenceGuard()
    for s in range(5):
        assert not guard.update(s, -1.5, 9.0).diverged
    loss_spike = guard.update(5, -40.0, 9.0)
    assert loss_spike.diverged and "loss -40 is 26.7x the recent scale 1.5" in loss_spike.reasons[0]
    grad_spike = guard.update(6, -1.5, 400.0)
    assert grad_spike.diverged and "divergence.grad_ratio=20" in grad_spike.reasons[0]
    assert not guard.update(7, -1.5, 9.0).diverged  # the spikes did not enter the window
    bounded = DivergenceGuard({"max_abs_loss": 5.0, "max_grad_norm": 50.0})
    v = bounded.update(0, -6.0, 60.0)  # absolute bounds need no history
    assert v.diverged and len(v.reasons) == 2 and "divergence.max_abs_loss=5" in v.reasons[0]


def test_what_is_not_divergence():
    guard = DivergenceGuard()
    for s in range(4):
        assert not guard.update(s, 0.0, 0.0, tokens=0).diverged  # nothing supervised: no gradient, fine
    assert not guard.update(4, float("nan"), float("inf")).diverged  # the non-finite guard's case
    assert not guard.update(5, -1.0, 0.0).diverged  # one zero-gradient step is not a collapse
    assert guard.update(6, -1.0, 0.0).diverged
    off = DivergenceGuard({"zero_grad_steps": 0, "loss_ratio": 0.0, "grad_ratio": 0.0})
    assert not any(v.diverged for v in replay(off, LR_1E3))


def test_state_dict_round_trip_gives_the_same_verdicts():
    a = DivergenceGuard()
    replay(a, {"loss": LR_1E3["loss"][:2], "grad_norm": LR_1E3["grad_norm"][:2]})
    b = DivergenceGuard()
    b.load_state_dict(a.state_dict())
    assert a.update(2, -32.0, 0.0).reasons == b.update(2, -32.0, 0.0).reasons != []


def test_config_section_matches_the_defaults_and_bad_keys_are_named():
    section = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["divergence"]
    assert DivergenceSpec(**section) == DivergenceSpec()
    with pytest.raises(ValueError, match=r"divergence: unknown key\(s\) \['stop'\]"):
        spec_from_config({"stop": True})
    with pytest.raises(ValueError, match=r"divergence.window=0: an integer >= 1"):
        spec_from_config({"window": 0})
