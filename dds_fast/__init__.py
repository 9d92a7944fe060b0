"""dds-fast: prefix-sliced convolutions and dynamic slimmable denoisers."""
from ._version import __version__
from .checkpoint import CheckpointError, load, read_metadata, save
from .config import ChannelGroup, RoutingEntry, SubnetConfig, WidthSpace, make_divisible, width_choices
from .cost import macs_per_pixel, trace_convs
from .export import StaticConv2d, export_static
from .nets import ARCHITECTURES, SlimDnCNN, SlimNet, SlimUNet, register_architecture
from .slim_conv import SlimConv2d, convert_model

__all__ = [
    "__version__", "CheckpointError", "load", "read_metadata", "save", "ChannelGroup", "RoutingEntry",
    "SubnetConfig", "WidthSpace", "make_divisible", "width_choices", "macs_per_pixel", "trace_convs",
    "StaticConv2d", "export_static", "ARCHITECTURES", "SlimDnCNN", "SlimNet", "SlimUNet",
    "register_architecture", "SlimConv2d", "convert_model",
]
