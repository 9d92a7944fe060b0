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


def test_a_kill_while_the_plan_is_written_leaves_no_half_plan_for_the_next_call(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    from dds_fast.training import gpu_train

    config = tmp_path / "gpu.json"
    config.write_text(json.dumps({"gate_steps": 500}))
    trained = []
    monkeypatch.setattr(gpu_train, "seconds_per_step", lambda path: 0.045)
    monkeypatch.setattr(gpu_train, "train", lambda stage, run_dir, planned: trained.append(json.loads(planned.read_text())))
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                                      "--budget", "520"])
    write_text = Path.write_text

    def killed_midway(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        gpu_train.main()
    monkeypatch.setattr(Path, "write_text", write_text)
    gpu_train.main()  # planned afresh, not read from half a file
    assert len(trained) == 1 and trained[0]["gate_steps"] == 500 and trained[0]["steps"] >= 1000
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == trained[0]
