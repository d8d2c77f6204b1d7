"""CUDA implementations of fxquant's custom ops, backed by the Triton kernels of this package.

Importing this module registers them (`torch.library.register_kernel`); fxquant does so at import time when CUDA
and Triton are available. Eager CUDA calls and graphs compiled with `backend="fxquant"` then run these kernels;
the CPU keeps the reference bodies of fxquant.ops.
"""

from __future__ import annotations

import torch

from .attention import attention_fp8_codes, quantized_attention
from .conv import quantized_conv2d
from .gemm import attention_operand_gemm, quantized_gemm, unpack_weights
from .quantize import fused_quantize_per_token, modulation_table, quantize_per_token, quantize_per_token_fp8


@torch.library.register_kernel("fxquant::quantize_per_token", "cuda")
def _quantize_per_token_cuda(x: torch.Tensor):
    return quantize_per_token(x)


@torch.library.register_kernel("fxquant::fused_quantize_per_token", "cuda")
def _fused_quantize_per_token_cuda(x, weight, bias, mul, add, norm, eps, activation, fp8):
    return fused_quantize_per_token(x, weight, bias, mul, add, norm, eps, activation, fp8)


@torch.library.register_kernel("fxquant::fused_quantize_concat", "cuda")
def _fused_quantize_concat_cuda(head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add, norm, eps,
                                activation, fp8):
    return fused_quantize_per_token(head, weight, bias, head_mul, head_add, norm, eps, activation, fp8, tail=tail,
                                    tail_mul=tail_mul, tail_add=tail_add)


@torch.library.register_kernel("fxquant::modulation_table", "cuda")
def _modulation_table_cuda(table, embedding, plus_one):
    return modulation_table(table, embedding, plus_one)


@torch.library.register_kernel("fxquant::int8_linear", "cuda")
def _int8_linear_cuda(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype):
    return quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype)


@torch.library.register_kernel("fxquant::packed_int8_linear", "cuda")
def _packed_int8_linear_cuda(x_q, x_scale, x_zero, w_packed, weight_bits, w_scale, w_sum, bias, out_dtype):
    return quantized_gemm(x_q, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype, weight_bits)


def _unpacked(packed: torch.Tensor, weight_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed codes [..., K * weight_bits / 8] -> [..., K] of dtype by the unpack kernel (eager calls; compiled graphs
    hand unpacking to Inductor as plain PyTorch)."""
    rows = packed.reshape(-1, packed.shape[-1]).contiguous()
    return unpack_weights(rows, weight_bits, dtype=dtype).reshape(*packed.shape[:-1], -1)


@torch.library.register_kernel("fxquant::unpack_int4", "cuda")
def _unpack_int4_cuda(packed):
    return _unpacked(packed, 4, torch.int8)


@torch.library.register_kernel("fxquant::unpack_int2", "cuda")
def _unpack_int2_cuda(packed):
    return _unpacked(packed, 2, torch.int8)


@torch.library.register_kernel("fxquant::unpack_fp8_codes", "cuda")
def _unpack_fp8_codes_cuda(packed, weight_bits):
    return _unpacked(packed, weight_bits, torch.float8_e4m3fn)


@torch.library.register_kernel("fxquant::quantize_per_token_fp8", "cuda")
def _quantize_per_token_fp8_cuda(x: torch.Tensor):
    return quantize_per_token_fp8(x)


@torch.library.register_kernel("fxquant::fp8_linear", "cuda")
def _fp8_linear_cuda(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, out_dtype)


@torch.library.register_kernel("fxquant::packed_fp8_linear", "cuda")
def _packed_fp8_linear_cuda(x_q, x_scale, w_packed, weight_bits, w_scale, bias, out_dtype):
    return quantized_gemm(x_q, x_scale, None, w_packed, w_scale, None, bias, out_dtype, weight_bits)


@torch.library.register_kernel("fxquant::linear_residual", "cuda")
def _linear_residual_cuda(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, gate, residual):
    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, residual.dtype, weight_bits, gate=gate,
                          residual=residual)


@torch.library.register_kernel("fxquant::linear_residual_parts", "cuda")
def _linear_residual_parts_cuda(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, head_gate, head_residual,
                                tail_gate, tail_residual):
    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, head_residual.dtype, weight_bits,
                          gate=head_gate, residual=head_residual, tail=(tail_gate, tail_residual))


@torch.library.register_kernel("fxquant::linear_activation_quantize", "cuda")
def _linear_activation_quantize_cuda(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, activation,
                                     out_scale, out_zero):
    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, torch.float32, weight_bits,
                          activation=activation, out_scale=out_scale, out_zero=out_zero)


@torch.library.register_kernel("fxquant::quantized_attention", "cuda")
def _quantized_attention_cuda(q, k, v, scale, pv_fp8, operand_scales=None):
    return quantized_attention(q, k, v, scale, pv_fp8, operand_scales)


@torch.library.register_kernel("fxquant::quantized_attention_codes", "cuda")
def _quantized_attention_codes_cuda(q, k, v, scale, pv_fp8, operand_scales, out_scale, out_split=0):
    return quantized_attention(q, k, v, scale, pv_fp8, operand_scales, out_scale=out_scale, out_split=out_split)


@torch.library.register_kernel("fxquant::linear_attention_operand", "cuda")
def _linear_attention_operand_cuda(x_q, x_scale, w_q, w_scale, bias, scale, heads, tokens, keys_major, norm,
                                   norm_weight, norm_bias, norm_eps, rope, weight_bits=8):
    return attention_operand_gemm(x_q, x_scale, w_q, w_scale, bias, scale, heads, tokens, keys_major, norm,
                                  norm_weight, norm_bias, norm_eps, rope, weight_bits)


@torch.library.register_kernel("fxquant::attention_fp8_codes", "cuda")
def _attention_fp8_codes_cuda(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale=None, out_split=0):
    return attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)


@torch.library.register_kernel("fxquant::gluon_attention_fp8_codes", "cuda")
def _gluon_attention_fp8_codes_cuda(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale=None, out_split=0):
    from .attention_hopper import attention_fp8_codes_or_triton  # (Gluon's Hopper API as of Triton 3.6)

    return attention_fp8_codes_or_triton(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)


@torch.library.register_kernel("fxquant::int8_conv2d", "cuda")
def _int8_conv2d_cuda(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation):
    return quantized_conv2d(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation)


@torch.library.register_kernel("fxquant::fp8_conv2d", "cuda")
def _fp8_conv2d_cuda(x, act_scale, w_q, w_scale, bias, stride, padding, dilation):
    return quantized_conv2d(x, act_scale, None, w_q, w_scale, None, bias, stride, padding, dilation)
