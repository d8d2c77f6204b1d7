"""fxquant::cudnn_attention_fp8_codes on the GPU: static fp8 attention run by cuDNN's fp8 flash-attention engine
(the cudnn-frontend graph API, package `nvidia-cudnn-frontend`; the cuDNN library is the one torch loads).

The format is `fp8-static`'s: Q, K, V e4m3 codes with one scale each (cuDNN's descale_q / k / v), P cast to e4m3
after multiplying by 448 (scale_s, and descale_s = 1 / 448 after P V), the output written as e4m3 codes of the
output projection's static input scale (scale_o = 1 / out_scale). Queries before and after out_split (two output
scales: SD3's / Flux's text and image tokens) run as two calls on those query rows. Operands are the layouts the
GEMM epilogues write for the Triton kernel (q / k [B, H, N, D], V keys-major [B, H, D, Nkp], read as a strided
[B, H, Nk, D] view or, where cuDNN refuses that, copied to rows first). Where cuDNN cannot run a call
(`unsupported_reason`: no frontend package, no fp8 output scale, a head dim that is not a multiple of 16, before
Hopper) it goes to the Triton kernel. One graph per (shapes, strides, scale) is built at its first call and kept.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...ops import empty_heads_last
from ...quantizer import FP8_MAX
from .attention import attention_fp8_codes


@functools.cache
def _cudnn():
    """The cudnn-frontend module, or None when it is not installed (or finds no cuDNN library to load)."""
    try:
        import cudnn
    except (ImportError, OSError):
        return None
    return cudnn


@functools.cache
def _handle(device_index: int):
    """One cuDNN handle per device."""
    return _cudnn().create_handle()


def unsupported_reason(q: torch.Tensor, head_dim: int, out_scale: torch.Tensor | None) -> str | None:
    """Why cuDNN's fp8 attention cannot take this call (q: the laid-out query codes), or None when it can."""
    if out_scale is None:
        return "cuDNN writes fp8 attention outputs on Hopper: the output projection's static scale is needed"
    if head_dim % 16 or q.shape[-1] != head_dim:
        return f"head dim {head_dim} stored as {q.shape[-1]}: cuDNN's fp8 attention takes multiples of 16, unpadded"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return "cuDNN's fp8 attention needs a Hopper or newer GPU"
    if _cudnn() is None:
        return "the cudnn-frontend package (pip install nvidia-cudnn-frontend) is not installed"
    return None


class _Graph:
    """A built cuDNN fp8 SDPA graph for one problem: q / k / v / out views of given shapes and strides."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float):
        cudnn = _cudnn()
        self.handle = _handle(q.device.index)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        self.operands = [graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=e4m3)
                         for name, x in (("q", q), ("k", k), ("v", v))]
        self.scalars = [graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
                        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        self.out, _, amax_s, amax_o = graph.sdpa_fp8(*self.operands, *self.scalars, generate_stats=False,
                                                     attn_scale=scale, use_causal_mask=False, name="sdpa_fp8")
        self.out.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(e4m3)
        self.amax = [amax_s, amax_o]
        for tensor in self.amax:
            tensor.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(max(graph.get_workspace_size(), 1), device=q.device, dtype=torch.uint8)
        # descale_s / scale_s, and the two amax outputs (written, never read), 16 bytes apart
        self.constants = torch.tensor([[1 / FP8_MAX, 0, 0, 0], [FP8_MAX, 0, 0, 0]], device=q.device)
        self.amax_buffer = torch.zeros(2, 4, device=q.device)

    def __call__(self, q, k, v, out, scales: torch.Tensor, out_row: int) -> None:
        """Write out; scales: one 16-byte row per value, q / k / v's scales first and the output's at out_row."""
        pointers = [q, k, v, scales[0], scales[1], scales[2], self.constants[0], self.constants[1], scales[out_row],
                    out, self.amax_buffer[0], self.amax_buffer[1]]
        pack = dict(zip([*self.operands, *self.scalars, self.out, *self.amax], pointers))
        _cudnn().set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)


_GRAPHS: dict[tuple, _Graph] = {}
_ROWS_ONLY: set[tuple] = set()  # problems whose keys-major V cuDNN refused: V is copied to rows first


def _key(*tensors: torch.Tensor, scale: float) -> tuple:
    return (*((tuple(x.shape), x.stride()) for x in tensors), scale, tensors[0].device)


def _graph_for(q, k, v, out, scale: float) -> tuple[_Graph, torch.Tensor]:
    """(the graph for this problem, V as it takes it): V's strided view, or where cuDNN refuses that a row copy."""
    key = _key(q, k, v, out, scale=scale)
    if key not in _ROWS_ONLY and key not in _GRAPHS:
        try:
            _GRAPHS[key] = _Graph(q, k, v, out, scale)
        except Exception:  # cudnn.cudnnGraphNotSupportedError and the like: try V in rows
            _ROWS_ONLY.add(key)
    if key in _GRAPHS:
        return _GRAPHS[key], v
    v_rows = v.contiguous()
    rows_key = _key(q, k, v_rows, out, scale=scale)
    if rows_key not in _GRAPHS:
        _GRAPHS[rows_key] = _Graph(q, k, v_rows, out, scale)
    return _GRAPHS[rows_key], v_rows


def cudnn_attention_fp8_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                              operand_scales: torch.Tensor, out_dtype: torch.dtype,
                              out_scale: torch.Tensor | None = None, out_split: int = 0) -> torch.Tensor:
    """fxquant::attention_fp8_codes' arguments and result (fp8 codes of out_scale, stored [B, Nq, H, head_dim]),
    computed by cuDNN, or by the Triton kernel where `unsupported_reason` says cuDNN cannot."""
    if unsupported_reason(q, head_dim, out_scale) is not None:
        return attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)
    n_q, n_k = q.shape[2], k.shape[2]
    values = torch.cat([operand_scales.float(), 1 / out_scale.float().reshape(-1)])
    scales = F.pad(values[:, None], (0, 3))  # one 16-byte row per scale
    out = empty_heads_last(q, torch.float8_e4m3fn)
    v_view = v.transpose(-1, -2)[:, :, :n_k]  # keys-major codes as [B, H, Nk, D]
    parts = [(0, out_split, 3), (out_split, n_q, 4)] if out_split else [(0, n_q, 3)]
    for start, stop, out_row in parts:
        q_part, out_part = q[:, :, start:stop], out[:, :, start:stop]
        graph, v_taken = _graph_for(q_part, k, v_view, out_part, scale)
        graph(q_part, k, v_taken, out_part, scales, out_row)
    return out
