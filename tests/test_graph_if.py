"""Conditional IF nodes in CUDA graph captures (dds_fast.graph_if): torch's own, and the CUDA
driver's through cuda-python where torch has none (torch 2.11, on our GPU machines)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dds_fast import graph_if
from dds_fast.graph_if import (_SET_CONDITIONAL_PTX, _checked, conditional_graph_nodes, conditional_nodes_source,
                               conditional_nodes_supported, driver_if_nodes, driver_if_nodes_available, torch_if_nodes)


def test_conditional_nodes_need_cuda_12_4_in_the_build_and_the_driver():
    assert conditional_nodes_supported("12.4", 12040) and conditional_nodes_supported("13.0", 13000)
    assert not conditional_nodes_supported("12.3", 12080)  # the build
    assert not conditional_nodes_supported("12.8", 12020)  # the driver
    assert not conditional_nodes_supported(None, 13000)  # a CPU build
    assert conditional_graph_nodes() == (conditional_nodes_source() in ("torch", "driver"))
    if not torch.cuda.is_available():
        assert conditional_nodes_source() is None


@pytest.mark.parametrize("cuda, build, driver, torch_api, bindings, source, reason", [
    (True, "13.0", 13000, True, True, "torch", ""),
    (True, "13.0", 13000, False, True, "driver", ""),  # torch 2.11 on our GPU machines
    (True, "13.0", 13000, False, False, None, "needs cuda-python 13 or later (cuda.bindings) and torch 2.8"),
    (True, "12.8", 12020, True, True, None, "built for CUDA 12.8 on a driver of CUDA 12.2"),  # an old driver
    (True, "13.0", None, True, True, None, "driver library could not be asked"),  # no driver library
    (False, "13.0", 13000, True, True, None, "no CUDA device"),
])
def test_conditional_nodes_come_from_torch_else_the_driver(monkeypatch, cuda, build, driver, torch_api, bindings,
                                                           source, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(graph_if, "cuda_driver_version", lambda: driver)
    monkeypatch.setattr(graph_if, "torch_if_nodes", lambda: torch_api)
    monkeypatch.setattr(graph_if, "driver_if_nodes_available", lambda: bindings)
    found, why = graph_if._source_or_reason.__wrapped__()
    assert found == source and reason in why and (why == "") == (source is not None)


def test_the_driver_way_needs_torchs_pool_hooks_of_2_8(monkeypatch):
    """torch 2.4 to 2.7 have the begin hook but name the end hook otherwise: reported
    unavailable, not failing in the middle of a capture."""
    monkeypatch.setattr(graph_if, "_driver_bindings", lambda: object())
    monkeypatch.setattr(torch._C, "_cuda_beginAllocateCurrentStreamToPool", lambda *a: None, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda *a: None, raising=False)
    assert graph_if.driver_if_nodes_available()
    monkeypatch.delattr(torch._C, "_cuda_endAllocateToPool")
    assert not graph_if.driver_if_nodes_available()


def test_the_driver_version_is_read_from_the_driver_library():
    version = graph_if.cuda_driver_version()
    assert version is None or version >= 10000
    if torch.cuda.is_available():
        assert version is not None


def test_driver_call_results_unpack_or_raise_naming_the_error():
    class Result(int):  # a CUresult: an int enum with a name
        def __repr__(self):
            return "<CUresult.CUDA_ERROR_INVALID_VALUE: 1>" if self else "<CUresult.CUDA_SUCCESS: 0>"

    assert _checked((Result(0),)) is None
    assert _checked((Result(0), "module")) == "module"
    assert _checked((Result(0), 1, 2, 3)) == (1, 2, 3)
    with pytest.raises(RuntimeError, match="CUDA_ERROR_INVALID_VALUE"):
        _checked((Result(1), "module"))


def test_the_kernel_that_sets_a_predicate_assembles_for_sm_90_calling_the_driver_builtin(tmp_path):
    """The driver JIT-compiles the PTX on the GPU; Triton's ptxas (the same compiler, without a
    GPU) checks it here: a kernel whose call to cudaGraphSetConditional is left for the driver
    to resolve at load, as nvcc leaves it, with no device runtime linked."""
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        pytest.skip("this Triton ships no ptxas and cuobjdump")
    ptx, cubin = tmp_path / "set_conditional.ptx", tmp_path / "set_conditional.cubin"
    ptx.write_bytes(_SET_CONDITIONAL_PTX)
    subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90", str(ptx), "-o", str(cubin)], check=True,
                   capture_output=True)
    elf = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-elf", str(cubin)], check=True, capture_output=True,
                         text=True).stdout
    assert re.search(r"externs:\s+cudaGraphSetConditional", elf)
    assert "dds_set_conditional" in elf


def test_driver_nodes_are_refused_inside_a_capture_before_they_are_made(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(graph_if, "_DRIVER_IF_NODES", {})
    with pytest.raises(RuntimeError, match="outside the capture first"):
        driver_if_nodes(torch.device("cuda", 0))


# DriverIfNodes against the stand-in driver: torch's CUDA pieces replaced by loggers, since torch
# has no GPU here either
_DRIVE_STAND_IN = """
import contextlib, sys, torch
from dds_fast.graph_if import DriverIfNodes

def log(text):
    print("[torch] " + text, file=sys.stderr, flush=True)

class Stream:
    def __init__(self, handle, device=None):
        self.cuda_stream = int(handle)

caller = Stream(0xA00A)
torch.cuda.device = lambda device: contextlib.nullcontext()
torch.cuda.synchronize = lambda device=None: None
torch.cuda.ExternalStream = Stream
torch.cuda.graph_pool_handle = lambda: (0, 42)
torch.cuda.current_stream = lambda device=None: caller
torch.cuda.set_stream = lambda stream: log(f"set_stream {stream.cuda_stream:#x}")
torch._C._cuda_beginAllocateCurrentStreamToPool = lambda device, pool: log(f"beginAllocate {device} {pool}")
torch._C._cuda_endAllocateToPool = lambda device, pool: log(f"endAllocate {device} {pool}")

class Flag:
    device, shape = torch.device("cuda", 0), ()
    def __init__(self, dtype=torch.bool, numel=1):
        self.dtype, self.count = dtype, numel
    def numel(self):
        return self.count
    def data_ptr(self):
        return 0x7F00DEAD0000

def refused(call, reason):
    try:
        call()
    except (ValueError, RuntimeError) as error:
        assert reason in str(error), error
        log("refused: " + reason)
    else:
        raise AssertionError("not refused: " + reason)

nodes = DriverIfNodes(torch.device("cuda", 0))
log("begin")
nodes.begin_capture_to_if_node(Flag())
log("end")
nodes.end_capture_to_conditional_node()
# refused before any driver call: predicates other than one bool, an end with no node open
refused(lambda: nodes.begin_capture_to_if_node(Flag(dtype=torch.uint8)), "the predicate must be one bool")
refused(lambda: nodes.begin_capture_to_if_node(Flag(numel=2)), "the predicate must be one bool")
refused(nodes.end_capture_to_conditional_node, "no conditional node is open")
nodes.begin_capture_to_if_node(Flag())
refused(lambda: nodes.begin_capture_to_if_node(Flag()), "already open")
nodes.end_capture_to_conditional_node()
"""


def _cuda_header():
    """cuda.h of the NVIDIA wheels beside torch's CUDA builds, else Triton's."""
    for root in map(Path, sys.path):
        for candidate in (root / "nvidia" / "cu13" / "include" / "cuda.h",
                          root / "triton" / "backends" / "nvidia" / "include" / "cuda.h"):
            if candidate.is_file():
                return candidate
    return None


def test_driver_nodes_make_the_driver_calls_torch_does_in_order(tmp_path):
    """What DriverIfNodes hands the CUDA driver through cuda-python, seen by a stand-in driver
    (tests/stand_in_libcuda.c): the kernel loaded up front; then the handle on the graph being
    captured, set by the kernel on the caller's stream, the IF node after the stream's
    dependencies and before what follows, and the body captured into the node's graph from
    the body stream, torch's current stream and allocations routed to it meanwhile."""
    if graph_if._driver_bindings() is None:  # torch's pool hooks are stand-ins too: a CPU build lacks one
        pytest.skip("needs cuda-python 13+ (installed with torch's CUDA 13 builds, and by the test extras)")
    header, compiler = _cuda_header(), shutil.which("gcc") or shutil.which("cc")
    if header is None or compiler is None:
        pytest.skip("needs a C compiler and cuda.h")
    from cuda.bindings import driver as cu
    library = tmp_path / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", f"-I{header.parent}", str(Path(__file__).with_name(
        "stand_in_libcuda.c")), "-o", str(library), "-ldl"], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-c", _DRIVE_STAND_IN], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    calls = [line.split(" ", 1)[1] for line in run.stderr.splitlines() if line.startswith(("[driver]", "[torch]"))]
    conditional = int(cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL)
    if_node = int(cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF)
    set_dependencies = int(cu.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES)
    global_mode = int(cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)
    loaded = [
        "cuCtxGetCurrent",
        f"cuModuleLoadData length={len(_SET_CONDITIONAL_PTX)}",  # the whole PTX, NUL-terminated
        "cuModuleGetFunction module=0x3003 name=dds_set_conditional",
        "cuFuncLoad function=0xf00f",
        f"cuStreamCreate flags={int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)}"]
    begin = [
        "cuStreamGetCaptureInfo stream=0xa00a",
        "cuGraphConditionalHandleCreate graph=0x6006 context=0xc7c7 default=0 flags=0",
        "cuLaunchKernel function=0xf00f grid=1,1,1 block=1,1,1 shared=0 stream=0xa00a extra=(nil) "
        "handle=0x123456789abc flag=0x7f00dead0000",
        "cuStreamGetCaptureInfo stream=0xa00a",
        f"cuGraphAddNode graph=0x6006 count=2 dependencies=0xd001,0xd002 type={conditional} handle=0x123456789abc "
        f"condition={if_node} size=1 context=0xc7c7",
        f"cuStreamUpdateCaptureDependencies stream=0xa00a count=1 dependency=0xc0de flags={set_dependencies}",
        f"cuStreamBeginCaptureToGraph stream=0x5005 graph=0xb0d1 count=0 mode={global_mode}",
        "set_stream 0x5005",
        "beginAllocate 0 (0, 42)"]
    end = ["endAllocate 0 (0, 42)", "set_stream 0xa00a", "cuStreamEndCapture stream=0x5005"]
    assert calls == [*loaded, "begin", *begin, "end", *end,
                     *["refused: the predicate must be one bool"] * 2, "refused: no conditional node is open",
                     *begin, "refused: already open", *end]


def _implementations():
    """Each way this machine opens conditional nodes: torch's, and the driver's."""
    found = []
    if torch.cuda.is_available() and conditional_graph_nodes():
        if torch_if_nodes():
            found.append("torch")
        if driver_if_nodes_available():
            found.append("driver")
    return found or [pytest.param("none", marks=pytest.mark.skip(
        reason="conditional graph nodes need a GPU, a CUDA 12.4+ build and driver, and torch's or cuda-python's API"))]


@pytest.mark.parametrize("how", _implementations())
def test_gpu_if_nodes_run_their_body_only_when_the_predicate_holds(how):
    """One graph, two IF nodes whose bodies allocate and write the one output, replayed with
    each pair of predicates set on the device: only the taken bodies' writes land, every
    replay reads the predicates anew, and the work after the nodes waits for them."""
    device = torch.device("cuda")
    x = torch.randn(1000, device=device)
    out = torch.empty_like(x)
    flags = torch.zeros(2, dtype=torch.bool, device=device)
    nodes = driver_if_nodes(device) if how == "driver" else None  # made outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            opener = nodes or torch.cuda.CUDAGraph.get_currently_capturing_graph()
            out.fill_(-1.0)
            for k, scale in enumerate((2.0, 3.0)):
                opener.begin_capture_to_if_node(flags[k])
                try:
                    out.copy_(torch.sin(x) * scale)  # a temporary: allocated inside the body
                finally:
                    opener.end_capture_to_conditional_node()
            after = out + 1.0
    torch.cuda.current_stream().wait_stream(stream)
    for first, second in ((False, False), (True, False), (False, True), (True, True), (False, False)):
        flags.copy_(torch.tensor([first, second]))
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.sin(x) * 3.0 if second else torch.sin(x) * 2.0 if first else torch.full_like(x, -1.0)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(after, expected + 1.0)
