"""Checkpoints in safetensors (never pickle), written atomically.

The file's metadata holds the format tag and revision (a later revision is refused, not
misread), the library version, the architecture with its
constructor arguments, the active config, whether the model is a static export of that
config (``export_static``), the routing space (``model.routing_space``, a tuple of
RoutingEntry) with its MACs table when the model has one, and the caller's own metadata
(JSON values). Tensors keep their dtypes, and load back in them, read into memory: a model
never depends on its file after ``load``.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as serialize
from torch import nn

from ._version import __version__
from .config import RoutingEntry, SubnetConfig, json_loads
from .ddsnet import AttentionSupernet, DDSNet
from .export import StaticConv2d, export_static
from .gate import DynamicGate
from .nets import ARCHITECTURES, SlimNet, constructor_misfit

FORMAT = "dds-fast"
# Revision of what the header fields mean: a file from a later revision is refused, not misread
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000  # bytes; safetensors' own bound
_DIGEST = "sha256"  # the metadata key of the tensors' fingerprint
# the metadata key of the other metadata's (files before it have none: their headers load unchecked)
_HEADER_DIGEST = "metadata_sha256"
SHIPPED_MODEL = Path(__file__).parent / "weights" / "dds.safetensors"  # the model the package ships


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as this library's: the message names the file."""


def save(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Write ``model``'s tensors and architecture to ``path`` (temporary file, then rename);
    returns the path. ``metadata``: any JSON values, which ``read_metadata(path)["user"]``
    gives back. A ValueError for a model ``load`` could not rebuild: a class not registered
    (``register_architecture``), ``arch_args`` its constructor does not take, masked widths,
    a layer's width set apart from its config, tensors its constructor does not build (a
    buffer or a parametrization added later), NaN or infinite values."""
    arch = type(model).__name__
    if ARCHITECTURES.get(arch) is not type(model) or not hasattr(model, "arch_args"):
        raise ValueError(f"save: {arch} is not a registered architecture ({sorted(ARCHITECTURES)}); "
                         "save a plain module's state_dict with safetensors.torch.save_file instead")
    if getattr(model, "masked", False):  # its config says largest, its layers compute another one
        raise ValueError(f"save: this {arch} runs masked widths (set_masked_widths); call set_config with the "
                         f"config to keep first")
    for net in model.modules():
        if isinstance(net, SlimNet):
            net.check_widths("save")
    static = isinstance(model, SlimNet) and model.is_static
    if not static and any(isinstance(m, StaticConv2d) for m in model.modules()):
        # load rebuilds a static export from its SlimNet's arguments and config; nothing else
        raise ValueError(f"save: this {arch} holds exported static layers; export_static of a SlimNet can be "
                         f"saved, not of a {arch}")
    arch_args = model.arch_args
    # load rebuilds a gated network's parts by their registered names and a plain DynamicGate:
    # a subclass of either would come back as another model
    gated = isinstance(model, (DDSNet, AttentionSupernet))
    supernet, gate = (model.supernet, model.gate) if gated else (None, None)
    if gated and ARCHITECTURES.get(type(supernet).__name__) is not type(supernet):
        raise ValueError(f"save: this {arch}'s super-network {type(supernet).__name__} is not a registered "
                         f"architecture ({sorted(ARCHITECTURES)}): register_architecture it first")
    if gated and type(gate) is not DynamicGate:
        raise ValueError(f"save: this {arch}'s gate is a {type(gate).__name__}; load rebuilds a DynamicGate")
    # what load will call (for a gated network, its super-network's constructor too): a file
    # it cannot rebuild is refused now, not when it is read
    for part in (model, getattr(model, "supernet", None)):
        misfit = None if part is None else constructor_misfit(type(part), part.arch_args)
        if misfit is not None:
            raise ValueError(f"save: {type(part).__name__}'s arch_args {sorted(part.arch_args)} do not fit its "
                             f"constructor ({misfit}): arch_args must be the keyword arguments that build it")
    user = _json_text(metadata, "metadata")
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "version": __version__,
        "arch": arch,
        "arch_args": _json_text(arch_args, "arch_args"),
        "user": user,
        "static": json.dumps(static),
    }
    if hasattr(model, "get_config") and model.get_config() is not None:
        header["config"] = model.get_config().to_json()
    routing = getattr(model, "routing_space", None)
    if routing is not None:  # (checked as it was set)
        header["routing_space"] = json.dumps([entry.to_dict() for entry in routing])
    state = model.state_dict()
    _refuse_tied(state, path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    # what load will rebuild and check: a file it would refuse is refused now (a parametrization
    # or a buffer added after construction, a NaN weight)
    try:
        rebuilt = _rebuilt(path, ARCHITECTURES[arch], _decoded(Path(path), header))
        _check_tensors(path, rebuilt, arch, tensors)
    except CheckpointError as error:
        raise ValueError(f"save: load could not rebuild this {arch} from {path}: {error}") from None
    _check_settings(model, rebuilt, arch)
    return atomic_save_file(tensors, path, header)


# What a module computes with beside its tensors, which load rebuilds from the constructor's
# arguments: a value set after construction would be lost (runtime choices, such as backends,
# are not in the file by design: load's docstring)
_SETTINGS = ((nn.Conv2d, ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "activation",
                          "negative_slope", "in_segments", "upscale_factor")),
             (nn.modules.batchnorm._NormBase, ("eps", "affine", "track_running_stats")),
             (nn.LeakyReLU, ("negative_slope",)),
             (DynamicGate, ("attention",)))


def _check_settings(model: nn.Module, rebuilt: nn.Module, arch: str) -> None:
    """Refuse a model whose settings ``load`` would not give back."""
    for (name, module), (_, fresh) in zip(model.named_modules(), rebuilt.named_modules()):
        kinds = [names for kind, names in _SETTINGS if isinstance(module, kind)]
        for setting in (kinds[0] if kinds else ()):
            if setting == "negative_slope" and getattr(module, "activation", "leaky_relu") != "leaky_relu":
                continue  # (no other activation reads it)
            value, loaded = getattr(module, setting, None), getattr(fresh, setting, None)
            if value != loaded:
                raise ValueError(f"save: this {arch}'s {name or 'model'}.{setting} is {value!r}, but load would "
                                 f"rebuild it as {loaded!r}: a checkpoint keeps the constructor's arguments, not "
                                 f"settings changed after construction")


def _refuse_tied(state: dict[str, torch.Tensor], path) -> None:
    """Tied weights would load as two tensors (load rebuilds the network from its arguments):
    refused here, where they are one tensor still; a copy to the CPU or to a contiguous layout
    would hide the tie (safetensors refuses only what it sees shared)."""
    names: dict[tuple[torch.device, int], str] = {}
    for name, t in state.items():
        if t.numel():
            tied = names.setdefault((t.device, t.data_ptr()), name)
            if tied != name:
                raise ValueError(f"cannot write {path}: {name} is {tied} (tied weights), which load would rebuild "
                                 f"as two tensors")


def _json_text(value, name: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError) as error:  # (RecursionError: nested too deep)
        raise ValueError(f"save: {name} must be JSON-serialisable: {error}") from None


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """safetensors bytes of ``tensors`` through ``atomic_write``, the tensors'
    ``weights_fingerprint`` and a fingerprint of the other metadata in the metadata:
    safetensors has no checksum of its own; ``read_tensors`` checks both (every reader the
    metadata's). (Not safetensors' ``save_file``, whose own temporary file a kill would leave
    where ``remove_leftovers`` does not look.)"""
    metadata = {**metadata, _DIGEST: weights_fingerprint(tensors)}
    metadata[_HEADER_DIGEST] = _metadata_fingerprint(metadata)
    try:
        data = serialize(tensors, metadata=metadata)
    except (SafetensorError, RuntimeError) as error:  # RuntimeError: tensors sharing memory (tied weights)
        raise ValueError(f"cannot write {path}: {error}") from error
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, read into memory in one read (a
    memory map would let a later write to the file change the tensors). A file written by
    ``atomic_save_file`` whose tensors no longer match their fingerprint (corrupt data)
    raises ValueError; so does a truncated file or a corrupt header."""
    return _tensors_of(Path(path).read_bytes())


def _tensors_of(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    metadata = _metadata_of(data)
    try:
        tensors = load_tensors(data)
    except SafetensorError as error:
        raise ValueError(str(error)) from None
    except KeyError as error:  # a dtype safetensors parses and its torch table lacks (F8_E8M0)
        raise ValueError(f"it holds tensors of dtype {error}, which safetensors cannot give torch") from None
    if _DIGEST in metadata and weights_fingerprint(tensors) != metadata[_DIGEST]:
        raise ValueError("its tensors do not match the checksum saved with them (corrupt data)")
    return metadata, tensors


def _metadata_of(data: bytes, file_size: int | None = None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file from its first bytes (8 bytes of header
    length, then the JSON header); ``file_size`` (default ``len(data)``) must hold the tensor
    data the header places after it."""
    file_size = len(data) if file_size is None else file_size
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > _MAX_HEADER:
        raise ValueError(f"its header claims {size} bytes, more than the {_MAX_HEADER} a header may hold")
    if size > len(data) - 8:
        raise ValueError(f"its header claims {size} bytes; the file holds {file_size - 8} after the length")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError) as error:
        raise ValueError(f"its header is not JSON: {error}") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its header's __metadata__ is not a map of strings")
    # (a changed config or argument would load as another model that computes something else)
    if _HEADER_DIGEST in metadata and _metadata_fingerprint(metadata) != metadata[_HEADER_DIGEST]:
        raise ValueError("its metadata do not match the checksum saved with them (corrupt header)")
    try:
        end = max([entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError):
        raise ValueError("its header holds a tensor entry without data offsets") from None
    if not isinstance(end, int) or 8 + size + end > file_size:
        raise ValueError(f"its tensors end at byte {8 + size + end if isinstance(end, int) else end}; the file "
                         f"holds {file_size} (truncated?)")
    return metadata


def _metadata_fingerprint(metadata: dict[str, str]) -> str:
    """sha256 of a file's metadata entries but its own."""
    entries = sorted((key, value) for key, value in metadata.items() if key != _HEADER_DIGEST)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and values): the same weights give the
    same digest from a file or in memory, on any device or memory layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def remove_leftovers(path: str | os.PathLike) -> None:
    """Delete the temporary files that ``atomic_write`` calls for ``path`` left behind when a
    kill stopped them mid-write; only for a writer that knows no other process writes ``path``."""
    path = Path(path)
    for leftover in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*{glob.escape(_temp_suffix(path))}"):
        leftover.unlink(missing_ok=True)


def _temp_prefix(path: Path) -> str:
    # a long name cut to 100 bytes, so that the temporary's additions fit the file system's 255,
    # with a digest of the whole name, so that no other file's temporaries match it
    name = os.fsencode(path.name)
    if len(name) <= 100:
        return f".{path.name}."
    return f".{name[:88].decode(errors='ignore')}-{hashlib.sha256(name).hexdigest()[:10]}."


def _temp_suffix(path: Path) -> str:
    # the name's suffix kept (a writer may read the format from it), unless too long to be one
    return f".tmp{path.suffix}" if len(os.fsencode(path.suffix)) <= 32 else ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes a temporary file beside ``path`` (with its suffix, which some
    writers read the format from), then a rename puts it in place, so a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one. The data and the
    rename are flushed to the disk, so a power loss after the call keeps the new file. A file
    replaced keeps its permissions; a symbolic link keeps pointing at the file it names,
    which is replaced."""
    path = Path(path)
    if path.is_symlink():
        try:
            path = path.resolve()
        except RuntimeError as error:  # a loop of links (an OSError from Python 3.13 on)
            raise OSError(errno.ELOOP, f"cannot write {path}: {error}") from None
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=_temp_suffix(path))
    except OSError as error:
        raise _write_error(path, error) from error
    os.close(fd)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        write(Path(tmp))
        os.chmod(tmp, mode)  # mkstemp's file is private
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        # an error about the temporary file, or of no file (a full disk), named after the file asked
        # for; one about another file (a font a plot lacks), or of another kind too, as it came
        if isinstance(error, OSError) and error.filename in (None, tmp, Path(tmp)) \
                and (error.errno is not None or type(error) is OSError):
            raise _write_error(path, error) from error
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself (POSIX; Windows has no directory handles)
        _fsync(path.parent, os.O_DIRECTORY)
    return path


def _write_error(path: Path, error: OSError) -> OSError:
    """``error`` as one that names ``path``, of the same OSError subclass where it had an errno."""
    if error.errno is None:  # (a writer's own, such as Pillow's for a mode its format cannot hold)
        return OSError(f"cannot write {path}: {error}")
    return OSError(error.errno, f"cannot write {path}: {error.strerror}")  # (a filename argument would repeat it)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_JSON_KINDS = {dict: "object", list: "array", bool: "true or false"}


def _json_field(header: dict[str, str], name: str, kind: type, default: str | None = None):
    """Header field ``name`` decoded from JSON, which must be a ``kind``."""
    value = json_loads(header[name] if default is None else header.get(name, default))  # (a key twice: refused)
    if not isinstance(value, kind):
        raise TypeError(f"'{name}' must be a JSON {_JSON_KINDS[kind]}, got {header[name]!r}")
    return value


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, decoded (the header alone: the tensors' checksum is checked
    by ``load``); raises CheckpointError for a file that is not one (and OSError, such as
    PermissionError, for one that cannot be opened)."""
    path = _existing_file(path)
    with open(path, "rb") as f:  # the header alone: a training state's tensors can be large
        return _read_metadata(path, f)


def _read_metadata(path: Path, f) -> dict:
    """The decoded metadata of ``path`` opened as ``f``, read from its start (8 bytes of header
    length, then the JSON header)."""
    head = f.read(8)
    head += f.read(min(int.from_bytes(head, "little"), _MAX_HEADER)) if len(head) == 8 else b""
    return _decoded(path, _header_of(path, head, os.fstat(f.fileno()).st_size))


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is not a regular file" if path.exists()
                                else f"checkpoint {path} does not exist")
    return path


def _header_of(path: Path, data: bytes, file_size: int) -> dict[str, str]:
    try:
        return _metadata_of(data, file_size)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file "
                              f"(truncated or corrupt?): {error}") from None


def _decoded(path: Path, header: dict[str, str]) -> dict:
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint (no '{FORMAT}' format tag)")
    revision = header.get("format_version", "1")  # files from before the field are revision 1
    # ("²" is a digit, not a number int() reads; past 4,300 digits int() refuses the text)
    if not (revision.isascii() and revision.isdigit() and len(revision) <= 9):
        raise CheckpointError(f"checkpoint {path} has malformed metadata: format_version {revision!r} is not a "
                              f"whole number")
    if int(revision) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by dds-fast {header.get('version')} in format revision "
                              f"{revision}; dds-fast {__version__} reads revisions up to {FORMAT_VERSION}: upgrade "
                              f"dds-fast to load it")
    missing = [key for key in ("version", "arch", "arch_args") if key not in header]
    if missing:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: no {missing[0]!r} entry")
    try:
        meta = {
            "version": header["version"],
            "arch": header["arch"],
            "arch_args": _json_field(header, "arch_args", dict),
            "user": _json_field(header, "user", dict, "{}"),
            "static": _json_field(header, "static", bool, "false"),
            "config": SubnetConfig.from_dict(_json_field(header, "config", dict)) if "config" in header else None,
            "routing_space": ([RoutingEntry.from_dict(e) for e in _json_field(header, "routing_space", list)]
                              if "routing_space" in header else None),
        }
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError, OverflowError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {error}") from None
    if meta["static"] and meta["config"] is None:
        raise CheckpointError(f"checkpoint {path} holds a static export but no config to rebuild its shapes from")
    return meta


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtypes(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The saved tensors' dtypes fit ``model``'s: floats where it holds floats, of a dtype the
    layers run and one for each layer's (a layer cast as a whole; a gate may stay fp32 beside a
    bf16 network), and exactly its dtype elsewhere (BatchNorm's batch count). A misfit would
    fail in the first forward, deep in torch."""
    fresh = model.state_dict()
    layers: dict[str, set[torch.dtype]] = {}
    odd = []
    for key, tensor in sorted(tensors.items()):
        if not fresh[key].is_floating_point():
            if tensor.dtype != fresh[key].dtype:
                odd.append(f"{key} {tensor.dtype}")
        elif tensor.dtype not in _FLOATS:
            odd.append(f"{key} {tensor.dtype}")
        else:
            layers.setdefault(key.rpartition(".")[0], set()).add(tensor.dtype)
    odd += [f"{layer or 'the model'}'s tensors of {sorted(map(str, dtypes))}"
            for layer, dtypes in layers.items() if len(dtypes) > 1]
    if odd:
        raise CheckpointError(f"checkpoint {path}: tensors of dtypes its model cannot hold: {', '.join(odd)} "
                              f"(float16, bfloat16, float32 or float64, one for each layer's floats; the model's "
                              f"own dtype for the rest)")


def _rebuilt(path: Path, cls: type, meta: dict) -> nn.Module:
    """The model ``load`` builds from a file's metadata (``meta``, as ``_decoded`` reads it),
    with its fresh weights: its arguments, config, static export and routing space."""
    build = getattr(cls, "from_arch_args", cls)
    try:
        with torch.random.fork_rng(devices=[]):  # its random weights, replaced below, leave the caller's stream
            model = build(**meta["arch_args"])
    except (TypeError, ValueError, KeyError, RuntimeError, MemoryError, OverflowError) as error:
        # RuntimeError, MemoryError: arguments so large that the parameters cannot be allocated
        raise CheckpointError(f"checkpoint {path}: cannot build {meta['arch']} from its arguments: "
                              f"{error or type(error).__name__}") from None
    try:
        if meta["config"] is not None and hasattr(model, "set_config"):
            model.set_config(meta["config"])
        if meta["static"]:
            model = export_static(model)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: its config does not fit {meta['arch']}: {error}") from None
    routing = meta["routing_space"]
    if routing is not None and getattr(model, "routing_space", None) is not None:
        # a DDSNet validated its routing space as it was built from arch_args: the header's copy must agree
        if list(model.routing_space) != list(routing):
            raise CheckpointError(f"checkpoint {path}: its header's routing space differs from the one in its "
                                  f"arguments")
    elif routing is not None:
        try:
            model.routing_space = routing  # (checked against the network as it is set)
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path}: its routing space does not fit {meta['arch']}: "
                                  f"{error}") from None
    return model


def _check_tensors(path: Path, model: nn.Module, arch: str, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` fit ``model`` as ``_rebuilt`` built it: its keys, dtypes it runs, finite values."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {arch}: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    misshapen = [f"{name} {tuple(t.shape)} (expected {tuple(expected[name].shape)})"
                 for name, t in sorted(tensors.items()) if t.shape != expected[name].shape]
    if misshapen:
        more = f" and {len(misshapen) - 3} more" if len(misshapen) > 3 else ""
        raise CheckpointError(f"checkpoint {path} does not match {arch}: tensor shapes {', '.join(misshapen[:3])}{more}")
    _check_dtypes(path, model, tensors)
    # a NaN or infinite weight would not fail: it would route every image to one sub-network
    # (a gate's) or end in a NaN image, far from its cause
    broken = [key for key, t in sorted(tensors.items()) if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise CheckpointError(f"checkpoint {path}: NaN or infinite values in {', '.join(broken)}")


def load(path: str | os.PathLike, arch: str | type | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``, its tensors in the dtypes they were saved in, on
    the device ``map_location``. ``arch`` (a class or its name), when given, must match the
    file's architecture. The model comes back in training mode, as a new module does: call
    ``.eval()`` for inference (a DDSNet's gate normalises with batch statistics otherwise).
    How the model runs is not in the file, only what it computes: layer and gate ``backend``,
    a DDSNet's ``per_image_tiles``, ``packed_buffers`` and ``route_branches``, and the weights'
    memory format come back as a new model has them; set them again after loading.
    A missing file raises FileNotFoundError, a folder IsADirectoryError, one that cannot be
    opened another OSError (such as PermissionError); a foreign, truncated or corrupt one
    CheckpointError (a ValueError), as does one whose tensors the model cannot hold (NaN or
    infinite values, dtypes its layers do not run)."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"load: map_location {map_location!r} is not a torch device: {error}") from None
    path = _existing_file(path)
    # the header, then the whole file, from one open file (one version of it, whatever writes
    # to the path meanwhile), read into memory (a memory map would let a later write to the file
    # change the model's weights under it)
    with open(path, "rb") as f:
        meta = _read_metadata(path, f)
        f.seek(0)
        data = f.read()
    expected = arch.__name__ if isinstance(arch, type) else arch
    if expected is not None and expected != meta["arch"]:
        raise CheckpointError(f"checkpoint {path} holds a {meta['arch']}, not a {expected}")
    cls = ARCHITECTURES.get(meta["arch"])
    if cls is None:
        raise CheckpointError(f"checkpoint {path}: unknown architecture {meta['arch']!r} (known: "
                              f"{sorted(ARCHITECTURES)}; a class of your own: import the module that registers "
                              f"it with dds_fast.register_architecture first, on the command line with "
                              f"dds-fast --import MODULE)")
    model = _rebuilt(path, cls, meta)
    try:
        _, tensors = _tensors_of(data)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: cannot read its tensors (truncated or corrupt?): {error}") from None
    _check_tensors(path, model, meta["arch"], tensors)
    try:
        model.load_state_dict(tensors, assign=True)  # assign: the saved dtypes, not the fresh model's fp32
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not match {meta['arch']}: {error}") from None
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as error:  # e.g. CUDA asked for where there is none
        raise ValueError(f"load: cannot move the model to map_location {map_location!r}: {error}") from None
