"""Host-side launch arithmetic and cached launches shared by the kernels. Plain Python on
purpose: some Triton versions wrap ``triton.cdiv`` and ``triton.next_power_of_2`` in a JIT
function that costs microseconds per call from the host, on every launch."""
import functools
import os

import torch

# Read once at import: triton.jit picks interpretation when the kernels are decorated, too.
# Triton's own reading of the variable: "true" or "on" interprets as "1" does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "y", "yes", "true", "on")
MAX_BATCH = 65535  # the kernels put images on the grid's third dimension, which CUDA caps there


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cached_call(fn, *args):
    """``fn(*args)`` through ``fn``'s lru_cache; while torch.compile traces, ``fn`` itself:
    Dynamo traces through the cache anyway, and warns on every compile that it does."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    """GPU ``index``'s multiprocessor count (a driver query per call otherwise)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


# Benchmarks turn this off to time the launch through Triton's JIT on every call.
CACHE_LAUNCHES = True
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas"}


class CachedLaunch:
    """A launch whose grid, run-time scalars and compile-time arguments are fixed: the tensors
    are the only arguments left to each call.

    Triton's JIT binds and specialises every argument on every call (tens of microseconds for
    a kernel of 50 arguments, which is most of a small layer's time). The specialisation of
    fixed scalars never changes, and a tensor's is its dtype and the 16-byte alignment of its
    address, so after the first launch through the JIT for a (device, each tensor's dtype and
    alignment) key, later calls go to the compiled kernel's own launcher. The interpreter
    always takes the JIT path."""

    __slots__ = ("kernel", "grid", "scalars", "meta", "constexprs", "_runners")

    def __init__(self, kernel, grid: tuple, scalars: tuple, meta: dict, num_tensors: int):
        # the compiled kernel's launcher reads three grid dimensions (the JIT pads them itself)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, scalars, meta
        # checked under the interpreter too, which never takes the cached path: the parameters
        # after the tensors and scalars must be exactly the compile-time ones that meta names
        names = kernel.arg_names[num_tensors + len(scalars):]
        unknown = [name for name in names if name not in meta] + [
            key for key in meta if key not in names and key not in _LAUNCH_OPTIONS]
        if unknown:
            raise ValueError(f"CachedLaunch: {unknown} do not match the compile-time parameters of "
                             f"{getattr(kernel, '__name__', kernel)} after {num_tensors} tensors and "
                             f"{len(scalars)} scalars")
        self.constexprs = tuple(meta[name] for name in names)  # in the kernel's parameter order
        self._runners = {}

    def __call__(self, *tensors) -> None:
        if INTERPRET:
            self.kernel[self.grid](*tensors, *self.scalars, **self.meta)
            return
        device = self._device(tensors[0])
        if device == torch.cuda.current_device():
            self._launch(tensors, device)
            return
        # Triton launches on the current device whatever the tensors' device: a model on
        # cuda:1 would otherwise run its kernels on cuda:0 over cuda:1's memory
        with torch.cuda.device(device):
            self._launch(tensors, device)

    def _launch(self, tensors, device: int) -> None:
        if not CACHE_LAUNCHES:
            self.kernel[self.grid](*tensors, *self.scalars, **self.meta)
            return
        key = self._key(device, tensors)
        runner = self._runners.get(key)
        if runner is not None:
            runner(*tensors, *self.scalars, *self.constexprs)
            return
        compiled = self.kernel[self.grid](*tensors, *self.scalars, **self.meta)
        if hasattr(compiled, "packed_metadata"):  # a compiled kernel (not a benchmark's stub)
            self._runners[key] = compiled[self.grid]

    @staticmethod
    def _device(tensor) -> int:
        return tensor.get_device()

    @staticmethod
    def _key(device: int, tensors) -> tuple:
        return (device, *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


class CachedDescriptorLaunch(CachedLaunch):
    """A ``CachedLaunch`` whose tensor arguments may also be host-side tensor descriptors
    (``triton.tools.tensor_descriptor.TensorDescriptor``). The JIT specialises a descriptor by
    its dtype and block shape (the plan fixes the latter), and the compiled kernel's launcher
    encodes each call's descriptors itself."""

    __slots__ = ()

    @staticmethod
    def _device(tensor) -> int:
        return (tensor if isinstance(tensor, torch.Tensor) else tensor.base).get_device()

    @staticmethod
    def _key(device: int, tensors) -> tuple:
        return (device, *[(t.dtype, t.data_ptr() % 16 == 0) if isinstance(t, torch.Tensor)
                          else (t.base.dtype,) for t in tensors])


@functools.lru_cache(maxsize=4096)
def _launch_of(kernel, grid: tuple, scalars: tuple, meta: tuple, num_tensors: int) -> CachedLaunch:
    return CachedLaunch(kernel, grid, scalars, dict(meta), num_tensors)


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, **meta) -> None:
    """``kernel[grid](*tensors, *scalars, **meta)`` through a ``CachedLaunch`` kept per
    (kernel, grid, scalars, meta): for launch sites without a plan cache of their own, whose
    arguments repeat from one training step to the next."""
    _launch_of(kernel, grid, scalars, tuple(meta.items()), len(tensors))(*tensors)
