"""Data, losses and the three-stage trainer (installed as ``dds_fast.training``)."""
