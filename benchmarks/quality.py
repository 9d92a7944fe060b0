"""Denoising quality of a checkpoint on held-out photos, against BM3D and the I-Nets.

    python benchmarks/quality.py CHECKPOINT [MORE_DDS ...] [--noise awgn camera] [--sigma 10 25 50]
        [--images chelsea coins] [--gray] [--channel-orders] [--inets INET.safetensors ...] [--out FILE.json]

Adds noise (fixed seed) to scikit-image's bundled photos that training held out: AWGN of
each ``--sigma``, and/or the camera pipeline (then the clean reference is the photo through
the same ISP); every image under every noise is one test pair. With ``--gray`` a colour
model gets the photos as gray photos read as colour: made gray, the noise drawn on that one
plane and so the same in every channel (``GrayNoise``; BM3D then denoises the one plane). With
``--channel-orders`` each colour photo comes in all 6 orders of its channels. Reports PSNR/SSIM on 8-bit
outputs (``dds_fast.metrics``) with MACs/pixel for: the noisy input, the DDSNet in dynamic
mode, each routing config run alone, and, when every pair is AWGN, BM3D (the ``bm3d``
package, CBM3D for colour, told the true sigma) when it is installed. Further DDSNet
checkpoints (the same super-network with gates trained for other budgets) add a dynamic
row each. With ``--inets``: the I-Net table, and each dynamic DDS against the cheapest
I-Net that costs at least its mean MACs/pixel.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import dds_fast
from dds_fast.checkpoint import read_metadata
from dds_fast.cli import _noise_sigma
from dds_fast.evaluate import TABLE_HEADER, Evaluation, comparison_table, evaluate, inet_name
from dds_fast.metrics import psnr, ssim
from dds_fast.training.data import bundled_images
from dds_fast.training.noise import CameraNoise, GaussianNoise, GrayNoise
from dds_fast.training.stages import DEFAULT_VALIDATION_IMAGES
from ablate_stage1 import output_file


def noisy_pairs(names, noise, channels: int, seed: int = 0, channel_orders: bool = False):
    """A pair per photo; with ``channel_orders``, per order of a colour photo's channels (as
    given first, with the noise it gets without them)."""
    orders = list(itertools.permutations(range(3))) if channel_orders and channels == 3 else [(0, 1, 2)]
    images = list(bundled_images(names, channels=channels).values())
    return [noise.pair(clean[list(order)] if channels == 3 else clean,
                       torch.Generator().manual_seed(seed + i + 1000 * k))
            for k, order in enumerate(orders) for i, clean in enumerate(images)]


def bm3d_row(pairs, sigmas: list[float]) -> Evaluation | None:
    """BM3D on each pair, told its AWGN sigma."""
    try:
        import bm3d
    except ImportError:
        print("no BM3D row: the bm3d package is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return None
    scores = []
    for (noisy, clean), sigma in zip(pairs, sigmas):
        gray = bool((noisy == noisy[:1]).all())  # a gray photo read as colour: one plane to denoise
        image = (noisy[:1] if gray else noisy).permute(1, 2, 0).double().numpy()
        if image.shape[-1] == 3:
            out = bm3d.bm3d_rgb(image, sigma / 255)
        else:
            out = bm3d.bm3d(image[..., 0], sigma / 255)[..., None]
        out = torch.from_numpy(out).permute(2, 0, 1).float().expand_as(noisy)
        scores.append((psnr(out, clean), ssim(out, clean)))
    return Evaluation("BM3D (true sigma)", sum(s[0] for s in scores) / len(scores),
                      sum(s[1] for s in scores) / len(scores), float("nan"), len(scores))


def matched_table(dynamic_rows: list[Evaluation], inet_rows: list[Evaluation]) -> str:
    """Each dynamic DDS against the cheapest I-Net that costs at least its mean MACs/pixel."""
    lines = ["| DDS | mean MACs/pixel | PSNR | I-Net | MACs/pixel | PSNR | DDS - I-Net (dB) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in dynamic_rows:
        dearer = [inet for inet in inet_rows if inet.macs_per_pixel >= row.macs_per_pixel]
        if dearer:
            inet = min(dearer, key=lambda r: r.macs_per_pixel)
            lines.append(f"| {row.name} | {row.macs_per_pixel:,.0f} | {row.psnr:.2f} | {inet.name} | "
                         f"{inet.macs_per_pixel:,.0f} | {inet.psnr:.2f} | {row.psnr - inet.psnr:+.2f} |")
    return "\n".join(lines)


def json_row(row: Evaluation) -> dict:
    """``row`` for JSON, which has no NaN or infinity: BM3D's MACs/pixel (unknown, NaN in the
    table) is null, and so is an infinite score (an output equal to its target: sigma 0); any
    other NaN fails the write."""
    record = {**row.__dict__, "macs_per_pixel": None if math.isnan(row.macs_per_pixel) else row.macs_per_pixel}
    return {key: None if isinstance(value, float) and math.isinf(value) else value for key, value in record.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="a model; further DDSNets add a dynamic row each")
    parser.add_argument("--noise", nargs="+", choices=["awgn", "camera"], default=["awgn"])
    parser.add_argument("--sigma", nargs="+", type=_noise_sigma, default=[25.0], help="of the AWGN, in 0-255 units")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_VALIDATION_IMAGES))
    parser.add_argument("--gray", action="store_true", help="gray photos read as colour: the same noise in "
                                                            "every channel")
    parser.add_argument("--channel-orders", action="store_true",
                        help="each colour photo in all 6 orders of its channels (a green cat: the bundled photos "
                             "hold almost no green)")
    parser.add_argument("--inets", nargs="*", default=[])
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    args = parser.parse_args(argv)

    models = [dds_fast.load(path).eval() for path in args.checkpoints]
    model = models[0]
    for path, extra in list(zip(args.checkpoints, models))[1:]:
        if not isinstance(extra, dds_fast.DDSNet) or not isinstance(model, dds_fast.DDSNet):
            raise SystemExit(f"{path}: further checkpoints add dynamic rows, so they and the first must be DDSNets")
    if args.inets and not isinstance(model, dds_fast.DDSNet):
        parser.error(f"--inets are set against a DDSNet's routes, but {args.checkpoints[0]} holds a "
                     f"{type(model).__name__}")
    try:  # now, not after the evaluation
        inets = [dds_fast.load(path).eval() for path in args.inets]
    except (OSError, ValueError) as error:
        parser.error(f"--inets: {error}")
    for path, inet in zip(args.inets, inets):  # (they denoise the same images)
        if inet.in_channels != model.in_channels:
            parser.error(f"--inets: {path} takes {inet.in_channels} channels, {args.checkpoints[0]} "
                         f"{model.in_channels}")
    noises, sigmas = [], []
    for name in dict.fromkeys(args.noise):
        if name == "awgn":
            noises += [(f"AWGN sigma {sigma:g}", GaussianNoise(sigma), sigma) for sigma in args.sigma]
        else:
            noises.append(("camera noise", CameraNoise(), None))
    if args.gray:
        noises = [(f"gray, {name}", GrayNoise(noise), sigma) for name, noise, sigma in noises]
    pairs = []
    for _, noise, sigma in noises:
        try:
            added = noisy_pairs(args.images, noise, model.in_channels, channel_orders=args.channel_orders)
        except ValueError as error:  # (an unknown photo name, a file that does not read)
            parser.error(f"--images: {error}")
        pairs += added
        sigmas += [sigma] * len(added)
    # scored as saved, clamped to [0, 1]: a large sigma's noisy images overrun the metrics' range
    noisy = Evaluation("noisy input", sum(psnr(n.clamp(0, 1), c) for n, c in pairs) / len(pairs),
                       sum(ssim(n.clamp(0, 1), c) for n, c in pairs) / len(pairs), 0.0, len(pairs))
    rows = [noisy]
    started = time.perf_counter()
    dynamic_rows = []
    if isinstance(model, dds_fast.DDSNet):
        for path, dds in zip(args.checkpoints, models):
            dds.set_budget(None)  # (a file saved in static mode loads in it)
            budget = read_metadata(path)["user"].get("budget")
            dynamic_rows.append(evaluate(dds, pairs, "DDS dynamic" + (f", gate budget {budget:,.0f}" if budget else "")))
        rows += dynamic_rows
        for index in range(len(model.routing_space)):
            # static mode runs a route as the model does: behind the gate's attention scale when that is on
            model.set_budget(model.static_macs_per_pixel(index))
            picked = "" if model.budget_index == index else f" (its budget runs route {model.budget_index})"
            rows.append(evaluate(model, pairs, f"route {index} alone{picked}"))
        model.set_budget(None)
    else:
        rows.append(evaluate(model, pairs, type(model).__name__))
    baseline = bm3d_row(pairs, sigmas) if None not in sigmas else None
    if baseline is not None:
        rows.append(baseline)
    table = "\n".join([TABLE_HEADER] + [row.row() for row in rows])
    if inets:
        inet_rows = [evaluate(inet, pairs, inet_name(model, inet, position)) for position, inet in enumerate(inets)]
        table += "\n\n" + comparison_table(model, inets, pairs, inet_rows)
        table += "\n\n" + matched_table(dynamic_rows, inet_rows)
    noise = ", ".join(name for name, _, _ in noises)
    print(f"{noise} on {', '.join(args.images)}; {time.perf_counter() - started:.0f} s")
    print(table)
    if args.out:
        record = {"device": f"CPU: {platform.processor() or platform.machine()}", "checkpoints": args.checkpoints,
                  "inets": args.inets, "gray": args.gray, "channel_orders": args.channel_orders,
                  "noise": noise, "images": args.images, "torch": torch.__version__,
                  "rows": [json_row(row) for row in rows], "table": table}
        Path(args.out).write_text(json.dumps(record, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
