"""What Triton makes of fxquant's kernels for Hopper, read on any machine (no GPU): compile for sm_90 and count.

    python benchmarks/kernel_ir.py --out kernel-ir-sm90.json

Each kernel is compiled as a real launch would specialise it (16-divisible pointers / sizes, unit strides as
constants) and its TTGIR / PTX is searched for: wgmma ops and how many are left in flight at each wait (`pendings`:
0 = every MMA waited on at once, no overlap with the next tile's work), cp.async copies (software pipelining),
register -> shared round trips (`local_alloc` of computed values), layout conversions, exp2 / cvt counts; and in its
SASS (nvdisasm, as Triton ships it) all instructions and those of the special-function unit's exponentials and the
fp8 packing conversions (for the attention kernel: what bounds it per score element), and whether ptxas serialized
the warpgroup MMAs. The Gluon attention kernel (`attention_hopper.py`) is compiled the same way, its TMA descriptors
typed as a launch types them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

import fxquant  # noqa: F401  (registers the ops the kernels' modules import)
from fxquant.backends.triton import attention_hopper
from fxquant.backends.triton.attention import _attention_kernel
from fxquant.backends.triton.conv import _conv_kernel
from fxquant.backends.triton.gemm import _gemm_kernel, fixed_config_for_size
from fxquant.backends.triton.quantize import _launch_config, _quantize_rows_kernel
from fxquant.ops import head_dim_split

TARGET = GPUTarget("cuda", 90, 32)
TRACED_FLOAT = "fp64"  # how Inductor types a Python float argument of a traced kernel launch


INSTRUCTION = r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)"


def sass_text(cubin: bytes) -> str:
    """The cubin's SASS, by Triton's nvdisasm."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvdisasm, "-c", file.name], capture_output=True, text=True, check=True).stdout


def mma_loop_instructions(sass: str) -> int:
    """Instructions in the body of the largest loop (each label to its first backward branch) holding a warpgroup
    MMA: the K loop's cost per step; 0 when no loop holds one. A span that runs past an EXIT is no loop of the main
    path (an mbarrier wait's retry block placed after the kernel's end, branching back into it)."""
    sizes = []
    for label in re.finditer(r"^(\.L_x_\d+):$", sass, re.MULTILINE):
        branch = sass.find(f"BRA `({label.group(1)})", label.end())
        body = sass[label.end():branch]
        if branch >= 0 and "GMMA" in body and "EXIT" not in body:
            sizes.append(len(re.findall(INSTRUCTION, body, re.MULTILINE)) + 1)
    return max(sizes, default=0)


def _report(fn, types: dict, constants: dict, num_warps: int, num_stages: int, source_class=ASTSource) -> dict:
    """Compile `fn` (a Triton kernel, or a Gluon one with source_class GluonASTSource) with the given argument types
    (default i32) and constexprs for sm_90; counts from its IR."""
    names = fn.arg_names
    signature = {name: types.get(name, "i32") for name in names}
    signature.update({name: "constexpr" for name in constants})
    aligned = [name for name in names if name not in constants and signature[name] not in ("fp32", "fp64")
               and not signature[name].startswith("tensordesc")]
    source = source_class(fn=fn, signature=signature,
                          constexprs={(names.index(name),): value for name, value in constants.items()},
                          attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    log = io.StringIO()  # ptxas's own report (registers, spills), which Triton prints when asked to
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True  # (a cached kernel skips ptxas)
        kernel = triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    serialized = "wgmma.mma_async instructions are serialized" in log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    text = sass_text(kernel.asm["cubin"])
    sass = collections.Counter(match.group(1) for match in re.finditer(INSTRUCTION, text, re.MULTILINE))
    return {
        "wgmma_ops": ttgir.count("ttng.warp_group_dot "),
        "wgmma_wait_pendings": [int(p) for p in re.findall(r"pendings = (\d+)", ttgir)],
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "local_allocs": ttgir.count("ttg.local_alloc"),
        "local_loads": ttgir.count("ttg.local_load"),
        "convert_layouts": ttgir.count("ttg.convert_layout"),
        "ptx_wgmma": ptx.count("wgmma.mma_async"),
        "ptx_exp2": ptx.count("ex2.approx"),
        "ptx_cvt": ptx.count("cvt."),
        "ptx_tanh_approx": ptx.count("tanh.approx.f32"),  # fxquant's inline PTX: the hardware tanh in activations
        "ptx_top_nibble_masks": ptx.count("0xF0F0F0F0"),  # and W4 nibbles top-aligned four bytes per instruction
        "ptx_e4m3_field_masks": ptx.count("0x87878787"),  # (fp8 layers' sign / magnitude fields)
        "cubin_bytes": len(kernel.asm["cubin"]),  # ptxas accepted the PTX
        "shared_bytes": kernel.metadata.shared,
        # registers per thread (255 at most): with shared_bytes, how many programs an SM holds at once (65536
        # registers); spilled bytes go to local memory inside the loop
        "registers": int(registers.group(1)) if registers else None,
        "serialized": serialized,  # ptxas made every warpgroup MMA wait at once (its warning C7514)
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "sass_instructions": sum(sass.values()),
        "sass_mufu_ex2": sass["MUFU.EX2"],
        "sass_f2fp": sum(count for opcode, count in sass.items() if opcode.startswith("F2FP")),
        "sass_mma_loop_instructions": mma_loop_instructions(text),
    }


def gemm_reports() -> dict:
    """The GEMM kernel (plain epilogue) at W8A8 int8, fp8 and packed W4 / W2 (K loop, one dot per field; against
    int8 or fp8 activations; W4 with group-wise scales, groups of 128), fp8 with
    the GELU (tanh) + fp8 codes epilogue and with the GEGLU one (two products per tile), fp8 storing a
    keys-major attention operand's codes (split offsets, bias per row), a query operand's after a per-head
    RMSNorm and rotary embedding (Flux, head dim 128), and fp8 with gated residuals per token part (CogVideoX's
    text / video rows); 128 x 128 x 128 tiles, 8 warps, 3 stages; fp8 also with 64 x 64 fill tiles."""
    pointers = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "a_zero_ptr": "*i32",
                "b_scale_ptr": "*fp32", "b_sum_ptr": "*i32", "bias_ptr": "*bf16", "gate_ptr": "*bf16",
                "residual_ptr": "*bf16", "out_scale_ptr": "*fp32", "out_zero_ptr": "*i32", "norm_weight_ptr": "*bf16",
                "norm_bias_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "tail_gate_ptr": "*bf16",
                "tail_residual_ptr": "*bf16", "tail_out_ptr": "*bf16", "norm_eps": TRACED_FLOAT}
    reports = {}
    for label, bits, a_type, b_type in (("int8", 8, "*i8", "*i8"), ("fp8", 8, "*fp8e4nv", "*fp8e4nv"),
                                        ("w4a8", 4, "*i8", "*u8"), ("w2a8", 2, "*i8", "*u8"),
                                        ("w4a8_fp8", 4, "*fp8e4nv", "*u8"), ("w2a8_fp8", 2, "*fp8e4nv", "*u8"),
                                        ("w4a8_group128", 4, "*i8", "*u8"), ("w4a8_fp8_group128", 4, "*fp8e4nv", "*u8"),
                                        ("fp8_gelu_codes", 8, "*fp8e4nv", "*fp8e4nv"),
                                        ("fp8_geglu_codes", 8, "*fp8e4nv", "*fp8e4nv"),
                                        ("fp8_attention_operand", 8, "*fp8e4nv", "*fp8e4nv"),
                                        ("fp8_attention_operand_norm_rope", 8, "*fp8e4nv", "*fp8e4nv"),
                                        ("fp8_gate_residual_parts", 8, "*fp8e4nv", "*fp8e4nv")):
        fp8, gated, rotated = a_type == "*fp8e4nv", label.endswith("geglu_codes"), label.endswith("norm_rope")
        parts = label.endswith("residual_parts")
        operand, gelu = "attention_operand" in label, gated or label.endswith("gelu_codes")
        constants = dict(HAS_ZERO=not fp8, HAS_BIAS=True, BIAS_PER_ROW=operand and not rotated, HAS_GATE=parts,
                         GATE_PER_TILE=parts, HEAD_NORM=int(rotated), ROPE=rotated, HEAD_DIM=128 if rotated else 1,
                         HAS_RESIDUAL=parts, ROW_PARTS=parts, ACT=(1 if gated else 2) if gelu else 0,
                         OUT_CODES=2 if gelu or operand else 0, INT_ACC=not fp8, WEIGHT_BITS=bits, SPLIT_OUT=operand,
                         OUT_RUN=16 if operand else 1, GATED=gated, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
                         stride_ak=1, stride_bk=1, stride_on=1, stride_as=1, stride_bs=1,
                         FIELD_ACCUMULATORS=1 if "group" in label else 2, GROUP_K=128 if "group" in label else 0,
                         FILL_M=0, FILL_N=0)
        types = {**pointers, "a_ptr": a_type, "b_ptr": b_type, "out_ptr": "*fp8e4nv" if gelu or operand else "*bf16"}
        reports[label] = _report(_gemm_kernel, types, constants, 8, 3)
        if label == "fp8":  # the last wave's rows in 64 x 64 fill tiles: both tiles' buffers share shared memory
            reports["fp8_fill_64x64"] = _report(_gemm_kernel, types, {**constants, "FILL_M": 64, "FILL_N": 64}, 8, 3)
        if label in ("w4a8", "w4a8_fp8"):  # few tokens: the 16-row K-loop tile fixed_config launches there
            few = fixed_config_for_size(16, 4608, 1152, not fp8, packed=True)
            tile = {key: few[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            reports[f"{label}_16_rows"] = _report(_gemm_kernel, types, {**constants, **tile}, few["num_warps"],
                                                  few["num_stages"])
    return reports


def attention_reports() -> dict:
    """The attention kernel, P V in bf16 and fp8, head dims 64 and 72 (64 + 32 tail), 128 x 128 tiles, 8 warps; and
    with fp8 output codes (static_attention_outputs) at head dim 72, static fp8 operands there with their tails
    masked (laid out by the q / k / v GEMMs: attention_fp8_codes), codes of two scales split at a query (a joint
    attention's two streams) at head dim 64, and static codes at head dim 64 (CogVideoX); the last two also at the
    tiles the autotuner picks on an H100 (`_swept_tile` rows: 64 x 128 at PixArt's head dim 72, 128 x 128 with 4
    warps at CogVideoX's 64)."""
    reports = {}
    for head_dim, pv_fp8, codes, raw_tail in ((64, False, 0, False), (64, True, 0, False), (72, False, 0, False),
                                              (72, True, 0, False), (72, True, 1, False), (72, True, 1, True),
                                              (64, True, 2, True), (64, True, 1, True)):
        operand = "*fp8e4nv" if raw_tail else "*i8"
        types = {"q_ptr": operand, "q_scale_ptr": "*fp32", "k_ptr": operand, "k_scale_ptr": "*fp32",
                 "v_ptr": "*fp8e4nv" if pv_fp8 else "*bf16", "v_scale_ptr": "*fp32",
                 "out_ptr": "*fp8e4nv" if codes else "*bf16", "out_scale_ptr": "*fp32", "score_scale": TRACED_FLOAT}
        constants = dict(HEAD_DIM=head_dim, DIM_A=64, DIM_B=32, DIM_BV=16, HAS_TAIL=head_dim > 64, PV_FP8=pv_fp8,
                         STATIC_SCALES=raw_tail, OUT_CODES=codes, RAW_TAIL=raw_tail, BLOCK_M=128, BLOCK_N=128,
                         **({"stride_vn": 1} if pv_fp8 else {"stride_vd": 1}))
        label = f"d{head_dim}_{'fp8' if pv_fp8 else 'bf16'}_pv" + ["", "_fp8_codes", "_fp8_split_codes"][codes] + (
            "_static_raw_tail" if raw_tail else "")
        reports[label] = _report(_attention_kernel.fn, types, constants, 8, 3)
        if raw_tail and codes == 1:  # as the models run it
            tile = dict(BLOCK_M=64 if head_dim > 64 else 128, BLOCK_N=128)
            reports[f"{label}_swept_tile"] = _report(_attention_kernel.fn, types, {**constants, **tile}, 4, 3)
    return reports


def _descriptor_type(block: list[int]) -> str:
    """The signature type of a TMA descriptor loading `block` tiles of fp8 codes, as a launch would specialise it."""
    codes = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, device="meta")
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return mangle_type(attention_hopper.TensorDescriptor(codes, [4096, 4096], [4096, 1], block, layout))


def hopper_attention_reports() -> dict:
    """The Gluon attention kernel (MMAs in flight across the softmax) at its configs, head dim 64, bf16 output; at
    the default config with head dims 128 and 72 (PixArt: 64-wide main tiles, 32 / 16-wide tails) and with fp8 codes
    of two scales (a joint attention's two streams). `serialized`: ptxas made every warpgroup MMA wait at once
    (C7514)."""
    reports = {}
    for head_dim, (block_m, block_n, warps, stages), codes in (
            *((64, config, 0) for config in attention_hopper.CONFIGS), (128, attention_hopper.DEFAULT_CONFIG, 0),
            (72, attention_hopper.DEFAULT_CONFIG, 1), (64, attention_hopper.DEFAULT_CONFIG, 2)):
        dim, tail, value_tail = head_dim_split(head_dim)
        tail, value_tail = (tail, value_tail) if head_dim > dim else (dim, dim)  # (the main descriptors again)
        types = {"q_desc": _descriptor_type([block_m, dim]), "q_tail_desc": _descriptor_type([block_m, tail]),
                 "k_desc": _descriptor_type([block_n, dim]), "k_tail_desc": _descriptor_type([block_n, tail]),
                 "v_desc": _descriptor_type([dim, block_n]), "v_tail_desc": _descriptor_type([value_tail, block_n]),
                 "out_ptr": "*fp8e4nv" if codes else "*bf16", "scales_ptr": "*fp32", "out_scale_ptr": "*fp32",
                 "score_scale": "fp32"}
        label = f"d{head_dim}_{block_m}x{block_n}_{warps}w_{stages}s" + ["", "_codes", "_split_codes"][codes]
        reports[label] = _report(attention_hopper._attention_kernel, types,
                                 dict(HEAD_DIM=head_dim, OUT_CODES=codes, NUM_STAGES=stages, num_warps=warps), warps,
                                 stages, GluonASTSource)
    return reports


def conv_reports() -> dict:
    """The implicit-GEMM conv (3 x 3 taps, bias) at its GPU tile, 128 x 128 x 64, 8 warps, 3 stages: on static int8
    codes, on the bf16 input quantized per patch in the K loop, and on static fp8 codes."""
    reports = {}
    for label, per_patch, fp8 in (("conv3x3_int8", False, False), ("conv3x3_int8_per_patch", True, False),
                                  ("conv3x3_fp8", False, True)):
        codes = "*fp8e4nv" if fp8 else "*i8"
        types = {"a_ptr": "*bf16" if per_patch else codes, "w_ptr": codes, "out_ptr": "*bf16", "a_scale_ptr": "*fp32",
                 "a_zero_ptr": "*i32", "w_scale_ptr": "*fp32", "w_sum_ptr": "*i32", "bias_ptr": "*bf16"}
        constants = dict(KH=3, KW=3, HAS_BIAS=True, PER_PATCH=per_patch, FP8=fp8, OUT_RUN=16, BLOCK_M=128,
                         BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        reports[label] = _report(_conv_kernel, types, constants, 8, 3)
    return reports


def quantize_reports() -> dict:
    """The per-token quantize kernel as launched (`_launch_config`) for 2048-wide rows, fp8 codes: plain; after a
    LayerNorm + adaLN modulation (PixArt's prologue); and that over CogVideoX's text / video concatenation (1920-wide
    rows, each part read in place with its own modulation)."""
    reports = {}
    for label, norm, modulated, concat in (("fp8_plain", 0, False, False), ("fp8_layernorm_adaln", 1, True, False),
                                           ("fp8_concat_layernorm_adaln", 1, True, True)):
        rows, block, warps = _launch_config(1920 if concat else 2048, False, concat)
        types = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "w_ptr": "*bf16",
                 "b_ptr": "*bf16", "mul_ptr": "*bf16", "add_ptr": "*bf16", "tail_ptr": "*bf16", "tail_mul_ptr": "*bf16",
                 "tail_add_ptr": "*bf16", "eps": TRACED_FLOAT}
        constants = dict(NORM=norm, HAS_W=False, HAS_B=False, HAS_MUL=modulated, HAS_ADD=modulated, ACT=0,
                         GATED=False, FP8=True, CONCAT=concat, ROWS=rows, BLOCK_K=block, stride_mul_c=1,
                         stride_add_c=1)
        reports[label] = _report(_quantize_rows_kernel, types, constants, warps, 3)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"target": "cuda sm_90", "triton": triton.__version__, "gemm": gemm_reports(),
              "attention": attention_reports(), "hopper_attention": hopper_attention_reports(), "conv": conv_reports(),
              "quantize": quantize_reports()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for family in ("gemm", "attention", "hopper_attention", "conv", "quantize"):
        for name, report in result[family].items():
            print(family, name, report)


if __name__ == "__main__":
    main()
