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
keys-major [B, H, Dv, Nkp] (Dp / Dv: the head dim D padded, `padded_head_dim`). The tiles split D as the Triton
kernel's do (`head_dim_split`; PixArt's 72: main tiles 64 wide, Q / K tails 32, V's tail 16 rows), and the
descriptors see the operands as 2-D row blocks: Q [B * H * Nq, D] and K [B * H * Nk, D] with row stride Dp, so the
TMA unit zero-fills the tail channels past D (the padding, which a GEMM epilogue may have left unwritten, is never
read); V [B * H * Dv, Nk] with row stride Nkp, so its columns past Nk (the unwritten padding keys) are zero-filled,
while its tail rows past D (padding) only make output channels that are not stored. A key tile that runs past a
head's last key reads the next head's keys: their scores are masked.

Gluon kernels do not run in Triton's CPU interpreter: CI compiles this one for sm_90 (`benchmarks/kernel_ir.py`),
and the GPU benchmark checks it against the Triton kernel and fp32 attention at the models' shapes.
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...ops import empty_heads_last, head_dim_split
from . import ceil_div
from .attention import attention_fp8_codes as triton_attention_fp8_codes

LOG2_FP8_MAX = gl.constexpr(math.log2(448.0))
FP8_MAX = gl.constexpr(448.0)
LOG2E = math.log2(math.e)
MMA_K = gl.constexpr(32)  # a warpgroup MMA's reduction depth for 8-bit operands


def supported(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the Gluon kernel takes these operands: on a Hopper GPU (sm_90), head dims 32 to 256."""
    return q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and 32 <= head_dim <= 256


# head dim -> the CONFIGS entry the op runs there: where this kernel beat the Triton one on an H100 (kernels alone,
# bf16 / fp8-codes output, session 34): 64 with two slots (CogVideoX 8.36 / 8.32 against 9.09 / 9.16 ms, SD3 0.471 /
# 0.479 against 0.473 / 0.481) and 128 with three (Flux 0.354 / 0.361 against 0.380 / 0.372); at PixArt's 72 the
# split tiles tie (0.353 / 0.360 against 0.353 / 0.359), so the Triton kernel stays there, as at other head dims
FASTEST_CONFIGS = {64: (64, 128, 4, 2), 128: (64, 128, 4, 3)}


@gluon.jit
def _load_tile(keys, values, k_tiles, v_tiles, ready, tile, key_row, value_row, n_tiles, BLOCK_N: gl.constexpr,
               NUM_STAGES: gl.constexpr, TAIL: gl.constexpr):
    """TMA-copy key / value tile `tile` (when it exists) into slot tile % NUM_STAGES, signalling ready[slot]: keys /
    values, (main, tail) descriptors; k_tiles / v_tiles, (main, tail) slot rings; with TAIL, the tail tiles too (K's
    channels from DIM on, V's rows from DIM on)."""
    k_desc, k_tail_desc = keys
    v_desc, v_tail_desc = values
    k_smem, k_tail_smem = k_tiles
    v_smem, v_tail_smem = v_tiles
    slot = tile % NUM_STAGES
    exists = tile < n_tiles
    DIM: gl.constexpr = k_desc.block_type.shape[1]
    nbytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    if TAIL:
        mbarrier.expect(ready.index(slot), nbytes + k_tail_desc.block_type.nbytes + v_tail_desc.block_type.nbytes,
                        pred=exists)
        tma.async_copy_global_to_shared(k_tail_desc, [key_row + tile * BLOCK_N, DIM], ready.index(slot),
                                        k_tail_smem.index(slot), pred=exists)
        tma.async_copy_global_to_shared(v_tail_desc, [value_row + DIM, tile * BLOCK_N], ready.index(slot),
                                        v_tail_smem.index(slot), pred=exists)
    else:
        mbarrier.expect(ready.index(slot), nbytes, pred=exists)
    tma.async_copy_global_to_shared(k_desc, [key_row + tile * BLOCK_N, 0], ready.index(slot), k_smem.index(slot),
                                    pred=exists)
    tma.async_copy_global_to_shared(v_desc, [value_row, tile * BLOCK_N], ready.index(slot), v_smem.index(slot),
                                    pred=exists)


@gluon.jit
def _scores(q_tiles, k_tiles, slot, s, TAIL: gl.constexpr):
    """Issue S = Q K(slot)^T (one asynchronous MMA, two with TAIL: the tail channels' product added) -> s; q_tiles /
    k_tiles: (main, tail) tiles."""
    q_smem, q_tail_smem = q_tiles
    k_smem, k_tail_smem = k_tiles
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
    if TAIL:
        s = warpgroup_mma(q_tail_smem, k_tail_smem.index(slot).permute((1, 0)), s, is_async=True)
    return s


@gluon.jit
def _values(p_smem, v_tiles, slot, o, o_tail, TAIL: gl.constexpr):
    """Issue O += P V(slot) (one asynchronous MMA; with TAIL a second into the tail channels' output) -> o, o_tail;
    v_tiles: (main, tail) slot rings."""
    v_smem, v_tail_smem = v_tiles
    o = warpgroup_mma(p_smem, v_smem.index(slot).permute((1, 0)), o, is_async=True)
    if TAIL:
        o_tail = warpgroup_mma(p_smem, v_tail_smem.index(slot).permute((1, 0)), o_tail, is_async=True)
    return o, o_tail


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
def _rescaled(o, rescale):
    """The output o times each row's rescale factor."""
    return o * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, o.type.layout)), 1)


@gluon.jit
def _key_tile(j, s, o, o_tail, row_max, row_sum, score_scale, q_tiles, k_tiles, v_tiles, p_smem, ready, keys, values,
              key_row, value_row, n_tiles, N_K, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              s_layout: gl.constexpr, TAIL: gl.constexpr, MASKED: gl.constexpr):
    """One step of the schedule in the module docstring: S(j) and P(j-1) V(j-1) in flight together."""
    slot = j % NUM_STAGES
    previous = (j - 1) % NUM_STAGES
    mbarrier.wait(ready.index(slot), (j // NUM_STAGES) & 1)
    s = _scores(q_tiles, k_tiles, slot, s, TAIL)
    o, o_tail = _values(p_smem, v_tiles, previous, o, o_tail, TAIL)
    s = warpgroup_mma_wait(num_outstanding=2 if TAIL else 1, deps=(s, ))  # (groups finish in issue order)
    p, row_max, row_sum, rescale = _softmax(s, row_max, row_sum, score_scale, j * BLOCK_N, N_K, BLOCK_N, s_layout,
                                            MASKED)
    # the softmax's results pass through the wait, so that LLVM cannot sink their arithmetic below it (nothing else
    # orders the two; ptxas still places the wait itself: it hoisted it above the softmax in the SASS of Triton 3.6)
    o, o_tail, p, row_sum, rescale = warpgroup_mma_wait(num_outstanding=0, deps=(o, o_tail, p, row_sum, rescale))
    o = _rescaled(o, rescale)
    if TAIL:
        o_tail = _rescaled(o_tail, rescale)
    p_smem.store(p.to(gl.float8e4nv))
    fence_async_shared()
    gl.thread_barrier()  # P written for the next MMAs; every warpgroup's MMAs done with slot `previous`
    _load_tile(keys, values, k_tiles, v_tiles, ready, j - 1 + NUM_STAGES, key_row, value_row, n_tiles, BLOCK_N,
               NUM_STAGES, TAIL)
    return s, o, o_tail, row_max, row_sum


@gluon.jit
def _store(out_ptr, o, norm, rows, first_channel, N_Q, HEAD_DIM: gl.constexpr, OUT_CODES: gl.constexpr,
           stride_on):
    """Rows `rows` of one head's output (out_ptr at its first element): o [BLOCK_M, width] (channels first_channel
    on) times each row's norm, clamped to e4m3's range for OUT_CODES, stored below N_Q queries and HEAD_DIM
    channels."""
    layout: gl.constexpr = o.type.layout
    out = o * gl.expand_dims(gl.convert_layout(norm, gl.SliceLayout(1, layout)), 1)
    if OUT_CODES:
        out = gl.minimum(gl.maximum(out, -FP8_MAX), FP8_MAX)
    channels = first_channel + gl.arange(0, o.type.shape[1], layout=gl.SliceLayout(0, layout))
    rows = gl.convert_layout(rows, gl.SliceLayout(1, layout))
    pointers = out_ptr + gl.expand_dims(rows, 1) * stride_on + gl.expand_dims(channels, 0)
    gl.store(pointers, out.to(out_ptr.dtype.element_ty),
             mask=gl.expand_dims(rows < N_Q, 1) & gl.expand_dims(channels < HEAD_DIM, 0))


@gluon.jit
def _attention_kernel(q_desc, q_tail_desc, k_desc, k_tail_desc, v_desc, v_tail_desc, out_ptr, scales_ptr,
                      out_scale_ptr, N_Q, N_K, HEADS, VALUE_ROWS, score_scale, out_split, stride_ob, stride_oh,
                      stride_on, HEAD_DIM: gl.constexpr, OUT_CODES: gl.constexpr, NUM_STAGES: gl.constexpr,
                      num_warps: gl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) -> out [B, H, Nq, HEAD_DIM] (strides stride_ob / oh / on,
    unit channel stride). The descriptors: `kernel_arguments`' (the tail ones used when HEAD_DIM is wider than the
    main tiles). VALUE_ROWS: V's stored channels per head (Dv); scales_ptr: Q / K / V's static scales (fp32 [3]);
    score_scale: the softmax scale times log2(e); OUT_CODES, out_scale_ptr, out_split: as
    `attention._attention_kernel`'s; the schedule is the module docstring's."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    DIM: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    TAIL: gl.constexpr = HEAD_DIM > DIM
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, MMA_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, DIM, MMA_K])
    TAIL_ROWS: gl.constexpr = v_tail_desc.block_type.shape[0]
    o_tail_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, TAIL_ROWS, MMA_K])

    query_blocks = gl.cdiv(N_Q, BLOCK_M)
    batch_head = gl.program_id(0) // query_blocks
    first_row = (gl.program_id(0) % query_blocks) * BLOCK_M
    n_tiles = gl.cdiv(N_K, BLOCK_N)
    key_row = batch_head * N_K
    value_row = batch_head * VALUE_ROWS

    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, BLOCK_N, DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, DIM, BLOCK_N], v_desc.layout)
    if TAIL:
        TAIL_DIM: gl.constexpr = k_tail_desc.block_type.shape[1]
        q_tail_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, TAIL_DIM], q_tail_desc.layout)
        k_tail_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, BLOCK_N, TAIL_DIM], k_tail_desc.layout)
        v_tail_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, TAIL_ROWS, BLOCK_N], v_tail_desc.layout)
    else:  # (never read)
        q_tail_smem, k_tail_smem, v_tail_smem = q_smem, k_smem, v_smem
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv))
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(slot), count=1)
    q_start = batch_head * N_Q + first_row
    if TAIL:
        mbarrier.expect(q_ready, q_desc.block_type.nbytes + q_tail_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_tail_desc, [q_start, DIM], q_ready, q_tail_smem)
    else:
        mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_start, 0], q_ready, q_smem)
    q_tiles, k_tiles, v_tiles = (q_smem, q_tail_smem), (k_smem, k_tail_smem), (v_smem, v_tail_smem)
    keys, values = (k_desc, k_tail_desc), (v_desc, v_tail_desc)
    for tile in gl.static_range(NUM_STAGES):  # slot (j - 1) % NUM_STAGES is refilled after key tile j's softmax
        _load_tile(keys, values, k_tiles, v_tiles, ready, tile, key_row, value_row, n_tiles, BLOCK_N, NUM_STAGES,
                   TAIL)

    score_scale = gl.load(scales_ptr) * gl.load(scales_ptr + 1) * score_scale
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    row_sum = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.zeros([BLOCK_M, DIM], gl.float32, o_layout)
    o_tail = gl.zeros([BLOCK_M, TAIL_ROWS], gl.float32, o_tail_layout)  # (unused without TAIL)
    # tile 0's scores and softmax alone (masked: it may be the only tile); then the steps, the last tile's masked
    mbarrier.wait(q_ready, 0)
    mbarrier.wait(ready.index(0), 0)
    s = _scores(q_tiles, k_tiles, 0, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), TAIL)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    p, row_max, row_sum, _ = _softmax(s, row_max, row_sum, score_scale, 0, N_K, BLOCK_N, s_layout, True)
    p_smem.store(p.to(gl.float8e4nv))
    fence_async_shared()
    gl.thread_barrier()
    for j in range(1, n_tiles - 1):
        s, o, o_tail, row_max, row_sum = _key_tile(j, s, o, o_tail, row_max, row_sum, score_scale, q_tiles, k_tiles,
                                                   v_tiles, p_smem, ready, keys, values, key_row, value_row, n_tiles,
                                                   N_K, BLOCK_N, NUM_STAGES, s_layout, TAIL, False)
    if n_tiles > 1:
        s, o, o_tail, row_max, row_sum = _key_tile(n_tiles - 1, s, o, o_tail, row_max, row_sum, score_scale, q_tiles,
                                                   k_tiles, v_tiles, p_smem, ready, keys, values, key_row, value_row,
                                                   n_tiles, N_K, BLOCK_N, NUM_STAGES, s_layout, TAIL, True)
    o, o_tail = _values(p_smem, v_tiles, (n_tiles - 1) % NUM_STAGES, o, o_tail, TAIL)
    o, o_tail = warpgroup_mma_wait(num_outstanding=0, deps=(o, o_tail))
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
    head_out = out_ptr + (batch_head // HEADS) * stride_ob + (batch_head % HEADS) * stride_oh
    _store(head_out, o, norm, rows, 0, N_Q, HEAD_DIM, OUT_CODES, stride_on)
    if TAIL:
        _store(head_out, o_tail, norm, rows, DIM, N_Q, HEAD_DIM, OUT_CODES, stride_on)


# (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES): tiles, each warp owning 16 query rows of a warpgroup MMA. Timed on an
# H100 (sessions 33-34, `benchmarks/gluon_attention.py`, every entry at the four models' shapes): 64 x 128 with one
# warpgroup is fastest everywhere, with 3 slots at head dim 128 (Flux 0.354 ms; 2 slots 0.413) and 2 slots at 64
# (CogVideoX 8.36 against 8.45; SD3 0.471 against 0.482): FASTEST_CONFIGS; 128-row tiles trail at every shape
CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 4), (64, 64, 4, 3),
           (64, 128, 4, 2)]
DEFAULT_CONFIG = CONFIGS[0]


@functools.cache
def _shared_layout(block: tuple[int, int]) -> gl.NVMMASharedLayout:
    """The shared-memory layout of fp8 `block` tiles (built once: ~5 us each on the H100's host, six per launch)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float8e4nv)


def _descriptor(x: torch.Tensor, shape: list[int], strides: list[int], block: list[int]) -> TensorDescriptor:
    """A TMA descriptor over fp8 codes x seen as the 2-D `shape` / `strides`, loading `block` tiles."""
    return TensorDescriptor(x, shape, strides, block, _shared_layout(tuple(block)))


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                     operand_scales: torch.Tensor, out: torch.Tensor, scale: float, out_scale: torch.Tensor | None,
                     out_split: int, block_m: int, block_n: int) -> tuple:
    """`_attention_kernel`'s positional arguments for laid-out fp8 operands (q [B, H, Nq, Dp], k [B, H, Nk, Dp],
    v keys-major [B, H, Dv, Nkp], all contiguous) writing out ([B, H, Nq, head_dim] view). The descriptors, in the
    Triton kernel's split (`head_dim_split`): Q / K's main tiles the power-of-two part of the head dim wide, their
    tail tiles the rest rounded up to an MMA's depth, V's main and tail row blocks likewise (the tail descriptors are
    the main ones where the head dim is a power of two)."""
    batch, heads, n_q, padded = q.shape
    n_k, (value_rows, n_kp) = k.shape[2], v.shape[2:]
    dim, tail, value_tail = head_dim_split(head_dim)

    def main_and_tail(x, shape, strides, main_block, tail_block):
        main = _descriptor(x, shape, strides, main_block)
        return main, _descriptor(x, shape, strides, tail_block) if head_dim > dim else main

    descriptors = (
        *main_and_tail(q, [batch * heads * n_q, head_dim], [padded, 1], [block_m, dim], [block_m, tail]),
        *main_and_tail(k, [batch * heads * n_k, head_dim], [padded, 1], [block_n, dim], [block_n, tail]),
        *main_and_tail(v, [batch * heads * value_rows, n_k], [n_kp, 1], [dim, block_n], [value_tail, block_n]))
    scales = operand_scales.float().contiguous()
    out_scale = scales if out_scale is None else out_scale.float().reshape(-1)  # (else never read)
    return (*descriptors, out, scales, out_scale, n_q, n_k, heads, value_rows, scale * LOG2E, out_split,
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
    return _launch(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split, config)


def _launch(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split, config) -> torch.Tensor:
    """`attention_fp8_codes` on operands already known to be `supported`."""
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
    """fxquant::gluon_attention_fp8_codes on CUDA: this kernel at its FASTEST_CONFIGS head dims where it is
    `supported`, else the Triton one."""
    if head_dim in FASTEST_CONFIGS and supported(q, head_dim):
        config = FASTEST_CONFIGS[head_dim]
        return _launch(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split, config)
    return triton_attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)
