"""Slimming-criterion ablation: the paper's least-PSNR-lost rule against least lost per MAC.

    python benchmarks/ablate_slimming.py CHECKPOINT [--criteria psnr psnr_per_mac] [--out FILE.json]

From a DDSNet (or stage-2) checkpoint's super-network, runs progressive slimming with each
criterion on the validation crops that the checkpoint's training options define (the stage-2
measure) and reports each trajectory, its thinned routing space, and the mean validation PSNR
over the MACs range (the area under the PSNR-against-MACs staircase, divided by the range):
the criterion whose trajectory sits higher gives the gate better configs to choose from.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from ablate_stage1 import output_file, report, stored_train_config

import dds_fast
from dds_fast.training.slimming import SLIM_CRITERIA, progressive_slimming, thin_routing_space
from dds_fast.training.stages import Run, TrainConfig, super_network_of


def mean_psnr_over_macs(trajectory) -> float:
    """The PSNR the trajectory offers at each MACs level (the best config costing at most
    that), averaged over the range from its cheapest to its dearest config."""
    points = sorted((e.macs_per_pixel, e.psnr) for e in trajectory)
    area, best = 0.0, points[0][1]
    for (m0, p0), (m1, _) in zip(points, points[1:]):
        best = max(best, p0)
        area += best * (m1 - m0)
    return area / (points[-1][0] - points[0][0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--criteria", nargs="+", default=list(SLIM_CRITERIA), choices=SLIM_CRITERIA)
    parser.add_argument("--out", type=output_file, help="write the result as JSON here")
    args = parser.parse_args(argv)
    model = dds_fast.load(args.checkpoint)
    net = super_network_of(model).eval()  # (behind the gate's attention scale where it runs one, as stage 2 slims)
    stored = stored_train_config(parser, args.checkpoint)
    config = TrainConfig.from_dict({**stored, "device": "cpu", "progress": False})
    results = {}
    with tempfile.TemporaryDirectory() as run_dir:
        batches = Run(run_dir, config).validation_batches()
        for criterion in args.criteria:
            began = time.perf_counter()
            trajectory = progressive_slimming(net, batches, step=config.slim_step, criterion=criterion)
            routes = thin_routing_space(trajectory, config.num_choices)
            results[criterion] = {
                "mean_psnr_over_macs": mean_psnr_over_macs(trajectory),
                "routes": [{"macs_per_pixel": e.macs_per_pixel, "psnr": e.psnr, "config": e.config.to_dict()}
                           for e in routes],
                "trajectory": [(e.macs_per_pixel, e.psnr) for e in trajectory],
                "seconds": time.perf_counter() - began}
    report({"checkpoint": args.checkpoint, "slim_step": config.slim_step, "criteria": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
