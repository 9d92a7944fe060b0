import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dds_fast
from dds_fast import CheckpointError, RoutingEntry, SlimDnCNN, SlimUNet, load, macs_per_pixel, read_metadata, save
from dds_fast.checkpoint import atomic_save_file
from tests.test_cli import small_ddsnet


def rewrite(path, tensors, **header_changes):
    """Write ``tensors`` to ``path`` with the checkpoint's header, some fields changed, as a
    writer would have written them (their checksum too)."""
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    header.update(header_changes)
    atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path, header)


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = SlimUNet(in_channels=3, base_width=8, depth=3)
    model.set_config(model.space.sample(torch.Generator().manual_seed(1)))
    return model


def test_round_trip_keeps_weights_config_routing_and_metadata(net, tmp_path):
    routes = [RoutingEntry(c, macs_per_pixel(net, c), 30.0 + i)
              for i, c in enumerate([net.space.smallest(), net.space.largest()])]
    net.routing_space = routes
    path = save(net, tmp_path / "sub" / "model.safetensors", note="test", step=3)
    loaded = load(path)
    assert type(loaded) is SlimUNet
    assert loaded.get_config() == net.get_config()
    assert loaded.routing_space == tuple(routes)
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    x = torch.rand(1, 3, 9, 7)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["user"] == {"note": "test", "step": 3}
    assert meta["version"] == dds_fast.__version__
    assert meta["arch_args"]["base_width"] == 8
    assert os.listdir(path.parent) == ["model.safetensors"]  # no temporary file left


def test_loading_and_exporting_leave_the_callers_random_stream(net, tmp_path):
    """Both build layers whose random initial weights are replaced: the draws moved the
    caller's stream, so a script's later draws depended on whether it had loaded a model."""
    path = save(net, tmp_path / "model.safetensors")
    static = save(dds_fast.export_static(net), tmp_path / "static.safetensors")
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    load(path), load(static), dds_fast.export_static(net)
    assert torch.equal(torch.rand(3), expected)


def test_save_is_atomic_when_it_fails(net, tmp_path, monkeypatch):
    path = save(net, tmp_path / "model.safetensors")
    original = path.read_bytes()

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[:100])
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device"):
        save(net, path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("failure,kind,text", [
    (OSError(28, "No space left on device"), OSError, "No space left on device"),
    (PermissionError(1, "Operation not permitted"), PermissionError, "Operation not permitted"),
    (OSError("cannot write mode RGBA as JPEG"), OSError, "cannot write mode RGBA as JPEG"),  # Pillow's, no errno
])
def test_atomic_write_names_the_file_asked_for_whatever_step_fails(tmp_path, monkeypatch, failure, kind, text):
    """A writer's error, or the rename's, named the temporary file (its random name) or no file."""
    from dds_fast.checkpoint import atomic_write

    path = tmp_path / "out.png"

    def fail(tmp):
        raise failure

    with pytest.raises(kind, match=f"^(\\[Errno \\d+\\] )?cannot write {path}: {text}$") as raised:
        atomic_write(path, fail)
    assert raised.value.errno == failure.errno
    def refuse_rename(src, dst):  # (a rename's error names both files: the temporary one first)
        raise failure if failure.errno is None else type(failure)(failure.errno, failure.strerror, src, None, dst)

    monkeypatch.setattr(os, "replace", refuse_rename)
    with pytest.raises(kind, match=f"cannot write {path}: {text}"):
        atomic_write(path, lambda tmp: tmp.write_bytes(b"x"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failure", [FileNotFoundError(2, "No such file or directory", "/fonts/DejaVuSans.ttf"),
                                     io.UnsupportedOperation("not writable")])  # (an OSError and a ValueError)
def test_atomic_write_passes_an_error_about_another_file_or_of_another_kind_as_it_came(tmp_path, failure):
    from dds_fast.checkpoint import atomic_write

    def fail(tmp):
        raise failure

    with pytest.raises(type(failure)) as raised:
        atomic_write(tmp_path / "plot.png", fail)
    assert raised.value is failure and os.listdir(tmp_path) == []


def test_a_safetensors_serialisation_error_is_a_value_error_naming_the_file(net, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def refuse(tensors, metadata=None):
        raise SafetensorError("Error while serializing: some tensors share memory")

    monkeypatch.setattr(dds_fast.checkpoint, "serialize", refuse)
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'model.safetensors'}: .*share memory"):
        save(net, tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_flushes_the_file_before_the_rename_and_the_rename_after(net, tmp_path, monkeypatch):
    """Without the first fsync a power loss can leave the renamed file empty; without the
    second, the old file back."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    path = save(net, tmp_path / "model.safetensors")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert ".tmp" in events[0][1] and events[1][1] == str(path) and events[2][1] == str(tmp_path)


@pytest.mark.parametrize("change,message", [
    (lambda m: setattr(m.supernet.encoders[0][0], "negative_slope", 0.01),
     r"supernet.encoders.0.0.negative_slope is 0.01, but load would rebuild it as 0.2"),
    (lambda m: setattr(m.supernet.last, "activation", "relu"), r"supernet.last.activation is 'relu'.* as None"),
    (lambda m: setattr(m.gate.bn, "eps", 0.5), r"gate.bn.eps is 0.5, but load would rebuild it as 1e-05"),
    (lambda m: setattr(m.supernet.last, "stride", 2), r"supernet.last.stride is \(2, 2\).* as \(1, 1\)"),
])
def test_settings_changed_after_construction_are_refused_not_lost(change, message, tmp_path):
    """A checkpoint rebuilds the model from its constructor's arguments: a setting changed
    since would come back as built, computing something else, so save refuses it by name."""
    model = small_ddsnet()
    save(model, tmp_path / "as-built.safetensors")
    change(model)
    with pytest.raises(ValueError, match=rf"save: this DDSNet's {message}: a checkpoint keeps the constructor's"):
        save(model, tmp_path / "changed.safetensors")
    assert not (tmp_path / "changed.safetensors").exists()
    runs_otherwise = small_ddsnet()  # how it runs is not in the file (load's docstring): saved
    runs_otherwise.gate.backend = runs_otherwise.supernet.encoders[0][0].backend = "torch"
    runs_otherwise.supernet.last.negative_slope = 0.01  # read by no activation but LeakyReLU
    save(runs_otherwise, tmp_path / "runs-otherwise.safetensors")


def test_a_layer_width_set_apart_from_the_config_is_refused_by_save_and_export(net, tmp_path):
    from dds_fast import export_static

    layer = net.encoders[1][0]
    layer.active_out_channels = layer.active_out_channels + 8
    message = rf"SlimUNet's encoders.1.0 runs {layer.active_out_channels} filters, but its config sets group 'enc1.mid'"
    with pytest.raises(ValueError, match="save: " + message):
        save(net, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="export_static: " + message):
        export_static(net)
    assert not (tmp_path / "model.safetensors").exists()


def test_tensor_shapes_that_do_not_fit_the_header_are_named(net, tmp_path):
    from dds_fast import export_static

    static = export_static(net, net.space.smallest())
    path = save(static, tmp_path / "static.safetensors")
    rewrite(path, static.state_dict(), config=net.space.largest().to_json())
    with pytest.raises(CheckpointError, match=r"does not match SlimUNet: tensor shapes decoders.0.0.bias \(8,\) "
                                              r"\(expected \(24,\)\), .* and \d+ more$"):
        load(path)


def test_truncated_file(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load(path)


def test_a_file_one_byte_short_is_truncated(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_metadata(path)


def test_the_fingerprint_tells_shapes_apart():
    from dds_fast.checkpoint import weights_fingerprint

    flat = torch.arange(6.0)
    assert weights_fingerprint({"w": flat}) != weights_fingerprint({"w": flat.view(2, 3)})
    strided = flat.view(3, 2).t()  # the same weights in another memory layout
    assert weights_fingerprint({"w": strided}) == weights_fingerprint({"w": strided.contiguous()})


def test_a_static_export_without_its_config_is_refused_by_name(net, tmp_path):
    from dds_fast import export_static

    static = export_static(net, net.space.smallest())
    path = save(static, tmp_path / "static.safetensors")
    with safe_open(str(path), "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k != "config"}
    atomic_save_file(static.state_dict(), path, header)
    with pytest.raises(CheckpointError, match="holds a static export but no config"):
        load(path)


def flip_tensor_bytes(path):
    """Corrupts bytes of a safetensors file's tensor data, leaving its header readable."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start + 5, len(data), 97):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupt_tensor_data(net, tmp_path):
    """safetensors has no checksum: the one saved in the metadata finds what its reader cannot."""
    path = save(net, tmp_path / "model.safetensors")
    flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match=f"{path}.*checksum"):
        load(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load(path)


def test_plain_safetensors_file_is_not_ours(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a dds-fast checkpoint"):
        load(path)


def test_other_architecture(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds a SlimUNet, not a SlimDnCNN"):
        load(path, arch=SlimDnCNN)
    assert type(load(path, arch="SlimUNet")) is SlimUNet


def test_missing_key(net, tmp_path):
    path = tmp_path / "model.safetensors"
    save(net, path)
    rewrite(path, {k: v for k, v in net.state_dict().items() if k != "last.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \['last.bias'\]"):
        load(path)


def test_wrong_shapes_for_the_arguments(net, tmp_path):
    path = tmp_path / "model.safetensors"
    save(net, path)
    rewrite(path, net.state_dict(), arch_args=json.dumps({**net.arch_args, "base_width": 16}))
    with pytest.raises(CheckpointError, match="does not match SlimUNet"):
        load(path)


def test_arguments_too_large_to_build_are_a_checkpoint_error(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    rewrite(path, net.state_dict(), arch_args=json.dumps({**net.arch_args, "base_width": 10 ** 6}))
    with pytest.raises(CheckpointError, match=f"{path}: cannot build SlimUNet from its arguments"):
        load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_named(net, tmp_path, bad):
    path = save(net, tmp_path / "model.safetensors")
    tensors = net.state_dict()
    tensors["last.bias"] = tensors["last.bias"].clone()
    tensors["last.bias"][1] = bad
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=f"{path}: NaN or infinite values in last.bias$"):
        load(path)


def test_unknown_architecture_and_missing_file(net, tmp_path):
    path = tmp_path / "model.safetensors"
    save(net, path)
    rewrite(path, net.state_dict(), arch="ResNet50")
    with pytest.raises(CheckpointError, match="unknown architecture 'ResNet50'"):
        load(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        load(tmp_path)
    if Path(os.devnull).exists():  # it was said not to exist
        with pytest.raises(FileNotFoundError, match=f"checkpoint {os.devnull} is not a regular file"):
            load(os.devnull)


def test_save_rejects_unregistered_models_and_bad_metadata(net, tmp_path):
    with pytest.raises(ValueError, match="not a registered architecture"):
        save(torch.nn.Conv2d(1, 1, 1), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        save(net, tmp_path / "a.safetensors", bad=object())


def test_save_refuses_a_gated_network_whose_parts_load_would_rebuild_as_others(tmp_path):
    """load rebuilds a DDSNet's super-network by its registered name and its gate as a plain
    DynamicGate: a subclass of either would come back as another model."""
    from dds_fast import DDSNet, DynamicGate

    class SlimUNet(dds_fast.SlimUNet):  # the registered name, another class
        pass

    class NoisyGate(DynamicGate):
        pass

    for supernet, gate_class, message in [(SlimUNet(3, base_width=8, depth=2), DynamicGate, "super-network SlimUNet "
                                           "is not a registered architecture"),
                                          (dds_fast.SlimUNet(3, base_width=8, depth=2), NoisyGate,
                                           "gate is a NoisyGate; load rebuilds a DynamicGate")]:
        routes = [RoutingEntry(c, macs_per_pixel(supernet, c)) for c in (supernet.space.smallest(),
                                                                         supernet.space.largest())]
        dds = DDSNet(supernet, gate_class(supernet.stem_channels, 2), routes)
        with pytest.raises(ValueError, match=message):
            save(dds, tmp_path / "dds.safetensors")
    assert not (tmp_path / "dds.safetensors").exists()


def test_a_bf16_network_behind_an_fp32_gate_round_trips(tmp_path):
    """Each layer is cast as a whole; layers may differ (the gate runs in its input's dtype)."""
    from dds_fast import DDSNet, DynamicGate

    supernet = SlimUNet(in_channels=3, base_width=8, depth=2)
    routes = [RoutingEntry(c, macs_per_pixel(supernet, c)) for c in (supernet.space.smallest(),
                                                                     supernet.space.largest())]
    dds = DDSNet(supernet, DynamicGate(supernet.stem_channels, 2), routes).eval()
    dds.supernet.to(torch.bfloat16)
    loaded = load(save(dds, tmp_path / "mixed.safetensors")).eval()
    assert loaded.supernet.last.weight.dtype == torch.bfloat16 and loaded.gate.fc1.weight.dtype == torch.float32
    x = torch.rand(1, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), dds(x))


def test_save_names_tied_weights_and_arguments_json_cannot_hold(net, tmp_path, monkeypatch):
    tied = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    assert tied.layers[1].weight.shape == tied.layers[2].weight.shape
    tied.layers[2].weight = tied.layers[1].weight
    with pytest.raises(ValueError, match=r"cannot write .*tied.safetensors: layers.2.weight is layers.1.weight "
                                         r"\(tied weights\)"):
        save(tied, tmp_path / "tied.safetensors")
    # channels_last: the copies to a contiguous layout would hide the tie (as the copies to the CPU of a CUDA model)
    with pytest.raises(ValueError, match="tied weights"):
        save(tied.to(memory_format=torch.channels_last), tmp_path / "tied.safetensors")
    assert not (tmp_path / "tied.safetensors").exists()
    arch_args = net.arch_args
    monkeypatch.setattr(SlimUNet, "arch_args", property(lambda self: {**arch_args, "base_width": {8}}))
    with pytest.raises(ValueError, match="arch_args must be JSON-serialisable"):
        save(net, tmp_path / "odd.safetensors")


@pytest.mark.parametrize("key,dtype,message", [
    ("last.bias", torch.float64, r"last's tensors of \['torch.float32', 'torch.float64'\]"),
    ("last.bias", torch.int64, "last.bias torch.int64"),
    ("last.bias", torch.float8_e4m3fn, "last.bias torch.float8_e4m3fn"),
])
def test_tensors_of_dtypes_the_model_cannot_hold_are_named(net, tmp_path, key, dtype, message):
    path = save(net, tmp_path / "model.safetensors")
    tensors = net.state_dict()
    tensors[key] = tensors[key].to(dtype)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=f"{path}: tensors of dtypes its model cannot hold: {message}"):
        load(path)


def test_an_integer_buffer_of_another_integer_dtype_is_named(tmp_path):
    """BatchNorm's batch count is int64: an int32 one is no float to cast, but a misfit."""
    dds = small_ddsnet()
    path = save(dds, tmp_path / "dds.safetensors")
    tensors = dds.state_dict()
    tensors["gate.bn.num_batches_tracked"] = tensors["gate.bn.num_batches_tracked"].to(torch.int32)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match="cannot hold: gate.bn.num_batches_tracked torch.int32"):
        load(path)


def test_saved_file_has_ordinary_permissions(net, tmp_path):
    umask = os.umask(0o022)
    try:
        path = save(net, tmp_path / "model.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_static_export_round_trips(net, tmp_path):
    net.routing_space = [RoutingEntry(net.space.smallest(), macs_per_pixel(net, net.space.smallest()))]
    static = dds_fast.export_static(net)
    loaded = load(save(static, tmp_path / "static.safetensors"))
    assert type(loaded) is SlimUNet and loaded.is_static and loaded.get_config() == net.get_config()
    assert loaded.routing_space == net.routing_space
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in static.state_dict().items()}
    x = torch.rand(1, 3, 9, 7)
    torch.testing.assert_close(loaded(x), static(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="static"):
        loaded.set_config(net.space.largest())
    assert macs_per_pixel(loaded) == macs_per_pixel(net)


def test_a_routing_space_that_load_would_refuse_is_refused_as_it_is_set(net, tmp_path):
    other = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    with pytest.raises(ValueError, match=r"SlimUNet: routing_space\[0\] does not fit it: .*missing"):
        net.routing_space = [RoutingEntry(other.space.largest(), 1.0)]
    with pytest.raises(ValueError, match="SlimUNet: the routing space must be a sequence of RoutingEntry"):
        net.routing_space = [{"config": net.space.largest().to_dict(), "macs_per_pixel": 1.0}]
    assert net.routing_space is None
    routes = [RoutingEntry(net.space.largest(), 1.0)]
    net.routing_space = routes
    assert net.routing_space == tuple(routes)


def test_save_names_a_folder_given_for_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"cannot write {tmp_path}: it is a folder"):
        save(SlimDnCNN(in_channels=1, base_width=8, depth=3), tmp_path)


def test_save_rejects_static_layers_it_could_not_rebuild(net, tmp_path):
    attended = dds_fast.AttentionSupernet(net, dds_fast.DynamicGate(net.stem_channels, 2))
    with pytest.raises(ValueError, match="export_static of a SlimNet can be saved, not of a AttentionSupernet"):
        save(dds_fast.export_static(attended), tmp_path / "a.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_tensors_load_back_in_the_dtype_they_were_saved_in(net, tmp_path, dtype):
    loaded = load(save(net.to(dtype), tmp_path / "model.safetensors"))
    assert {t.dtype for t in loaded.state_dict().values()} == {dtype}
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("field,value,message", [
    ("config", "[1, 2]", "'config' must be a JSON object, got '\\[1, 2\\]'"),
    ("arch_args", '"SlimUNet"', "'arch_args' must be a JSON object"),
    ("routing_space", '{"config": {}}', "'routing_space' must be a JSON array"),
    ("routing_space", '[{"config": [8], "macs_per_pixel": 1}]', "malformed metadata"),
    ("routing_space", '[{"config": {"enc0.mid": 8}, "macs_per_pixel": 1e999}]', "malformed metadata"),
    ("routing_space", '[{"config": {"enc0.mid": 8}, "macs_per_pixel": 1' + '0' * 400 + '}]', "malformed metadata"),
    ("static", '"yes"', "'static' must be a JSON true or false"),
    ("config", '{"enc0.mid": 8, "enc0.mid": 16}', r"malformed metadata: an object repeats the key\(s\) \['enc0.mid'\]"),
    # well formed, but not for this network
    ("config", "{}", "its config does not fit SlimUNet: config does not match the network's groups"),
    ("config", '{"enc0.mid": 8}', "missing"),
    ("routing_space", '[{"config": {"nope": 8}, "macs_per_pixel": 1}]', "its routing space does not fit SlimUNet"),
])
def test_malformed_or_unfitting_header_fields(net, tmp_path, field, value, message):
    path = save(net, tmp_path / "model.safetensors")
    rewrite(path, net.state_dict(), **{field: value})
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        load(path)


@pytest.mark.parametrize("field", ["version", "arch", "arch_args"])
def test_a_header_without_a_required_entry_names_it(net, tmp_path, field):
    path = save(net, tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    del header[field]
    atomic_save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path, header)
    with pytest.raises(CheckpointError, match=f"{path} has malformed metadata: no '{field}' entry$"):
        load(path)


def test_a_ddsnet_header_routing_space_must_agree_with_its_arguments(tmp_path):
    dds = small_ddsnet()
    routes = list(dds.routing_space)
    path = save(dds, tmp_path / "dds.safetensors")
    assert load(path).routing_space == tuple(routes)
    swapped = json.dumps([entry.to_dict() for entry in reversed(routes)])
    rewrite(path, dds.state_dict(), routing_space=swapped)
    with pytest.raises(CheckpointError, match="routing space differs"):
        load(path)


def test_a_bad_map_location_is_reported_as_such(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="map_location 'gpu9' is not a torch device") as raised:
        load(path, map_location="gpu9")
    assert not isinstance(raised.value, CheckpointError)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot move the model to map_location 'cuda'") as raised:
            load(path, map_location="cuda")
        assert not isinstance(raised.value, CheckpointError)
    assert load(path, map_location=torch.device("cpu")).get_config() == net.get_config()


def test_a_loaded_model_keeps_its_weights_when_the_file_is_overwritten_in_place(net, tmp_path):
    """Tensors read through a memory map followed the file: a checkpoint deployed over the
    old one with cp changed a running model's weights (or killed it with SIGBUS)."""
    path = save(net, tmp_path / "model.safetensors")
    model = load(path)
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place, as cp does: the same inode
        f.seek(8 + int.from_bytes(data[:8], "little"))
        f.write(bytes(len(data) - f.tell()))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_kill_while_saving_leaves_only_what_remove_leftovers_deletes(tmp_path):
    """safetensors' save_file writes a temporary file of its own, which a kill left behind
    where remove_leftovers does not look."""
    import signal
    import subprocess
    import sys
    import time

    from dds_fast.checkpoint import remove_leftovers

    path = tmp_path / "state.safetensors"
    # (no checksum: the writes, where the temporary files live, take the loop's time)
    script = (f"import torch; from dds_fast import checkpoint\n"
              f"checkpoint.weights_fingerprint = lambda tensors: ''\n"
              f"tensors = {{'w': torch.rand(16_000_000)}}\n"
              f"while True:\n    checkpoint.atomic_save_file(tensors, {str(path)!r}, {{}}); print('saved', flush=True)\n")
    for delay in (0.0, 0.03, 0.07):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "saved\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    remove_leftovers(path)
    assert os.listdir(tmp_path) == [path.name]
    assert load_file(path)["w"].shape == (16_000_000,)  # (its checksum is none: not read_tensors)


def test_a_checkpoint_from_a_later_format_revision_is_refused(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    assert read_metadata(path)["arch"] == "SlimUNet"
    rewrite(path, net.state_dict(), format_version="2", version="9.0")
    with pytest.raises(CheckpointError, match=f"{path} was written by dds-fast 9.0 in format revision 2; .* "
                                              f"reads revisions up to 1"):
        load(path)


@pytest.mark.parametrize("revision", ["\u00b2", "", "9" * 5000])
def test_a_format_revision_that_is_no_number_is_malformed(net, tmp_path, revision):
    path = save(net, tmp_path / "model.safetensors")
    # ("²".isdigit(), and int() refuses it; 5,000 digits are past what int() reads from text)
    rewrite(path, net.state_dict(), format_version=revision)
    with pytest.raises(CheckpointError, match=f"{path} has malformed metadata: format_version '{revision[:20]}"):
        load(path)


def test_a_header_changed_since_the_save_is_refused_as_corrupt(net, tmp_path):
    """Its tensors' checksum does not cover the header: a config or an argument changed in
    place (the JSON still valid) loaded as another model, computing something else."""
    from dds_fast.checkpoint import SHIPPED_MODEL

    path = save(net, tmp_path / "model.safetensors")
    data = path.read_bytes()
    config = json.dumps(net.get_config().to_dict()).encode()
    width = str(net.get_config()["enc0"]).encode()
    changed = config.replace(b'"enc0": ' + width, b'"enc0": ' + (b"8" if width != b"8" else b"9").rjust(len(width)))
    assert changed != config and len(changed) == len(config)
    escaped = config.replace(b'"', b'\\"'), changed.replace(b'"', b'\\"')  # (as JSON within the header's JSON)
    assert data.count(escaped[0]) == 1
    path.write_bytes(data.replace(*escaped))
    for read in (load, read_metadata):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is not a readable safetensors file .*its "
                                                  f"metadata do not match the checksum saved with them"):
            read(path)
    # files from before the header's checksum (the shipped model's) load as they did
    with safe_open(str(SHIPPED_MODEL), "pt") as f:
        assert "metadata_sha256" not in f.metadata()
    load(SHIPPED_MODEL)


def test_a_header_claimed_past_the_limit_says_so(tmp_path):
    from dds_fast import checkpoint

    path = tmp_path / "big.safetensors"
    path.write_bytes((checkpoint._MAX_HEADER + 1).to_bytes(8, "little") + b"{}" + bytes(64))
    with pytest.raises(CheckpointError, match=f"its header claims {checkpoint._MAX_HEADER + 1} bytes, more than the "
                                              f"{checkpoint._MAX_HEADER} a header may hold"):
        read_metadata(path)


def test_save_refuses_what_load_would_refuse(net, tmp_path):
    """A file save wrote, load must read: a buffer or a parametrization added after the net was
    built (load rebuilds it from its arguments), a NaN weight."""
    extra = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    extra.register_buffer("step", torch.zeros(()))
    with pytest.raises(ValueError, match=r"save: load could not rebuild this SlimDnCNN from .*: .*missing keys \[\], "
                                         r"unexpected keys \['step'\]"):
        save(extra, tmp_path / "extra.safetensors")
    normed = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    torch.nn.utils.parametrizations.weight_norm(normed.last)
    with pytest.raises(ValueError, match=r"unexpected keys \['last.parametrizations.weight.original0'"):
        save(normed, tmp_path / "normed.safetensors")
    with torch.no_grad():
        net.last.bias[0] = float("nan")
    with pytest.raises(ValueError, match="save: load could not rebuild this SlimUNet .*NaN or infinite values in "
                                         "last.bias"):
        save(net, tmp_path / "nan.safetensors")
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temporary left


def test_deeply_nested_user_metadata_is_refused_by_save(net, tmp_path):
    nested = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(ValueError, match="save: metadata must be JSON-serialisable: maximum recursion depth"):
        save(net, tmp_path / "model.safetensors", deep=nested)


def test_save_takes_a_name_with_a_long_suffix_and_a_loop_of_links_is_an_os_error(net, tmp_path):
    path = save(net, tmp_path / ("m." + "a" * 150))
    assert load(path).state_dict().keys() == net.state_dict().keys()
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    with pytest.raises(OSError, match=f"cannot write {loop}"):
        save(net, loop)


def test_deeply_nested_metadata_is_a_checkpoint_error(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    rewrite(path, net.state_dict(), user='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=f"{path} has malformed metadata"):
        load(path)


def test_a_ddsnet_attention_flag_must_be_a_boolean(tmp_path):
    dds = small_ddsnet(attention=False)
    path = save(dds, tmp_path / "dds.safetensors")
    with safe_open(str(path), "pt") as f:
        args = json.loads(f.metadata()["arch_args"])
    rewrite(path, dds.state_dict(), arch_args=json.dumps(dict(args, attention="false")))
    with pytest.raises(CheckpointError, match="attention must be true or false, got 'false'"):
        load(path)


def test_saving_over_a_file_keeps_its_permissions_and_through_a_link_keeps_the_link(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    os.chmod(path, 0o600)
    save(net, path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    link = tmp_path / "latest.safetensors"
    link.symlink_to(path.name)
    save(net, link)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["latest.safetensors", "model.safetensors"]
    assert load(link).get_config() == net.get_config()


def test_long_file_names_are_saved_and_their_leftovers_kept_apart(net, tmp_path):
    """The temporary file's name adds to the target's: it must stay within the file system's
    255 bytes for a name that fits them (in bytes: 78 x 'あ' is 234), and names alike in their
    first bytes must not share temporaries, which remove_leftovers of one would delete."""
    from dds_fast.checkpoint import atomic_write, remove_leftovers

    for name in ("n" * 230 + ".safetensors", "あ" * 78 + ".safetensors"):
        path = tmp_path / name
        save(net, path)
        assert path.name in os.listdir(tmp_path) and load(path).get_config() == net.get_config()
    first, second = tmp_path / ("r" * 120 + "-seed1.json"), tmp_path / ("r" * 120 + "-seed2.json")

    def interrupted(tmp):  # a writer of `second` still at work while `first`'s cleans up
        remove_leftovers(first)
        assert tmp.exists()
        tmp.write_text("{}")

    atomic_write(second, interrupted)
    assert second.read_text() == "{}"


def test_read_metadata_notices_a_truncated_file(net, tmp_path):
    path = save(net, tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=f"{path} is not a readable .*truncated"):
        read_metadata(path)


def test_an_architecture_name_cannot_be_taken_twice():
    """A user's class registered as SlimUNet built every SlimUNet checkpoint, the shipped
    model's super-network included."""
    from dds_fast import ARCHITECTURES, register_architecture

    class SlimUNet(dds_fast.SlimUNet):
        pass

    with pytest.raises(ValueError, match="the name SlimUNet is taken by dds_fast.nets.SlimUNet; give "):
        register_architecture(SlimUNet)
    assert ARCHITECTURES["SlimUNet"] is dds_fast.SlimUNet
    assert register_architecture(dds_fast.SlimUNet) is dds_fast.SlimUNet


class OwnGateDnCNN(SlimDnCNN):
    """A user's network with an attribute of its own named gate, no DynamicGate."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = torch.nn.Parameter(torch.ones(1))


def test_a_network_with_its_own_gate_attribute_is_no_gated_network_to_save(tmp_path, monkeypatch):
    # registered for this test alone (another test module imports this one under a second name)
    monkeypatch.setitem(dds_fast.ARCHITECTURES, "OwnGateDnCNN", OwnGateDnCNN)
    torch.manual_seed(0)
    model = OwnGateDnCNN(in_channels=1, base_width=8, depth=3)
    loaded = load(save(model, tmp_path / "own.safetensors"))
    assert isinstance(loaded, OwnGateDnCNN) and torch.equal(loaded.gate, model.gate)


def test_a_ddsnet_in_static_mode_loads_in_it(tmp_path):
    """set_budget is how the model runs: a checkpoint keeps it (a dynamic one names no budget,
    as files of earlier versions, which load in dynamic mode)."""
    from dds_fast import DDSNet, DynamicGate

    torch.manual_seed(2)
    supernet = SlimUNet(in_channels=3, base_width=8, depth=2)
    routes = [RoutingEntry(c, macs_per_pixel(supernet, c), psnr)
              for c, psnr in ((supernet.space.smallest(), 28.0), (supernet.space.largest(), 30.0))]
    dds = DDSNet(supernet, DynamicGate(supernet.stem_channels, 2), routes).eval()
    dynamic = save(dds, tmp_path / "dynamic.safetensors")
    with safe_open(str(dynamic), "pt") as f:
        assert "budget_index" not in json.loads(f.metadata()["arch_args"])
    assert load(dynamic).budget_index is None
    dds.set_budget(dds.static_macs_per_pixel(0))
    static = save(dds, tmp_path / "static.safetensors")
    loaded = load(static).eval()
    assert loaded.budget_index == 0
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dds(x), rtol=0, atol=0)
    with safe_open(str(static), "pt") as f:
        args = json.loads(f.metadata()["arch_args"])
    rewrite(static, dds.state_dict(), arch_args=json.dumps(dict(args, budget_index=2)))
    with pytest.raises(CheckpointError, match="budget_index 2 is past the 2 routes"):
        load(static)


def test_the_weights_fingerprint_covers_names_dtypes_and_values():
    """A corrupt header that swapped two same-shape tensors' names, or a dtype field, left the
    bytes as they were: the digest must still change."""
    from dds_fast.checkpoint import weights_fingerprint

    a, b = torch.arange(6.0).view(2, 3), torch.arange(6.0).view(2, 3) + 1
    assert weights_fingerprint({"a": a, "b": b}) != weights_fingerprint({"a": b, "b": a})
    assert weights_fingerprint({"a": a}) != weights_fingerprint({"b": a})
    assert weights_fingerprint({"a": a}) != weights_fingerprint({"a": a.view(torch.int32)})
    assert weights_fingerprint({"a": a}) == weights_fingerprint({"a": a.t().contiguous().t()})


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    """Ctrl-C inside a write (a KeyboardInterrupt, no Exception) left a stray temporary."""
    from dds_fast.checkpoint import atomic_write

    def interrupted(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.safetensors", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_empty_buffers_are_not_tied_weights(tmp_path):
    """Every empty tensor has address 0: two were refused as one tensor saved twice."""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    net.register_buffer("first_empty", torch.empty(0))
    net.register_buffer("second_empty", torch.zeros(0, 3))
    from dds_fast.checkpoint import _refuse_tied

    _refuse_tied(net.state_dict(), tmp_path / "n.safetensors")  # no error
    shared = torch.ones(3)
    with pytest.raises(ValueError, match="tied weights"):
        _refuse_tied({"a": shared, "b": shared}, tmp_path / "n.safetensors")
