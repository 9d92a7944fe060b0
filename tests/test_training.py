import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dds_fast
from dds_fast import SlimDnCNN, SlimUNet
from dds_fast.training.loop import LoopSettings, TrainingDiverged, TrainLoop, cosine_factor, step_generator
from dds_fast.config import RoutingEntry
from dds_fast.training.sandwich import routing_sandwich_configs, sandwich_configs, sandwich_step, training_psnr
from dds_fast.training.slimming import progressive_slimming, slimmer, thin_routing_space
from dds_fast.training.stages import Run, TrainConfig, slimming_length
from tests.test_checkpoint import flip_tensor_bytes


def tiny_net():
    torch.manual_seed(0)
    return SlimDnCNN(in_channels=1, base_width=16, depth=3)


def batch(seed=0, n=2, size=12):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 1, size, size, generator=g)
    return clean + 0.1 * torch.randn(clean.shape, generator=g), clean


def test_sandwich_configs_are_largest_random_smallest():
    space = tiny_net().space
    configs = sandwich_configs(space, 4, torch.Generator().manual_seed(0))
    assert configs[0] == space.largest() and configs[-1] == space.smallest() and len(configs) == 4
    # the middle ones are never an end (385 of 1,000 steps drew one in this space of 9 configs):
    # an end's loss twice, and synergy's smallest distilled partly against itself
    small = SlimDnCNN(in_channels=1, base_width=16, depth=3).space
    ends = (small.largest(), small.smallest())
    assert not any(c in ends for step in range(300) for c in sandwich_configs(small, 4, step_generator(0, step))[1:-1])
    with pytest.raises(ValueError, match="n >= 2"):
        sandwich_configs(space, 1, torch.Generator())


def test_routing_sandwich_draws_the_middle_configs_without_replacement():
    space = tiny_net().space
    generator = torch.Generator().manual_seed(0)
    routing = sorted({c for c in (space.sample(generator) for _ in range(40))} | {space.largest(), space.smallest()},
                     key=lambda c: tuple(c.to_dict().values()))[:6]
    routing = [RoutingEntry(c, float(i)) for i, c in enumerate(routing)]  # ascending MACs
    for n in (2, 3, 4, 6, 9):
        configs = routing_sandwich_configs(routing, n, generator)
        assert configs[0] == routing[-1].config and configs[-1] == routing[0].config
        middle = configs[1:-1]
        assert len(middle) == min(n - 2, 4) and len(set(middle)) == len(middle)
        assert set(middle) <= {e.config for e in routing[1:-1]}
        # dearer first, so the smallest's teachers come in the order the sandwich expects
        order = [[e.config for e in routing].index(c) for c in middle]
        assert order == sorted(order, reverse=True)
    seen = {c for _ in range(30) for c in routing_sandwich_configs(routing, 3, generator)[1:-1]}
    assert seen == {e.config for e in routing[1:-1]}
    with pytest.raises(ValueError, match="n >= 2"):
        routing_sandwich_configs(routing, 1, generator)
    with pytest.raises(ValueError, match="at least 2 configs"):
        routing_sandwich_configs(routing[:1], 4, generator)
    # a generator of entries draws as its list does
    assert (routing_sandwich_configs(iter(routing), 4, torch.Generator().manual_seed(3))
            == routing_sandwich_configs(routing, 4, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("distillation", ["synergy", "inplace", "none"])
def test_sandwich_targets(distillation):
    net = tiny_net()
    noisy, clean = batch()
    configs = sandwich_configs(net.space, 4, torch.Generator().manual_seed(1))
    seen = []

    def recording(criterion):
        def loss(output, target):
            seen.append((criterion, output.detach().clone(), target.detach().clone(), target.requires_grad))
            return F.l1_loss(output, target)
        return loss

    losses = sandwich_step(net, noisy, clean, configs, distillation, recording("truth"),
                           distillation_loss_fn=recording("teacher"))
    assert list(losses) == ["largest", "random1", "random2", "smallest", "psnr"]
    criteria = [c for c, _, _, _ in seen]
    outputs = [o for _, o, _, _ in seen]
    targets = [t for _, _, t, _ in seen]
    assert not any(requires_grad for _, _, _, requires_grad in seen)  # targets are detached
    torch.testing.assert_close(targets[0], clean)
    if distillation == "none":
        assert criteria == ["truth"] * 4
        for target in targets:
            torch.testing.assert_close(target, clean)
    else:
        assert criteria == ["truth"] + ["teacher"] * 3
        for target in targets[1:3]:
            torch.testing.assert_close(target, outputs[0])
        expected_smallest = torch.stack(outputs[:3]).mean(0) if distillation == "synergy" else outputs[0]
        torch.testing.assert_close(targets[3], expected_smallest)
    assert net.get_config() == net.space.largest()
    # the largest's output against the ground truth, from the step's own forward
    mse = ((outputs[0].clamp(0, 1) - clean) ** 2).mean(dim=(1, 2, 3))
    assert losses["psnr"] == pytest.approx((-10 * torch.log10(mse)).mean().item(), rel=1e-5)


def test_students_learn_from_their_teachers_by_mse_by_default():
    """L1 students pulled every width towards the noisy input (README, stage 1's ablation):
    the default is MSE, in the config and in the step, and the ground truth's loss L1."""
    assert TrainConfig().distillation_loss == "mse" and TrainConfig().loss == "l1"
    net = tiny_net()
    noisy, clean = batch()
    configs = [net.space.largest(), net.space.smallest()]
    losses = sandwich_step(net, noisy, clean, configs, "inplace")
    with torch.no_grad():
        outputs = []
        for config in configs:
            net.set_config(config)
            outputs.append(net(noisy))
    assert losses["largest"] == pytest.approx(F.l1_loss(outputs[0], clean).item(), rel=1e-5)
    assert losses["smallest"] == pytest.approx(F.mse_loss(outputs[1], outputs[0]).item(), rel=1e-5)


def test_training_psnr_is_the_mean_per_image_psnr_of_the_clipped_output():
    clean = torch.full((2, 1, 4, 4), 0.5)
    output = clean + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    assert training_psnr(output, clean).item() == pytest.approx((20 + 40) / 2, rel=1e-4)
    assert training_psnr(torch.full_like(clean, 2.0), torch.ones_like(clean)).item() == pytest.approx(100)


def test_sandwich_accumulates_gradients_of_every_subnetwork():
    net = tiny_net()
    noisy, clean = batch()
    configs = [net.space.largest(), net.space.smallest()]
    sandwich_step(net, noisy, clean, configs, "none")
    both = net.layers[0].weight.grad.clone()
    for p in net.parameters():
        p.grad = None
    net.set_config(configs[0])
    F.l1_loss(net(noisy), clean).backward()
    largest = net.layers[0].weight.grad.clone()
    for p in net.parameters():
        p.grad = None
    net.set_config(configs[1])
    F.l1_loss(net(noisy), clean).backward()
    smallest = net.layers[0].weight.grad.clone()
    torch.testing.assert_close(both, largest + smallest)
    # configs from a generator: the same step; none at all: named
    for p in net.parameters():
        p.grad = None
    sandwich_step(net, noisy, clean, (c for c in configs), "none")
    torch.testing.assert_close(net.layers[0].weight.grad, both)
    with pytest.raises(ValueError, match="at least one config"):
        sandwich_step(net, noisy, clean, [], "none")


def test_progressive_slimming_walks_from_largest_to_smallest():
    net = tiny_net().eval()
    batches = [batch(seed) for seed in range(2)]
    seen = []
    trajectory = progressive_slimming(net, batches, step=8, on_step=seen.append)
    assert trajectory[0].config == net.space.largest() and trajectory[-1].config == net.space.smallest()
    assert seen == trajectory
    for before, after in zip(trajectory, trajectory[1:]):
        changed = [g for g in before.config if before.config[g] != after.config[g]]
        assert len(changed) == 1 and after.config[changed[0]] < before.config[changed[0]]
        assert after.macs_per_pixel < before.macs_per_pixel
    assert net.get_config() == net.space.largest()
    routes = thin_routing_space(trajectory, 3)
    assert [r.macs_per_pixel for r in routes] == sorted(r.macs_per_pixel for r in routes)
    assert routes[0] == min(trajectory, key=lambda e: e.macs_per_pixel)
    assert routes[-1] == trajectory[0]
    with pytest.raises(ValueError, match="fewer"):
        thin_routing_space(trajectory, len(trajectory) + 1)


def test_slimming_behind_an_attention_head_costs_each_config_alone():
    """A routing entry's MACs are its config's own; DDSNet adds the full-width stem its gate reads."""
    supernet = tiny_net().eval()
    net = dds_fast.AttentionSupernet(supernet, dds_fast.DynamicGate(supernet.stem_channels, 2)).eval()
    trajectory = progressive_slimming(net, [batch()], step=8)
    assert len(trajectory) > 1
    for entry in trajectory:
        assert entry.macs_per_pixel == dds_fast.macs_per_pixel(supernet, entry.config)
    assert trajectory[-1].macs_per_pixel < dds_fast.macs_per_pixel(net, trajectory[-1].config)


@pytest.mark.parametrize("criterion,first_slimmed", [("psnr", "enc1"), ("psnr_per_mac", "dec0.mid")])
def test_slimming_criteria_choose_by_loss_or_by_loss_per_mac(monkeypatch, criterion, first_slimmed):
    """enc1 loses the least PSNR per step but saves 560 MACs/pixel; dec0.mid loses 1.5x as
    much and saves 3456: the paper's rule slims enc1 first, ours dec0.mid."""
    from dds_fast.training import slimming

    net = SlimUNet(in_channels=1, base_width=8, depth=2).eval()
    largest = net.space.largest()
    cost = {"enc1": 0.1, "dec0.mid": 0.15}

    def fake_psnr(net, batches, config):
        return 30.0 - sum(cost.get(g, 1.0) * (largest[g] - config[g]) / 8 for g in config)

    monkeypatch.setattr(slimming, "validation_psnr", fake_psnr)
    trajectory = progressive_slimming(net, [], step=8, criterion=criterion)
    first = trajectory[1].config
    assert [g for g in first if first[g] != largest[g]] == [first_slimmed]
    assert trajectory[-1].config == net.space.smallest()
    with pytest.raises(ValueError, match="unknown slimming criterion 'flops'"):
        progressive_slimming(net, [], criterion="flops")
    with pytest.raises(ValueError, match="unknown slim_criterion 'flops'"):
        TrainConfig.from_dict({"slim_criterion": "flops"})


def test_slimming_per_mac_ranks_a_gain_by_its_saving(monkeypatch):
    """A step that gains PSNR beats every step that loses it, and among equal gains the one
    that saves more MACs wins (a gain divided by the saving favoured the step saving least)."""
    from dds_fast.training import slimming

    net = SlimUNet(in_channels=1, base_width=8, depth=2).eval()
    largest = net.space.largest()

    def fake_psnr(net, batches, config):  # every first step gains 0.1 dB, but enc1's loses
        return 30.0 + sum(-0.5 if g == "enc1" else 0.1 for g in config if config[g] != largest[g])

    monkeypatch.setattr(slimming, "validation_psnr", fake_psnr)
    trajectory = progressive_slimming(net, [], step=8, criterion="psnr_per_mac")
    candidates = [largest.replace(**{g: slimmer(largest, net.space[g], 8)}) for g in largest if g != "enc1"]
    assert trajectory[1].config == min(candidates, key=lambda c: dds_fast.macs_per_pixel(net, c))


@pytest.mark.parametrize("criterion", ["psnr", "psnr_per_mac"])
def test_slimming_takes_the_cheaper_of_equal_steps(monkeypatch, criterion):
    """Among candidates of equal PSNR (or equal loss per MAC: none), the cheaper config."""
    from dds_fast.training import slimming

    net = SlimUNet(in_channels=1, base_width=8, depth=2).eval()
    largest = net.space.largest()
    monkeypatch.setattr(slimming, "validation_psnr", lambda net, batches, config: 30.0)
    trajectory = progressive_slimming(net, [], step=8, criterion=criterion)
    candidates = [largest.replace(**{g: slimmer(largest, net.space[g], 8)}) for g in largest
                  if slimmer(largest, net.space[g], 8) is not None]
    assert trajectory[1].macs_per_pixel == min(dds_fast.macs_per_pixel(net, c) for c in candidates)


def test_validation_psnr_is_the_mean_over_images_not_over_batches():
    from dds_fast.metrics import batch_psnr
    from dds_fast.training.slimming import validation_psnr

    net = tiny_net().eval()
    noisy, clean = batch(0, n=4)
    config = net.space.largest()
    unequal = [(noisy[:1], clean[:1]), (noisy[1:], clean[1:])]
    with torch.no_grad():
        expected = batch_psnr(net(noisy).clamp(0, 1), clean)
    assert validation_psnr(net, unequal, config) == pytest.approx(expected, rel=1e-6)


def test_a_thinned_routing_space_takes_no_entry_twice():
    """(a trajectory dense at one end had the same entry chosen for two targets)"""
    net = tiny_net()
    configs = [net.space.largest(), net.space.smallest(), net.space.uniform(0.5), net.space.uniform(0.75)]
    trajectory = [RoutingEntry(c, macs) for c, macs in zip(configs, (100.0, 0.0, 1.0, 2.0))]
    assert [e.macs_per_pixel for e in thin_routing_space(trajectory, 3)] == [0.0, 2.0, 100.0]
    # targets 0, 33, 67 and 100: the last, 100, taken already for 67, leaves 1
    assert [e.macs_per_pixel for e in thin_routing_space(trajectory, 4)] == [0.0, 1.0, 2.0, 100.0]


def test_slimmer_steps_and_floors():
    space = SlimUNet(base_width=16, depth=2).space
    group = space["enc0"]  # choices 8, 16, 24
    config = space.largest()
    assert slimmer(config, group, 16) == 8
    assert slimmer(config, group, 8) == 16
    assert slimmer(config.replace(enc0=16), group, 16) == 8  # the step passes the smallest: stop there
    assert slimmer(space.smallest(), group, 16) is None


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.items = [batch(seed, n=1) for seed in range(n)]
        self.items = [(a[0], b[0]) for a, b in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_loop(run_dir, steps, checkpoint_every=2, nan_at=None, optimizer="adam", schedule="epoch", progress=False,
              bad_loss=float("nan")):
    net = tiny_net()
    if optimizer == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    else:  # plain SGD: Adam's first steps follow the sign of near-zero gradients, rounding included
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9) if schedule == "epoch" else None
    lr_factor = cosine_factor(6) if schedule == "cosine" else None

    def step_fn(step, noisy, clean):
        configs = sandwich_configs(net.space, 3, step_generator(0, step))
        losses = sandwich_step(net, noisy, clean, configs)
        if step == nan_at:
            losses["largest"] = bad_loss
        return losses

    settings = LoopSettings(steps=steps, batch_size=2, checkpoint_every=checkpoint_every, progress=progress)
    return TrainLoop(run_dir, "stage1", net, optimizer, Pairs(), step_fn, settings, scheduler=scheduler,
                     lr_factor=lr_factor), net


@pytest.mark.parametrize("schedule", ["epoch", "cosine"])
def test_resume_after_a_kill_reaches_the_same_result(tmp_path, schedule):
    straight, net_a = make_loop(tmp_path / "a", steps=6, schedule=schedule)
    straight.run()
    # a run killed after step 4 (checkpoint at 4, a logged step 4 lost with it) ...
    first, _ = make_loop(tmp_path / "b", steps=4, schedule=schedule)
    first.run()
    with (tmp_path / "b" / "stage1.log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 4, "largest": 1.0}) + "\n")
    resumed, net_b = make_loop(tmp_path / "b", steps=6, schedule=schedule)
    assert resumed.run() == 2
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "stage1.log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"] < 1e-2
    if schedule == "epoch":  # the scheduler's own count too, which a step- or cosine-shaped schedule reads
        assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
        assert straight.scheduler.last_epoch > 0


def test_a_run_killed_before_its_first_checkpoint_leaves_no_log_lines_behind(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "stage1.log.jsonl").write_text(json.dumps({"step": 0, "largest": 1.0}) + "\n")
    loop, _ = make_loop(tmp_path, steps=2)
    loop.run()
    steps = [json.loads(line)["step"] for line in (tmp_path / "stage1.log.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


def test_resume_removes_a_checkpoint_write_cut_short_by_a_kill(tmp_path):
    import tempfile

    tmp_path.mkdir(exist_ok=True)
    # atomic_write's temporary files, as a kill mid-write leaves them
    leftovers = [tempfile.mkstemp(dir=tmp_path, prefix=f".{name}.", suffix=f".tmp{Path(name).suffix}")[1]
                 for name in ("stage1.state.safetensors", "stage1.state.safetensors", "stage1.log.jsonl",
                              "stage3.state.safetensors")]
    loop, _ = make_loop(tmp_path, steps=2)
    loop.run()
    assert [Path(path).exists() for path in leftovers] == [False, False, False, True]  # another stage's is its own


def test_a_result_write_cut_short_by_a_kill_is_removed_when_the_result_is_written(tmp_path):
    import tempfile

    leftovers = [tempfile.mkstemp(dir=tmp_path, prefix=f".{name}.", suffix=".tmp.safetensors")[1]
                 for name in ("inet-0.safetensors", "inet-1.safetensors")]
    Run(tmp_path, tiny_run_config()).save(tiny_net(), "inet-0.safetensors")
    # another I-Net's may be a write in flight (I-Nets train in processes side by side)
    assert [Path(path).exists() for path in leftovers] == [False, True]


def test_cosine_schedule_decays_from_the_initial_rate_to_one_percent(tmp_path):
    factor = cosine_factor(6)
    values = [factor(step) for step in range(6)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(values, values[1:]))
    loop, _ = make_loop(tmp_path, steps=6, schedule="cosine")
    loop.run()
    logged = [json.loads(line)["lr"] for line in (tmp_path / "stage1.log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-2 * v for v in values])


def test_progress_bar_and_log_show_the_psnr(tmp_path, capsys):
    loop, _ = make_loop(tmp_path, steps=2, progress=True)
    loop.run()
    assert "psnr=" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "stage1.log.jsonl").read_text().splitlines()]
    assert all(0 < record["psnr"] < 100 for record in log)


def test_losses_returned_as_tensors_are_read_after_the_next_batch_is_drawn(tmp_path, monkeypatch):
    """A step function may return its losses as device tensors (a replayed CUDA graph's): the
    loop draws the next batch before it reads them (observed where they are read: the batches
    and steps alone come in the same order either way), logs them as floats, and a NaN among
    them still stops the run before the optimizer step."""
    import dds_fast.training.loop as loop_module

    loop, net = make_loop(tmp_path, steps=3, nan_at=2)
    events = []
    batch, inner = loop.batch, loop.step_fn
    loop.batch = lambda step: events.append(("batch", step)) or batch(step)

    def step_fn(step, noisy, clean):
        events.append(("step", step))
        return {name: torch.tensor(value) for name, value in inner(step, noisy, clean).items()}

    loop.step_fn = step_fn
    as_floats = loop_module.as_floats
    monkeypatch.setattr(loop_module, "as_floats", lambda losses: events.append(("read",)) or as_floats(losses))
    with pytest.raises(TrainingDiverged, match="step 2"):
        loop.run()
    assert events == [("batch", 0), ("step", 0), ("batch", 1), ("read",), ("step", 1), ("batch", 2), ("read",),
                      ("step", 2), ("read",)]
    log = [json.loads(line) for line in (tmp_path / "stage1.log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [0, 1]
    assert all(isinstance(record["largest"], float) and 0 < record["psnr"] < 100 for record in log)


@pytest.mark.parametrize("bad_loss", [float("nan"), float("inf"), -float("inf")])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad_loss):
    loop, _ = make_loop(tmp_path, steps=6, nan_at=3, bad_loss=bad_loss)
    with pytest.raises(TrainingDiverged, match=r"step 3.*last good checkpoint \(step 2\)"):
        loop.run()
    fresh, _ = make_loop(tmp_path, steps=6)
    assert fresh.resume() == 2


def test_running_again_in_the_process_after_a_stop(tmp_path):
    """Before the first checkpoint the model holds steps that no file records: run() again is
    refused. After one, it reloads the checkpoint and goes on to the straight run's result."""
    loop, _ = make_loop(tmp_path / "early", steps=6, checkpoint_every=5, nan_at=3)
    with pytest.raises(TrainingDiverged, match="step 3, not finite; stopped. No checkpoint was saved before it"):
        loop.run()
    with pytest.raises(RuntimeError, match="already took 3 optimizer steps in this process and saved no checkpoint"):
        loop.run()

    straight, net_a = make_loop(tmp_path / "a", steps=6)
    straight.run()
    loop, net_b = make_loop(tmp_path / "b", steps=6)
    inner, failed = loop.step_fn, []

    def fails_once_at_step_3(step, noisy, clean):
        losses = inner(step, noisy, clean)
        if step == 3 and not failed:
            failed.append(step)
            losses["largest"] = float("nan")
        return losses

    loop.step_fn = fails_once_at_step_3
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 2\)"):
        loop.run()
    assert loop.run() == 4
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_non_finite_gradient_stops_before_the_optimizer_step(tmp_path):
    """A finite loss with an infinite gradient (an overflowing backward): the step is refused,
    so no checkpoint holds its NaN weights."""
    loop, net = make_loop(tmp_path, steps=6, checkpoint_every=1)
    inner = loop.step_fn

    def step_fn(step, noisy, clean):
        losses = inner(step, noisy, clean)
        if step == 1:
            next(net.parameters()).grad.view(-1)[0] = float("inf")
        return losses

    loop.step_fn = step_fn
    with pytest.raises(TrainingDiverged, match=r"'largest \|gradient\|': inf\} at step 1.*checkpoint \(step 1\)"):
        loop.run()
    fresh, fresh_net = make_loop(tmp_path, steps=6)
    assert fresh.resume() == 1 and all(torch.isfinite(p).all() for p in fresh_net.parameters())


def test_a_huge_finite_gradient_is_no_divergence(tmp_path):
    """The check takes each gradient's largest |entry|: no sum of squares that could overflow."""
    loop, net = make_loop(tmp_path, steps=3, optimizer="sgd")
    inner = loop.step_fn

    def step_fn(step, noisy, clean):
        losses = inner(step, noisy, clean)
        if step == 2:  # (the last: no forward runs on the weights it leaves)
            next(net.parameters()).grad.view(-1)[:2] = 1e20  # (its 2-norm is inf in fp32)
        return losses

    loop.step_fn = step_fn
    assert loop.run() == 3


def test_resume_names_a_corrupt_or_truncated_state_file(tmp_path):
    loop, _ = make_loop(tmp_path, steps=2)
    loop.run()
    state = tmp_path / "stage1.state.safetensors"
    data = state.read_bytes()
    for broken in (data[: len(data) // 2], b"garbage", None):
        if broken is None:  # readable, but its tensors changed: the saved checksum tells
            state.write_bytes(data)
            flip_tensor_bytes(state)
        else:
            state.write_bytes(broken)
        with pytest.raises(ValueError, match=f"cannot read the training state {state}"):
            make_loop(tmp_path, steps=4)[0].run()


def test_resume_refuses_fewer_steps_than_the_checkpoint_has_run(tmp_path):
    make_loop(tmp_path, steps=6)[0].run()
    with pytest.raises(ValueError, match=r"stage1.state.safetensors has run 6 steps, more than the 2 asked for"):
        make_loop(tmp_path, steps=2)[0].run()
    assert len((tmp_path / "stage1.log.jsonl").read_text().splitlines()) == 6
    make_loop(tmp_path / "one", steps=3, checkpoint_every=1)[0].run()  # one step past: refused too
    with pytest.raises(ValueError, match=r"has run 3 steps, more than the 2 asked for"):
        make_loop(tmp_path / "one", steps=2)[0].run()


def test_the_loop_trains_a_model_handed_to_it_in_eval_mode(tmp_path):
    """(after a validation, say: its BatchNorm and dropout would train frozen)"""
    loop, net = make_loop(tmp_path, steps=2)
    seen = []
    step_fn = loop.step_fn

    def recording(step, noisy, clean):
        seen.append(net.training)
        return step_fn(step, noisy, clean)

    loop.step_fn = recording
    net.eval()
    loop.run()
    assert seen == [True, True]


def test_two_seeds_share_no_step_s_stream():
    """(seed + step gave seed 1's step 0 the stream of seed 0's step 1: the same sandwich configs)"""
    seeds = {step_generator(seed, step).initial_seed() for seed in range(3) for step in range(3)}
    assert len(seeds) == 9


def test_a_setting_no_checkpoint_can_store_is_refused_before_training(tmp_path):
    """(a tensor learning rate trained up to the first checkpoint, then failed in json.dumps)"""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=torch.tensor(1e-2), foreach=False)
    with pytest.raises(ValueError, match=r"stage1: the optimizer's param group 0's lr is tensor\(0.0100\), which a "
                                         r"checkpoint cannot store"):
        TrainLoop(tmp_path, "stage1", net, optimizer, Pairs(), lambda *a: {}, LoopSettings(steps=2, batch_size=2))


def test_a_scheduler_beside_an_lr_factor_is_refused(tmp_path):
    """Each step sets the rates to the initial ones times the factor: a scheduler's would be lost."""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5)
    with pytest.raises(ValueError, match="stage1: a scheduler and an lr_factor"):
        TrainLoop(tmp_path, "stage1", net, optimizer, Pairs(), lambda *a: {}, LoopSettings(steps=2, batch_size=2),
                  scheduler=scheduler, lr_factor=lambda step: 1.0)


def test_the_log_reaches_the_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """A checkpoint is fsynced; a power loss must not keep it while losing the log's lines before it."""
    import os

    from dds_fast.training import loop as loop_module

    events = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    save_state = loop_module.TrainLoop.save_state
    monkeypatch.setattr(loop_module.TrainLoop, "save_state",
                        lambda self, step: events.append(("checkpoint", step)) or save_state(self, step))
    make_loop(tmp_path, steps=4, checkpoint_every=2)[0].run()
    checkpoints = [i for i, event in enumerate(events) if event[0] == "checkpoint"]
    assert len(checkpoints) == 2
    for i in checkpoints:
        assert events[i - 1] == ("fsync", str(tmp_path / "stage1.log.jsonl"))


def test_resume_names_a_state_file_of_another_architecture(tmp_path):
    make_loop(tmp_path, steps=2)[0].run()
    wider = SlimDnCNN(in_channels=1, base_width=24, depth=3)
    loop = TrainLoop(tmp_path, "stage1", wider, torch.optim.Adam(wider.parameters()), Pairs(), lambda *a: {},
                     LoopSettings(steps=4, batch_size=2, progress=False))
    with pytest.raises(ValueError, match=r"(?s)stage1.state.safetensors does not fit this stage1 model .*size mismatch"):
        loop.resume()


def test_resume_drops_a_log_record_cut_short_by_a_kill(tmp_path, monkeypatch):
    make_loop(tmp_path, steps=4)[0].run()
    log = tmp_path / "stage1.log.jsonl"
    with log.open("a") as f:
        f.write('{"step": 4, "time": 0.01, "lr": 0.0')  # killed mid-record
    before = log.read_text()
    # a failure while the log is rewritten leaves it whole
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        make_loop(tmp_path, steps=6)[0].run()
    assert log.read_text() == before
    monkeypatch.undo()
    assert make_loop(tmp_path, steps=6)[0].run() == 2
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(6))
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ["{broken"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"stage1.log.jsonl, line 3: not a JSON record"):
        make_loop(tmp_path, steps=8)[0].run()


def test_gate_psnr_of_an_exact_reproduction_is_finite():
    """8-bit PSNR is +inf on an exact reproduction (a black sky): the gain and the log would
    be too, and the loop would stop as if training diverged."""
    from dds_fast.training.gate_stage import per_image_psnr

    clean = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    one_off = clean.clone()
    one_off[1, 0, 0, 0] += 1 / 255
    values = per_image_psnr(clean, one_off)
    assert torch.isfinite(values).all() and values[0] == pytest.approx(10 * math.log10(255 ** 2 * 3 * 64))
    assert values[0] >= values[1]


def test_gate_psnr_scores_each_image_as_the_8_bit_metric_does():
    from dds_fast.metrics import psnr
    from dds_fast.training.gate_stage import per_image_psnr

    g = torch.Generator().manual_seed(1)
    clean = torch.rand(5, 3, 9, 7, generator=g)
    output = clean + 0.05 * torch.randn(clean.shape, generator=g)  # outside [0, 1] too: clipped
    output[0] = torch.round(clean[0] * 255) / 255 + 0.5 / 255  # exact .5 ties: rounded to even, as numpy does
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = per_image_psnr(output.to(dtype), clean)
        expected = torch.tensor([psnr(o, c) for o, c in zip(output.to(dtype), clean)], dtype=torch.float64)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    nan = output.clone()
    nan[2, 0, 0, 0] = float("nan")
    assert per_image_psnr(nan, clean).isnan().tolist() == [False, False, True, False, False]


def frozen_gated_net(pick=lambda space: (space.smallest(), space.largest())):
    """A tiny frozen super-network and a new gate (attention off, as stage 3 trains it) over
    routes at the configs ``pick`` gives of its space, in ascending MACs: (net, gate, DDSNet)."""
    from dds_fast import DDSNet, DynamicGate, RoutingEntry, macs_per_pixel

    net = tiny_net()
    for p in net.parameters():
        p.requires_grad_(False)
    configs = sorted(pick(net.space), key=lambda c: macs_per_pixel(net, c))
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in configs]
    torch.manual_seed(0)
    gate = DynamicGate(net.stem_channels, len(routes))
    gate.attention = False
    return net, gate, DDSNet(net, gate, routes)


def test_gate_labels_and_step():
    from dds_fast import DDSNet, DynamicGate
    from dds_fast.training.gate_stage import gate_labels, gate_step, per_image_psnr

    # the paper's rule: rows are the smallest's and the largest's PSNRs
    labels = gate_labels(torch.tensor([[29.9, 30.0, 30.0], [30.0, 30.5, 31.0]]), [0, 3], beta=0.2)
    # a gain of exactly beta is hard ("less than beta is easy")
    assert gate_labels(torch.tensor([[30.0, 30.0], [30.25, 30.0]]), [0, 3], beta=0.25).tolist() == [3, 0]
    assert gate_labels(torch.tensor([[30.0], [30.0]]), [0, 3], beta=0.0).tolist() == [3]
    assert labels.tolist() == [0, 3, 3]
    with pytest.raises(ValueError, match="3 routes' PSNRs, routes names 2"):
        gate_labels(torch.zeros(3, 2), [0, 3], beta=0.2)
    net, gate, model = frozen_gated_net()
    routes = model.routing_space
    noisy, clean = batch(n=4, size=16)
    record = gate_step(model, noisy, clean, budget=routes[0].macs_per_pixel)
    assert all(p.grad is not None for p in gate.parameters() if p is not gate.fc2.weight and p is not gate.fc2.bias)
    assert routes[0].macs_per_pixel <= record["expected_macs"] <= model.dynamic_macs_per_pixel[-1]
    psi = record["expected_macs"]
    assert record["complexity"] == pytest.approx(((psi - routes[0].macs_per_pixel) / model.supernet_macs_per_pixel) ** 2)
    with torch.no_grad():
        quality = []
        for entry in routes:
            net.set_config(entry.config)
            quality.append(per_image_psnr(net(noisy), clean))
    assert record["psnr_gain"] == pytest.approx((quality[1] - quality[0]).mean().item(), abs=1e-4)
    # the labels the step trains on, and its cross-entropy over the gate's logits
    labels = ((quality[1] - quality[0]) >= 0.2).long()
    assert record["hard_fraction"] == pytest.approx(labels.float().mean().item())
    net.set_config(net.space.largest())
    with torch.no_grad():
        logits = gate(net.stem(net.pad(noisy))).logits
    assert record["cross_entropy"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    with pytest.raises(ValueError, match="ascending"):
        gate_step(DDSNet(net, DynamicGate(net.stem_channels, 2), routes[::-1]), noisy, clean, 1.0)


def test_the_gate_reads_the_full_width_stem_whatever_the_largest_route():
    """The gate squeezes the whole stem, as a DDSNet runs it; a routing space whose largest
    route is narrower must not leave the stem at that route's width."""
    from dds_fast.training.gate_stage import gate_step, per_image_psnr

    net, gate, model = frozen_gated_net(lambda space: (space.smallest(), space.uniform(0.5)))
    routes = model.routing_space
    assert routes[-1].config != net.space.largest()
    noisy, clean = batch(n=4, size=16)
    record = gate_step(model, noisy, clean, budget=routes[0].macs_per_pixel)
    with torch.no_grad():
        quality = []
        for entry in routes:
            net.set_config(entry.config)
            quality.append(per_image_psnr(net(noisy), clean))
        net.set_config(net.space.largest())
        logits = gate(net.stem(net.pad(noisy))).logits
    labels = ((quality[1] - quality[0]) >= 0.2).long()
    assert record["cross_entropy"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_within_labels_take_the_smallest_route_close_to_the_largest():
    from dds_fast.training.gate_stage import gate_labels, gate_step, scored_routes

    assert scored_routes(4, "ends") == [0, 3] and scored_routes(4, "within") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown gate labels 'middle'"):
        scored_routes(4, "middle")
    quality = torch.tensor([[29.0, 30.95, 29.0, 29.0],
                            [30.85, 30.0, 29.0, 31.5],  # the last image: a middle route beats the largest
                            [30.95, 31.0, 30.0, 31.2],
                            [31.0, 31.0, 31.0, 31.0]])
    assert gate_labels(quality, [0, 1, 2, 3], beta=0.2).tolist() == [1, 0, 3, 1]
    assert gate_labels(quality, [0, 1, 2, 3], beta=0.1).tolist() == [2, 0, 3, 1]

    net, gate, model = frozen_gated_net(lambda space: {space.smallest(), space.largest(), space.uniform(0.5)})
    routes = model.routing_space
    configs = [entry.config for entry in routes]
    noisy, clean = batch(n=6, size=16)

    class Scorer(torch.nn.Module):
        """Each route's output off the clean image by a set number of 8-bit levels per image."""
        levels = {configs[0]: [8, 2, 8, 2, 8, 2], configs[1]: [2, 8, 8, 8, 8, 8], configs[2]: [2] * 6}

        def set_config(self, config):
            self.config = config

        def forward(self, x):
            return clean + torch.tensor(self.levels[self.config]).view(-1, 1, 1, 1) / 255

    record = gate_step(model, noisy, clean, budget=routes[0].macs_per_pixel, labels="within", scorer=Scorer())
    expected = torch.tensor([1, 0, 2, 0, 2, 0])  # the smallest route within 0.2 dB of the largest
    with torch.no_grad():
        net.set_config(net.space.largest())
        logits = gate(net.stem(net.pad(noisy))).logits
    shares = [record[f"label_share_{r}"] for r in range(3)]
    assert shares == pytest.approx([(expected == r).float().mean().item() for r in range(3)])
    assert record["hard_fraction"] == pytest.approx((expected > 0).float().mean().item())
    assert record["cross_entropy"] == pytest.approx(F.cross_entropy(logits, expected).item(), rel=1e-5)


def test_gate_step_on_two_ranks_averages_to_one_process_on_the_whole_batch(monkeypatch):
    """The complexity loss squares the mean Psi over the whole batch, so each rank needs the
    others' Psi: two ranks on half a batch each, their gradients averaged as the loop does,
    give the gradient of one process on the whole batch. (The gate's BatchNorm in eval mode:
    in train mode each rank normalises its own share, as under DDP.)"""
    from dds_fast.training import gate_stage

    net, gate, model = frozen_gated_net()
    routes = model.routing_space
    gate.eval()
    with torch.no_grad():
        for p in gate.parameters():
            p.mul_(2)  # so that the two shares' Psi differ: bright images, then dark ones
    noisy, clean = batch(n=4, size=16)
    noisy[2:], clean[2:] = noisy[2:] * 0.1, clean[2:] * 0.1

    def grads(rows):
        gate.zero_grad()
        record = gate_stage.gate_step(model, noisy[rows], clean[rows], routes[0].macs_per_pixel,
                                      complexity_weight=1000.0)
        return [p.grad.clone() for p in gate.parameters() if p.grad is not None], record["expected_macs"]

    whole, _ = grads(slice(0, 4))
    shares = [slice(0, 2), slice(2, 4)]
    psi = [grads(rows)[1] for rows in shares]
    monkeypatch.setattr(gate_stage, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(gate_stage.dist, "all_reduce", lambda tensor: tensor.fill_(sum(psi)))
    ranks = [grads(rows)[0] for rows in shares]
    for full, *parts in zip(whole, *ranks):
        torch.testing.assert_close(sum(parts) / 2, full)


def test_one_sided_gate_labels_get_a_warning_naming_the_median_gain():
    from dds_fast.training.gate_stage import one_sided_labels

    log = [{"hard_fraction": 1.0, "psnr_gain": g} for g in (2.5, 0.9, 3.1)]
    warning = one_sided_labels(log, 0.2)
    assert "100.0% of the training images were labelled hard with beta = 0.2 dB" in warning and "2.50 dB" in warning
    assert "100.0% of the training images were labelled easy" in one_sided_labels(
        [{**r, "hard_fraction": 0.0} for r in log], 5.0)
    nearly = [{**log[0], "hard_fraction": 0.97}] + log * 33  # 99.97% hard: as degenerate
    assert "100.0% of the training images were labelled hard" in one_sided_labels(nearly, 0.2)
    assert one_sided_labels([{**log[0], "hard_fraction": 0.5}] + log, 0.2) is None
    assert one_sided_labels([], 0.2) is None
    assert "labelled hard with beta = 0.2 dB, so" in one_sided_labels([{"hard_fraction": 1.0}], 0.2)
    # exactly 1% or 99% of one side is within the tolerance, no warning
    assert one_sided_labels([{"hard_fraction": 0.5}], 0.2, tolerance=0.5) is None
    assert one_sided_labels([{"hard_fraction": 0.25}, {"hard_fraction": 0.75}], 0.2, tolerance=0.5) is None
    # "within" labels: one route's share, whichever it is
    spread = [{"hard_fraction": 1.0, "label_share_0": 0.0, "label_share_1": 0.5, "label_share_2": 0.5}]
    assert one_sided_labels(spread, 0.2, labels="within") is None
    middle = [{"hard_fraction": 1.0, "label_share_0": 0.0, "label_share_1": 1.0, "label_share_2": 0.0}]
    warning = one_sided_labels(middle, 0.2, labels="within")
    assert "100.0% of the training images were labelled route 1" in warning and warning.endswith("lower beta")
    largest = [{"hard_fraction": 1.0, "label_share_0": 0.0, "label_share_1": 0.0, "label_share_2": 1.0}]
    assert one_sided_labels(largest, 0.2, labels="within").endswith("raise beta")


def test_training_config_from_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"steps": 5, "noise": "camera", "noise_args": {}}))
    config = TrainConfig.from_file(path, batch_size=4)
    assert config.steps == 5 and config.batch_size == 4 and config.noise == "camera"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"steps": 7}).encode())  # a BOM, as some editors write
    assert TrainConfig.from_file(path).steps == 7
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="cannot read training config"):
        TrainConfig.from_file(path)
    path.write_text(json.dumps({"stepz": 5}))
    with pytest.raises(ValueError, match=r"unknown training options \['stepz'\]"):
        TrainConfig.from_file(path)
    path.write_text('{"steps": 5, "noise_args": {"sigma": 10, "sigma": 25}, "steps": 50}')  # json keeps the last
    with pytest.raises(ValueError, match=r"cannot read training config .*repeats the key\(s\) \['sigma'\]"):
        TrainConfig.from_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        TrainConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        TrainConfig.from_dict({"lr_schedule": "step"})
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        TrainConfig.from_dict({"backend": "cudnn"})
    for seed in (10 ** 23, 2 ** 50):  # 2**50: torch takes it, but not times the steps' stride
        with pytest.raises(ValueError, match=f"seed must be at most 18446688733642, got {seed}"):
            TrainConfig.from_dict({"seed": seed})
    step_generator(18446688733642, 1_000_002)  # the largest seed's last step
    with pytest.raises(ValueError, match="unknown distillation_loss 'kl'"):
        TrainConfig.from_dict({"distillation_loss": "kl"})
    with pytest.raises(ValueError, match="unknown distillation 'soft'"):
        TrainConfig.from_dict({"distillation": "soft"})
    with pytest.raises(ValueError, match="unknown refine_distillation 'soft'"):
        TrainConfig.from_dict({"refine_distillation": "soft"})
    assert TrainConfig.from_dict({"refine_distillation": "none"}).refine_distillation == "none"


def test_training_config_checks_the_type_of_every_option(tmp_path):
    config = TrainConfig.from_dict({"lr": 1, "budget": 20000, "validation_images": ["a.png"], "inet_steps": None})
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.budget, float)
    assert config.validation_images == ("a.png",)
    for values, message in [({"steps": "ten"}, "steps must be an integer, got 'ten'"),
                            ({"steps": 2.5}, "steps must be an integer"),
                            ({"steps": True}, "steps must be an integer"),
                            ({"noise_args": [25]}, r"noise_args must be a JSON object, got \[25\]"),
                            ({"validation_images": "chelsea"}, "validation_images must be a list of str or null"),
                            ({"budget": "big"}, "budget must be a number or null"),
                            ({"progress": 1}, "progress must be true or false")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(values)
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object of training options, got list"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize("values, message", [
    ({"num_choices": 1}, "num_choices must be >= 2, got 1"),
    ({"validation_crops": 0}, "validation_crops must be >= 1, got 0"),
    ({"slim_step": 0}, "slim_step must be >= 1, got 0"),
    ({"sandwich": 1}, "sandwich must be >= 2, got 1"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"inet_steps": 0}, r"inet_steps must be >= 1 \(or null: steps \+ refine_steps\), got 0"),
    ({"channels": 2}, "channels must be 1 or 3, got 2"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"refine_lr": 1e38}, r"refine_lr must be at most 1e\+30 \(Adam's steps overflow fp32 beyond\), got 1e\+38"),
    ({"budget": -5.0}, "budget must be a positive number, got -5.0"),
    ({"gate_lr_decay": 0.0}, r"gate_lr_decay must be in \(0, 1\], got 0.0"),
    ({"batch_size": 32, "epoch_patches": 16}, "batch_size 32 is larger than epoch_patches 16"),
    ({"batch_size": 8, "gate_batch_size": 64, "epoch_patches": 16}, "gate_batch_size 64 is larger than epoch_patches 16"),
])
def test_training_config_checks_ranges_before_any_stage_runs(values, message):
    with pytest.raises(ValueError, match=f"^options: {message}"):
        TrainConfig.from_dict(values)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(), **values)


def test_training_config_checks_the_device():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        TrainConfig(device="gpu").resolved_device()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
            TrainConfig(device="cuda").resolved_device()
    assert TrainConfig(device="cpu").resolved_device() == torch.device("cpu")


def test_noise_arguments_default_to_the_models_own(tmp_path):
    from dds_fast.training.noise import CameraNoise, PoissonGaussianNoise

    assert Run(tmp_path, TrainConfig(device="cpu")).noise.sigma == (25.0, 25.0)
    assert isinstance(Run(tmp_path, TrainConfig(noise="camera", device="cpu")).noise, CameraNoise)
    noise = Run(tmp_path, TrainConfig.from_dict({"noise": "poisson_gaussian", "noise_args": {"a": 0.01},
                                                 "device": "cpu"})).noise
    assert isinstance(noise, PoissonGaussianNoise) and noise.a == (0.01, 0.01)
    with pytest.raises(ValueError, match="bad parameters for noise model 'camera'"):
        Run(tmp_path, TrainConfig(noise="camera", noise_args={"sigma": 25.0}, device="cpu"))


def test_building_a_run_leaves_the_callers_random_state_alone(tmp_path, monkeypatch):
    """The new networks' weights come from the config's seed alone, drawn without moving the
    caller's stream, and no GPU's generator is seeded (torch.manual_seed seeds them all)."""
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    run = Run(tmp_path, TrainConfig(device="cpu", seed=7))
    net = run.new_network(attention_choices=2)
    assert torch.equal(torch.rand(3), expected) and not cuda_seeds
    torch.manual_seed(1)
    again = Run(tmp_path, TrainConfig(device="cpu", seed=7)).new_network(attention_choices=2)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def image_folder(folder, names, size=(40, 36)):
    """Small random RGB PNGs."""
    from dds_fast.training.data import save_image

    folder.mkdir()
    for k, name in enumerate(names):
        save_image(folder / name, torch.rand(3, *size, generator=torch.Generator().manual_seed(k)))
    return folder


def test_a_folder_holds_out_its_last_two_images_by_default(tmp_path):
    folder = image_folder(tmp_path / "photos", ["d.png", "a.png", "c.png", "b.png"])
    small = dict(validation_patch=32, gate_patch_size=32, device="cpu")
    run = Run(tmp_path / "run", TrainConfig(images=str(folder), **small))
    assert list(run.train_images) == [str(folder / "a.png"), str(folder / "b.png")]
    assert list(run.validation_images) == [str(folder / "c.png"), str(folder / "d.png")]
    chosen = Run(tmp_path / "run", TrainConfig(images=str(folder), validation_images=("a.png",), **small))
    assert list(chosen.validation_images) == [str(folder / "a.png")] and len(chosen.train_images) == 3
    with pytest.raises(ValueError, match=r"validation images \['chelsea'\] are not among the clean images"):
        Run(tmp_path / "run", TrainConfig(images=str(folder), validation_images=("a.png", "chelsea"), **small))
    with pytest.raises(ValueError, match="none is left to train on"):
        Run(tmp_path / "run", TrainConfig(images=str(folder), validation_images=("a.png", "b.png", "c.png", "d.png"),
                                          **small))
    two = Run(tmp_path / "run", TrainConfig(images=str(image_folder(tmp_path / "two", ["x.png", "y.png"])), **small))
    assert list(two.validation_images) == [str(tmp_path / "two" / "y.png")] and len(two.train_images) == 1
    with pytest.raises(ValueError, match=r"no clean image is held out for validation among \['x.png'\]"):
        Run(tmp_path / "run", TrainConfig(images=str(image_folder(tmp_path / "one", ["x.png"])), **small))


def test_a_runs_8_bit_folder_images_stay_uint8_with_the_data_digest_of_their_floats(tmp_path, monkeypatch):
    """A run holds every training image: 8-bit ones as uint8 (a quarter of the memory), and its
    data digest, which a resume compares with the one it recorded, still hashes their float
    pixels, as runs did before."""
    from dds_fast.training import stages
    from dds_fast.training.data import load_image, load_image_folder

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    config = TrainConfig(images=str(folder), patch_size=32, validation_patch=32, gate_patch_size=32, device="cpu")
    run = Run(tmp_path / "run", config)
    assert {image.dtype for image in [*run.train_images.values(), *run.validation_images.values()]} == {torch.uint8}
    monkeypatch.setattr(stages, "load_image_folder", lambda folder, channels, keep_8_bit: load_image_folder(
        folder, channels))
    floats = Run(tmp_path / "run", config)
    assert {image.dtype for image in floats.train_images.values()} == {torch.float32}
    assert run.data_fingerprint == floats.data_fingerprint
    # as earlier versions hashed it (what a resume of their runs compares with)
    digest = hashlib.sha256()
    for names in (["a.png"], ["b.png", "c.png"]):  # trained on, then held out (the last two)
        for name in names:
            digest.update(name.encode())
            digest.update(load_image(folder / name, 3).numpy())
        digest.update(b"\0")
    assert run.data_fingerprint == digest.hexdigest()
    assert all(torch.equal(a, b) for a, b in zip(run.dataset().batch(0, 3), floats.dataset().batch(0, 3)))
    assert all(torch.equal(a, b) for a, b in zip(run.validation_batches()[0], floats.validation_batches()[0]))


def test_a_folder_image_smaller_than_the_patch_is_named(tmp_path):
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    run = Run(tmp_path / "run", TrainConfig(images=str(folder), patch_size=38, validation_patch=32, gate_patch_size=32,
                                            device="cpu"))
    with pytest.raises(ValueError, match=r"image .*a.png of size \(40, 36\) is smaller than patch_size 38"):
        run.dataset()
    # stage 2's crops of the held-out images are checked before stage 1 runs
    with pytest.raises(ValueError, match=r"validation_patch 37 is larger than the held-out image .*b.png of size "
                                         r"\(40, 36\)"):
        Run(tmp_path / "run", TrainConfig(images=str(folder), validation_patch=37, device="cpu"))
    # and stage 3's crops of the training images (asked by `train all` before stage 1; a run of the
    # stages before it alone does not crop at that size), and the routing configs stage 2 can find
    run = Run(tmp_path / "run", TrainConfig(images=str(folder), validation_patch=32, gate_patch_size=37, device="cpu"))
    with pytest.raises(ValueError, match=r"gate_patch_size 37 is larger than the training image .*a.png of size "
                                         r"\(40, 36\)"):
        run.check_crops("gate_patch_size")
    # and the training crops, before the noise check crops a blank image that large (100000 x
    # 100000 pixels ran out of memory there)
    huge = Run(tmp_path / "run", TrainConfig(images=str(folder), validation_patch=32, patch_size=100_000,
                                             noise="camera", device="cpu"))
    with pytest.raises(ValueError, match=r"patch_size 100000 is larger than the training image .*a.png of size "
                                         r"\(40, 36\)"):
        huge.check_stages(["stage1"])
    with pytest.raises(ValueError, match="gate_patch_size 37"):
        run.stage3()
    tiny = dict(images=str(folder), arch="SlimDnCNN", base_width=8, depth=3, validation_patch=32, gate_patch_size=32,
                device="cpu")
    Run(tmp_path / "run", TrainConfig(**tiny, slim_step=8, num_choices=3))  # widths (8, 16) of two groups
    with pytest.raises(ValueError, match=r"num_choices 4 is more than the 3 configs that progressive slimming by "
                                         r"slim_step 8 finds in this SlimDnCNN \(base_width 8, depth 3\)"):
        Run(tmp_path / "run", TrainConfig(**tiny, slim_step=8, num_choices=4))


@pytest.mark.parametrize("arch, base_width, step", [(SlimDnCNN, 8, 8), (SlimDnCNN, 16, 3), (SlimUNet, 8, 8),
                                                     (SlimUNet, 8, 20)])
def test_slimming_length_is_the_length_of_the_slimming_trajectory(arch, base_width, step):
    net = arch(in_channels=1, base_width=base_width, depth=2)
    assert slimming_length(net.space, step) == len(progressive_slimming(net, [batch(size=16)], step=step))


def tiny_run_config(**options):
    return TrainConfig(**{"arch": "SlimDnCNN", "channels": 1, "base_width": 8, "depth": 3, "patch_size": 16,
                          "batch_size": 2, "epoch_patches": 4, "gate_batch_size": 4, "validation_crops": 1,
                          "validation_patch": 16, "gate_patch_size": 16,
                          "slim_step": 8, "num_choices": 2, "checkpoint_every": 2, "progress": False, "device": "cpu",
                          **options})


def test_a_run_resumes_on_its_images_moved_but_not_on_other_images(tmp_path):
    import shutil

    names = ["a.png", "b.png", "c.png"]
    folder = image_folder(tmp_path / "photos", names)
    Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant")).stage1()
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    Run(tmp_path / "run", tiny_run_config(images=str(moved), steps=3, lr_schedule="constant")).stage1()
    other = image_folder(tmp_path / "other", names, size=(40, 37))
    with pytest.raises(ValueError, match=r"stage1.state.safetensors was trained with other options: data .* \(a "
                                         r"digest of the images: they changed\)"):
        Run(tmp_path / "run", tiny_run_config(images=str(other), steps=4, lr_schedule="constant")).stage1()


def test_a_stage_run_alone_refuses_an_earlier_result_of_other_options(tmp_path):
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    options = dict(images=str(folder), steps=2, lr_schedule="constant")
    run = Run(tmp_path / "run", tiny_run_config(**options))
    run.stage1()
    run.stage2()
    with pytest.raises(ValueError, match=r"stage1.safetensors was trained with base_width 8; this run's config has "
                                         r"base_width 16"):
        Run(tmp_path / "run", tiny_run_config(**options, base_width=16)).stage2()
    with pytest.raises(ValueError, match=r"holds 2 routing configs, num_choices is 3: run `dds-fast train stage2` "
                                         r"again, or set num_choices 2"):
        Run(tmp_path / "run", tiny_run_config(**options, num_choices=3)).stage3()
    with pytest.raises(ValueError, match=r"stage2.safetensors's routing space was slimmed with slim_step 8, this "
                                         r"run's config has slim_step 4"):
        Run(tmp_path / "run", tiny_run_config(**options, slim_step=4)).inets(indices=[0])
    assert not list((tmp_path / "run").glob("stage3*")) and not list((tmp_path / "run").glob("inet*"))
    # what stage 2 validated on does not shape its routing space: later stages build on it as it is
    stage2 = tmp_path / "run" / "stage2.safetensors"
    Run(tmp_path / "run", tiny_run_config(**options, seed=1, batch_size=4)).check_earlier_result(
        "stage2.safetensors", dds_fast.load(stage2))


def test_a_stage2_result_of_an_earlier_version_is_reused(tmp_path, monkeypatch):
    """Its record of what it was made from holds no digest of the data."""
    from dds_fast.training import stages

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    run = Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant"))
    run.stage1()
    first = run.stage2()
    stage2 = tmp_path / "run" / "stage2.safetensors"
    metadata = dds_fast.read_metadata(stage2)["user"]
    del metadata["made_from"]["data"]
    dds_fast.save(first, stage2, **metadata)
    monkeypatch.setattr(stages, "progressive_slimming", lambda *a, **k: pytest.fail("slimmed again"))
    assert run.stage2().routing_space == first.routing_space


def test_stage2_reruns_reuse_the_routing_space_of_the_same_stage1(tmp_path, monkeypatch):
    """``train all`` resuming after a kill runs stage 2 again: it reuses its routing space
    while stage 1's weights and the slimming options are the same, and slims again otherwise."""
    from dds_fast.training import stages

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    run = Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant"))
    run.stage1()
    first = run.stage2()
    slimmed = []
    slimming = stages.progressive_slimming
    monkeypatch.setattr(stages, "progressive_slimming", lambda *a, **k: slimmed.append(1) or slimming(*a, **k))
    assert run.stage2().routing_space == first.routing_space and not slimmed
    # stage 1 run again with an option it does not depend on rewrites its file: other bytes
    # (as safetensors' metadata in another process), the same weights
    written = (tmp_path / "run" / "stage1.safetensors").read_bytes()
    Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant", gate_lr=1e-4)).stage1()
    assert (tmp_path / "run" / "stage1.safetensors").read_bytes() != written
    run.stage2()
    assert not slimmed
    Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant", slim_step=4)).stage2()
    assert len(slimmed) == 1  # another slimming step
    run.stage2()
    assert len(slimmed) == 2
    Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, lr_schedule="constant", noise="camera")).stage2()
    assert len(slimmed) == 3  # other validation data
    run.stage2()
    assert len(slimmed) == 4
    Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=3, lr_schedule="constant")).stage1()
    run.stage2()  # stage 1 trained on: its weights changed
    assert len(slimmed) == 5
    stage1 = tmp_path / "run" / "stage1.safetensors"
    stage1.write_bytes(stage1.read_bytes()[:300])  # a raw safetensors error ended in a traceback
    with pytest.raises(dds_fast.CheckpointError, match=f"checkpoint {stage1} .*truncated or corrupt"):
        run.stage2()


def test_stage1_resumes_through_run_to_the_result_of_one_run(tmp_path, monkeypatch):
    """Bit-identical on the CPU to one 4-step run: a 2-step run asked again for 4 steps, and a
    run killed after its step-2 checkpoint. (A constant learning rate: a cosine schedule
    depends on the step count asked for.)"""
    from dds_fast.training import stages

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])

    def stage1(run_dir, steps):
        config = tiny_run_config(images=str(folder), steps=steps, lr_schedule="constant")
        return Run(run_dir, config).stage1().state_dict()

    def assert_same(a, b):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)

    straight = stage1(tmp_path / "straight", 4)
    stage1(tmp_path / "longer", 2)
    assert_same(stage1(tmp_path / "longer", 4), straight)

    def killed_at_step_2(net, noisy, clean, configs, *args, **kwargs):
        if (tmp_path / "killed" / "stage1.state.safetensors").exists():
            raise KeyboardInterrupt
        return sandwich_step(net, noisy, clean, configs, *args, **kwargs)

    monkeypatch.setattr(stages, "sandwich_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        stage1(tmp_path / "killed", 4)
    monkeypatch.setattr(stages, "sandwich_step", sandwich_step)
    assert_same(stage1(tmp_path / "killed", 4), straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "stage1.log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_refine_and_stage3_refuse_a_state_file_trained_from_other_weights(tmp_path, monkeypatch):
    """``train all`` again after a kill resumes each stage from its state file, but not once
    a stage before it trained on: refine and stage 3 would go on to save weights trained from
    the old ones."""
    from dds_fast.training import stages
    from dds_fast.training.gate_stage import gate_step

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])

    def train_all(**options):
        config = tiny_run_config(images=str(folder), lr_schedule="constant",
                                 **{"steps": 2, "refine_steps": 2, "gate_steps": 4, **options})
        run = Run(tmp_path / "run", config)
        run.stage1()
        run.stage2()
        run.refine()
        return run.stage3()

    def killed_at_step_2(*args, **kwargs):
        if (tmp_path / "run" / "stage3.state.safetensors").exists():
            raise KeyboardInterrupt
        return gate_step(*args, **kwargs)

    monkeypatch.setattr(stages, "gate_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_all()
    monkeypatch.setattr(stages, "gate_step", gate_step)
    train_all()  # refine saves the same weights again, and stage 3 goes on from them
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "stage3.log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    digests = r"start_weights '[0-9a-f]{64}' then, '[0-9a-f]{64}' now \(the weights the stage starts from changed"
    with pytest.raises(ValueError, match=rf"stage3.state.safetensors was trained with other options: {digests}"):
        train_all(refine_steps=3)  # refine went on
    with pytest.raises(ValueError, match=rf"refine.state.safetensors was trained with other options: {digests}"):
        train_all(refine_steps=3, steps=3)  # stage 1 went on


def test_stage3_on_refine_s_routes_refuses_other_slimming_options_and_a_budget_past_the_routes(tmp_path):
    """Refine's result carries how stage 2 slimmed its routes, as stage 2's does (stage 3 built
    on it with any slim_step or slim_criterion); a budget outside the routes' MACs would pull
    the gate past every route."""
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    options = dict(images=str(folder), lr_schedule="constant", steps=1, refine_steps=1, gate_steps=1)
    run = Run(tmp_path / "run", tiny_run_config(**options))
    run.stage1()
    run.stage2()
    run.refine()
    with pytest.raises(ValueError, match=r"refine.safetensors's routing space was slimmed with slim_criterion 'psnr', "
                                         r"this run's config has slim_criterion 'psnr_per_mac'"):
        Run(tmp_path / "run", tiny_run_config(**options, slim_criterion="psnr_per_mac")).stage3()
    with pytest.raises(ValueError, match=r"budget 1 MACs/pixel is outside what any routes of this SlimDnCNN cost"):
        Run(tmp_path / "run", tiny_run_config(**options, budget=1.0)).stage3()
    assert isinstance(run.stage3(), dds_fast.DDSNet)


def test_a_state_file_recorded_before_weight_fingerprints_still_resumes():
    loop = TrainLoop.__new__(TrainLoop)  # the option check alone
    loop.state_path, loop.options = Path("refine.state.safetensors"), {"lr": 1.0, "start_weights": "ab" * 32}
    loop._check_options({"lr": 1.0})
    with pytest.raises(ValueError, match="lr 2.0 then, 1.0 now"):
        loop._check_options({"lr": 2.0})


def test_stage_resume_refuses_other_options_naming_them(tmp_path):
    """Each stage's state file records the options its training depends on: a resume with
    others is refused, the changed ones named. Under the cosine schedule, which spans the
    steps asked for, so are other steps; a constant rate lets a finished stage go on."""
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])

    def stage1(run_dir, **options):
        return Run(run_dir, tiny_run_config(images=str(folder), **{"steps": 2, **options})).stage1()

    stage1(tmp_path / "run", lr_schedule="constant")
    state = tmp_path / "run" / "stage1.state.safetensors"
    with pytest.raises(ValueError, match=rf"{state} was trained with other options: lr 0.0002 then, 0.1 now; "
                                         r"noise 'awgn' then, 'camera' now\. Resume with"):
        stage1(tmp_path / "run", lr_schedule="constant", lr=0.1, noise="camera")
    with pytest.raises(ValueError, match=r"base_width 8 then, 16 now"):  # not load_state_dict's RuntimeError
        stage1(tmp_path / "run", lr_schedule="constant", base_width=16)
    with pytest.raises(ValueError, match=r"attention True then, False now"):
        stage1(tmp_path / "run", lr_schedule="constant", attention=False)
    with pytest.raises(ValueError, match=r"permute_channels True then, None now"):  # (the default: on)
        stage1(tmp_path / "run", lr_schedule="constant", permute_channels=False)
    stage1(tmp_path / "run", lr_schedule="constant", steps=3)  # more steps: goes on
    stage1(tmp_path / "cosine")
    with pytest.raises(ValueError, match=r"steps 2 then, 3 now \(the learning-rate schedule spans the steps"):
        stage1(tmp_path / "cosine", steps=3)


def test_all_stages_train_and_validate_on_sidd_pairs(tmp_path, monkeypatch):
    import numpy as np

    from test_data import write_sidd_medium, write_sidd_validation  # the layouts test_data checks

    from dds_fast.training.data import PairedPatches

    write_sidd_medium(tmp_path / "medium")
    (tmp_path / "val").mkdir()
    clean = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    write_sidd_validation(tmp_path / "val", 255 - clean, clean)
    config = tiny_run_config(paired_root=str(tmp_path / "medium"), sidd_validation=str(tmp_path / "val"),
                             steps=2, refine_steps=1, inet_steps=1, gate_steps=1,
                             gate_batch_size=2, gate_patch_size=16, validation_crops=2)
    from dds_fast.training import stages

    monkeypatch.setattr(stages, "bundled_images", lambda *a, **k: pytest.fail("clean images read"))
    run = Run(tmp_path / "run", config)  # no clean images needed: none is read
    data = run.dataset()
    assert isinstance(data, PairedPatches) and len(data) == 4
    assert data.pair_of(0) != data.pair_of(1)  # a batch takes its crops from different pairs
    noisy, target = data[0]
    assert noisy.shape == (1, 16, 16) and torch.allclose(noisy, 1 - target, atol=1e-6)  # a real (inverted) pair
    batches = run.validation_batches()
    noisy, target = torch.cat([n for n, _ in batches]), torch.cat([k for _, k in batches])
    assert len(noisy) == 4 and target.shape[1:] == (1, 16, 16)  # blocks 0 and 1 of both images, in gray
    assert torch.allclose(noisy, 1 - target, atol=1e-6)
    run.stage1()
    run.stage2()
    run.refine()
    run.stage3()
    assert [p.name for p in run.inets()] == ["inet-0.safetensors", "inet-1.safetensors"]
    for stage in ("stage1", "refine", "inet-0"):
        log = [json.loads(line) for line in (tmp_path / "run" / f"{stage}.log.jsonl").read_text().splitlines()]
        assert all(record["psnr"] > 0 for record in log), stage


def test_missing_or_malformed_sidd_data_is_named(tmp_path):
    from test_data import write_sidd_medium

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "medium" / "Data")):
        Run(tmp_path / "run", tiny_run_config(paired_root=str(tmp_path / "medium")))
    write_sidd_medium(tmp_path / "medium")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="ValidationNoisyBlocksSrgb.mat"):
        Run(tmp_path / "run", tiny_run_config(paired_root=str(tmp_path / "medium"), sidd_validation=str(tmp_path / "val")))
    for name in ("ValidationNoisyBlocksSrgb.mat", "ValidationGtBlocksSrgb.mat"):
        (tmp_path / "val" / name).write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="cannot read MATLAB file .*ValidationNoisyBlocksSrgb.mat"):
        Run(tmp_path / "run", tiny_run_config(paired_root=str(tmp_path / "medium"),
                                              sidd_validation=str(tmp_path / "val")))
    synthetic = Run(tmp_path / "run", tiny_run_config(paired_root=str(tmp_path / "medium")))
    with pytest.warns(UserWarning, match="set sidd_validation to validate on real pairs too"):
        synthetic.validation_batches()


def test_beside_real_pairs_a_folder_s_images_all_validate(tmp_path):
    """With paired_root a folder's images are read for validation only: by default every one
    (the last two were, and the others read, fingerprinted and left unused)."""
    from test_data import write_sidd_medium

    write_sidd_medium(tmp_path / "medium")
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    paired = dict(paired_root=str(tmp_path / "medium"), images=str(folder), validation_patch=32)
    run = Run(tmp_path / "run", tiny_run_config(**paired))
    assert run.train_images == {}
    assert sorted(Path(name).name for name in run.validation_images) == ["a.png", "b.png", "c.png"]
    with pytest.raises(ValueError, match=r"images \['a.png'\] in .*photos would go unused: beside paired_root's "
                                         r"training pairs the folder's images validate only"):
        Run(tmp_path / "run", tiny_run_config(**paired, validation_images=["b.png", "c.png"]))


def test_real_pairs_that_would_fail_a_later_stage_are_refused_before_stage_1(tmp_path):
    """What a pair's PNG headers tell is checked when the run starts (it was found when the
    pair was first decoded, anywhere in stage 1, or at stage 3)."""
    import imageio.v3 as iio

    from test_data import write_sidd_medium  # four pairs of 24x30

    write_sidd_medium(tmp_path / "medium")
    paired = dict(paired_root=str(tmp_path / "medium"), gate_batch_size=4, epoch_patches=4)
    Run(tmp_path / "run", tiny_run_config(**paired)).check_stages({"stage1", "stage3"})
    run = Run(tmp_path / "run", tiny_run_config(**paired, gate_patch_size=28))
    run.check_stages({"stage1"})  # (stage 1 does not crop at that size)
    with pytest.raises(ValueError, match=r"gate_patch_size 28 is larger than the training image .*NOISY.* of size "
                                         r"\(24, 30\)"):
        run.check_stages({"stage3"})
    noisy = sorted((tmp_path / "medium" / "Data").glob("*/*_NOISY_SRGB_*.PNG"))[0]
    clean = noisy.with_name(noisy.name.replace("NOISY", "GT"))
    image = iio.imread(noisy)
    for bad, match in ((image[:20], r"noisy/clean sizes differ for .*NOISY.*: \(20, 30\) vs \(24, 30\)"),
                       (image[..., 0], "noisy/clean colour channels differ for .*NOISY.*: 1 vs 3")):
        iio.imwrite(noisy, bad, extension=".png")
        with pytest.raises(ValueError, match=match):
            Run(tmp_path / "run", tiny_run_config(**paired))
    for path in (noisy, clean):
        iio.imwrite(path, image[:12, :12], extension=".png")
    with pytest.raises(ValueError, match=r"size \(12, 12\) is smaller than patch_size 16"):
        Run(tmp_path / "run", tiny_run_config(**paired))
    noisy.with_name("._" + noisy.name).write_bytes(b"\0\5\26\7 macOS metadata")  # ignored, its ._ partner too
    clean.with_name("._" + clean.name).write_bytes(b"\0\5\26\7 macOS metadata")
    clean.write_bytes(b"\0\5\26\7 not an image")
    with pytest.raises(ValueError, match="cannot read image .*GT.*cannot identify image file"):
        Run(tmp_path / "run", tiny_run_config(**paired))
    iio.imwrite(clean, image[:12, :12], extension=".jpg")  # a JPEG named .PNG: the decoder reads it
    Run(tmp_path / "run", tiny_run_config(**paired))
    noisy.unlink(), clean.unlink()  # three pairs: an epoch of 4 // 3 = 1 crop of each, not a gate batch
    with pytest.raises(ValueError, match=r"gate_batch_size 4 is more than an epoch's 3 crops of 3 pairs"):
        Run(tmp_path / "run", tiny_run_config(**paired)).check_stages({"stage3"})


def test_a_run_builds_and_takes_networks_of_its_arch_only(tmp_path, monkeypatch):
    """A registered super-network of one's own trains when its constructor takes what the
    run builds it with; a network given to a stage, or read from the run folder, must be of
    the config's arch (a stage recorded the config's, and a later stage failed on the groups)."""
    from test_ddsnet import BodyGroupFirstNet  # noqa: F401 (registered; its constructor takes none of them)

    with pytest.raises(ValueError, match=r"unknown architecture 'NoSuchNet'; choose one of \[.*'SlimDnCNN'.*\] "
                                         r"\(a super-network of your own: .*dds-fast --import MODULE"):
        Run(tmp_path / "run", tiny_run_config(arch="NoSuchNet"))
    with pytest.raises(ValueError, match=r"arch BodyGroupFirstNet: training builds it as BodyGroupFirstNet\("
                                         r"in_channels=..., base_width=..., depth=...\)"):
        Run(tmp_path / "run", tiny_run_config(arch="BodyGroupFirstNet"))
    run = Run(tmp_path / "fresh", tiny_run_config(refine_steps=1))  # (SlimDnCNN)
    other = SlimUNet(in_channels=1, base_width=8, depth=2)
    for stage in (run.stage2, run.refine, run.stage3):
        with pytest.raises(ValueError, match=r"the network given to .* is a SlimUNet, and this run's config has "
                                             r"arch 'SlimDnCNN': set arch SlimUNet"):
            stage(other)
    dds_fast.save(other, tmp_path / "stage2.safetensors")
    with pytest.raises(ValueError, match=r"stage2.safetensors is a SlimUNet, and this run's config has arch"):
        Run(tmp_path, tiny_run_config(refine_steps=1)).refine()
    slimmed = run.stage2(run.new_network())  # a run folder that does not exist yet
    assert slimmed.routing_space and (tmp_path / "fresh" / "stage2.safetensors").exists()


def test_held_out_images_and_sidd_validation_are_not_both_set():
    with pytest.raises(ValueError, match="validation_images and sidd_validation both name what stage 2 validates on"):
        TrainConfig(validation_images=("chelsea",), sidd_validation="val")
    # refused by a run, not by the config: configs stored by earlier versions still load
    unused = dataclasses.asdict(TrainConfig(images="photos", paired_root="sidd", sidd_validation="val"))
    with pytest.raises(ValueError, match="images would go unused: .* drop images"):
        Run("run", TrainConfig.from_dict(unused))
    repeated = dataclasses.asdict(TrainConfig(validation_images=("a.png", "b.png", "a.png")))
    with pytest.raises(ValueError, match=r"validation_images names \['a.png'\] more than once"):
        Run("run", TrainConfig.from_dict(repeated))


def test_a_run_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match="run dir .*run is a file, not a folder"):
        Run(tmp_path / "run", tiny_run_config())


def test_stage2_stops_as_a_divergence_on_weights_whose_outputs_overflow(tmp_path):
    """Finite weights can still overflow (stage 1's last step taken with a huge rate): stage 2
    stops as a divergence, not on a metric's NaN error; outputs out of range but finite score."""
    run = Run(tmp_path, tiny_run_config())
    net = run.new_network()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e29)
    with pytest.raises(TrainingDiverged, match="validation: the network's output at config .* is not finite.*a state file resumes only with the options"):
        run.stage2(net)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    assert run.stage2(net).routing_space  # outputs far outside [0, 1] but finite: scored (poorly), not refused


def test_inets_reject_an_unknown_routing_index(tmp_path):
    from dds_fast import RoutingEntry

    run = Run(tmp_path, TrainConfig(base_width=8, depth=2))
    space = run.new_network().space
    with pytest.raises(ValueError, match=r"no routing config \[2\]: the routing space has 2"):
        run.inets([RoutingEntry(space.smallest(), 1.0), RoutingEntry(space.largest(), 2.0)], indices=[0, 2])


def test_run_puts_every_conv_on_the_configured_backend(tmp_path):
    from dds_fast import SlimConv2d

    run = Run(tmp_path, TrainConfig(backend="torch", base_width=8, depth=2, attention=False))
    net = run.new_network()
    run.save(net, "net.safetensors")
    for model in (net, run.load("net.safetensors")):
        assert {m.backend for m in model.modules() if isinstance(m, SlimConv2d)} == {"torch"}


def test_stage3_labels_an_attended_body_behind_its_attention_scale(tmp_path):
    """The labels' PSNR gains are those of the network the DDSNet deploys: a body trained
    behind the attention scale runs behind it, so its gains depend on that scale (they did
    not when stage 3 scored the bare body)."""
    from dds_fast import RoutingEntry, macs_per_pixel

    config = TrainConfig(arch="SlimDnCNN", channels=1, base_width=8, depth=3, batch_size=4, epoch_patches=8,
                         slim_step=8, num_choices=2, progress=False, gate_steps=1, gate_batch_size=4, gate_patch_size=24, attention=True)
    gains = {}
    for bias in (0.0, 2.0):  # scales 1 and 1 + tanh(2)
        run = Run(tmp_path / str(bias), config)
        net = run.new_network(attention_choices=2)
        body = net.supernet
        net.routing_space = [RoutingEntry(c, macs_per_pixel(body, c)) for c in (body.space.smallest(), body.space.largest())]
        with torch.no_grad():
            net.gate.fc2.bias.fill_(bias)
        run.stage3(net)
        gains[bias] = json.loads((tmp_path / str(bias) / "stage3.log.jsonl").read_text().splitlines()[0])["psnr_gain"]
    assert abs(gains[2.0] - gains[0.0]) > 1e-3, gains


def test_stage3_with_within_labels_logs_each_route_s_share_and_resumes_only_with_them(tmp_path):
    from dds_fast import RoutingEntry, macs_per_pixel

    config = tiny_run_config(gate_steps=2, gate_labels="within", num_choices=3, attention=False)
    run = Run(tmp_path / "run", config)
    net = run.new_network()
    configs = [net.space.smallest(), net.space.uniform(0.5), net.space.largest()]
    net.routing_space = [RoutingEntry(c, macs_per_pixel(net, c)) for c in configs]
    run.stage3(net)
    records = [json.loads(line) for line in (tmp_path / "run" / "stage3.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert sum(record[f"label_share_{r}"] for r in range(3)) == pytest.approx(1.0)
    other = Run(tmp_path / "run", tiny_run_config(gate_steps=3, num_choices=3, attention=False))
    with pytest.raises(ValueError, match=r"stage3.state.safetensors was trained with other options: gate_labels"):
        other.stage3(net)
    with pytest.raises(ValueError, match="unknown gate_labels 'all'"):
        TrainConfig.from_dict({"gate_labels": "all"})


@dds_fast.register_architecture
class BatchNormDnCNN(SlimDnCNN):
    """A user's super-network with a BatchNorm (on its fixed-width output): the built-in
    nets have none, so the stages' eval modes show only on one like it."""

    def __init__(self, in_channels=1, base_width=8, depth=3, **options):
        super().__init__(in_channels=in_channels, base_width=base_width, depth=depth, **options)
        self.post = torch.nn.BatchNorm2d(in_channels)

    def body(self, features, x):
        return self.post(super().body(features, x))


def test_stage3_and_validation_leave_a_frozen_body_s_batch_norm_alone(tmp_path):
    """Stage 3 scores the frozen body as deployed, in eval mode: its BatchNorm's running
    statistics stayed put (the loop's model.train() had them updated by every label), and
    validation runs in eval mode too, giving each module's mode back."""
    from dds_fast import RoutingEntry, macs_per_pixel
    from dds_fast.training.slimming import validation_psnr

    run = Run(tmp_path, tiny_run_config(arch="BatchNormDnCNN", gate_steps=2, gate_patch_size=24))
    net = run.new_network()
    net.routing_space = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    with torch.no_grad():  # statistics a batch would move
        net.post.running_mean.fill_(0.3)
        net.post.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = run.stage3(net)
    after = model.supernet.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    net.train()
    net.post.eval()  # a mixed mode, given back as it was
    validation_psnr(net, [batch(0)], net.space.largest())
    assert net.training and not net.post.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.train()  # the BatchNorm in training mode too: validation runs it in eval mode all the same
    validation_psnr(net, [batch(0)], net.space.largest())
    assert net.post.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items()
                                     if not k.endswith("num_batches_tracked"))


def test_a_ddsnet_copied_in_as_an_earlier_result_serves_as_its_super_network(tmp_path):
    """A shipped DDSNet copied into a run folder as stage 1's or stage 2's result (the README
    copies one in for the I-Nets) is its super-network with its routing space; stages 2, 3
    and refine failed on it with AttributeErrors. A result without a routing space is refused
    by name for the I-Nets too (a TypeError)."""
    from dds_fast import DDSNet, DynamicGate, RoutingEntry, macs_per_pixel

    # (a gate without attention: a run of the default, attention on, refuses it as run without the head)
    run = Run(tmp_path, tiny_run_config(gate_steps=1, steps=1, inet_steps=1, attention=False))
    net = run.new_network()
    net.routing_space = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = False  # (as stage 3 leaves a body trained without it)
    dds_fast.save(DDSNet(net, gate, net.routing_space), tmp_path / "stage2.safetensors")
    loaded = run.load("stage2.safetensors")
    assert type(loaded) is SlimDnCNN and loaded.routing_space == net.routing_space
    assert isinstance(run.stage3(), dds_fast.DDSNet)
    Run(tmp_path, tiny_run_config(refine_steps=1, attention=False)).refine()
    (tmp_path / "stage2.safetensors").rename(tmp_path / "stage1.safetensors")
    assert len(run.stage2(dds_fast.load(tmp_path / "stage1.safetensors")).routing_space) == 2
    dds_fast.save(net.__class__(**net.arch_args), tmp_path / "stage2.safetensors")
    with pytest.raises(ValueError, match="stage2.safetensors holds no routing space: the I-Nets train at its configs"):
        run.inets()


def test_an_attended_stage3_state_of_an_earlier_version_says_to_delete_it(tmp_path):
    """Its labels came from the body without its attention scale: no option resumes it."""
    from safetensors import safe_open

    from dds_fast import RoutingEntry, macs_per_pixel
    from dds_fast.checkpoint import atomic_save_file

    config = TrainConfig(arch="SlimDnCNN", channels=1, base_width=8, depth=3, batch_size=4, epoch_patches=8,
                         slim_step=8, num_choices=2, progress=False, gate_steps=1, gate_batch_size=4,
                         gate_patch_size=24, checkpoint_every=1, attention=True)
    run = Run(tmp_path, config)
    net = run.new_network(attention_choices=2)
    body = net.supernet
    net.routing_space = [RoutingEntry(c, macs_per_pixel(body, c)) for c in (body.space.smallest(), body.space.largest())]
    run.stage3(net)
    state = tmp_path / "stage3.state.safetensors"
    with safe_open(str(state), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    options = json.loads(metadata["options"])
    del options["labels_behind_attention"]
    atomic_save_file(tensors, state, {**metadata, "options": json.dumps(options)})
    with pytest.raises(ValueError, match=r"without its attention scale; delete .*stage3.state.safetensors"):
        Run(tmp_path, dataclasses.replace(config, gate_steps=2)).stage3(net)


def test_a_stage1_state_of_an_earlier_version_that_drew_ends_says_to_delete_it(tmp_path):
    """Its random sub-networks could be the largest or the smallest: resumed, the run would
    go on drawing others from the same seeds."""
    from safetensors import safe_open

    from dds_fast.checkpoint import atomic_save_file

    config = tiny_run_config(steps=2, lr_schedule="constant", checkpoint_every=1)
    Run(tmp_path, config).stage1()
    state = tmp_path / "stage1.state.safetensors"
    with safe_open(str(state), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    options = json.loads(metadata["options"])
    assert options.pop("middle_draws") == "distinct from the ends"
    atomic_save_file(tensors, state, {**metadata, "options": json.dumps(options)})
    with pytest.raises(ValueError, match=r"equal to the largest or the smallest; delete .*stage1.state.safetensors"):
        Run(tmp_path, dataclasses.replace(config, steps=3)).stage1()


@pytest.mark.parametrize("attention", [True, False])
def test_three_stage_run_end_to_end(tmp_path, attention):
    """On the configured device (CUDA where present); checkpoints load on the CPU. With
    ``attention`` the super-network trains behind the gate's attention head through stages 1,
    2 and refine; stage 3 keeps that head as trained and the DDSNet runs behind it."""
    config = TrainConfig(arch="SlimDnCNN", channels=1, base_width=8, depth=3, patch_size=24, batch_size=4,
                         epoch_patches=8, steps=3, inet_steps=2, validation_crops=1, validation_patch=32,
                         slim_step=8, num_choices=2, checkpoint_every=2, progress=False, gate_steps=4,
                         gate_batch_size=4, gate_patch_size=24, refine_steps=2, beta=-1000.0, attention=attention)
    run = Run(tmp_path, config)
    torch.manual_seed(5)
    caller_draws = torch.rand(4)
    torch.manual_seed(5)  # the stages leave the caller's random stream as it was
    net = run.stage1()
    assert isinstance(net, dds_fast.AttentionSupernet) is attention
    if attention:  # W2 starts at zero: stage 1 trained the attention head
        assert net.gate.fc2.weight.abs().sum() > 0
        assert isinstance(dds_fast.load(tmp_path / "stage1.safetensors"), dds_fast.AttentionSupernet)
    routed = run.stage2(net)
    assert len(routed.routing_space) == 2
    reloaded = dds_fast.load(tmp_path / "stage2.safetensors")
    assert reloaded.routing_space == routed.routing_space
    with pytest.raises(FileNotFoundError, match="refine.safetensors does not exist: run `dds-fast train refine` first"):
        run.stage3()
    refined = run.refine()
    log = [json.loads(line) for line in (tmp_path / "refine.log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"largest", "smallest"} <= set(log[0])
    assert [e.config for e in refined.routing_space] == [e.config for e in routed.routing_space]
    stage2_weights, refined_weights = reloaded.state_dict(), dds_fast.load(tmp_path / "refine.safetensors").state_dict()
    assert any(not torch.equal(stage2_weights[k], refined_weights[k]) for k in stage2_weights)
    with pytest.warns(UserWarning, match="100.0% of the training images were labelled hard with beta = -1000.0 dB"):
        model = run.stage3()
    prefix = "supernet." if attention else ""
    assert all(torch.equal(v.cpu(), refined_weights[prefix + k]) for k, v in model.supernet.state_dict().items())
    if attention:  # the head the body was trained behind, unchanged by stage 3
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert torch.equal(model.gate.state_dict()[name].cpu(), refined_weights["gate." + name])
    assert model.gate.attention is attention and len(model.routing_space) == 2
    loaded = dds_fast.load(tmp_path / "dds.safetensors")
    assert loaded.routing_space == refined.routing_space
    assert torch.equal(torch.rand(4), caller_draws)
    log = [json.loads(line) for line in (tmp_path / "stage3.log.jsonl").read_text().splitlines()]
    assert len(log) == config.gate_steps and {"cross_entropy", "complexity", "expected_macs"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["cross_entropy"] + log[0]["complexity"], rel=1e-5)
    # each step's rate, decayed per epoch of 2 steps (not the next epoch's at an epoch's end)
    assert [record["lr"] for record in log] == pytest.approx([5e-5, 5e-5, 4.5e-5, 4.5e-5])
    weighted = Run(tmp_path / "weighted", dataclasses.replace(config, gate_complexity_weight=10.0))
    weighted.stage3(refined)
    first = json.loads((tmp_path / "weighted" / "stage3.log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(first["cross_entropy"] + 10 * first["complexity"], rel=1e-5)
    paths = run.inets()
    assert [p.name for p in paths] == ["inet-0.safetensors", "inet-1.safetensors"]
    inet = dds_fast.load(paths[0])
    assert inet.get_config() == routed.routing_space[0].config


def _distributed_worker(rank, world, init_file, run_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loop, _ = make_loop(run_dir, steps=3, optimizer="sgd")
        assert loop.world == world and len(loop.batch(0)[0]) == 2 // world
        loop.run()
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (it aborted once)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dataset", ["items", "batched noise"])
def test_ranks_slice_the_batch_one_process_sees(tmp_path, dataset):
    from dds_fast.training.data import NoisyPatches
    from dds_fast.training.noise import make_noise

    data = Pairs() if dataset == "items" else NoisyPatches([torch.rand(3, 40, 40)], make_noise("camera"),
                                                           patch_size=16, length=8, seed=1)
    net = tiny_net()
    loop = TrainLoop(tmp_path, "stage1", net, torch.optim.SGD(net.parameters(), lr=0.1), data, lambda *a: {},
                     LoopSettings(steps=4, batch_size=4, progress=False))
    whole = loop.batch(3)
    loop.world = 2
    for rank in (0, 1):
        loop.rank = rank
        for part, full in zip(loop.batch(3), whole):
            torch.testing.assert_close(part, full[2 * rank : 2 * rank + 2], rtol=0, atol=0)


def test_two_processes_train_like_one_on_the_whole_batch(tmp_path):
    """Gloo on the CPU: two ranks on half a batch each, gradients averaged, reach the weights
    of one process on the whole batch."""
    single, net = make_loop(tmp_path / "single", steps=3, optimizer="sgd")
    single.run()
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2)
    resumed, ddp_net = make_loop(tmp_path / "ddp", steps=3, optimizer="sgd")
    assert resumed.resume() == 3
    for (name, a), b in zip(net.state_dict().items(), ddp_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    logged = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "stage1.log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2]  # rank 0 alone writes the log


def test_slimming_and_a_sandwich_step_that_raise_leave_the_config_as_it_was():
    torch.manual_seed(0)
    net = SlimDnCNN(1, base_width=8, depth=3)
    small = net.space.smallest()
    net.set_config(small)
    with pytest.raises(ValueError):
        progressive_slimming(net, [])  # its first evaluation already fails
    assert net.get_config() == small
    x = torch.rand(2, 1, 8, 8)

    def failing_loss(output, target):
        raise RuntimeError("out of memory")

    configs = [net.space.largest(), small]
    with pytest.raises(RuntimeError, match="out of memory"):
        sandwich_step(net, x, x, configs, loss_fn=failing_loss)
    assert net.get_config() == net.space.largest()  # where a step that ran leaves it


STUB_CONFIG = dict(device="cpu", base_width=4, depth=2, num_choices=2, progress=False, validation_crops=1,
                   validation_patch=16)


def _stub_run(run_dir, monkeypatch, **options):
    """A Run whose TrainLoop records its arguments instead of training, and a network with a
    routing space of its smallest and largest configs (validation PSNR 1.0 each)."""
    import types

    from dds_fast.training import stages

    calls = []

    def loop(*args, **kwargs):
        calls.append((args, kwargs))
        return types.SimpleNamespace(run=lambda: None)

    monkeypatch.setattr(stages, "TrainLoop", loop)
    run = Run(run_dir, TrainConfig(**{**STUB_CONFIG, **options}))
    run_dir.mkdir(exist_ok=True)
    (run_dir / "stage3.log.jsonl").write_text("")
    net = run.new_network(2 if run.config.attention else None)
    net.routing_space = [RoutingEntry(c, dds_fast.macs_per_pixel(net, c), 1.0)
                         for c in (net.space.smallest(), net.space.largest())]
    return run, net, calls


def test_a_runs_initial_weights_follow_its_seed(tmp_path):
    # TrainConfig.seed "seeds the data, the noise and the initial weights"
    def weights(seed):
        run = Run(tmp_path / str(seed), TrainConfig(**{**STUB_CONFIG, "seed": seed}))
        return torch.cat([p.detach().flatten() for p in run.new_network().parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_stage3_gates_initial_weights_follow_the_seed(tmp_path, monkeypatch):
    def gate(seed):
        run, net, _ = _stub_run(tmp_path / str(seed), monkeypatch, seed=seed, attention=False)
        return run.stage3(net).gate.fc4.weight.detach().clone()

    assert torch.equal(gate(0), gate(0))
    assert not torch.equal(gate(0), gate(1))


def test_stage3_default_budget_is_the_middle_of_the_routes(tmp_path, monkeypatch):
    run, net, calls = _stub_run(tmp_path, monkeypatch, attention=False)
    macs = run.stage3(net).dynamic_macs_per_pixel
    middle = (min(macs) + max(macs)) / 2
    assert calls[0][1]["options"]["budget"] == pytest.approx(middle)
    assert dds_fast.read_metadata(tmp_path / "dds.safetensors")["user"]["budget"] == pytest.approx(middle)


def test_stage3_keeps_the_attention_head_the_body_trained_behind(tmp_path, monkeypatch):
    run, net, _ = _stub_run(tmp_path, monkeypatch, attention=True)
    model = run.stage3(net)
    assert model.gate.attention
    assert torch.equal(model.gate.fc1.weight, net.gate.fc1.weight)
    assert torch.equal(model.gate.fc2.weight, net.gate.fc2.weight)


def test_refine_measures_the_routes_psnr_again(tmp_path, monkeypatch):
    # not stage 2's figures carried over (1.0 here)
    run, net, _ = _stub_run(tmp_path, monkeypatch, attention=False, refine_steps=1)
    assert all(e.psnr != 1.0 and e.psnr > 5 for e in run.refine(net).routing_space)


def test_refine_steps_use_the_refine_distillation(tmp_path, monkeypatch):
    from dds_fast.training import stages

    seen = []
    monkeypatch.setattr(stages, "sandwich_step",
                        lambda net, noisy, clean, configs, distillation, *a: seen.append(distillation))
    run, net, calls = _stub_run(tmp_path, monkeypatch, attention=False, refine_steps=1, distillation="synergy",
                                refine_distillation="none")
    run.refine(net)
    step_fn = calls[0][0][5]
    step_fn(0, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert seen == ["none"]


def test_stage3_trains_on_gate_sized_batches_of_gate_sized_crops(tmp_path, monkeypatch):
    run, net, calls = _stub_run(tmp_path, monkeypatch, attention=False, batch_size=4, gate_batch_size=6,
                                patch_size=32, gate_patch_size=48)
    run.stage3(net)
    data, settings = calls[0][0][4], calls[0][0][6]
    assert data.patch_size == 48 and settings.batch_size == 6


def test_stage1_state_records_the_gate_shape_it_trains_behind(tmp_path, monkeypatch):
    # a stage 1 state of another num_choices (another gate) must not resume
    run, net, calls = _stub_run(tmp_path, monkeypatch, attention=True)
    run.stage1()
    assert calls[0][1]["options"]["num_choices"] == 2


def test_a_stage1_result_of_the_other_attention_setting_is_refused(tmp_path, monkeypatch):
    run, net, _ = _stub_run(tmp_path, monkeypatch, attention=True)
    run.save(net, "stage1.safetensors", stage=1)
    with pytest.raises(ValueError, match="attention True"):
        Run(tmp_path, TrainConfig(**{**STUB_CONFIG, "attention": False})).load("stage1.safetensors")


@pytest.mark.parametrize("attention", [True, False])
def test_a_copied_in_model_runs_the_attention_setting_of_the_config_or_is_refused(tmp_path, monkeypatch, attention):
    """A DDSNet copied in as stage 2's result records no attention option (the shipped model's
    is from before it): what its gate runs decides. A run with the other setting trained it
    without the head it asked for, and saved its config beside the network."""
    from dds_fast import DDSNet, DynamicGate

    run, net, _ = _stub_run(tmp_path, monkeypatch, attention=False)
    body = net.supernet if hasattr(net, "supernet") else net
    dds = DDSNet(body, DynamicGate(body.stem_channels, 2), net.routing_space)
    dds.gate.attention = attention
    dds_fast.save(dds, tmp_path / "stage2.safetensors", stage=2)  # no train_config: copied in
    assert Run(tmp_path, TrainConfig(**{**STUB_CONFIG, "attention": attention})).load("stage2.safetensors")
    flag = "--attention" if attention else "--no-attention"
    with pytest.raises(ValueError, match=f"stage2.safetensors holds a network {'behind' if attention else 'without'} "
                                         f"the gate's attention head; this run's config has attention {not attention}: "
                                         f"set attention {attention} \\({flag}\\)"):
        Run(tmp_path, TrainConfig(**{**STUB_CONFIG, "attention": not attention})).load("stage2.safetensors")
    # the I-Nets read its routing space alone, and train no gate: either setting takes it
    assert Run(tmp_path, TrainConfig(**{**STUB_CONFIG, "attention": not attention})).inets(indices=[0])


def test_num_choices_may_keep_every_config_slimming_finds(tmp_path):
    n = slimming_length(SlimUNet(in_channels=3, base_width=4, depth=2).space, 16)
    Run(tmp_path, TrainConfig(device="cpu", base_width=4, depth=2, num_choices=n, progress=False))
    with pytest.raises(ValueError, match="num_choices"):
        Run(tmp_path, TrainConfig(device="cpu", base_width=4, depth=2, num_choices=n + 1, progress=False))


def test_a_seed_past_the_step_seeds_range_is_refused():
    # the largest seed whose every step seed fits 64 bits is the bound
    from dds_fast.training.loop import STEP_SEED_STRIDE

    largest = (2 ** 64 - STEP_SEED_STRIDE) // STEP_SEED_STRIDE
    TrainConfig(seed=largest, device="cpu")
    with pytest.raises(ValueError, match="seed must be at most"):
        TrainConfig(seed=largest + 1, device="cpu")


@pytest.mark.parametrize("criterion", ["psnr", "psnr_per_mac"])
def test_an_exactly_reproduced_validation_crop_leaves_slimming_its_choices(criterion):
    """A crop every config reproduces (a blown-out highlight) scores finite: +inf would tie
    every config (psnr) or turn every drop into NaN (psnr_per_mac)."""
    torch.manual_seed(0)
    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    with torch.no_grad():
        net.last.bias.fill_(0.9)  # the white crop's output clips to white at every config
    white = torch.ones(1, 3, 16, 16)
    dark = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.2
    ordinary = [(dark + 0.05 * torch.randn(dark.shape, generator=torch.Generator().manual_seed(2)), dark)]
    with_white = progressive_slimming(net, [(white, white)] + ordinary, step=8, criterion=criterion)
    alone = progressive_slimming(net, ordinary, step=8, criterion=criterion)
    assert all(math.isfinite(e.psnr) for e in with_white)
    assert [e.config for e in with_white] == [e.config for e in alone]


def test_crop_sizes_the_noise_cannot_run_on_and_an_unreachable_budget_are_named_before_any_stage(tmp_path):
    """Camera noise needs 2 x 2 crops for its Bayer mosaic, and a budget past both ends of the
    width space fits no routes: found before stage 1, not in the stage that meets them."""
    camera = {"channels": 3, "noise": "camera"}
    with pytest.raises(ValueError, match=r"validation_patch 1: the 'camera' noise does not run on crops of that "
                                         r"size \(CameraNoise: RGB images need at least 2 x 2 pixels"):
        Run(tmp_path / "a", tiny_run_config(**camera, validation_patch=1))
    run = Run(tmp_path / "b", tiny_run_config(**camera, gate_patch_size=1))
    run.check_stages({"stage1", "inets"})  # (they crop at patch_size)
    with pytest.raises(ValueError, match=r"gate_patch_size 1: the 'camera' noise does not run"):
        run.check_stages({"stage1", "refine", "stage3", "inets"})
    with pytest.raises(ValueError, match=r"patch_size 1: the 'camera' noise"):
        Run(tmp_path / "c", tiny_run_config(**camera, patch_size=1)).check_stages({"refine"})
    run = Run(tmp_path / "d", tiny_run_config())
    net = run.new_network()
    smallest, largest = (dds_fast.macs_per_pixel(net, c) for c in (net.space.smallest(), net.space.largest()))
    for budget in (smallest - 1, largest + 1):  # (the smallest's own count is below what it routes at)
        with pytest.raises(ValueError, match=rf"budget {budget:,.0f} MACs/pixel is outside what any routes of this "
                                             rf"SlimDnCNN cost, [\d,]+ to {largest:,.0f}"):
            Run(tmp_path / "e", tiny_run_config(budget=budget)).check_stages({"stage1", "stage3"})
    Run(tmp_path / "f", tiny_run_config(budget=largest)).check_stages({"stage3"})
    before = torch.random.get_rng_state()
    Run(tmp_path / "g", tiny_run_config(budget=largest)).check_stages({"stage3"})
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("options,message", [
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"channels": "3"}, "channels must be an integer, got '3'"),
    ({"noise_args": None}, "noise_args must be a JSON object, got None"),
    ({"progress": 1}, "progress must be true or false, got 1"),
    ({"steps": 1_000_004}, "steps must be at most 1,000,003, got 1,000,004"),
    ({"refine_steps": 2_000_000}, "refine_steps must be at most 1,000,003"),
])
def test_a_train_config_built_directly_checks_types_and_step_counts_as_from_dict_does(options, message):
    """A stage-1 or refine step's random stream is seed * 1,000,003 + step: a step count past
    that would draw another seed's streams, and past 2**64 fail after millions of steps."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(options)
    TrainConfig(steps=1_000_003, refine_steps=1_000_003, gate_steps=2_000_000, lr=1,  # an int for a float,
                validation_images=["camera"])  # a list for a tuple; the gate draws no step streams


def test_crops_the_network_pads_are_warned_of_with_their_cost(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match=r"gate_patch_size 18 is not a multiple of 8, which this SlimUNet of depth 4 "
                                         r"pads its input to: each crop runs at 24 x 24 pixels, 1.78 times its own"):
        Run(tmp_path / "a", tiny_run_config(arch="SlimUNet", depth=4, gate_patch_size=18))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Run(tmp_path / "b", tiny_run_config(arch="SlimUNet", depth=4))


def _waiting_worker(rank, world, init_file, wait_seconds):
    import datetime
    import time

    import torch.distributed as dist

    from dds_fast.training.loop import lead_done

    # a default group whose collectives time out sooner than rank 0 works alone
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=wait_seconds / 3))
    try:
        if rank == 0:
            time.sleep(wait_seconds)  # stage 2's slimming, say
        lead_done()  # (dist.barrier() here times out on rank 1)
        lead_done()  # (the group is made once)
    finally:
        dist.destroy_process_group()


def test_ranks_wait_for_rank_0_working_alone_longer_than_the_default_groups_timeout(tmp_path):
    """NCCL's watchdog stops a collective after 10 minutes by default: the ranks waiting for
    rank 0's stage 2 wait through a Gloo group of its own timeout."""
    torch.multiprocessing.spawn(_waiting_worker, args=(2, str(tmp_path / "init"), 3.0), nprocs=2)
