"""The torch.compile backend (`torch.compile(qmodel, backend="fxquant")`) and, on CUDA, its Triton kernels."""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run in Triton's CPU interpreter (tests)
