import json
import math

import numpy as np
import pytest
import torch

from dds_fast import ChannelGroup, RoutingEntry, SlimDnCNN, SubnetConfig, WidthSpace, make_divisible, width_choices


@pytest.mark.parametrize("value,divisor,expected", [
    (48, 8, 48), (47, 8, 48), (3.2, 8, 8), (12, 8, 16), (20, 8, 24), (100, 8, 104), (99, 8, 96), (33, 16, 32), (1, 1, 1),
])
def test_make_divisible(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


@pytest.mark.parametrize("value,divisor,min_value,expected", [(2, 8, 1, 8), (3, 8, 2, 8), (20, 8, 32, 32), (47, 8, 4, 48)])
def test_make_divisible_keeps_to_the_multiples_above_a_small_min_value(value, divisor, min_value, expected):
    assert make_divisible(value, divisor, min_value=min_value) == expected


def test_make_divisible_never_drops_more_than_ten_percent():
    for value in range(8, 500):
        assert make_divisible(value) >= 0.9 * value


@pytest.mark.parametrize("value,divisor", [(0, 8), (-3, 8), (10, 0), (float("inf"), 8), (float("nan"), 8),
                                           (10, 2.5), (10, True), ("10", 8)])
def test_make_divisible_rejects_bad_arguments(value, divisor):
    with pytest.raises(ValueError, match="make_divisible"):
        make_divisible(value, divisor)
    with pytest.raises(ValueError, match="make_divisible: min_value must be an int >= 1, got 9.5"):
        make_divisible(12, 8, 9.5)


def test_configs_and_spaces_refuse_what_is_not_a_group_name_or_a_group():
    with pytest.raises(ValueError, match=r"SubnetConfig: group names must be strings, got \[1\]"):
        SubnetConfig.from_dict({1: 8})  # (it became the group '1')
    with pytest.raises(ValueError, match="SubnetConfig: width of group 'a' must be a positive int"):
        SubnetConfig((("a", torch.tensor(8, device="meta")),))
    for groups in ([1, 2], None):
        with pytest.raises(ValueError, match="WidthSpace: groups must be ChannelGroups"):
            WidthSpace(groups)


def test_width_choices_follow_the_paper():
    # base 32: super-network 1.5x = 48, smallest 0.2x rounded to 8, steps of 8
    assert width_choices(32) == (8, 16, 24, 32, 40, 48)
    assert width_choices(64) == (16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96)
    with pytest.raises(ValueError, match="ratios"):
        width_choices(32, width_mult=0.5, min_ratio=0.8)


def space():
    return WidthSpace([ChannelGroup("a", 24, (8, 16, 24)), ChannelGroup("b", 48, width_choices(32))])


def test_config_is_a_hashable_json_value():
    cfg = SubnetConfig.from_dict({"a": 8, "b": 40})
    same = SubnetConfig.from_json(cfg.to_json())
    assert cfg == same and hash(cfg) == hash(same) and len({cfg, same}) == 1
    assert json.loads(cfg.to_json()) == {"a": 8, "b": 40}
    assert cfg["b"] == 40 and list(cfg) == ["a", "b"] and len(cfg) == 2
    assert cfg.replace(a=16) == SubnetConfig.from_dict({"a": 16, "b": 40})
    with pytest.raises(KeyError):
        cfg["c"]
    with pytest.raises(KeyError):
        cfg.replace(c=3)


def test_config_is_a_mapping_whose_equality_ignores_group_order():
    cfg = SubnetConfig.from_dict({"a": 8, "b": 40})
    reordered = SubnetConfig.from_dict({"b": 40, "a": 8})
    assert dict(cfg) == {**cfg} == {"a": 8, "b": 40}
    assert list(cfg.items()) == [("a", 8), ("b", 40)] and "a" in cfg and "c" not in cfg
    assert cfg.get("c", 3) == 3
    assert cfg == reordered and hash(cfg) == hash(reordered) and len({cfg, reordered}) == 1
    assert cfg != SubnetConfig.from_dict({"a": 8, "b": 32}) and cfg != SubnetConfig.from_dict({"a": 8})
    assert cfg != {"a": 8, "b": 40}  # a config, not any mapping of the same items
    space = WidthSpace([ChannelGroup("a", 16, (8, 16)), ChannelGroup("b", 40, (24, 40))])
    assert space.validate(reordered) == reordered


@pytest.mark.parametrize("widths", [{"a": 0}, {"a": -8}, {"a": 2.5}, {"a": True}])
def test_config_rejects_non_positive_int_widths(widths):
    with pytest.raises(ValueError, match="group 'a'"):
        SubnetConfig(tuple(widths.items()))


@pytest.mark.parametrize("widths", [5, None, ("a", 8), [("a", 8, 1)]])
def test_config_rejects_what_are_not_pairs(widths):
    with pytest.raises(ValueError, match="SubnetConfig: widths must be \\(group, width\\) pairs"):
        SubnetConfig(widths)


@pytest.mark.parametrize("data", [{}, {"config": {"a": 8}}, [("config", {"a": 8})], None])
def test_routing_entry_from_dict_names_what_it_needs(data):
    with pytest.raises(ValueError, match="RoutingEntry: needs a mapping with 'config' and 'macs_per_pixel'"):
        RoutingEntry.from_dict(data)


@pytest.mark.parametrize("max_width, choices, what", [(8.0, (4, 8), "max_width"), (True, (1,), "max_width"),
                                                      (8, (4.0, 8), "each choice"), (8, 8, "choices must be")])
def test_channel_group_takes_int_widths_only(max_width, choices, what):
    with pytest.raises(ValueError, match=f"group 'a'.*{what}"):
        ChannelGroup("a", max_width, choices)


def test_space_largest_smallest_uniform():
    s = space()
    assert s.largest() == SubnetConfig.from_dict({"a": 24, "b": 48})
    assert s.smallest() == SubnetConfig.from_dict({"a": 8, "b": 8})
    assert s.uniform(0.5) == SubnetConfig.from_dict({"a": 16, "b": 24})
    assert s.uniform(1.0) == s.largest()
    for bad in (0, 1.5, float("nan"), True, "0.5", torch.tensor(0.5)):
        with pytest.raises(ValueError, match="uniform: ratio must be"):
            s.uniform(bad)


def test_sample_is_reproducible_non_uniform_and_allowed():
    s = space()
    draws = [s.sample(torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert draws[:5] == [s.sample(torch.Generator().manual_seed(seed)) for seed in range(5)]
    for cfg in draws:
        assert cfg["a"] in s["a"].choices and cfg["b"] in s["b"].choices
    assert len(set(draws)) > 10
    # non-uniform: some draw puts the two groups at different ratios of their maxima
    assert any(cfg["a"] / 24 != cfg["b"] / 48 for cfg in draws)


def test_validate_names_what_is_wrong():
    s = space()
    assert s.validate({"b": 16, "a": 8}) == SubnetConfig.from_dict({"a": 8, "b": 16})
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        s.validate({"a": 8})
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        s.validate({"a": 8, "b": 8, "c": 8})
    with pytest.raises(ValueError, match=r"'b' width 56 outside \[1, 48\]"):
        s.validate({"a": 8, "b": 56})
    with pytest.raises(ValueError, match=r"'a' width '8' is not an integer"):
        s.validate({"a": "8", "b": 16})
    for bad in (None, 5, "a", [("a", 8), ("b", 16)]):  # dict() took the list; the rest failed in dict()
        with pytest.raises(ValueError, match="config must be a SubnetConfig or a mapping of group names to widths"):
            s.validate(bad)
    # tensors of any dtype have __index__-like conversions: only integer ones are widths
    for bad in (torch.tensor(8.7), torch.tensor(True), np.bool_(True)):
        with pytest.raises(ValueError, match="'a' width .* is not an integer"):
            s.validate({"a": bad, "b": 16})
    assert s.validate({"a": torch.tensor(8), "b": np.int64(16)}) == SubnetConfig.from_dict({"a": 8, "b": 16})
    with pytest.raises(ValueError, match=r"group names must be strings, got \[1\]"):
        SubnetConfig(((1, 8),))


def test_groups_and_routing_entries():
    with pytest.raises(ValueError, match="ascending"):
        ChannelGroup("x", 16, (16, 8))
    with pytest.raises(ValueError, match="end at the maximum"):
        ChannelGroup("x", 16, (8,))
    with pytest.raises(ValueError, match="duplicate"):
        WidthSpace([ChannelGroup("x", 8, (8,)), ChannelGroup("x", 8, (8,))])
    entry = RoutingEntry(SubnetConfig.from_dict({"a": 8}), 1234.5, 30.1)
    assert RoutingEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry
    numpy_entry = RoutingEntry(entry.config, np.float32(1234.5), np.float64(30.1))
    assert numpy_entry == entry and type(numpy_entry.macs_per_pixel) is float
    for macs, psnr in ((True, None), (1.0, True), (float("inf"), None), (torch.tensor(1.0), None)):
        with pytest.raises(ValueError, match="RoutingEntry"):
            RoutingEntry(entry.config, macs, psnr)
    # a mapping, as set_config takes one, is converted: to_dict (and so save) needs a SubnetConfig
    assert RoutingEntry({"a": 8}, 1234.5, 30.1) == entry and RoutingEntry({"a": 8}, 1234.5, 30.1).to_dict()
    with pytest.raises(ValueError, match="RoutingEntry: config must be a SubnetConfig or a mapping"):
        RoutingEntry([("a", 8)], 1234.5)


@pytest.mark.parametrize("width", [12.7, 8.0, "8", True, None])
def test_from_dict_and_json_reject_widths_that_are_not_integers(width):
    with pytest.raises(ValueError, match=f"width of group 'enc0' must be a positive int, got {width!r}"):
        SubnetConfig.from_dict({"enc0": width})
    with pytest.raises(ValueError, match="width of group 'enc0'"):
        SubnetConfig.from_json('{"enc0": 12.7}')


@pytest.mark.parametrize("text", ["null", "[1, 2]", '"abc"'])
def test_from_json_rejects_what_is_not_an_object(text):
    with pytest.raises(ValueError, match="widths must be a mapping of group names to ints"):
        SubnetConfig.from_json(text)


def test_from_json_refuses_a_repeated_group():
    with pytest.raises(ValueError, match=r"repeats the key\(s\) \['enc0'\]"):
        SubnetConfig.from_json('{"enc0": 8, "enc1": 16, "enc0": 24}')


def test_from_dict_the_constructor_and_replace_take_integer_types():
    plain = SubnetConfig((("a", 8), ("b", 16)))
    for config in (SubnetConfig.from_dict({"a": np.int64(8), "b": torch.tensor(16)}),
                   SubnetConfig((("a", np.int32(8)), ("b", torch.tensor(16)))), plain.replace(a=np.int64(8))):
        assert config == plain and hash(config) == hash(plain)
        assert all(type(width) is int for _, width in config.widths)
    with pytest.raises(ValueError, match="width of group 'a' must be a positive int, got tensor"):
        SubnetConfig((("a", torch.tensor(8.0)),))


def test_config_from_lists_is_the_same_hashable_value():
    config = SubnetConfig([["a", 8], ["b", 16]])
    assert config == SubnetConfig((("a", 8), ("b", 16)))
    assert {config: 1}[SubnetConfig((("a", 8), ("b", 16)))] == 1
    with pytest.raises(ValueError, match="from_dict"):  # iterating a dict would split names into letters
        SubnetConfig({"up": 8})


def test_uniform_picks_the_width_at_exactly_the_ratio():
    choices = width_choices(100, width_mult=2.0)
    assert choices[-1] == 200 and 56 in choices
    space = WidthSpace([ChannelGroup("g", 200, choices)])
    assert 0.28 * 200 > 56  # the float product lands just above the choice
    assert space.uniform(0.28)["g"] == 56
    assert space.uniform(0.281)["g"] == 64


def test_a_route_of_zero_macs_is_allowed():
    """(a route that computes nothing, as an identity baseline; negative and infinite are refused)"""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    for zero in (0, 0.0, np.float32(0)):
        assert RoutingEntry(net.space.smallest(), zero).macs_per_pixel == 0
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError):
            RoutingEntry(net.space.smallest(), bad)
