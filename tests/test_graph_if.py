"""Conditional IF nodes in CUDA graph captures (dds_fast.graph_if): torch's own, and the CUDA
driver's through cuda-python where torch has none (torch 2.11, on our GPU machines)."""
import os
import re
import subprocess

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


@pytest.mark.parametrize("cuda, build, driver, torch_api, bindings, source", [
    (True, "13.0", 13000, True, True, "torch"),
    (True, "13.0", 13000, False, True, "driver"),  # torch 2.11 on our GPU machines
    (True, "13.0", 13000, False, False, None),
    (True, "12.8", 12020, True, True, None),  # an old driver
    (True, "13.0", None, True, True, None),  # no driver library
    (False, "13.0", 13000, True, True, None),
])
def test_conditional_nodes_come_from_torch_else_the_driver(monkeypatch, cuda, build, driver, torch_api, bindings,
                                                           source):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(graph_if, "cuda_driver_version", lambda: driver)
    monkeypatch.setattr(graph_if, "torch_if_nodes", lambda: torch_api)
    monkeypatch.setattr(graph_if, "driver_if_nodes_available", lambda: bindings)
    assert conditional_nodes_source.__wrapped__() == source


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
