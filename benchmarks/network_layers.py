"""Each conv layer of a SlimUNet config timed alone on a GPU, against cuDNN on the same narrow
shape and against its roofline floor: which layers make the network's distance from its floor.

    python benchmarks/network_layers.py [--config smallest ...] [--batch 8] [--size 512] [--tma] [OUT.json]

Every SlimConv2d's inputs are captured in one forward of the config (fp16, channels_last);
each layer is then timed with ``triton.testing.do_bench`` (median), and so is cuDNN's static
conv over the concatenated inputs and a contiguous copy of the active weight (bias and
activation left out: the floor of what slicing cannot reach; an upsampling conv's time includes
its pixel-shuffled store, cuDNN's conv is not shuffled). --tma turns on the forward through
tensor descriptors (``kernels.conv2d.TMA_FORWARD``) where it applies. Without a GPU it runs the
reference path on the CPU in fp32 with wall-clock medians: a check of the script, not a speed.
"""
import json

import torch
import torch.nn.functional as F

from _timing import CUDA, chosen_configs, median_ms, network_arguments

from dds_fast import SlimConv2d, SlimUNet
from dds_fast.runner import LatencyRunner


def main() -> None:
    args = network_arguments(__doc__, "network-layers.json", ["smallest", "largest"], lambda parser: parser.add_argument(
        "--tma", action="store_true", help="the forward through tensor descriptors where it applies"))
    if args.tma:
        from dds_fast.kernels import conv2d

        conv2d.TMA_FORWARD = True
    device, dtype = ("cuda", torch.float16) if CUDA else ("cpu", torch.float32)
    net = SlimUNet(in_channels=3, base_width=32, depth=4).to(device, dtype).to(memory_format=torch.channels_last)
    net.eval()
    peaks = LatencyRunner(torch.nn.Identity(), (1, 1, 1, 1), dtype, torch.device(device), 2, 5).measure_peaks()
    configs = chosen_configs(args.config, net)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, SlimConv2d)]
    report = dict(device=torch.cuda.get_device_name() if CUDA else "CPU (reference path: checks the script)",
                  torch=torch.__version__, dtype=str(dtype), tma_forward=args.tma,
                  input=list(x.shape), peaks=dict(flops_per_s=peaks.flops_per_s, bytes_per_s=peaks.bytes_per_s),
                  configs={})
    for label, config in configs.items():
        net.set_config(config)
        calls = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, kw, name=name: calls.setdefault(name, (a, kw)),
                                             with_kwargs=True) for name, m in convs]
        with torch.no_grad():
            net(x)
        for hook in hooks:
            hook.remove()
        rows = []
        for name, conv in convs:
            if name not in calls:
                continue
            a, kw = calls[name]
            inputs = a[0] if isinstance(a[0], (list, tuple)) else [a[0]]
            with torch.no_grad():
                y = conv(*a, **kw)
                in_widths = [t.shape[1] for t in inputs]
                out_width = conv.active_out_channels or conv.out_channels  # filters: an upsampling conv shuffles them
                narrow = conv.active_weight(in_widths, out_width).contiguous(memory_format=torch.channels_last)
                cat = torch.cat(inputs, 1).contiguous(memory_format=torch.channels_last)
                ours = median_ms(lambda: conv(*a, **kw))
                cudnn = median_ms(lambda: F.conv2d(cat, narrow, None, conv.stride, conv.padding))
            macs = y.numel() * sum(in_widths) * conv.kernel_size[0] * conv.kernel_size[1]
            residual = a[1] if len(a) > 1 else kw.get("residual")
            # what ours reads and writes: bias and residual too (cuDNN's row runs neither)
            nbytes = (cat.numel() + y.numel() + narrow.numel() + out_width * (conv.bias is not None)
                      + (0 if residual is None else residual.numel())) * cat.element_size()
            floor, bound = peaks.floor_ms(nbytes, 2 * macs)
            rows.append(dict(layer=name, inputs=[list(t.shape) for t in inputs], out=list(y.shape), ms=ours,
                             cudnn_ms=cudnn, floor_ms=floor, bound=bound))
            print(f"{label:12s} {name:28s} in {'+'.join(map(str, in_widths)):>9s} out {out_width:4d} "
                  f"{y.shape[2] // conv.upscale_factor:4d}px  ours {ours:7.4f} ms  cuDNN {cudnn:7.4f} ms  floor {floor:7.4f} ms ({bound})",
                  flush=True)
        total = sum(r["ms"] for r in rows)
        print(f"{label:12s} sum of layers: ours {total:.3f} ms, cuDNN {sum(r['cudnn_ms'] for r in rows):.3f} ms, "
              f"floors {sum(r['floor_ms'] for r in rows):.3f} ms", flush=True)
        report["configs"][label] = rows
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
