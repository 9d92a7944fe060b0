"""The GPU path of ``CachedLaunch`` without a GPU: Triton's own ``CompiledKernel.__getitem__``
runner over a stand-in for the compiled kernel and the driver, so that what the runner hands
the launcher (grid, argument order, which compiled kernel) is checked in CI. The interpreter,
which runs every other test, never takes this path."""
import contextlib

import pytest
import torch

pytest.importorskip("triton")
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from dds_fast.kernels import _launch  # noqa: E402


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


class _Compiled:
    """What a JIT launch returns, recording the launches of Triton's runner over it."""
    __getitem__ = CompiledKernel.__getitem__
    packed_metadata = function = module = None

    def __init__(self, kernel, signature):
        self.kernel, self.signature = kernel, signature

    def _init_handles(self):
        pass

    def launch_metadata(self, *args):
        return None

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.kernel.calls.append(("runner", self.signature, (gx, gy, gz), args))
        self.kernel.devices.append(torch.cuda.current_device())


class _Kernel:
    """A kernel of parameters (x, y, n, scale, BLOCK, FLAG) whose JIT compiles per tensor dtype."""
    arg_names = ["x", "y", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.calls = []
        self.devices = []  # the current device at each launch

    def __getitem__(self, grid):
        def jit(*args, **meta):
            signature = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.calls.append(("jit", signature, grid, args, meta))
            self.devices.append(torch.cuda.current_device())
            return _Compiled(self, signature)
        return jit


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    # the stand-in tensors live on the CPU (device index -1): make that the current device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)
    # what the driver had (None on CI) comes back; Triton 3.4 keeps it in a plain attribute
    monkeypatch.setattr(driver, "_active" if hasattr(driver, "_active") else "active", _Driver())


def test_runner_gets_three_grid_dimensions_and_the_arguments_in_order(gpu_path):
    kernel = _Kernel()
    x, y = torch.randn(8), torch.randn(8)
    for _ in range(2):
        _launch.launch(kernel, (5,), (x, y), (8, 0.5), BLOCK=16, FLAG=True, num_warps=4)
    jit, runner = kernel.calls
    assert jit[0] == "jit" and jit[3] == (x, y, 8, 0.5) and jit[4] == dict(BLOCK=16, FLAG=True, num_warps=4)
    # the compiled kernel's launcher reads grid[0..2], and every parameter, constexprs included
    assert runner[0] == "runner" and runner[2] == (5, 1, 1)
    assert runner[3][:4] == (x, y, 8, 0.5) and runner[3][4:] == (16, True)


def test_runners_are_kept_apart_by_dtype_and_alignment(gpu_path):
    kernel = _Kernel()
    half, bf16 = torch.randn(16, dtype=torch.float16), torch.randn(16, dtype=torch.bfloat16)
    shifted = torch.randn(17, dtype=torch.float16)[1:]  # 2 bytes past a 16-byte boundary
    for tensor in (half, bf16, half, bf16, shifted, shifted):
        _launch.launch(kernel, (2, 1, 1), (tensor, tensor), (16, 1.0), BLOCK=16, FLAG=False)
    kinds = [(call[0], call[1]) for call in kernel.calls]
    assert kinds == [("jit", ("torch.float16",) * 2), ("jit", ("torch.bfloat16",) * 2),
                     ("runner", ("torch.float16",) * 2), ("runner", ("torch.bfloat16",) * 2),
                     ("jit", ("torch.float16",) * 2), ("runner", ("torch.float16",) * 2)]


@pytest.fixture
def fake_devices(monkeypatch):
    """torch.cuda's current device and its ``device`` context as stand-ins (device 0 current):
    the current device (a one-item list) and the devices switched to."""
    current, switches = [0], []

    @contextlib.contextmanager
    def device(index):
        switches.append(index)
        previous, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    return current, switches


def test_runners_are_kept_apart_by_device(gpu_path, fake_devices, monkeypatch):
    """A kernel compiled on one GPU is not another's: each device gets its own compile and runner."""
    a, b = torch.randn(4), torch.randn(4)
    where = {id(a): 0, id(b): 1}
    monkeypatch.setattr(_launch.CachedLaunch, "_device", staticmethod(lambda t: where[id(t)]))
    kernel = _Kernel()
    launch = _launch.CachedLaunch(kernel, (1,), (4, 2.0), dict(BLOCK=16, FLAG=True), num_tensors=2)
    for t in (a, b, a, b):
        launch(t, t)
    assert [call[0] for call in kernel.calls] == ["jit", "jit", "runner", "runner"]
    assert kernel.devices == [0, 1, 0, 1] and fake_devices[0] == [0]


def test_next_pow2_is_the_smallest_power_of_two_at_least_n():
    assert [_launch.next_pow2(n) for n in (0, 1, 2, 3, 16, 17, 64)] == [1, 1, 2, 4, 16, 32, 64]


@pytest.mark.parametrize("cache", [True, False])
def test_a_launch_runs_on_its_tensors_device_then_gives_the_current_device_back(gpu_path, fake_devices, monkeypatch,
                                                                                 cache):
    """Triton launches on the current device, whatever the tensors' device: tensors on
    another device (here the CPU's -1 against a current device 0) switch to theirs."""
    current, switches = fake_devices
    monkeypatch.setattr(_launch, "CACHE_LAUNCHES", cache)
    kernel = _Kernel()
    x = torch.randn(4)
    for _ in range(2):
        _launch.launch(kernel, (1, 1, 1), (x, x), (4, 2.0), BLOCK=16, FLAG=True)
    assert [call[0] for call in kernel.calls] == (["jit", "runner"] if cache else ["jit", "jit"])
    assert kernel.devices == [-1, -1] and switches == [-1, -1] and current == [0]


def test_descriptor_launches_are_kept_apart_by_their_dtype_and_hand_the_descriptors_on(gpu_path):
    """``CachedDescriptorLaunch`` (the forward through tensor descriptors): a descriptor is
    keyed by its base's dtype; each call's descriptors reach the runner in order."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def descriptor(dtype):
        base = torch.randn(4, 16).to(dtype)
        return TensorDescriptor(base, list(base.shape), list(base.stride()), [2, 16])

    kernel = _Kernel()
    launch = _launch.CachedDescriptorLaunch(kernel, (3,), (16, 1.0), dict(BLOCK=16, FLAG=True), num_tensors=2)
    y = torch.randn(8)
    calls = [descriptor(dtype) for dtype in (torch.float16, torch.float16, torch.bfloat16, torch.bfloat16)]
    for desc in calls:
        launch(desc, y)
    assert [call[0] for call in kernel.calls] == ["jit", "runner", "jit", "runner"]
    assert kernel.calls[1][3][0] is calls[1] and kernel.calls[3][3][0] is calls[3]  # this call's descriptor
    assert kernel.calls[1][2] == (3, 1, 1) and kernel.calls[1][3][1:] == (y, 16, 1.0, 16, True)


def test_the_jit_path_is_taken_every_call_when_caching_is_off(gpu_path, monkeypatch):
    monkeypatch.setattr(_launch, "CACHE_LAUNCHES", False)
    kernel = _Kernel()
    x = torch.randn(4)
    for _ in range(3):
        _launch.launch(kernel, (1, 1, 1), (x, x), (4, 2.0), BLOCK=16, FLAG=True)
    assert [call[0] for call in kernel.calls] == ["jit"] * 3


@pytest.mark.parametrize("value", ["true", "On", "0", "off"])
def test_interpret_is_read_as_triton_reads_it(value):
    """``TRITON_INTERPRET=true`` interprets the kernels: the host side must plan for the
    interpreter then too (bf16 dots upcast, CPU tensors accepted), or it plans for a GPU."""
    import os
    import subprocess
    import sys

    probe = ("import triton.knobs; from dds_fast.kernels import _launch; "
             "print(_launch.INTERPRET, triton.knobs.runtime.interpret)")
    env = dict(os.environ, TRITON_INTERPRET=value)
    ours, triton_s = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert ours == triton_s == str(value.lower() in ("true", "on"))
