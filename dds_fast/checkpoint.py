"""Checkpoints in safetensors (never pickle), written atomically.

The file's metadata holds the format tag, the library version, the architecture with its
constructor arguments, the active config, the routing space (``model.routing_space``, a list
of RoutingEntry) with its MACs table when the model has one, and the caller's own metadata
(JSON values).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .config import RoutingEntry, SubnetConfig
from .nets import ARCHITECTURES

FORMAT = "dds-fast"
SHIPPED_MODEL = Path(__file__).parent / "weights" / "dds.safetensors"  # the model the package ships


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as this library's: the message names the file."""


def save(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Write ``model``'s tensors and architecture to ``path`` (temporary file, then rename)."""
    arch = type(model).__name__
    if ARCHITECTURES.get(arch) is not type(model) or not hasattr(model, "arch_args"):
        raise ValueError(f"save: {arch} is not a registered architecture ({sorted(ARCHITECTURES)}); "
                         "save a plain module's state_dict with safetensors.torch.save_file instead")
    try:
        user = json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"save: metadata must be JSON-serialisable: {error}") from None
    header = {
        "format": FORMAT,
        "version": __version__,
        "arch": arch,
        "arch_args": json.dumps(model.arch_args),
        "user": user,
    }
    if hasattr(model, "get_config") and model.get_config() is not None:
        header["config"] = model.get_config().to_json()
    routing = getattr(model, "routing_space", None)
    if routing is not None:
        header["routing_space"] = json.dumps([entry.to_dict() for entry in routing])
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    return atomic_save_file(tensors, path, header)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """safetensors ``save_file`` through a temporary file and a rename, so a reader (or a
    run killed mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a checkpoint gets ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, decoded; raises CheckpointError for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file "
                              f"(truncated or corrupt?): {error}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint (no '{FORMAT}' format tag)")
    try:
        meta = {
            "version": header["version"],
            "arch": header["arch"],
            "arch_args": json.loads(header["arch_args"]),
            "user": json.loads(header.get("user", "{}")),
            "config": SubnetConfig.from_json(header["config"]) if "config" in header else None,
            "routing_space": ([RoutingEntry.from_dict(e) for e in json.loads(header["routing_space"])]
                              if "routing_space" in header else None),
        }
    except (KeyError, TypeError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {error}") from None
    return meta


def load(path: str | os.PathLike, arch: str | type | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``. ``arch`` (a class or its name), when given, must
    match the file's architecture."""
    path = Path(path)
    meta = read_metadata(path)
    expected = arch.__name__ if isinstance(arch, type) else arch
    if expected is not None and expected != meta["arch"]:
        raise CheckpointError(f"checkpoint {path} holds a {meta['arch']}, not a {expected}")
    cls = ARCHITECTURES.get(meta["arch"])
    if cls is None:
        raise CheckpointError(f"checkpoint {path}: unknown architecture {meta['arch']!r} "
                              f"(known: {sorted(ARCHITECTURES)})")
    build = getattr(cls, "from_arch_args", cls)
    try:
        model = build(**meta["arch_args"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot build {meta['arch']} from its arguments: {error}") from None
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read its tensors (truncated or corrupt?): {error}") from None
    expected_keys = set(model.state_dict())
    missing, unexpected = sorted(expected_keys - set(tensors)), sorted(set(tensors) - expected_keys)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {meta['arch']}: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not match {meta['arch']}: {error}") from None
    model.to(map_location)
    if meta["config"] is not None and hasattr(model, "set_config"):
        model.set_config(meta["config"])
    if meta["routing_space"] is not None:
        model.routing_space = meta["routing_space"]
    return model
