import os

import torch

# triton.jit decides at decoration time whether a kernel is interpreted: set this before
# any kernel module is imported, so the kernels run on the CPU where no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
