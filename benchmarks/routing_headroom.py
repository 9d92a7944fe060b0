"""How much a DDSNet's dynamic routing can gain at all: its gate and an oracle gate against
its routes run statically, at the same mean MACs/pixel.

    python benchmarks/routing_headroom.py [CHECKPOINT] [--images chelsea coins]
        [--sigma 5 10 15 25 35 50] [--camera 6] [--inets INET.safetensors ...]
        [--fit-config training/cpu-mixed.json --fit-crops 4096] [--out FILE.json]

Every image under every noise (AWGN of each ``--sigma``, and ``--camera`` draws of the camera
pipeline, whose noise level is drawn per image) is one test pair, and every route runs on
every pair in static mode (behind the gate's attention scale when that is on, as the model
runs a route). Three things are compared, PSNR on 8-bit outputs:
- the static frontier: the routes' (MACs/pixel, mean PSNR) joined by straight lines, what a
  gate that ignores the image reaches by sending a share of the images to each of two
  neighbouring routes;
- the trained gate: each whole image routed by the model, its MACs those of dynamic mode
  (the full-width stem included; the gate's few MACs per image are not counted);
- the oracle gate: it knows each image's PSNR under every route and picks the route that
  maximises PSNR - lambda * MACs, over a sweep of lambda; the best any gate can do at its
  mean MACs with these weights, so its gain over the frontier bounds what a better gate
  could add.
With ``--inets`` (static networks, such as the I-Nets trained at the routes' configs), their
rows too, and each row's PSNR against the I-Nets' frontier at its MACs (where even the oracle
trails that frontier, no gate on these weights reaches the I-Nets) and against the frontier
of the same oracle routing between the I-Nets (what weight sharing costs when both are
routed perfectly).
With ``--fit-config``, how much the gate's input tells about an image's difficulty: a ridge
fit of the largest route's PSNR gain over the smallest on the squeeze the gate reads (the
channel means of the full-width stem's output), over ``--fit-crops`` training crops drawn as
that training config's stage 3 draws them, then its correlation with the real gain on the
test pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import dds_fast
from dds_fast.cost import macs_per_pixel
from dds_fast.evaluate import denoise
from dds_fast.metrics import psnr
from dds_fast.training.gate_stage import per_image_psnr
from dds_fast.training.noise import CameraNoise, GaussianNoise
from dds_fast.training.stages import DEFAULT_VALIDATION_IMAGES, Run, TrainConfig
from ablate_stage1 import output_file
from quality import noisy_pairs

SHIPPED = Path(dds_fast.__file__).parent / "weights" / "dds.safetensors"


def frontier_psnr(macs: np.ndarray, psnrs: np.ndarray, at: float) -> float:
    """The static frontier's PSNR at ``at`` MACs/pixel (the routes in any order); beyond its
    ends, the end's PSNR."""
    order = np.argsort(macs)  # np.interp needs ascending points: a DDSNet's routes may come in any order
    return float(np.interp(at, np.asarray(macs)[order], np.asarray(psnrs)[order]))


def per_pair_psnr(model: torch.nn.Module, pairs) -> np.ndarray:
    with torch.no_grad():
        return np.array([psnr(denoise(model, noisy[None]).float().clamp(0, 1), clean) for noisy, clean in pairs])


def gate_squeeze(model: dds_fast.DDSNet, x: torch.Tensor) -> np.ndarray:
    """[N, C]: the channel means of what the gate reads, the full-width stem's output."""
    seen = []
    handle = model.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.gate_forward(x)
    finally:
        handle.remove()
    return seen[0].double().mean(dim=(2, 3)).numpy()


def gate_crops(config: TrainConfig):
    """The training crops as ``config``'s stage 3 draws them."""
    with tempfile.TemporaryDirectory() as run_dir:
        return Run(run_dir, config).dataset(config.gate_patch_size)


def fit_gain(model: dds_fast.DDSNet, data, crops: int, batch: int = 64) -> tuple:
    """A ridge fit of the largest route's PSNR gain over the smallest on the gate's squeeze,
    over the first ``crops`` of ``data`` (``gate_crops``): (predict, R^2 on the crops)."""
    squeeze, gain = [], []
    for start in range(0, crops, batch):
        noisy, clean = (torch.stack(t) for t in zip(*[data[i][:2] for i in range(start, min(start + batch, crops))]))
        squeeze.append(gate_squeeze(model, noisy))
        quality = []
        for k in (0, len(model.routing_space) - 1):
            model.set_budget(model.static_macs_per_pixel(k))
            if model.budget_index != k:  # (a cheaper route of a better PSNR takes that budget)
                raise SystemExit(f"route {k}'s own cost selects route {model.budget_index} in static mode")
            with torch.no_grad():
                quality.append(per_image_psnr(model(noisy).float(), clean).cpu().numpy())
        model.set_budget(None)
        gain.append(quality[1] - quality[0])
    x, y = np.concatenate(squeeze), np.concatenate(gain)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8

    def design(u):
        return np.hstack([(u - mean) / scale, np.ones((len(u), 1))])

    a = design(x)
    weights = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ y)
    r2 = 1 - np.mean((a @ weights - y) ** 2) / np.var(y)
    return (lambda u: design(u) @ weights), float(r2)


def oracle_points(route_psnr: np.ndarray, route_macs: np.ndarray, steps: int = 40) -> list[dict]:
    """The oracle's (mean MACs, mean PSNR) for a sweep of lambda, one point per distinct
    routing: ``route_psnr`` is [pairs, routes], ``route_macs`` what each route costs."""
    spread = max(np.ptp(route_macs), 1.0)  # one route: any lambda picks it
    points, seen = [], set()
    # lambda in dB per MAC/pixel: from choosing the largest route nearly always to the smallest
    for weight in np.geomspace(1e-3, 1e2, steps) / spread:
        choice = np.argmax(route_psnr - weight * route_macs, axis=1)
        if tuple(choice) in seen:
            continue
        seen.add(tuple(choice))
        points.append({"lambda_db_per_mac": float(weight), "choice": choice.tolist(),
                       "macs_per_pixel": float(route_macs[choice].mean()),
                       "psnr": float(route_psnr[np.arange(len(choice)), choice].mean())})
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(SHIPPED), help="a DDSNet (default: the shipped model)")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_VALIDATION_IMAGES))
    parser.add_argument("--sigma", nargs="*", type=float, default=[5, 10, 15, 25, 35, 50],
                        help="AWGN sigmas, in 0-255 units")
    parser.add_argument("--camera", type=int, default=6, help="draws of the camera noise pipeline per image")
    parser.add_argument("--inets", nargs="*", default=[], help="static baselines to compare with")
    parser.add_argument("--fit-config", help="a training config (JSON): fit the gain on its crops")
    parser.add_argument("--fit-crops", type=int, default=4096)
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.camera < 0:
        parser.error(f"--camera must be >= 0, got {args.camera}")
    if not args.sigma and not args.camera:
        parser.error("no noise: give --sigma values or --camera draws")
    if args.fit_crops < 3:
        parser.error(f"--fit-crops must be >= 3, got {args.fit_crops}")
    if args.fit_config:  # checked now: the fit runs after every route
        try:
            fit_data = gate_crops(TrainConfig.from_file(args.fit_config))
        except (OSError, ValueError) as error:
            parser.error(f"--fit-config: {error}")
        if args.fit_crops > len(fit_data):
            parser.error(f"--fit-crops {args.fit_crops} is more than the {len(fit_data)} crops an epoch of "
                         f"{args.fit_config} holds (its epoch_patches)")

    model = dds_fast.load(args.checkpoint).eval()
    if not isinstance(model, dds_fast.DDSNet):
        parser.error(f"{args.checkpoint} holds a {type(model).__name__}, not a DDSNet")
    try:  # now, not after every route ran
        static_nets = [(Path(path).stem, dds_fast.load(path).eval()) for path in args.inets]
    except (OSError, ValueError) as error:
        parser.error(f"--inets: {error}")
    started = time.perf_counter()
    pairs, labels = [], []
    noises = [(f"AWGN {sigma:g}", GaussianNoise(sigma), 0) for sigma in args.sigma]
    noises += [(f"camera {draw}", CameraNoise(), 1000 * (draw + 1)) for draw in range(args.camera)]
    for label, noise, seed in noises:
        pairs += noisy_pairs(args.images, noise, model.in_channels, seed=seed)
        labels += [f"{name}, {label}" for name in args.images]

    routes = range(len(model.routing_space))
    static_macs = np.array([model.static_macs_per_pixel(k) for k in routes])
    dynamic_macs = np.array(model.dynamic_macs_per_pixel)
    route_psnr = np.empty((len(pairs), len(routes)))
    for k in routes:
        model.set_budget(static_macs[k])
        if model.budget_index != k:
            raise SystemExit(f"route {k}'s own cost selects route {model.budget_index} in static mode")
        route_psnr[:, k] = per_pair_psnr(model, pairs)
    model.set_budget(None)
    with torch.no_grad():
        gate_choice = np.array([int(model.gate_forward(noisy[None])[1].choice) for noisy, _ in pairs])
    mean_psnr = route_psnr.mean(axis=0)
    inets = []  # (MACs/pixel, name, PSNR of each pair), ascending in MACs
    for name, inet in static_nets:
        inets.append((macs_per_pixel(inet), name, per_pair_psnr(inet, pairs)))
    inets.sort(key=lambda i: i[0])
    inet_macs = np.array([i[0] for i in inets])
    inet_psnr = np.array([i[2].mean() for i in inets])
    if inets:
        inet_oracle = sorted((p["macs_per_pixel"], p["psnr"])
                             for p in oracle_points(np.stack([i[2] for i in inets], axis=1), inet_macs))

    def row(name, macs, quality, choice=None):
        frontier = frontier_psnr(static_macs, mean_psnr, macs)
        record = {"name": name, "macs_per_pixel": macs, "psnr": quality, "frontier_psnr": frontier,
                  "gain_db": quality - frontier,
                  "routes_used": None if choice is None else np.bincount(choice, minlength=len(routes)).tolist()}
        if inets:
            record["inet_frontier_psnr"] = frontier_psnr(inet_macs, inet_psnr, macs)
            record["inet_oracle_psnr"] = frontier_psnr(*np.array(inet_oracle).T, macs)
        return record

    rows = [row(f"route {k} alone", float(static_macs[k]), float(mean_psnr[k]), np.full(len(pairs), k)) for k in routes]
    rows.append(row("trained gate", float(dynamic_macs[gate_choice].mean()),
                    float(route_psnr[np.arange(len(pairs)), gate_choice].mean()), gate_choice))
    oracle = oracle_points(route_psnr, dynamic_macs)
    rows += [row(f"oracle, lambda {p['lambda_db_per_mac'] * 1e4:.3g} dB per 10K MACs", p["macs_per_pixel"],
                 p["psnr"], np.array(p["choice"])) for p in oracle]
    rows += [row(name, float(macs), float(quality.mean())) for macs, name, quality in inets]
    inet_columns = " I-Net frontier there | minus it (dB) | I-Net oracle there | minus it (dB) |" if inets else ""
    lines = [f"| routing | mean MACs/pixel | PSNR (dB) | static frontier there | gain (dB) |{inet_columns} "
             f"images per route |", "| --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * 2 * bool(inets) + " --- |"]
    for r in rows:
        versus = "".join(f" {r[key]:.3f} | {r['psnr'] - r[key]:+.3f} |" for key in
                         ("inet_frontier_psnr", "inet_oracle_psnr") if inets)
        lines.append(f"| {r['name']} | {r['macs_per_pixel']:,.0f} | {r['psnr']:.3f} | {r['frontier_psnr']:.3f} | "
                     f"{r['gain_db']:+.3f} |{versus} {r['routes_used'] or ''} |")
    table = "\n".join(lines)
    fit = None
    if args.fit_config:
        predict, r2 = fit_gain(model, fit_data, args.fit_crops)
        predicted = predict(np.concatenate([gate_squeeze(model, noisy[None]) for noisy, _ in pairs]))
        actual = route_psnr[:, -1] - route_psnr[:, 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # one pair or a constant gain: NaN, said below
            correlation = float(np.corrcoef(predicted, actual)[0, 1])
        correlation = None if math.isnan(correlation) else correlation  # JSON has no NaN
        fit = {"config": args.fit_config, "crops": args.fit_crops, "r2_on_crops": r2,
               "correlation_on_pairs": correlation}
        table += (f"\n\nThe largest route's gain over the smallest, fitted on the gate's squeeze over {args.fit_crops} "
                  f"training crops: R^2 {r2:.3f} there; correlation with the real gain on these pairs "
                  + ("undefined (one pair, or the same gain on every pair)." if correlation is None
                     else f"{correlation:+.3f}."))
    print(f"{len(pairs)} pairs ({', '.join(args.images)}; {len(args.sigma)} AWGN sigmas, {args.camera} camera "
          f"draws) in {time.perf_counter() - started:.0f} s")
    print(table)
    if args.out:
        record = {"device": f"CPU: {platform.processor() or platform.machine()}", "checkpoint": args.checkpoint,
                  "inets": args.inets, "images": args.images, "sigma": args.sigma, "camera_draws": args.camera, "torch": torch.__version__,
                  "pairs": labels, "route_psnr": route_psnr.tolist(), "gate_choice": gate_choice.tolist(),
                  "static_macs_per_pixel": static_macs.tolist(), "dynamic_macs_per_pixel": dynamic_macs.tolist(),
                  "rows": rows, "gain_fit": fit, "table": table}
        Path(args.out).write_text(json.dumps(record, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
