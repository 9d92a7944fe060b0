"""The README's code of a super-network of one's own runs as written and does what the README
says of it."""
import contextlib
import io
import re
from pathlib import Path

import torch

import dds_fast
from dds_fast.training.stages import Run, TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The README's python code block that holds ``marker``."""
    return next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in block)


def test_the_readme_super_network_of_ones_own(tmp_path):
    namespace = {"__name__": "readme_example"}
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(readme_block("class TinyResNet"), "README.md", "exec"), namespace)
        dds, net, routes = namespace["dds"], namespace["net"], namespace["routes"]
        printed_macs = [float(v) for v in re.findall(r"[\d.]+", printed.getvalue())]
        assert len(printed_macs) == 2 and set(printed_macs) <= {route.macs_per_pixel for route in routes}
        x = torch.rand(3, 1, 13, 11)
        choice = torch.tensor([0, 2, 1])
        with torch.no_grad():
            out = dds(x, choice=choice)
            for i, route in enumerate(choice.tolist()):
                static = dds_fast.export_static(net, routes[route].config).eval()
                torch.testing.assert_close(out[i:i + 1], static(x[i:i + 1]))
        # its receptive radius: how far an input pixel changes the output
        with torch.no_grad():
            for parameter in net.parameters():  # away from zero, so that no path cancels out
                parameter.add_(0.05 * torch.sign(parameter))
            net.set_config(net.space.largest())
            size = 4 * net.receptive_radius + 1
            impulse = torch.zeros(1, 1, size, size)
            impulse[..., size // 2, size // 2] = 1
            changed = (net(impulse) - net(torch.zeros_like(impulse)))[0, 0] != 0
            rows, cols = changed.nonzero(as_tuple=True)
            reach = max((rows - size // 2).abs().max().item(), (cols - size // 2).abs().max().item())
        assert reach == net.receptive_radius
        dds_fast.save(dds, tmp_path / "dds.safetensors")
        loaded = dds_fast.load(tmp_path / "dds.safetensors").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, choice=choice), dds(x, choice=choice))
        # the trainer builds it from the options, as the README says
        run = Run(tmp_path / "run", TrainConfig(arch="TinyResNet", channels=1, base_width=8, depth=3, device="cpu"))
        assert type(run.new_network()).__name__ == "TinyResNet" and len(run.new_network().blocks) == 3
    finally:
        dds_fast.ARCHITECTURES.pop("TinyResNet", None)


def test_the_readme_usage_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves net.safetensors where it runs
    namespace = {"__name__": "readme_usage"}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(readme_block("A drop-in layer"), "README.md", "exec"), namespace)
    assert namespace["y"].shape == (1, 24, 64, 64)
    report = namespace["report"]
    assert [r.label for r in report.results] == ["smallest", "uniform 0.25", "uniform 0.5", "uniform 0.75", "largest"]
    assert report.reference == "largest" and report.device.startswith("CPU: ")
    assert report.to_markdown() in printed.getvalue()
    # the budget set last: every image then runs one route
    dds = namespace["dds"]
    assert dds.budget_index is not None and (tmp_path / "net.safetensors").is_file()
