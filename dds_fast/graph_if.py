"""Conditional IF nodes in a CUDA graph being captured: work captured inside one runs, at each
replay, only when a device bool is true, with no host sync.

torch 2.13 opens them itself (``torch.cuda.CUDAGraph.begin_capture_to_if_node``). torch 2.11,
the version on our GPU machines, has no such method, so there ``capturing_graph`` returns
``DriverIfNodes``, which does what torch 2.13 does through the CUDA driver, by way of
cuda-python's bindings (``cuda.bindings``, which torch's CUDA 13 wheels install):
- a one-thread kernel, captured upstream of the node, copies the bool into the node's handle;
- the node's body graph is captured from a stream of its own;
- the body's allocations come from a private memory pool (no graph capture owns that stream).
"""
from __future__ import annotations

import ctypes
import functools

import torch

_TORCH_IF_NODES = ("begin_capture_to_if_node", "end_capture_to_conditional_node", "get_currently_capturing_graph")

# cudaGraphSetConditional is a builtin of the CUDA driver (resolved when the module loads, as
# printf's is), so hand-written PTX reaches it with no CUDA headers or device runtime to link.
_SET_CONDITIONAL_PTX = b"""
.version 8.4
.target sm_60
.address_size 64

.extern .func cudaGraphSetConditional(.param .b64 handle, .param .b32 value);

.visible .entry dds_set_conditional(.param .u64 handle, .param .u64 flag)
{
    .reg .pred %p;
    .reg .b16 %h;
    .reg .b32 %r;
    .reg .b64 %rd<4>;

    ld.param.u64 %rd1, [handle];
    ld.param.u64 %rd2, [flag];
    cvta.to.global.u64 %rd3, %rd2;
    ld.global.u8 %h, [%rd3];
    setp.ne.s16 %p, %h, 0;
    selp.u32 %r, 1, 0, %p;
    {
    .param .b64 a;
    .param .b32 b;
    st.param.b64 [a], %rd1;
    st.param.b32 [b], %r;
    call.uni cudaGraphSetConditional, (a, b);
    }
    ret;
}
"""


def conditional_nodes_supported(build_cuda: str | None, driver: int) -> bool:
    """Whether torch built against CUDA ``build_cuda`` ("12.4") on a driver of version
    ``driver`` (12040) can capture conditional graph nodes: both must be CUDA 12.4 or later."""
    return build_cuda is not None and tuple(int(v) for v in build_cuda.split(".")[:2]) >= (12, 4) and driver >= 12040


def torch_if_nodes() -> bool:
    """Whether this torch opens conditional nodes itself (torch 2.13 does, 2.11 does not)."""
    return all(hasattr(torch.cuda.CUDAGraph, name) for name in _TORCH_IF_NODES)


def _driver_bindings():
    """cuda-python's driver bindings, or None where they are not installed or older than 13
    (whose capture calls take no edge data)."""
    try:
        import cuda.bindings
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver if int(cuda.bindings.__version__.split(".")[0]) >= 13 else None


def driver_if_nodes_available() -> bool:
    """Whether ``DriverIfNodes`` can work here: cuda-python 13+ and torch's allocator hooks
    (the end hook has this name and signature from torch 2.8 on)."""
    return _driver_bindings() is not None and all(
        hasattr(torch._C, name) for name in ("_cuda_beginAllocateCurrentStreamToPool", "_cuda_endAllocateToPool"))


def cuda_driver_version() -> int | None:
    """The CUDA driver's version (12040 for 12.4), or None where there is none. torch exposes
    only the version it was built with, so this asks the driver library itself."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        return version.value if library.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    return None


@functools.lru_cache(maxsize=None)
def _source_or_reason() -> tuple[str | None, str]:
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    driver = cuda_driver_version()
    if driver is None:
        return None, "the CUDA driver library could not be asked its version"
    if not conditional_nodes_supported(torch.version.cuda, driver):
        return None, (f"they need CUDA 12.4 or later, and torch was built for CUDA {torch.version.cuda} on a "
                      f"driver of CUDA {driver // 1000}.{driver % 1000 // 10}")
    if torch_if_nodes():
        return "torch", ""
    if driver_if_nodes_available():
        return "driver", ""
    return None, (f"torch {torch.__version__} cannot open them itself, and the way around it needs cuda-python 13 "
                  f"or later (cuda.bindings) and torch 2.8 or later")


def conditional_nodes_source() -> str | None:
    """Who opens conditional nodes in a CUDA graph captured here: ``"torch"``, ``"driver"``
    (``DriverIfNodes``, where torch cannot), or None; either needs a CUDA build and a driver of
    12.4 or later."""
    return _source_or_reason()[0]


def conditional_nodes_unavailable_reason() -> str:
    """Why a CUDA graph captured here cannot hold conditional nodes ("" where it can)."""
    return _source_or_reason()[1]


def conditional_graph_nodes() -> bool:
    """Whether a CUDA graph captured here can hold conditional nodes (``capturing_graph``)."""
    return conditional_nodes_source() is not None


def _checked(result):
    """A cuda-python call's values (None, one, or a tuple), or a RuntimeError naming its error code."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA driver call failed: {error!r}")
    return tuple(values) if len(values) > 1 else values[0] if values else None


class DriverIfNodes:
    """``begin_capture_to_if_node`` and ``end_capture_to_conditional_node`` of torch 2.13's
    ``CUDAGraph``, for the graph being captured on the current stream, through the CUDA driver.

    One per device (``driver_if_nodes``), made outside any capture: it loads the kernel that
    sets a node's handle, and holds the stream that captures bodies and the private memory
    pool their allocations come from. Bodies are captured one after another, and all graphs
    whose bodies were captured here share that pool: a block a body freed may serve a later
    body, of the same graph (whose node runs after it) or of another graph, so replay such
    graphs one at a time, not at once on two streams."""

    def __init__(self, device: torch.device):
        cu = _driver_bindings()
        if cu is None:
            raise RuntimeError("conditional graph nodes on this torch need cuda-python's driver bindings, "
                               "13 or later (pip install 'cuda-bindings>=13')")
        self._cu, self.device = cu, device
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # makes the device's primary context current on this thread
            self._context = _checked(cu.cuCtxGetCurrent())
            if int(self._context) == 0:
                raise RuntimeError(f"DriverIfNodes: no CUDA context is current for {device}")
            module = _checked(cu.cuModuleLoadData(_SET_CONDITIONAL_PTX + b"\0"))  # PTX is read up to a NUL
            self._set_conditional = _checked(cu.cuModuleGetFunction(module, b"dds_set_conditional"))
            _checked(cu.cuFuncLoad(self._set_conditional))  # loaded now, not lazily at its first launch in a capture
            self._module = module  # loaded for the process's life: captured graphs keep using the kernel
            # a stream of its own, not one of torch's pool, which may also serve the capture
            self._body_stream = torch.cuda.ExternalStream(
                int(_checked(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))), device=device)
            self._pool = torch.cuda.graph_pool_handle()
        self._open: list[torch.cuda.Stream] = []

    def begin_capture_to_if_node(self, flag: torch.Tensor) -> None:
        """Work issued from here to ``end_capture_to_conditional_node`` (on the current stream,
        then the body stream) runs at replay only when ``flag`` (a bool on the device) is true."""
        if flag.device != self.device or flag.dtype != torch.bool or flag.numel() != 1:
            raise ValueError(f"DriverIfNodes: the predicate must be one bool on {self.device}, got "
                             f"{flag.dtype} of shape {tuple(flag.shape)} on {flag.device}")
        if self._open:
            raise RuntimeError("DriverIfNodes: a conditional node is already open; nodes do not nest here")
        cu = self._cu
        parent = torch.cuda.current_stream(self.device)
        stream = cu.CUstream(parent.cuda_stream)
        status, _, graph, _, _, _ = _checked(cu.cuStreamGetCaptureInfo(stream))
        if status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE:
            raise RuntimeError("DriverIfNodes: conditional nodes open only while the current stream captures a graph")
        handle = _checked(cu.cuGraphConditionalHandleCreate(graph, self._context, 0, 0))
        _checked(cu.cuLaunchKernel(self._set_conditional, 1, 1, 1, 1, 1, 1, 0, stream,
                                   ((int(handle), flag.data_ptr()), (ctypes.c_uint64, ctypes.c_void_p)), 0))
        _, _, graph, dependencies, edges, count = _checked(cu.cuStreamGetCaptureInfo(stream))
        params = cu.CUgraphNodeParams()
        params.type = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
        params.conditional.size = 1
        params.conditional.ctx = self._context
        node = _checked(cu.cuGraphAddNode(graph, dependencies, edges, count, params))
        # what the current stream captures next runs after the node
        _checked(cu.cuStreamUpdateCaptureDependencies(
            stream, [node], None, 1, cu.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES))
        body = cu.CUstream(self._body_stream.cuda_stream)
        _checked(cu.cuStreamBeginCaptureToGraph(body, params.conditional.phGraph_out[0], None, None, 0,
                                                cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
        try:
            torch.cuda.set_stream(self._body_stream)
            torch._C._cuda_beginAllocateCurrentStreamToPool(self.device.index, self._pool)
        except BaseException:  # no node is left open: the caller's stream back, the body's capture ended
            torch.cuda.set_stream(parent)
            cu.cuStreamEndCapture(body)
            raise
        self._open.append(parent)

    def end_capture_to_conditional_node(self) -> None:
        if not self._open:
            raise RuntimeError("DriverIfNodes: no conditional node is open")
        parent = self._open.pop()
        try:
            torch._C._cuda_endAllocateToPool(self.device.index, self._pool)
        finally:  # the caller's stream back and the body's capture ended, whatever failed
            torch.cuda.set_stream(parent)
            _checked(self._cu.cuStreamEndCapture(self._cu.CUstream(self._body_stream.cuda_stream)))


_DRIVER_IF_NODES: dict[torch.device, DriverIfNodes] = {}


def driver_if_nodes(device: torch.device) -> DriverIfNodes:
    """The device's ``DriverIfNodes``, made on first use: outside a capture, since it loads a kernel."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    nodes = _DRIVER_IF_NODES.get(device)
    if nodes is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("conditional graph nodes: run one forward on this device outside the capture "
                               "first (it loads the kernel that sets a node's predicate)")
        nodes = _DRIVER_IF_NODES[device] = DriverIfNodes(device)
    return nodes


def capturing_graph(device: torch.device):
    """What opens conditional nodes in the graph being captured on ``device``'s current
    stream: torch's ``CUDAGraph`` where it can, else the device's ``DriverIfNodes``."""
    if torch_if_nodes():
        return torch.cuda.CUDAGraph.get_currently_capturing_graph()
    return driver_if_nodes(device)
