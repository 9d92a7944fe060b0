"""The GPU training script's plan: the schedule sized to a time budget from a timed step."""
import pytest

from dds_fast.training.gpu_train import FIXED_SECONDS, GATE_STEP_COST, GATE_STEP_SECONDS, INETS_STEP_COST, plan


def test_plan_fills_the_budget_with_the_measured_costs():
    options = {"gate_steps": 500, "steps": 6000, "refine_steps": 2500, "lr": 1e-3}
    sized = plan(options, step_seconds=0.045, budget=520)
    assert sized["lr"] == 1e-3 and sized["gate_steps"] == 500
    # the I-Nets train as many steps as each route: stage 1's and refine's
    assert sized["refine_steps"] == sized["steps"]  # every route at every step, as long as stage 1
    assert sized["inet_steps"] == sized["steps"] + sized["refine_steps"]
    # stage 1, refine, the I-Nets and the gate at their costs in stage-1 steps, plus the fixed part
    seconds = 0.045 * (sized["steps"] + sized["refine_steps"] + sized["inet_steps"] * INETS_STEP_COST
                       + 500 * GATE_STEP_COST) + FIXED_SECONDS
    assert 515 < seconds <= 520


def test_plan_of_graphed_steps_counts_the_eager_gate_in_seconds():
    sized = plan({"gate_steps": 500, "graphs": True}, step_seconds=0.008, budget=520)
    seconds = 0.008 * (sized["steps"] + sized["refine_steps"] + sized["inet_steps"] * INETS_STEP_COST) \
        + 500 * GATE_STEP_SECONDS + FIXED_SECONDS
    assert 519 < seconds <= 520 and sized["graphs"]


def test_plan_refuses_a_budget_too_small_for_a_model_worth_shipping():
    with pytest.raises(SystemExit, match="leave only"):
        plan({"gate_steps": 500}, step_seconds=0.9, budget=373)
