"""The ``dds-fast`` command."""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .checkpoint import CheckpointError, load, read_metadata
from .cost import macs_per_pixel
from .export import export_static


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))


def cmd_info(args) -> int:
    meta = read_metadata(args.checkpoint)
    model = load(args.checkpoint)
    space = model.space
    print(f"checkpoint:    {args.checkpoint}")
    print(f"architecture:  {meta['arch']} {meta['arch_args']}")
    print(f"saved by:      dds-fast {meta['version']}")
    if meta["user"]:
        print(f"metadata:      {meta['user']}")
    print("width groups (max width: allowed widths):")
    for group in space.groups:
        print(f"  {group.name:>10}  {group.max_width:4d}: {list(group.choices)}")
    largest = macs_per_pixel(model, space.largest())
    rows = [["largest", f"{largest:,.0f}", "1.00"],
            ["smallest", f"{macs_per_pixel(model, space.smallest()):,.0f}",
             f"{largest / macs_per_pixel(model, space.smallest()):.2f}"]]
    if meta["config"] is not None:
        active = macs_per_pixel(model, meta["config"])
        rows.append(["saved config", f"{active:,.0f}", f"{largest / active:.2f}"])
    for index, entry in enumerate(model.routing_space or []):
        macs = macs_per_pixel(model, entry.config)
        psnr = "" if entry.psnr is None else f"{entry.psnr:.2f}"
        rows.append([f"route {index}", f"{macs:,.0f}", f"{largest / macs:.2f}", psnr])
    print("multiply-adds per pixel (the paper's FLOPs/pixel):")
    _print_table(rows, ["config", "MACs/pixel", "MAC ratio", "val PSNR"])
    return 0


def _bundled_photo(size: int) -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    photo = resize(data.astronaut(), (size, size), anti_aliasing=True)  # float64 in [0, 1]
    return torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cmd_demo(args) -> int:
    from .nets import SlimUNet

    torch.manual_seed(args.seed)
    clean = _bundled_photo(args.size)
    noisy = (clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed)) * args.sigma / 255)
    model = SlimUNet(in_channels=3, base_width=args.base_width).eval()
    space = model.space
    largest = macs_per_pixel(model, space.largest())
    print(f"SlimUNet(base_width={args.base_width}) super-network, untrained weights (the trained model "
          f"comes with the trainer); astronaut photo {args.size}x{args.size} with AWGN sigma {args.sigma}.")
    print("Each width runs the shared weights' channel prefixes; 'static diff' compares the slim output with "
          "an exported network of plain narrow convs.")
    rows = []
    configs = [("smallest", space.smallest())] + [(f"uniform {r:g}", space.uniform(r)) for r in (0.25, 0.5, 0.75, 1.0)]
    with torch.no_grad():
        for label, config in configs:
            model.set_config(config)
            out = model(noisy)
            static_diff = (export_static(model)(noisy) - out).abs().max().item()
            latency = _median_ms(lambda: model(noisy), args.repeats)
            macs = macs_per_pixel(model)
            rows.append([label, f"{macs:,.0f}", f"{largest / macs:.2f}", f"{latency:.1f}",
                         f"{out.mean():.4f}", f"{out.std():.4f}", f"{static_diff:.1e}"])
    _print_table(rows, ["config", "MACs/pixel", "MAC ratio", "CPU ms", "out mean", "out std", "static diff"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dds-fast", description="Dynamic slimmable denoising networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint: architecture, widths, MACs/pixel")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="slim a network on a bundled photo and print MACs and output per width")
    demo.add_argument("--size", type=int, default=256)
    demo.add_argument("--sigma", type=float, default=25.0)
    demo.add_argument("--base-width", type=int, default=16)
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"dds-fast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
