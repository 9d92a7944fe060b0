"""The ``dds-fast`` command."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from ._version import __version__
from .checkpoint import SHIPPED_MODEL, CheckpointError, load, read_metadata
from .config import json_loads
from .cost import macs_per_pixel, out_of_memory
from .export import export_static
from .runner import wall_clock


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))


def cmd_info(args) -> int:
    from .ddsnet import AttentionSupernet, DDSNet

    meta = read_metadata(args.checkpoint)
    model = load(args.checkpoint)
    net = model.supernet if isinstance(model, (DDSNet, AttentionSupernet)) else model
    space = net.space
    print(f"checkpoint:    {args.checkpoint}")
    print(f"architecture:  {meta['arch']} {meta['arch_args'] if net is model else meta['arch_args']['supernet']}")
    print(f"saved by:      dds-fast {meta['version']}")
    if isinstance(model, DDSNet):
        gate = model.gate
        print(f"gate:          over {gate.channels} stem channels, {gate.num_choices} choices, attention "
              f"{'on' if gate.attention else 'off'}")
    if isinstance(model, AttentionSupernet):
        print(f"gate:          attention head over {model.gate.channels} stem channels (trained with the "
              f"super-network: stage 1, and refine if run; the prediction head is untrained)")
    if meta["user"]:
        user = {k: v for k, v in meta["user"].items() if k not in ("train_config", "trajectory")}
        print(f"metadata:      {user}")
    if getattr(net, "is_static", False):  # an export_static: one config, fixed
        print(f"static export of config {meta['config'].to_dict()}")
        print(f"multiply-adds per pixel (the paper's FLOPs/pixel): {macs_per_pixel(net):,.0f}")
        return 0
    print("width groups (max width: allowed widths):")
    for group in space.groups:
        print(f"  {group.name:>10}  {group.max_width:4d}: {list(group.choices)}")
    largest = macs_per_pixel(net, space.largest())
    rows = [["largest", f"{largest:,.0f}", "1.00"],
            ["smallest", f"{macs_per_pixel(net, space.smallest()):,.0f}",
             f"{largest / macs_per_pixel(net, space.smallest()):.2f}"]]
    if meta["config"] is not None:
        active = macs_per_pixel(net, meta["config"])
        rows.append(["saved config", f"{active:,.0f}", f"{largest / active:.2f}"])
    budget_index = model.budget_index if isinstance(model, DDSNet) else None
    for index, entry in enumerate(model.routing_space or []):
        macs = macs_per_pixel(net, entry.config)
        psnr = "" if entry.psnr is None else f"{entry.psnr:.2f}"
        dynamic = f"{model.dynamic_macs_per_pixel[index]:,.0f}" if isinstance(model, DDSNet) else ""
        label = f"route {index}" + (" (static mode)" if index == budget_index else "")
        rows.append([label, f"{macs:,.0f}", f"{largest / macs:.2f}", psnr, dynamic])
    print("multiply-adds per pixel (the paper's FLOPs/pixel):")
    _print_table(rows, ["config", "MACs/pixel", "MAC ratio", "val PSNR", "dynamic (full stem)"])
    return 0


def _bundled_photo(name: str, size: int | None = None, channels: int = 3) -> torch.Tensor:
    from .training.data import bundled_images

    photo = bundled_images([name], channels=channels)[name]
    if size is not None:
        photo = torch.nn.functional.interpolate(photo[None], size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)[0].clamp(0, 1)
    return photo


def _parsed(text: str, kind: type, what: str):
    """``kind(text)``, or argparse's error for the flag (its own would name our parser function)."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _noise_sigma(text: str) -> float:
    """An argparse type for an AWGN sigma (0-255 units): NaN or a negative one would fail after the routing."""
    value = _parsed(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _finite_output(output: torch.Tensor, args, what: str) -> torch.Tensor:
    """A noisy photo so loud that it overflows float32 inside the network gives no image to score or save."""
    if not bool(output.isfinite().all()):
        raise ValueError(f"--sigma {args.sigma:g}: {what} is not finite (noise this large overflows float32 "
                         f"inside the network); use a smaller --sigma")
    return output


def _positive_int(text: str) -> int:
    """An argparse type for counts and sizes: 0 or less would fail deep in the run, not name the flag."""
    value = _parsed(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    """``_positive_int`` where 0 is allowed (a margin)."""
    value = _parsed(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    """An argparse type for a seed: torch's generators take -2**63 to 2**64 - 1."""
    value = _parsed(text, int, "an integer")
    if not -2 ** 63 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an integer from -2**63 to 2**64 - 1, got {value}")
    return value


def _median_ms(fn, repeats: int) -> float:
    return wall_clock(fn, 1, repeats).median_ms


def cmd_demo(args) -> int:
    if args.checkpoint or SHIPPED_MODEL.exists():
        untrained_only = [flag for flag, value in (("--size", args.size), ("--base-width", args.base_width))
                          if value is not None]
        if untrained_only:
            raise ValueError(f"{' and '.join(untrained_only)}: only for the untrained demo, which runs when no "
                             f"model is installed")
        return _demo_trained(args)
    if args.out is not None:  # (it prints a table, and writes no image)
        raise ValueError("--out: only for the trained demo; the untrained one, which runs when no model is "
                         "installed, writes no image")
    return _demo_untrained(args)


def _demo_trained(args) -> int:
    from .ddsnet import DDSNet
    from .metrics import psnr, ssim
    from .training.data import TEST_NAMES, check_output_path, save_image
    from .training.stages import DEFAULT_VALIDATION_IMAGES

    args.out = args.out or "dds-demo.png"
    check_output_path(args.out)
    model = _model_from(args.checkpoint)
    if not isinstance(model, DDSNet):
        raise ValueError(f"demo needs a DDSNet checkpoint (a dds-fast train run's dds.safetensors), "
                         f"got a {type(model).__name__}")
    model.set_budget(None)  # the demo shows dynamic routing, in whatever mode the checkpoint was saved
    args.image = args.image or "chelsea"
    clean = _bundled_photo(args.image, channels=model.in_channels)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed)) * args.sigma / 255
    noisy = clean + noise
    source = args.checkpoint or "the shipped model"
    # the shipped model never trained on the validation or test photos; of a user's model we cannot tell
    held_out = args.checkpoint is None and args.image in DEFAULT_VALIDATION_IMAGES + TEST_NAMES
    print(f"{source}: DDSNet over {type(model.supernet).__name__}, {len(model.routing_space)} sub-networks; "
          f"bundled photo '{args.image}' {tuple(clean.shape[1:])}{' (held out of training)' if held_out else ''} "
          f"with AWGN sigma {args.sigma:g}.")
    with torch.no_grad():
        batch = noisy[None]
        route = model.route(batch)[0]
        index = model.routing_space.index(route)
        # scored as saved: clamped to [0, 1] (the same 8-bit values; a large sigma overruns the metrics' range)
        shown = noisy.clamp(0, 1)
        output = _finite_output(model(batch)[0].float(), args, "the model's output").clamp(0, 1)
        latency = _median_ms(lambda: model(batch), args.repeats)
        print(f"gate chose sub-network {index} of {len(model.routing_space)}: {route.config.to_dict()}")
        print(f"MACs/pixel: {model.routed_macs(batch)[0]:,.0f} (largest sub-network "
              f"{model.routing_space[-1].macs_per_pixel:,.0f}); CPU latency {latency:.0f} ms")
        print(f"PSNR {psnr(shown, clean):.2f} -> {psnr(output, clean):.2f} dB; "
              f"SSIM {ssim(shown, clean):.3f} -> {ssim(output, clean):.3f}")
        rows = []
        for k in range(len(model.routing_space)):
            # through the model as it routes (the gate's attention scale included), the choice forced to k
            choice = torch.full((1,), k)
            forced = _finite_output(model(batch, choice=choice)[0].float(), args, f"route {k}'s output").clamp(0, 1)
            latency = _median_ms(lambda: model(batch, choice=choice), args.repeats)
            rows.append([f"route {k}" + (" (chosen)" if k == index else ""), f"{model.dynamic_macs_per_pixel[k]:,.0f}",
                         f"{psnr(forced, clean):.2f}", f"{latency:.0f}"])
    print("every sub-network of the routing space on this image (the gate's choice overridden; MACs/pixel as routed, "
          "the full-width stem that the gate reads included):")
    _print_table(rows, ["config", "MACs/pixel", "PSNR dB", "CPU ms"])
    save_image(args.out, torch.cat([shown, output, clean], dim=2))
    print(f"wrote {args.out} (noisy | denoised | clean)")
    return 0


def _demo_untrained(args) -> int:
    from .nets import SlimUNet

    torch.manual_seed(args.seed)
    size, base_width = args.size or 256, args.base_width or 16
    photo = args.image or "astronaut"
    clean = _bundled_photo(photo, size)[None]
    noisy = (clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed)) * args.sigma / 255)
    model = SlimUNet(in_channels=3, base_width=base_width).eval()
    space = model.space
    largest = macs_per_pixel(model, space.largest(), input_shape=tuple(noisy.shape[1:]))  # padded as it runs
    print(f"SlimUNet(base_width={base_width}) super-network, untrained weights (no trained model found); "
          f"{photo} photo {size}x{size} with AWGN sigma {args.sigma}.")
    print("Each width runs the shared weights' channel prefixes; 'static diff' compares the slim output with "
          "an exported network of plain narrow convs.")
    rows = []
    configs = [("smallest", space.smallest())] + [(f"uniform {r:g}", space.uniform(r)) for r in (0.25, 0.5, 0.75, 1.0)]
    with torch.no_grad():
        for label, config in configs:
            model.set_config(config)
            out = _finite_output(model(noisy), args, f"the {label} config's output")
            static_diff = (export_static(model)(noisy) - out).abs().max().item()
            latency = _median_ms(lambda: model(noisy), args.repeats)
            macs = macs_per_pixel(model, input_shape=tuple(noisy.shape[1:]))
            rows.append([label, f"{macs:,.0f}", f"{largest / macs:.2f}", f"{latency:.1f}",
                         f"{out.mean():.4f}", f"{out.std():.4f}", f"{static_diff:.1e}"])
    _print_table(rows, ["config", "MACs/pixel", "MAC ratio", "CPU ms", "out mean", "out std", "static diff"])
    return 0


TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help); each overrides the config file's value
    "--arch": ("arch", str, "SlimUNet, SlimDnCNN, or a super-network of your own that a module given to "
                            "dds-fast --import registers"),
    "--channels": ("channels", int, "1 (gray) or 3 (colour)"),
    "--base-width": ("base_width", int, "the network's base width (its widths run 0.2x to 1.5x it)"),
    "--depth": ("depth", int, "U-Net levels, or DnCNN layers"),
    "--noise": ("noise", str, "awgn, poisson_gaussian, camera, gray or mix (--noise-args gives its arguments)"),
    "--images": ("images", str, "a folder of clean images (default: the photos bundled with scikit-image)"),
    "--patch-size": ("patch_size", int, "training crops' side, stage 1, refine and the I-Nets"),
    "--batch-size": ("batch_size", int, "crops per step of stage 1, refine, the I-Nets and stage 2's validation"),
    "--epoch-patches": ("epoch_patches", int, "crops per epoch (the data order's period; the gate's rate decays "
                                              "per epoch)"),
    "--steps": ("steps", int, "stage 1's optimizer steps"),
    "--lr": ("lr", float, "stage 1's and the I-Nets' learning rate"),
    "--lr-schedule": ("lr_schedule", str, "cosine (over the steps asked for) or constant (a finished stage can "
                                          "be asked for more)"),
    "--sandwich": ("sandwich", int, "sub-networks per sandwich step (largest, smallest and random ones)"),
    "--distillation": ("distillation", str, "synergy (In-place Synergy), inplace or none"),
    "--loss": ("loss", str, "l1 or mse, against the ground truth"),
    "--distillation-loss": ("distillation_loss", str, "l1 or mse, against a teacher's output"),
    "--slim-step": ("slim_step", int, "channels a progressive slimming step removes from one group"),
    "--slim-criterion": ("slim_criterion", str, "psnr (the paper's: least PSNR lost) or psnr_per_mac"),
    "--num-choices": ("num_choices", int, "routing configs kept from stage 2 for the gate"),
    "--validation-crops": ("validation_crops", int, "crops of each held-out image (or SIDD blocks) stage 2 "
                                                    "validates on"),
    "--validation-patch": ("validation_patch", int, "the validation crops' side"),
    "--refine-steps": ("refine_steps", int, "sandwich steps over the routing configs after stage 2 (0: none)"),
    "--refine-lr": ("refine_lr", float, "the refine stage's learning rate"),
    "--refine-distillation": ("refine_distillation", str, "the refine stage's distillation (default: stage 1's)"),
    "--inet-steps": ("inet_steps", int, "each I-Net's steps (default: stage 1's plus refine's)"),
    "--gate-steps": ("gate_steps", int, "stage 3's steps"),
    "--gate-lr": ("gate_lr", float, "stage 3's learning rate"),
    "--gate-lr-decay": ("gate_lr_decay", float, "stage 3's learning-rate factor per epoch"),
    "--gate-batch-size": ("gate_batch_size", int, "crops per stage 3 step (2 or more per process)"),
    "--gate-patch-size": ("gate_patch_size", int, "stage 3's crops' side"),
    "--beta": ("beta", float, "dB of PSNR gain (largest over smallest config) that labels a crop hard; with "
                                "--gate-labels within, how far under the largest a close route may be"),
    "--gate-labels": ("gate_labels", str, "stage 3's labels: ends (the paper's: the smallest or the largest "
                                          "config) or within (the smallest within --beta of the largest)"),
    "--budget": ("budget", float, "stage 3's MACs/pixel budget (default: the middle of the routing space's range)"),
    "--gate-complexity-weight": ("gate_complexity_weight", float, "weight of the MACs loss against the "
                                                                  "cross-entropy"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--seed": ("seed", int, "seeds the data, the noise and the initial weights"),
    "--device": ("device", str, "auto, cpu or cuda[:N]"),
    "--backend": ("backend", str, "every SlimConv2d's: auto (Triton on CUDA), torch or triton"),
}


def _json_value(text: str):
    try:
        value = json_loads(text)
    except ValueError as error:  # (JSON's errors, and a repeated key)
        raise argparse.ArgumentTypeError(f"not a JSON value ({error}): {text}") from None
    if value is None:  # (an unset flag is None: a null would be dropped unseen)
        raise argparse.ArgumentTypeError("null is no value here: leave the flag out for the default")
    return value


def cmd_train(args) -> int:
    import dataclasses
    import os

    from .training.loop import TrainingDiverged
    from .training.stages import Run, TrainConfig

    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
               if getattr(args, field.name, None) is not None}
    config = (TrainConfig.from_file(args.config, **options) if args.config is not None
              else TrainConfig.from_dict(options, flags=options))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # under torchrun: one process per GPU (NCCL), or per CPU worker (Gloo). Each process
        # takes its own GPU first, or NCCL would put every rank's work on GPU 0.
        cuda = config.resolved_device().type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if args.inet is not None and args.stage not in ("inets", "all"):
        raise ValueError(f"--inet picks I-Nets to train: it applies to train inets or all, not {args.stage}")
    if args.inet is not None and args.stage == "all":  # (train inets checks them against stage 2's routes)
        unknown = sorted(set(args.inet) - set(range(config.num_choices)))
        if unknown:
            raise ValueError(f"--inet {unknown}: stage 2 keeps num_choices {config.num_choices} routing configs, "
                             f"0 to {config.num_choices - 1}")
    run = Run(args.run_dir, config)
    run.check_stages(("stage1", "refine", "stage3", "inets") if args.stage == "all" else (args.stage,))
    try:
        if args.stage in ("stage1", "all"):
            run.stage1()
        if args.stage in ("stage2", "all"):
            run.stage2()
        if args.stage == "refine" or (args.stage == "all" and config.refine_steps > 0):
            run.refine()
        if args.stage in ("stage3", "all"):
            run.stage3()
        if args.stage in ("inets", "all"):
            run.inets(indices=args.inet)
    except TrainingDiverged as error:
        print(f"dds-fast: error: {error}", file=sys.stderr)
        return 3
    print(f"results in {run.dir}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .training.stages import TrainConfig

    # the training device check: an unknown device or missing CUDA is an error naming it, not a traceback
    device = str(TrainConfig(device=args.device or "auto").resolved_device())
    model = load(args.checkpoint) if args.checkpoint is not None else None
    result = run_bench(args.out, quick=not args.full, dtype=args.dtype, sizes=args.size, batches=args.batch,
                       channels=args.channels, model=model, device=device, cuda_graph=args.cuda_graph,
                       compile_static=not args.no_compile, model_name=args.checkpoint)
    print((Path(args.out) / "bench.md").read_text())
    print(f"device: {result['device']}; written: {', '.join(result['written'])}")
    return 0


def _model_from(checkpoint: str | None):
    path = Path(checkpoint) if checkpoint else SHIPPED_MODEL
    if not path.exists():
        if checkpoint:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        raise FileNotFoundError("no trained model ships with this version yet; pass --checkpoint "
                                "(a dds-fast train run writes dds.safetensors)")
    # the commands run on the CPU in fp32: a checkpoint saved in fp16 or bf16 is widened
    return load(path).float().eval()


def cmd_denoise(args) -> int:
    from .ddsnet import DDSNet
    from .evaluate import denoise
    from .training.data import (check_output_path, icc_profile_fits, image_frames, read_icc_profile, read_image,
                                save_image, to_channels)

    image, bits = read_image(args.input, keep_alpha=True)
    frames = image_frames(args.input)
    if frames > 1:
        _warn(f"{args.input} holds {frames} images (pages or frames): only the first is denoised")
    alpha = None
    if image.shape[0] in (2, 4):  # the alpha plane is no noisy signal: it passes through as it was
        image, alpha = image[:-1], image[-1:]
    check_output_path(args.output, alpha=alpha is not None, size=image.shape[-2:])
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):  # (a link to it too)
        raise ValueError(f"output {args.output} is the input image, whose noisy original the denoised copy would "
                         f"replace; write it to another file")
    model = _model_from(args.checkpoint)
    out_channels = getattr(getattr(model, "supernet", model), "out_channels", model.in_channels)
    if out_channels != model.in_channels:  # its output would be no denoised copy of its input
        raise ValueError(f"denoise needs a model whose output has its input's channels; {args.checkpoint} maps "
                         f"{model.in_channels} to {out_channels}")
    if model.in_channels not in (1, 3):  # (images are gray or RGB here, their alpha apart)
        raise ValueError(f"denoise takes gray or RGB images, and {args.checkpoint} denoises {model.in_channels} "
                         f"channels")
    if args.budget is not None:
        if not isinstance(model, DDSNet):
            raise ValueError(f"--budget needs a DDSNet checkpoint; {args.checkpoint} holds {type(model).__name__}")
        model.set_budget(args.budget)
    dynamic = isinstance(model, DDSNet) and model.budget_index is None  # (a checkpoint may be saved in static mode)
    if isinstance(model, DDSNet) and not dynamic:
        print(f"static mode: config at {model.static_macs_per_pixel(model.budget_index):,.0f} MACs/pixel")
    if model.in_channels == 3 and image.shape[0] == 1:
        shipped = ("" if args.checkpoint else " (the shipped model gains about 1.4 dB at AWGN sigma 25 on gray "
                                              "photos, against 11 dB on colour ones)")
        _warn(f"{args.input} is gray, and a colour model learns noise that differs between channels; "
              f"a gray image's is the same in all three, and the model keeps much of it{shipped}. A model trained "
              f"with --channels 1, or with 'gray' noise mixed in, denoises gray images.")
    # a gray model denoises each colour plane alone
    planes = image[:, None] if model.in_channels == 1 else to_channels(image, model.in_channels)[None]
    # dynamic mode: the gate's squeeze of the whole image, tile by tile, once, for the tiles and the
    # route report (other models squeeze as they need: never in budget mode without attention)
    means = model.stem_means(planes, args.tile) if dynamic else None
    progress = sys.stderr.isatty()
    output = torch.cat([denoise(model, plane, tile=args.tile, overlap=args.overlap, progress=progress,
                                stem_means=None if means is None else means[index:index + 1],
                                tiles_per_batch=args.tiles_per_batch).float()
                        for index, plane in enumerate(planes)])
    output = to_channels(output, image.shape[0])
    if alpha is not None:
        output = torch.cat([output, alpha])
    profile = read_icc_profile(args.input)  # the colours the pixels mean
    if profile and not icc_profile_fits(profile, image.shape[0]):
        _warn(f"{args.input}'s ICC profile is for {profile[16:20].decode('latin-1').strip()} images, which "
              f"were read as {'RGB' if image.shape[0] == 3 else 'gray'}: the output is written without it")
        profile = None
    png = Path(args.output).suffix.lower() == ".png"
    if bits == 16 and not png:
        _warn(f"{args.output} holds 8 bits per sample, of {args.input}'s 16 (a .png output keeps 16)")
    save_image(args.output, output, 16 if bits == 16 and png else 8, icc_profile=profile)
    if dynamic:
        macs = model.routed_macs(planes, stem_means=means)
        print(f"dynamic mode: routed to {sum(macs) / len(macs):,.0f} MACs/pixel")
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dds-fast", description="Dynamic slimmable denoising networks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (found from the current folder too), for checkpoints of "
                             "super-networks it registers (dds_fast.register_architecture); repeatable")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint: architecture, widths, MACs/pixel")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="denoise a bundled photo with the shipped model (dynamic routing), or, "
                                       "without one, slim an untrained network and print MACs per width")
    demo.add_argument("--checkpoint", help="a DDSNet checkpoint instead of the shipped model")
    demo.add_argument("--image", help="a bundled scikit-image photo (default: chelsea, held out of the shipped "
                                      "model's training; astronaut for the untrained demo)")
    demo.add_argument("--sigma", type=_noise_sigma, default=25.0, help="AWGN sigma, 0-255 units (default 25)")
    demo.add_argument("--out", help="(trained demo) the side-by-side PNG (default dds-demo.png)")
    demo.add_argument("--size", type=_positive_int, help="(untrained demo, when no model is installed) photo side "
                                                          "(default 256)")
    demo.add_argument("--base-width", type=_positive_int, help="(untrained demo, when no model is installed) network "
                                                                "width (default 16)")
    demo.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per latency, their median "
                                                                       "printed (default 5)")
    demo.add_argument("--seed", type=_seed, default=0, help="seeds the noise (default 0)")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train: stage1 (once-for-all), stage2 (progressive slimming), refine "
                                         "(the routing configs; with --refine-steps), stage3 (gate), inets (static "
                                         "baselines) or all; resumes from the run directory")
    train.add_argument("stage", choices=["stage1", "stage2", "refine", "stage3", "inets", "all"])
    train.add_argument("--run-dir", required=True, help="where checkpoints, logs and results go")
    train.add_argument("--config", help="a JSON file of training options (flags override it)")
    train.add_argument("--inet", type=int, action="append",
                       help="train only the I-Net of this routing config (repeatable; default: all)")
    for flag, (field, kind, text) in TRAIN_FLAGS.items():
        train.add_argument(flag, dest=field, type=kind, help=text)
    train.add_argument("--attention", dest="attention", action=argparse.BooleanOptionalAction, default=None,
                       help="train the gate's attention head with the super-network in stages 1, 2 and refine "
                            "(default: on, as the paper)")
    train.add_argument("--permute-channels", dest="permute_channels", action=argparse.BooleanOptionalAction,
                       default=None, help="put each synthetic colour crop's channels in a random one of their 6 "
                                          "orders (default: on; the bundled photos hold almost no green)")
    train.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars with the losses, PSNR and time left (default: on)")
    train.add_argument("--graphs", dest="graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each training step of stage 1, refine and the I-Nets as one CUDA graph, the "
                            "sandwich's sub-networks as masked widths (full width, the same gradients; default: "
                            "off)")
    train.add_argument("--noise-args", dest="noise_args", type=_json_value, metavar="JSON",
                       help="the noise model's arguments as a JSON object, e.g. '{\"sigma\": [5, 50]}' "
                            "(default: the model's own; AWGN: sigma 25)")
    train.add_argument("--paired-root", dest="paired_root", metavar="FOLDER",
                       help="train on real pairs: a SIDD-Medium sRGB folder (Data/<scene>/*_NOISY_SRGB_*.PNG "
                            "beside *_GT_SRGB_*) instead of noise added to clean images")
    train.add_argument("--sidd-validation", dest="sidd_validation", metavar="FOLDER",
                       help="validate (stage 2, refine) on real pairs: the folder of ValidationNoisyBlocksSrgb.mat "
                            "and ValidationGtBlocksSrgb.mat")
    train.add_argument("--validation-images", dest="validation_images", nargs="+", metavar="NAME",
                       help="clean images held out for validation (bundled photo names, or file names in "
                            "--images; default: chelsea and coins, or the folder's last two by name, its last of two)")
    train.set_defaults(func=cmd_train)
    den = sub.add_parser("denoise", help="denoise an image (PNG 8/16-bit, JPEG or TIFF, gray or RGB, any size)")
    den.add_argument("input")
    den.add_argument("-o", "--output", required=True,
                     help=".png or .jpg; a 16-bit PNG or TIFF input gives a 16-bit PNG")
    den.add_argument("--checkpoint", help="a DDSNet or slimmable network checkpoint (default: the shipped model)")
    den.add_argument("--budget", type=float, help="MACs/pixel: run the best config within it (static mode)")
    den.add_argument("--tile", type=_positive_int, default=512, help="tile side for large images (memory stays "
                                                                      "bounded; default 512)")
    den.add_argument("--overlap", type=_nonnegative_int, help="pixels of context around each tile (default: the model's "
                                                 "receptive field radius, so tiles leave no seams)")
    den.add_argument("--tiles-per-batch", type=_positive_int, default=1,
                     help="tiles of one size run together, up to this many per forward (on a GPU, where a tile's "
                          "forward is mostly host time, fewer forwards; memory grows with it; default 1)")
    den.set_defaults(func=cmd_denoise)
    bench = sub.add_parser("bench", help="time layers and every config of a network; JSON, markdown and plots")
    length = bench.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_false", dest="full",
                        help="on a GPU, size 256 at batch 1, 50 repeats (the default)")
    length.add_argument("--full", action="store_true",
                        help="on a GPU, sizes 256 and 512 at batches 1, 8 and 16, 200 repeats; a CPU run is always "
                             "the short one")
    bench.set_defaults(full=False)  # (the first of the pair, --quick, would otherwise set the default: True)
    bench.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                       help="the GPU's dtype (default float16); a CPU run times float32")
    bench.add_argument("--size", type=_positive_int, action="append",
                       help="image side; repeat for several (the layer table times each, the network table the "
                            "first)")
    bench.add_argument("--batch", type=_positive_int, action="append", help="batch size; repeat for several")
    bench.add_argument("--channels", type=_positive_int, default=64, help="the benchmarked layer's maximum width")
    bench.add_argument("--checkpoint", help="time this model's configs (default: an untrained SlimUNet)")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    bench.add_argument("--cuda-graph", action="store_true", help="replay one CUDA graph per config (CUDA only)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and the plots "
                                                              "(default bench-results)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _import_modules(names: list[str]) -> None:
    """Import the modules ``--import`` names, as ``python -m`` would find them from here."""
    if names and "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in names:
        try:
            importlib.import_module(name)
        except (ImportError, TypeError, ValueError) as error:  # (TypeError: a relative name; ValueError: empty)
            stem = Path(name).name[:-3] if name.endswith(".py") else None
            hint = f" (a module's name, without .py: --import {stem})" if stem else ""
            raise ValueError(f"--import {name}: {error}{hint}") from error


_LESS_MEMORY = {  # what to shrink when a command runs out of memory
    "denoise": "a smaller --tile or --tiles-per-batch",
    "train": "a smaller network (--base-width, --depth), batch size or patch size",
    "bench": "a smaller --size or --batch",
}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is no valid UTF-8 prints escaped, not as a failure
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # (the caller's handler back after: main may run inside a program)
        warnings.showwarning = _show_warning
        return _run(args)


def _warn(text: str, file=None) -> None:
    print(f"dds-fast: warning: {text}", file=sys.stderr if file is None else file)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of ours, not Python's file, line and source line of the library."""
    _warn(f"{'' if category is UserWarning else f'{category.__name__}: '}{message}", file)


def _run(args) -> int:
    try:
        _import_modules(args.imports)
        return args.func(args)
    except KeyboardInterrupt:  # (training checkpoints as it goes: the same command resumes)
        print(f"dds-fast: interrupted{'; the same command resumes the run' if args.func is cmd_train else ''}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (| head): nothing is wrong, nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (else the exit's flush raises again)
        return 1
    except (CheckpointError, OSError, ValueError, OverflowError) as error:  # bad input or missing files: no traceback
        print(f"dds-fast: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        first_line = (str(error) or type(error).__name__).splitlines()[0]
        print(f"dds-fast: error: out of memory ({first_line}): {_LESS_MEMORY.get(args.command, 'a smaller input')} "
              f"needs less", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
