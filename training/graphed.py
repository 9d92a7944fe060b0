"""Training steps replayed as CUDA graphs.

A small network's training step on a GPU is bound by the host: the sandwich rule's four
sub-networks launch hundreds of small kernels per step, and the first GPU run (NOTES v11)
spent 41 ms a step on an H200 mostly launching them. Replaying the forward and backward
as one CUDA graph leaves the host one launch. A graph fixes every shape, so a slimmable
network runs its configs there as masked widths (``SlimNet.set_masked_widths``: full width,
the channels past each layer's width zeroed; the same function and gradients), with the
widths read from a device tensor that each step fills.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch


class GraphedStep:
    """``fn(*inputs) -> {name: 0-d tensor}`` (a forward and its ``backward``, leaving the
    gradients in the parameters' ``.grad``) run as a CUDA-graph replay.

    The first ``warmup`` calls run ``fn`` eagerly on a side stream (real steps: the caller's
    optimizer steps after each, as after every call); the next one captures it and replays
    the capture. Later calls copy their inputs into the graph's own tensors and replay. Every
    shape and every host-side decision inside ``fn`` must depend only on the inputs' shapes
    (never on their values), or the replay computes something else than ``fn`` would. After
    each call the parameters' ``.grad`` are the graph's gradient tensors, which hold this
    call's gradients; the caller may read, reduce and step them, and set them to None.

    A call whose inputs differ in shape or dtype from the captured ones runs eagerly, as does
    every call off CUDA (where there are no graphs) and every call after a capture that
    failed (with a warning naming the error). Returns the losses as 0-d device tensors
    (copies: the next replay overwrites the graph's own), with no host sync.
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], parameters: Iterable[torch.nn.Parameter],
                 warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1 (the capture needs warm kernels), got {warmup}")
        self.fn, self.parameters, self.warmup = fn, list(parameters), warmup
        self.calls = 0
        self.replays = 0
        self.failure: str | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] = []
        self._names: list[str] = []
        self._values: torch.Tensor | None = None
        self._grads: list[torch.Tensor | None] = []
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        on_cuda = bool(inputs) and all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
        if self._graph is not None and self._fits(inputs):
            return self._replay(inputs)
        if not on_cuda or self.failure is not None or self._graph is not None or self.calls <= self.warmup:
            return self._eager(inputs, side_stream=on_cuda)
        stream = torch.cuda.current_stream()
        try:
            self._capture(inputs)
        except Exception as error:  # a step that cannot be captured still trains, eagerly
            # torch.cuda.graph's __exit__ ends the capture before it restores the stream: where
            # capture_end raises (an invalidated capture), its capture stream stays current
            torch.cuda.set_stream(stream)
            self._graph = None
            for p in self.parameters:
                p.grad = None
            # a step that fails eagerly too raises here: its input's fault, not the capture's
            losses = self._eager(inputs, side_stream=True)
            self.failure = f"{type(error).__name__}: {error}"
            warnings.warn(f"GraphedStep: the capture failed ({self.failure}); every step runs eagerly",
                          stacklevel=2)
            return losses
        return self._replay(inputs)

    def _fits(self, inputs) -> bool:
        return len(inputs) == len(self._inputs) and all(
            t.shape == s.shape and t.dtype == s.dtype and t.device == s.device for t, s in zip(inputs, self._inputs))

    def _eager(self, inputs, side_stream: bool) -> dict[str, torch.Tensor]:
        if not side_stream:
            return _detached(self.fn(*inputs))
        # warm-up work runs on a side stream, as a capture does (PyTorch's rule for graphs)
        device = inputs[0].device
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        self._side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._side_stream):
            losses = self.fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(self._side_stream)
        return _detached(losses)

    def _capture(self, inputs) -> None:
        self._inputs = [torch.empty_like(t) for t in inputs]
        for static, t in zip(self._inputs, inputs):
            static.copy_(t)
        for p in self.parameters:  # the first backward in the graph writes each gradient anew
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self.fn(*self._inputs)
            self._names = list(losses)
            self._values = torch.stack([v.detach().float() for v in losses.values()])
        self._grads = [p.grad for p in self.parameters]
        self._graph = graph

    def _replay(self, inputs) -> dict[str, torch.Tensor]:
        for static, t in zip(self._inputs, inputs):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        self._graph.replay()
        self.replays += 1
        for p, grad in zip(self.parameters, self._grads):
            p.grad = grad
        return dict(zip(self._names, self._values.clone().unbind()))


def _detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in losses.items()}
