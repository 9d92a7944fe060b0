"""Triton kernels of dds_fast (installed as ``dds_fast.kernels``)."""
