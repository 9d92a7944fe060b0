import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dds_fast import SlimConv2d, SlimDnCNN, SlimUNet, convert_model, macs_per_pixel, trace_convs
from dds_fast.config import SubnetConfig


def counted_macs_per_pixel(model, h, w):
    """FlopCounterMode counts 2 FLOPs per multiply-add."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, model.in_channels, h, w))
    return counter.get_total_flops() / 2 / (h * w)


@pytest.mark.parametrize("make", [
    lambda: SlimUNet(in_channels=3, base_width=8, depth=3),
    lambda: SlimUNet(in_channels=1, base_width=16, depth=4),
    lambda: SlimDnCNN(in_channels=3, base_width=8, depth=5),
])
def test_macs_match_flop_counter_on_real_forward_passes(make):
    net = make()
    generator = torch.Generator().manual_seed(0)
    configs = [net.space.largest(), net.space.smallest()] + [net.space.sample(generator) for _ in range(3)]
    for config in configs:
        net.set_config(config)
        assert macs_per_pixel(net) == counted_macs_per_pixel(net, 32, 48)
        assert macs_per_pixel(net, config) == macs_per_pixel(net)


def test_macs_of_one_layer_by_hand():
    conv = SlimConv2d(16, 32, 3, stride=2, padding=1)
    conv.active_out_channels = 8
    # 8 filters x 5 channels x 9 taps, on a quarter of the pixels
    assert macs_per_pixel(conv, input_shape=(5, 8, 8)) == 8 * 5 * 9 / 4


class ConvsCalledByKeywordAndUnbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.second(self.first(input=x)[0])[None]  # the second conv sees one unbatched image


@pytest.mark.parametrize("convert", [False, True])
def test_macs_of_non_square_kernels_count_both_sides(convert):
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 5), padding=(0, 2)), nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
    model = convert_model(model) if convert else model
    model.in_channels = 3  # (for counted_macs_per_pixel)
    assert macs_per_pixel(model, input_shape=(3, 6, 7)) == 4 * 3 * 5 + 4 * 4 * 3 == counted_macs_per_pixel(model, 6, 7)


@pytest.mark.parametrize("convert", [False, True])
def test_macs_of_convs_called_by_keyword_or_unbatched(convert):
    model = ConvsCalledByKeywordAndUnbatched()
    model = convert_model(model) if convert else model
    assert macs_per_pixel(model, input_shape=(3, 5, 6)) == 4 * 3 * 9 + 2 * 4


def test_macs_of_a_dncnn_by_hand():
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    cfg = net.space.largest().replace(layer0=8, layer1=16)
    expected = 9 * (1 * 8 + 8 * 16 + 16 * 1)
    assert macs_per_pixel(net, cfg) == expected
    assert net.get_config() == net.space.largest()  # counting another config leaves the net as it was


def test_smaller_configs_cost_less():
    net = SlimUNet(base_width=8, depth=3)
    assert macs_per_pixel(net, net.space.smallest()) < macs_per_pixel(net, net.space.uniform(0.5)) < macs_per_pixel(net)


def test_counting_keeps_training_mode_and_batchnorm_statistics():
    model = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)))
    model.train()
    before = model[1].running_mean.clone()
    assert macs_per_pixel(model, input_shape=(3, 6, 6)) == 3 * 8 * 9 + 8 * 2
    assert model.training and model[1].training
    torch.testing.assert_close(model[1].running_mean, before)


def test_trace_records_concat_segments():
    net = SlimUNet(base_width=8, depth=2)
    calls, pixels = trace_convs(net, net.space.smallest())
    concat = [c for c in calls if len(c.in_widths) == 2]
    assert len(concat) == 1 and concat[0].name == "decoders.0.0"
    assert pixels == 4 * 4


def test_errors():
    with pytest.raises(ValueError, match="input_shape"):
        macs_per_pixel(nn.Sequential(SlimConv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="no width configs"):
        macs_per_pixel(nn.Sequential(SlimConv2d(3, 3, 1)), config={"a": 1}, input_shape=(3, 4, 4))


@pytest.mark.parametrize("model,shape", [
    (SlimConv2d(4, 8, 3, padding=1), (4, 0, 8)),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)), (8, 8)),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)), (1, 1, 8, 8)),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)), (1, 8.5, 8)),
])
def test_counting_rejects_an_input_shape_that_is_not_c_h_w(model, shape):
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\) of positive sizes"):
        macs_per_pixel(model, input_shape=shape)


def test_counting_leaves_the_global_random_stream_alone():
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    macs_per_pixel(net)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_a_model_the_default_input_does_not_fit_asks_for_an_input_shape():
    conv = convert_model(nn.Conv2d(3, 4, 3))  # unpadded: the default 2x2 input is smaller than its kernel
    with pytest.raises(ValueError, match=r"pass input_shape=\(C, H, W\)"):
        macs_per_pixel(conv)
    assert macs_per_pixel(conv, input_shape=(3, 6, 6)) == 4 * 3 * 9 * 16 / 36
    # a config that does not fit is its own error, not the default input's
    net = SlimUNet(in_channels=3, base_width=4, depth=2)
    with pytest.raises(ValueError, match=r"config: group 'enc0.mid' width 999") as raised:
        macs_per_pixel(net, SubnetConfig.from_dict({**net.space.largest().to_dict(), "enc0.mid": 999}))
    assert "input_shape" not in str(raised.value)


def test_running_out_of_memory_while_counting_is_not_called_a_misfit(monkeypatch):
    net = SlimDnCNN(1, base_width=8, depth=3)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")

    monkeypatch.setattr(net.layers[1], "forward", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        macs_per_pixel(net)


def test_macs_of_a_grouped_conv_count_each_filter_s_own_inputs():
    """A depthwise conv's filter reads one channel: counted as reading all, it cost 16x."""
    depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)
    assert macs_per_pixel(depthwise, input_shape=(16, 8, 8)) == 16 * 9
    assert macs_per_pixel(grouped, input_shape=(16, 8, 8)) == 8 * 4 * 9
    assert macs_per_pixel(grouped, input_shape=(16, 8, 8)) == counted_macs_per_pixel(grouped, 8, 8)
