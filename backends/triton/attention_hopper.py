"""Static fp8 attention for Hopper in Gluon, with the MMAs kept in flight across the softmax (FlashAttention-3's
intra-warpgroup schedule), for the operands `attention_fp8_codes` takes.

Triton's `tl` language waits on every warpgroup MMA at once on Hopper (`pendings = 0`), so the Triton kernel
(`attention.py`) runs its MMAs and its exponentials one after the other. Gluon (`triton.experimental.gluon`, Triton
3.6) issues them asynchronously and waits explicitly. Per key tile j, each warpgroup:

    issue S(j) = Q K(j)^T            (async)
    issue O += P(j-1) V(j-1)         (async; P(j-1) from shared memory)
    wait until S(j) is done          (P V still running)
    softmax of S(j) -> P(j), row maxima and sums, the rescale factor
    wait until P V is done, O *= rescale, P(j) -> shared memory
    TMA-load key / value tile j - 1 + NUM_STAGES into the slot tile j - 1 used

so the exponentials of tile j overlap the P V product of tile j - 1 (in ptxas's SASS the wait for P V lands after
only part of the row-maximum reduction). The fastest tile measured is 64 queries by one warpgroup (`CONFIGS`). A
second schedule that also issued S(j+1) before the softmax of S(j) (199 registers, one program per SM) was slower at
every measured shape (CogVideoX 13.3 against 8.5 ms; removed in session 33). K and V tiles arrive by TMA into a ring
of NUM_STAGES shared-memory slots (one mbarrier each). P takes a trip through shared memory because Triton 3.6's wait
cannot keep an 8-bit register operand alive while its MMA runs. The format is the Triton kernel's with
STATIC_SCALES: Q, K, V float8 e4m3 with one scale each, P multiplied by 448 through the exponent and cast to e4m3, the
output in the model's dtype or as e4m3 codes of one or two static scales (OUT_CODES as in `attention.py`).

Operands (as fxquant::attention_operand_fp8 lays them out, contiguous): q [B, H, Nq, Dp], k [B, H, Nk, Dp], v
keys-major [B, H, Dv, Nkp] (Dp / Dv: the head dim D padded, `padded_head_dim`). The tiles are DIM = D rounded up to a
power of two wide (PixArt's 72: 128), and the descriptors see the operands as 2-D row blocks: Q [B * H * Nq, D] and
K [B * H * Nk, D] with row stride Dp, so the TMA unit zero-fills channels D .. DIM (the padding, which a GEMM epilogue
may have left unwritten, is never read); V [B * H * Dv, Nk] with row stride Nkp, so its columns past Nk (the unwritten
padding keys) are zero-filled, while a tile's channel rows past D (padding, the next head's channels) only make output
channels that are not stored. A key tile that runs past a head's last key reads the next head's keys: their scores
are masked.

Gluon kernels do not run in Triton's CPU interpreter: CI compiles this one for sm_90 (`benchmarks/kernel_ir.py`),
and the GPU benchmark checks it against the Triton kernel and fp32 attention at the models' shapes.
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...ops import empty_heads_last
from . import ceil_div, next_power_of_two
from .attention import attention_fp8_codes as triton_attention_fp8_codes

LOG2_FP8_MAX = gl.constexpr(math.log2(448.0))
FP8_MAX = gl.constexpr(448.0)
LOG2E = math.log2(math.e)
MMA_K = gl.constexpr(32)  # a warpgroup MMA's reduction depth for 8-bit operands


def tile_width(head_dim: int) -> int:
    """The width of the kernel's Q / K / V tiles for a head dim: the next power of two, at least one 8-bit MMA's
    depth (32)."""
    return max(32, next_power_of_two(head_dim))


def supported(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the Gluon kernel takes these operands: on a Hopper GPU (sm_90), head dims 32 to 256."""
    return q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and 32 <= head_dim <= 256


# head dims where this kernel beat the Triton one on an H100 (session 33, kernels alone): 64 (CogVideoX 8.44 against
# 9.07 ms, SD3 0.471 against 0.467) and 128 (Flux 0.348 against 0.373); at PixArt's 72 its 128-wide tiles lose to the
# Triton kernel's 64 + 16 split (0.39 against 0.35 ms at the best tile); other head dims are untimed
FASTER_HEAD_DIMS = (64, 128)


@gluon.jit
def _load_tile(k_desc, v_desc, k_smem, v_smem, ready, tile, key_row, value_row, n_tiles,
               BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """TMA-copy key / value tile `tile` (when it exists) into slot tile % NUM_STAGES, signalling ready[slot]."""
    slot = tile % NUM_STAGES
    exists = tile < n_tiles
    mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=exists)
    tma.async_copy_global_to_shared(k_desc, [key_row + tile * BLOCK_N, 0], ready.index(slot), k_smem.index(slot),
                                    pred=exists)
    tma.async_copy_global_to_shared(v_desc, [value_row, tile * BLOCK_N], ready.index(slot), v_smem.index(slot),
                                    pred=exists)


@gluon.jit
def _softmax(s, row_max, row_sum, score_scale, key_start, N_K, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             MASKED: gl.constexpr):
    """Scores s [BLOCK_M, BLOCK_N] (unscaled int products of fp8 codes, fp32) into the online softmax: -> P (times
    448, fp32), the new row maxima (log2 units), row sums, and the factor the output accumulated so far is rescaled
    by. MASKED: keys at or past N_K get no weight."""
    if MASKED:
        keys = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(keys < N_K, 0), s, float("-inf"))
    new_max = gl.maximum(row_max, gl.max(s, axis=1) * score_scale)  # score_scale > 0 commutes with the max
    rescale = gl.exp2(row_max - new_max)
    p = gl.exp2(s * score_scale - gl.expand_dims(new_max - LOG2_FP8_MAX, 1))
    return p, new_max, row_sum * rescale + gl.sum(p, axis=1), rescale


@gluon.jit
def _key_tile(j, s, o, row_max, row_sum, score_scale, q_smem, k_smem, v_smem, p_smem, ready, k_desc, v_desc, key_row,
              value_row, n_tiles, N_K, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, s_layout: gl.constexpr,
              o_layout: gl.constexpr, MASKED: gl.constexpr):
    """One step of the schedule in the module docstring: S(j) and P(j-1) V(j-1) in flight together."""
    slot = j % NUM_STAGES
    previous = (j - 1) % NUM_STAGES
    mbarrier.wait(ready.index(slot), (j // NUM_STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
    o = warpgroup_mma(p_smem, v_smem.index(previous).permute((1, 0)), o, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    p, row_max, row_sum, rescale = _softmax(s, row_max, row_sum, score_scale, j * BLOCK_N, N_K, BLOCK_N, s_layout,
                                            MASKED)
    # the softmax's results pass through the wait, so that LLVM cannot sink their arithmetic below it (nothing else
    # orders the two; ptxas still places the wait itself: it hoisted it above the softmax in the SASS of Triton 3.6)
    o, p, row_sum, rescale = warpgroup_mma_wait(num_outstanding=0, deps=(o, p, row_sum, rescale))
    o = o * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, o_layout)), 1)
    p_smem.store(p.to(gl.float8e4nv))
    fence_async_shared()
    gl.thread_barrier()  # P written for the next MMAs; every warpgroup's MMAs done with slot `previous`
    _load_tile(k_desc, v_desc, k_smem, v_smem, ready, j - 1 + NUM_STAGES, key_row, value_row, n_tiles, BLOCK_N,
               NUM_STAGES)
    return s, o, row_max, row_sum


@gluon.jit
def _attention_kernel(q_desc, k_desc, v_desc, out_ptr, scales_ptr, out_scale_ptr, N_Q, N_K, HEADS, VALUE_ROWS,
                      score_scale, out_split, stride_ob, stride_oh, stride_on, HEAD_DIM: gl.constexpr,
                      OUT_CODES: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) -> out [B, H, Nq, HEAD_DIM] (strides stride_ob / oh / on,
    unit channel stride). VALUE_ROWS: V's stored channels per head (Dv); scales_ptr: Q / K / V's static scales
    (fp32 [3]); score_scale: the softmax scale times log2(e); OUT_CODES, out_scale_ptr, out_split: as
    `attention._attention_kernel`'s; the schedule is the module docstring's."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    DIM: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, MMA_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, DIM, MMA_K])

    query_blocks = gl.cdiv(N_Q, BLOCK_M)
    batch_head = gl.program_id(0) // query_blocks
    first_row = (gl.program_id(0) % query_blocks) * BLOCK_M
    n_tiles = gl.cdiv(N_K, BLOCK_N)
    key_row = batch_head * N_K
    value_row = batch_head * VALUE_ROWS

    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, BLOCK_N, DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, DIM, BLOCK_N], v_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv))
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(slot), count=1)
    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch_head * N_Q + first_row, 0], q_ready, q_smem)
    for tile in gl.static_range(NUM_STAGES):  # slot (j - 1) % NUM_STAGES is refilled after key tile j's softmax
        _load_tile(k_desc, v_desc, k_smem, v_smem, ready, tile, key_row, value_row, n_tiles, BLOCK_N, NUM_STAGES)

    score_scale = gl.load(scales_ptr) * gl.load(scales_ptr + 1) * score_scale
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    row_sum = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.zeros([BLOCK_M, DIM], gl.float32, o_layout)
    # tile 0's scores and softmax alone (masked: it may be the only tile); then the steps, the last tile's masked
    mbarrier.wait(q_ready, 0)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    p, row_max, row_sum, _ = _softmax(s, row_max, row_sum, score_scale, 0, N_K, BLOCK_N, s_layout, True)
    p_smem.store(p.to(gl.float8e4nv))
    fence_async_shared()
    gl.thread_barrier()
    for j in range(1, n_tiles - 1):
        s, o, row_max, row_sum = _key_tile(j, s, o, row_max, row_sum, score_scale, q_smem, k_smem, v_smem, p_smem,
                                           ready, k_desc, v_desc, key_row, value_row, n_tiles, N_K, BLOCK_N,
                                           NUM_STAGES, s_layout, o_layout, False)
    if n_tiles > 1:
        s, o, row_max, row_sum = _key_tile(n_tiles - 1, s, o, row_max, row_sum, score_scale, q_smem, k_smem, v_smem,
                                           p_smem, ready, k_desc, v_desc, key_row, value_row, n_tiles, N_K, BLOCK_N,
                                           NUM_STAGES, s_layout, o_layout, True)
    o = warpgroup_mma(p_smem, v_smem.index((n_tiles - 1) % NUM_STAGES).permute((1, 0)), o, is_async=True)
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready.index(slot))
    mbarrier.invalidate(q_ready)

    rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    # the Triton kernel's roundings: 1 / row sum, times V's scale, times 1 / the output scale
    norm = 1.0 / gl.convert_layout(row_sum, rows_layout) * gl.load(scales_ptr + 2)
    rows = first_row + gl.arange(0, BLOCK_M, layout=rows_layout)
    if OUT_CODES == 1:
        norm *= gl.div_rn(1.0, gl.load(out_scale_ptr))
    elif OUT_CODES == 2:
        norm *= gl.where(rows < out_split, gl.div_rn(1.0, gl.load(out_scale_ptr)),
                         gl.div_rn(1.0, gl.load(out_scale_ptr + 1)))
    out = o * gl.expand_dims(norm, 1)
    if OUT_CODES:
        out = gl.minimum(gl.maximum(out, -FP8_MAX), FP8_MAX)
    dims = gl.arange(0, DIM, layout=gl.SliceLayout(0, o_layout))
    batch = batch_head // HEADS
    head = batch_head % HEADS
    pointers = (out_ptr + batch * stride_ob + head * stride_oh + gl.expand_dims(rows, 1) * stride_on
                + gl.expand_dims(dims, 0))
    gl.store(pointers, out.to(out_ptr.dtype.element_ty),
             mask=gl.expand_dims(rows < N_Q, 1) & gl.expand_dims(dims < HEAD_DIM, 0))


# (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES): tiles, each warp owning 16 query rows of a warpgroup MMA. Timed on an
# H100 (session 33, `benchmarks/gluon_attention.py`): 64 x 128 with one warpgroup and 3 slots fastest at CogVideoX (8.44
# ms, the Triton kernel 9.07), SD3 (0.471 / 0.467) and Flux (0.348 / 0.373); the last two entries are untimed
CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 4), (64, 64, 4, 3)]
DEFAULT_CONFIG = CONFIGS[0]


def _descriptor(x: torch.Tensor, shape: list[int], strides: list[int], block: list[int]) -> TensorDescriptor:
    """A TMA descriptor over fp8 codes x seen as the 2-D `shape` / `strides`, loading `block` tiles."""
    return TensorDescriptor(x, shape, strides, block, gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv))


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                     operand_scales: torch.Tensor, out: torch.Tensor, scale: float, out_scale: torch.Tensor | None,
                     out_split: int, block_m: int, block_n: int) -> tuple:
    """`_attention_kernel`'s positional arguments for laid-out fp8 operands (q [B, H, Nq, Dp], k [B, H, Nk, Dp],
    v keys-major [B, H, Dv, Nkp], all contiguous) writing out ([B, H, Nq, head_dim] view)."""
    batch, heads, n_q, padded = q.shape
    n_k, (value_rows, n_kp) = k.shape[2], v.shape[2:]
    dim = tile_width(head_dim)
    q_desc = _descriptor(q, [batch * heads * n_q, head_dim], [padded, 1], [block_m, dim])
    k_desc = _descriptor(k, [batch * heads * n_k, head_dim], [padded, 1], [block_n, dim])
    v_desc = _descriptor(v, [batch * heads * value_rows, n_k], [n_kp, 1], [dim, block_n])
    scales = operand_scales.float().contiguous()
    out_scale = scales if out_scale is None else out_scale.float().reshape(-1)  # (else never read)
    return (q_desc, k_desc, v_desc, out, scales, out_scale, n_q, n_k, heads, value_rows, scale * LOG2E, out_split,
            *out.stride()[:3])


def attention_fp8_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                        operand_scales: torch.Tensor, out_dtype: torch.dtype, out_scale: torch.Tensor | None = None,
                        out_split: int = 0, config: tuple = DEFAULT_CONFIG) -> torch.Tensor:
    """The kernel on `supported` operands (else ValueError), with `attention.attention_fp8_codes`' arguments and
    result ([B, H, Nq, head_dim] in out_dtype, or fp8 codes of out_scale, stored [B, Nq, H, head_dim]); config: a
    CONFIGS entry."""
    if not supported(q, head_dim):
        raise ValueError(f"The Gluon attention kernel runs on Hopper GPUs at head dims 32 to 256, not on {q.device} "
                         f"at head dim {head_dim}")
    block_m, block_n, num_warps, num_stages = config
    batch, heads, n_q, _ = q.shape
    shape = q.new_empty(()).expand(batch, heads, n_q, head_dim)
    out = empty_heads_last(shape, torch.float8_e4m3fn if out_scale is not None else out_dtype)
    if out.numel() == 0:
        return out
    q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))
    args = kernel_arguments(q, k, v, head_dim, operand_scales, out, scale, out_scale, out_split, block_m, block_n)
    codes = 0 if out_scale is None else 2 if out_split else 1
    _attention_kernel[(ceil_div(n_q, block_m) * batch * heads,)](*args, HEAD_DIM=head_dim, OUT_CODES=codes,
                                                                  NUM_STAGES=num_stages, num_warps=num_warps)
    return out


def attention_fp8_codes_or_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                                  operand_scales: torch.Tensor, out_dtype: torch.dtype,
                                  out_scale: torch.Tensor | None = None, out_split: int = 0) -> torch.Tensor:
    """fxquant::gluon_attention_fp8_codes on CUDA: this kernel at FASTER_HEAD_DIMS where it is `supported`, else the
    Triton one."""
    if head_dim in FASTER_HEAD_DIMS and supported(q, head_dim):
        return attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)
    return triton_attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)
