"""dds-fast: prefix-sliced convolutions and dynamic slimmable denoisers."""
from . import metrics
from ._version import __version__
from .checkpoint import SHIPPED_MODEL, CheckpointError, load, read_metadata, save
from .config import ChannelGroup, RoutingEntry, SubnetConfig, WidthSpace, make_divisible, width_choices
from .cost import macs_per_pixel, trace_convs
from .ddsnet import AttentionSupernet, DDSNet
from .export import StaticConv2d, export_static
from .gate import DynamicGate, GateOutput
from .metrics import batch_psnr, batch_ssim, psnr, ssim
from .nets import ARCHITECTURES, SlimDnCNN, SlimNet, SlimUNet, register_architecture
from .runner import LatencyRunner
from .slim_conv import SlimConv2d, convert_model

__all__ = [
    "__version__", "metrics", "SHIPPED_MODEL", "CheckpointError", "load", "read_metadata", "save",
    "ChannelGroup", "RoutingEntry", "SubnetConfig", "WidthSpace", "make_divisible", "width_choices",
    "macs_per_pixel", "trace_convs", "DDSNet", "AttentionSupernet", "StaticConv2d", "export_static", "DynamicGate", "GateOutput",
    "batch_psnr", "batch_ssim", "psnr", "ssim", "ARCHITECTURES", "SlimDnCNN", "SlimNet", "SlimUNet",
    "register_architecture", "LatencyRunner", "SlimConv2d", "convert_model",
]
