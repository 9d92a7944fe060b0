"""Denoising quality of a checkpoint on held-out photos, against BM3D.

    python benchmarks/quality.py CHECKPOINT [--noise awgn|camera] [--sigma 25]
        [--images chelsea coins] [--inets INET.safetensors ...] [--out FILE.json]

Adds noise (fixed seed) to scikit-image's bundled photos that training held out: AWGN of
``--sigma``, or the camera pipeline (then the clean reference is the photo through the same
ISP). Reports PSNR/SSIM on 8-bit outputs (``dds_fast.metrics``) with MACs/pixel for: the
noisy input, the DDSNet in dynamic mode, each routing config run alone, and, for AWGN,
BM3D (the ``bm3d`` package, CBM3D for colour, told the true sigma) when it is installed.
Also the I-Net table when ``--inets`` lists I-Net checkpoints.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import dds_fast
from dds_fast.evaluate import TABLE_HEADER, Evaluation, comparison_table, evaluate
from dds_fast.metrics import psnr, ssim
from dds_fast.training.data import bundled_images
from dds_fast.training.noise import CameraNoise, GaussianNoise
from dds_fast.training.stages import DEFAULT_VALIDATION_IMAGES


def noisy_pairs(names, noise, channels: int, seed: int = 0):
    images = bundled_images(names, channels=channels)
    return [noise.pair(clean, torch.Generator().manual_seed(seed + i)) for i, clean in enumerate(images.values())]


def bm3d_row(pairs, sigma: float) -> Evaluation | None:
    try:
        import bm3d
    except ImportError:
        return None
    scores = []
    for noisy, clean in pairs:
        image = noisy.permute(1, 2, 0).double().numpy()
        if image.shape[-1] == 3:
            out = bm3d.bm3d_rgb(image, sigma / 255)
        else:
            out = bm3d.bm3d(image[..., 0], sigma / 255)[..., None]
        out = torch.from_numpy(out).permute(2, 0, 1).float()
        scores.append((psnr(out, clean), ssim(out, clean)))
    return Evaluation("BM3D (true sigma)", sum(s[0] for s in scores) / len(scores),
                      sum(s[1] for s in scores) / len(scores), float("nan"), len(scores))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--noise", choices=["awgn", "camera"], default="awgn")
    parser.add_argument("--sigma", type=float, default=25.0, help="of the AWGN, in 0-255 units")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_VALIDATION_IMAGES))
    parser.add_argument("--inets", nargs="*", default=[])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    model = dds_fast.load(args.checkpoint).eval()
    awgn = args.noise == "awgn"
    pairs = noisy_pairs(args.images, GaussianNoise(args.sigma) if awgn else CameraNoise(), model.in_channels)
    noisy = Evaluation("noisy input", sum(psnr(n, c) for n, c in pairs) / len(pairs),
                       sum(ssim(n, c) for n, c in pairs) / len(pairs), 0.0, len(pairs))
    rows = [noisy]
    started = time.perf_counter()
    if isinstance(model, dds_fast.DDSNet):
        rows.append(evaluate(model, pairs, "DDS dynamic"))
        for index, entry in enumerate(model.routing_space):
            model.supernet.set_config(entry.config)
            rows.append(evaluate(model.supernet, pairs, f"route {index} alone"))
    else:
        rows.append(evaluate(model, pairs, type(model).__name__))
    baseline = bm3d_row(pairs, args.sigma) if awgn else None
    if baseline is not None:
        rows.append(baseline)
    table = "\n".join([TABLE_HEADER] + [row.row() for row in rows])
    if args.inets and isinstance(model, dds_fast.DDSNet):
        table += "\n\n" + comparison_table(model, [dds_fast.load(p).eval() for p in args.inets], pairs)
    noise = f"AWGN sigma {args.sigma:g}" if awgn else "camera noise"
    print(f"{noise} on {', '.join(args.images)}; {time.perf_counter() - started:.0f} s")
    print(table)
    if args.out:
        record = {"device": f"CPU: {platform.processor() or platform.machine()}", "checkpoint": str(args.checkpoint),
                  "noise": noise, "images": args.images, "torch": torch.__version__,
                  "rows": [row.__dict__ for row in rows], "table": table}
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
