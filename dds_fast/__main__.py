"""``python -m dds_fast``: the same command line as ``dds-fast``."""
import sys

from .cli import main

sys.exit(main())
