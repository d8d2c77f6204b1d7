"""The torch.compile backend (`torch.compile(qmodel, backend="fxquant")`) and, on CUDA, its Triton kernels."""
