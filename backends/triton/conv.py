"""Quantized 2-D convolution as an implicit GEMM: int8 activations against int8 weights (per-output-channel
scales), int32 accumulation, the dequantisation and bias in the epilogue.

    out[b, o, y, x] = a_scale * w_scale[o] * sum_{i, j, c} (a[b, y s - p + i d, x s - p + j d, c] - zero) w[o, c, i, j]
                      + bias[o]

Rows of the GEMM are output positions (b, y, x), columns output channels, K runs over the kernel taps (i, j) and,
innermost, input channels, with the weights read as [O, kh, kw, C] (each K tile contiguous): no im2col buffer
exists. Static activations (one scale and zero point): the input is quantized once into channels-last codes
[B, H, W, C] (each row's tile one contiguous run of channels of one input pixel), and taps in the zero padding load
the zero point's code, which the w_sum correction cancels like any other. Dynamic activations (a scale and zero
point per patch, i.e. per row, from pooled per-pixel channel ranges: `patch_params`): the K loop reads the float
input, channels-last as well, and quantizes each tile with its rows' parameters, once per tap (padding: 0.0, whose
code is the zero point). Either way the arithmetic is fxquant::int8_conv2d's im2col reference's. Float8 e4m3 codes
and weights (static, symmetric: padding loads 0) accumulate in fp32 instead. The output is stored as the model's NCHW
tensor.

`quantized_conv2d` is the launcher; tests compare it with fxquant::int8_conv2d's and fp8_conv2d's references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops import conv_output_size
from ...quantizer import asymmetric_params, quantize_asymmetric, quantize_fp8_with_scale

from . import INTERPRET, ceil_div
from .gemm import grouped_tile
from .quantize import rint


def conv_config(m: int, n: int, fp8: bool = False) -> dict:
    """The tile of a launch: one small tile under the CPU interpreter (tests), else from the H100 sweep
    (gpu-bench-h100/conv-tiles-int8-fp8.json, SDXL's 320- and 640-channel 3 x 3 convolutions at >= 8192 positions):
    fp8 takes 128 x 256 x 128 / 8 warps from 512 output channels (0.076 ms against 0.097 for 128 x 128 x 64 at 640)
    and 128 x 128 x 64 / 4 warps / 4 stages below (0.093 and 0.029 ms, within 1-9 % of the best tile); int8 keeps
    128 x 128 x 64 / 8 warps (its best tile 1.0-1.6x faster, still slower than cuDNN bf16: int8 is not the fast
    conv). 64 rows for few positions."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    if fp8 and m >= 4096:
        wide = n >= 512
        return dict(BLOCK_M=128, BLOCK_N=256 if wide else 128, BLOCK_K=128 if wide else 64, GROUP_M=8,
                    num_warps=8 if wide else 4, num_stages=3 if wide else 4)
    return dict(BLOCK_M=128 if m >= 4096 else 64, BLOCK_N=128 if n >= 128 else 64, BLOCK_K=64, GROUP_M=8,
                num_warps=8 if m >= 4096 and n >= 128 else 4, num_stages=3)


@triton.jit
def _conv_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr,
    M, N, C, H, W, OUT_H, OUT_W, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PER_PATCH: tl.constexpr, FP8: tl.constexpr,
    OUT_RUN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """a: channels-last [B, H, W, C] contiguous: int8 codes with one scale / zero point, or (PER_PATCH) the float
    input with a scale / zero point per output position (row), quantized in the K loop, or (FP8) float8 e4m3 codes
    with one scale and no zero point; w: int8 (FP8: float8 e4m3) [N, KH, KW, C] contiguous; out [B, N, OUT_H,
    OUT_W] contiguous. OUT_RUN: output positions come in aligned runs of this many (a power of two dividing
    OUT_H * OUT_W)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    positions = OUT_H * OUT_W
    sample = rows // positions
    position = rows % positions
    top = (position // OUT_W) * stride_h - pad_h
    left = (position % OUT_W) * stride_w - pad_w
    if PER_PATCH:
        zero = tl.load(a_zero_ptr + rows, mask=row_ok, other=0)
        a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=1.0)
        inverse = tl.div_rn(1.0, a_scale)
    elif FP8:
        a_scale = tl.load(a_scale_ptr)
    else:
        zero = tl.load(a_zero_ptr)
        a_scale = tl.load(a_scale_ptr)
        zero_code = zero.to(tl.int8)
    channels = tl.arange(0, BLOCK_K)
    channel_steps = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for step in range(0, KH * KW * channel_steps):  # one loop over every (tap, channel block): pipelined as one
        tap = step // channel_steps
        channel = (step % channel_steps) * BLOCK_K + channels
        channel_ok = channel < C
        y = top + (tap // KW) * dilation_h
        x = left + (tap % KW) * dilation_w
        inside = row_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        pixels = (sample * H + y) * W + x
        tile = a_ptr + pixels[:, None] * C + channel[None, :]
        if PER_PATCH:  # as quantize_asymmetric on the patch; padding (0.0) becomes the zero point's code
            values = tl.load(tile, mask=inside[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
            codes = rint(values * inverse[:, None]) + zero[:, None].to(tl.float32)
            a = tl.minimum(tl.maximum(codes, -128.0), 127.0).to(tl.int8)
        elif FP8:
            a = tl.load(tile, mask=inside[:, None] & channel_ok[None, :], other=0.0)
        else:
            a = tl.load(tile, mask=inside[:, None] & channel_ok[None, :], other=zero_code)
        w = tl.load(w_ptr + cols[None, :] * (KH * KW * C) + (tap * C + channel)[:, None],
                    mask=channel_ok[:, None] & col_ok[None, :], other=0.0 if FP8 else 0)
        acc = tl.dot(a, w, acc, out_dtype=tl.float32 if FP8 else tl.int32)

    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    if FP8:
        out = acc * a_scale * w_scale[None, :]
    else:
        w_sum = tl.load(w_sum_ptr + cols, mask=col_ok, other=0)
        if PER_PATCH:
            acc = acc - zero[:, None] * w_sum[None, :]
            out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        else:
            acc = acc - zero * w_sum[None, :]
            out = acc.to(tl.float32) * a_scale * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    row_offsets = tl.max_contiguous(tl.multiple_of(sample * (N * positions) + position, OUT_RUN), OUT_RUN)
    out_ptrs = out_ptr + row_offsets[:, None] + cols[None, :] * positions
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def channels_last_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float x [B, C, H, W] -> its int8 codes (quantize_asymmetric with the static scale / zero point), or with zero
    None its float8 e4m3 codes (quantize_fp8_with_scale), as a contiguous [B, H, W, C] tensor: plain PyTorch, which
    Inductor can fuse into whatever produces x."""
    x = x.permute(0, 2, 3, 1)
    codes = quantize_fp8_with_scale(x, scale.reshape(())) if zero is None else \
        quantize_asymmetric(x, scale.reshape(()), zero.reshape(()))
    return codes.contiguous()


def patch_params(x: torch.Tensor, kernel: tuple, stride, padding, dilation) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch activation parameters of fxquant::int8_conv2d's dynamic mode without im2col: float x [B, C, H, W]
    -> (fp32 scale, int32 zero point) [B * H' * W'], from min- / max-pools of each pixel's channel min / max over the
    kernel window, zero padded like the convolution's input."""
    pad = (padding[1], padding[1], padding[0], padding[0])
    pools = dict(kernel_size=kernel, stride=stride, dilation=dilation)
    high = F.max_pool2d(F.pad(x.amax(dim=1, keepdim=True).float(), pad), **pools)
    low = -F.max_pool2d(F.pad(-x.amin(dim=1, keepdim=True).float(), pad), **pools)
    return asymmetric_params(low.reshape(-1), high.reshape(-1))


def quantized_conv2d(x: torch.Tensor, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
                     w_q: torch.Tensor, w_scale: torch.Tensor, w_sum: torch.Tensor | None, bias: torch.Tensor | None,
                     stride, padding, dilation, traced: bool = False) -> torch.Tensor:
    """fxquant::int8_conv2d: float x [B, C, H, W]; act_scale fp32 / act_zero int32 (one value each: static, the
    input quantized once into channels-last codes) or None (dynamic: a scale and zero point per patch, the input
    quantized in the K loop tap by tap); w_q int8 [O, C, kh, kw] (read in [O, kh, kw, C] order: free when stored
    channels-last), w_scale fp32 [O], w_sum int32 [O], bias [O] or None -> x.dtype [B, O, H', W'] (contiguous).
    fxquant::fp8_conv2d: w_q float8 e4m3, act_scale static, act_zero and w_sum None (fp8 codes of x).
    traced: launched through torch.library.wrap_triton (graphs the compile backend hands to Inductor)."""
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = w_q.shape
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    out = torch.empty((batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device)
    m = batch * out_h * out_w
    if m == 0:
        return out
    per_patch = act_scale is None
    assert not (per_patch and w_q.dtype == torch.float8_e4m3fn), "fp8 convolutions take a static activation scale"
    if per_patch:  # channels-last too (under the compile backend written so by the pass producing x)
        inputs = x.permute(0, 2, 3, 1).contiguous()
        act_scale, act_zero = patch_params(x, (kh, kw), stride, padding, dilation)
    else:
        inputs = channels_last_codes(x, act_scale, act_zero)
        act_scale = act_scale.reshape(1).float()
        act_zero = act_zero.reshape(1).int() if act_zero is not None else None
    weights = w_q.permute(0, 2, 3, 1)
    weights = weights if weights.is_contiguous() else weights.contiguous()
    return launch_conv(inputs, act_scale, act_zero, weights, w_scale, w_sum, bias, out, stride, padding, dilation,
                       per_patch, traced)


def launch_conv(inputs: torch.Tensor, act_scale: torch.Tensor, act_zero: torch.Tensor | None, weights: torch.Tensor,
                w_scale: torch.Tensor, w_sum: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor, stride,
                padding, dilation, per_patch: bool = False, traced: bool = False,
                config: dict | None = None) -> torch.Tensor:
    """The kernel on prepared operands: inputs channels-last [B, H, W, C] contiguous (int8 codes with act_zero, fp8
    codes without, or with per_patch the float input and a scale / zero point per output position), weights
    [O, kh, kw, C] contiguous of the codes' dtype, out [B, O, H', W'] (written and returned). config (benchmarks):
    a tile in place of `conv_config`'s."""
    batch, height, width, channels = inputs.shape
    out_channels, kh, kw, _ = weights.shape
    out_h, out_w = out.shape[2:]
    m = batch * out_h * out_w
    fp8 = weights.dtype == torch.float8_e4m3fn
    config = config or conv_config(m, out_channels, fp8)
    positions = out_h * out_w
    grid = (ceil_div(m, config["BLOCK_M"]) * ceil_div(out_channels, config["BLOCK_N"]),)
    kernel = wrap_triton(_conv_kernel) if traced else _conv_kernel
    kernel[grid](inputs, weights, out, act_scale, act_zero if act_zero is not None else act_scale, w_scale,
                 w_sum if w_sum is not None else w_scale, bias if bias is not None else w_scale, m, out_channels,
                 channels, height, width, out_h, out_w, *stride, *padding, *dilation, KH=kh, KW=kw,
                 HAS_BIAS=bias is not None, PER_PATCH=per_patch, FP8=fp8,
                 OUT_RUN=min(16, positions & -positions), **config)
    return out
