"""Where a SlimUNet config's time goes on a GPU: torch.profiler over a few forwards, CUDA
time per kernel name, largest first. The network table gives each config's total against its
roofline floor; this says which kernels make up the gap.

    python benchmarks/profile_network.py [--config smallest ...] [--routed smallest|largest ...]
        [--tiles widest|narrowest|branches ...] [--buffers packed|max-width ...]
        [--grid narrow|widest ...] [--graphs] [--batch 8] [--size 512] [OUT.txt]

--routed also profiles DDSNet's dynamic forward with the gate rigged to send every image to
the cheapest (or dearest) of the routes ``dds-fast bench`` times the gate over (the net's
default configs, a fresh DynamicGate, attention off), once per --tiles policy
(``DDSNet.per_image_tiles``; default widest and narrowest) and --buffers layout
(``DDSNet.packed_buffers``: packed, the default, or max-width) and, on the narrowest route's
tiles, --grid (``kernels.conv2d.PER_IMAGE_NARROW_GRID``: the per-image launches' filter tiles
for the tiles' width, the default, or for the widest image, as before v27; on the widest
route's tiles the two grids are one): against the route's config alone (the default
--config), what the gate and the per-image routing add. --graphs profiles
replays of one CUDA graph per case instead of eager forwards, as the bench times them; the
``branches`` policy (``DDSNet.route_branches``: a conditional graph node per route) needs it.
"""
import argparse
import re
import sys

import torch

from _timing import add_report, chosen_configs, kernel_table, network_arguments
from dds_fast import DDSNet, SlimUNet
from dds_fast.bench import ddsnet_over, rig_gate
from dds_fast.config import RoutingEntry
from dds_fast.cost import macs_per_pixel
from dds_fast.ddsnet import PER_IMAGE_TILES
from dds_fast.kernels import conv2d
from dds_fast.runner import capture_cuda_graph, default_configs

RUNS = 5  # kernel_table's forwards per profile
UNITS_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3}
BUFFERS = ("packed", "max-width")  # DDSNet.packed_buffers True / False
BRANCHES = "branches"  # DDSNet.route_branches, with the first of PER_IMAGE_TILES for a mixed batch
GRIDS = ("narrow", "widest")  # conv2d.PER_IMAGE_NARROW_GRID True / False


def arguments() -> argparse.Namespace:
    """network_arguments' command line plus --routed and --tiles."""
    def routing(parser):
        parser.add_argument("--routed", action="append", choices=("smallest", "largest"), default=[])
        parser.add_argument("--tiles", action="append", choices=(*PER_IMAGE_TILES, BRANCHES))
        parser.add_argument("--buffers", action="append", choices=BUFFERS)
        parser.add_argument("--grid", action="append", choices=GRIDS)
        parser.add_argument("--graphs", action="store_true")
    args = network_arguments(__doc__, "profile-network.txt", [], routing)
    if BRANCHES in (args.tiles or ()) and not args.graphs:
        sys.exit(f"profile_network.py: --tiles {BRANCHES} routes inside a captured graph: add --graphs")
    # by default, each routed route's config alone (SlimUNet's default configs share the labels)
    args.config = args.config or args.routed or ["smallest"]
    args.tiles = args.tiles or list(PER_IMAGE_TILES)
    args.buffers = args.buffers or ["packed"]
    args.grid = args.grid or ["narrow"]
    return args


def bench_routes(net: SlimUNet, size: int) -> tuple[list[str], DDSNet]:
    """The bench's routes, cheapest first (their labels), and the DDSNet routing among them, as
    ``time_gate`` builds it from the network report: the net's default configs at their MACs
    per pixel at this input, which order them."""
    labelled = sorted(((label, RoutingEntry(config, macs_per_pixel(net, config, (net.in_channels, size, size))))
                       for label, config in default_configs(net)), key=lambda pair: pair[1].macs_per_pixel)
    return [label for label, _ in labelled], ddsnet_over(net, [entry for _, entry in labelled])


def routed_cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(tiles, buffers, grid) of each routed profile: the grids apart on the narrowest route's
    tiles only, where they differ."""
    return [(tiles, buffers, grid) for tiles in args.tiles for buffers in args.buffers
            for grid in (args.grid if tiles == "narrowest" else args.grid[:1])]


def cuda_ms_per_forward(table: str) -> float:
    """The table's "Self CUDA time total" (all kernels, every profiled forward) per forward."""
    value, unit = re.search(r"CUDA time total: ([\d.]+)(\w+)", table).groups()
    return float(value) * UNITS_MS[unit] / RUNS


def main() -> None:
    args = arguments()
    if not torch.cuda.is_available():
        sys.exit("profile_network.py profiles GPU kernels: it needs CUDA")
    net = SlimUNet(in_channels=3, base_width=32, depth=4).cuda().half().to(memory_format=torch.channels_last).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device="cuda", dtype=torch.half).to(
        memory_format=torch.channels_last)
    reports = []

    def profile(what: str, fn) -> None:
        with torch.no_grad():
            table = kernel_table(capture_cuda_graph(fn, x.device) if args.graphs else fn, runs=RUNS)
        forwards = "graph replays" if args.graphs else "forwards"
        add_report(args.out, reports, f"{torch.cuda.get_device_name()}, SlimUNet base 32 depth 4, {what}, input "
                                      f"{list(x.shape)} fp16 channels_last, {RUNS} {forwards}: "
                                      f"{cuda_ms_per_forward(table):.3f} ms CUDA time per forward\n{table}")

    for label, config in chosen_configs(args.config, net).items():
        net.set_config(config)
        profile(f"config {label} alone", lambda: net(x))
    if args.routed:
        labels, routed = bench_routes(net, args.size)
        for route in args.routed:
            index = 0 if route == "smallest" else len(labels) - 1
            rig_gate(routed.gate, index)
            for tiles, buffers, grid in routed_cases(args):
                routed.route_branches = tiles == BRANCHES
                routed.per_image_tiles = PER_IMAGE_TILES[0] if routed.route_branches else tiles
                routed.packed_buffers = buffers == "packed"
                conv2d.PER_IMAGE_NARROW_GRID = grid == "narrow"
                conv2d.clear_plans()  # plans keep the grid they were made with
                how = "a conditional graph node per route" if routed.route_branches else f"per_image_tiles {tiles}"
                grid_said = f", per-image grid {grid}" if tiles == "narrowest" else ""
                profile(f"DDSNet dynamic forward over {len(labels)} routes, every image routed to "
                        f"{labels[index]}, {how}, {buffers} buffers{grid_said}", lambda: routed(x))

if __name__ == "__main__":
    main()
