"""ONNX Runtime on this CPU: fp32 ORT vs fxquant's int8 graphs (per-token, symmetric per-token and per-tensor
activations; and with int8 Q K^T, `attention=int8`) vs torch.

    python benchmarks/onnx_cpu.py --out benchmarks/results/onnx-cpu.json

Models: a PixArt-alpha-width block stack (hidden 1152 = 16 heads x 72, 1024 tokens, 4096-wide captions, random
weights) and the t2i-dit reference denoiser at a classifier-free-guidance batch. One process, the same inputs,
2 threads for both ORT and torch, median of --runs calls per variant, variants interleaved round-robin. Also: the
accuracy of each ORT graph against torch (fp32 and fxquant W8A8 per-token), ORT-vs-torch parity of W8A8 on the three
reference models' recorded denoiser calls with the integer-op census. Timings are reported, never asserted.
`--columns-ab`: only the stack's ORT graphs, the per-token form's zero-point columns per layer against per weight
shape (and the symmetric form), interleaved. `--weight-codes-ab`: only the stack's ORT graphs with int8 against
uint8 weight codes, interleaved, with their parity. `--op-profile`: only ORT's kernel time per operator type of the
stack's fp32 and int8 graphs. `--group-wise-ab`: only the stack's ORT graphs of W4A8 with group-wise against
per-channel weight scales, interleaved.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from diffusers import PixArtTransformer2DModel

import fxquant
from fxquant.backends.onnx import export_float_onnx, integer_op_count, session
from fxquant.backends.onnx.translations import ACT_FORMS
from fxquant.metrics import relative_l2
from fxquant.quality import calibration_prompts, record_denoiser_calls
from fxquant.reference.pipeline import REFERENCE_MODELS, load_reference_pipeline

THREADS = 2


def pixart_width_stack(layers: int) -> tuple[torch.nn.Module, dict]:
    """PixArt-alpha's block at full width (1152, 16 heads, 4096-wide T5 captions, 120 tokens), 64x64 latent /
    patch 2 = 1024 tokens, `layers` blocks, random weights; and one batch-1 input."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=layers, cross_attention_dim=1152, caption_channels=4096,
                                     sample_size=64, patch_size=2, norm_type="ada_norm_single",
                                     use_additional_conditions=False).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 64, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 120, 4096, generator=generator),
                  timestep=torch.tensor([500]))
    return model, inputs


def reference_denoiser(name: str, prompts: int) -> tuple[torch.nn.Module, list[dict]]:
    """A reference model's denoiser and its recorded calls while generating `prompts` prompts (CFG batch)."""
    pipe = load_reference_pipeline(name)
    calls: list = []
    steps, guidance = REFERENCE_MODELS[name]
    with record_denoiser_calls(pipe.denoiser, calls):
        pipe(calibration_prompts(prompts, seed=7), num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0))
    return pipe.denoiser, [kwargs for _args, kwargs in calls]


def interleaved_medians(calls: dict, runs: int) -> dict[str, float]:
    """Median seconds per call, the variants timed round-robin (one call each per round, after 3 warm-up rounds)
    so that drift in this shared machine's speed hits every variant alike."""
    times = {label: [] for label in calls}
    for round_index in range(runs + 3):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index >= 3:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def _ort_call(path: Path, inputs: dict):
    ort_session = session(path, THREADS, spin=False)  # idle sessions must not busy-wait on the shared cores
    feed = {i.name: inputs[i.name].numpy() for i in ort_session.get_inputs()}
    return lambda: torch.from_numpy(ort_session.run(None, feed)[0])


def _torch_call(model, inputs: dict):
    def call():
        with torch.no_grad():
            return model(**{**inputs, "return_dict": False})[0]
    return call


def speed_and_accuracy(name: str, model: torch.nn.Module, inputs: dict, calibration: list[dict], runs: int,
                       directory: Path) -> dict:
    """Every variant timed on `inputs`; accuracy of each against torch fp32 and torch W8A8 (and, for the plan with
    int8 attention, against its own torch reference: `rel_l2_vs_torch_w8a8_int8_attention`)."""
    qmodel = fxquant.quantize(copy.deepcopy(model), "w8a8", calibration)
    attention_model = fxquant.quantize(copy.deepcopy(model), "w8a8:attention=int8", calibration)
    variants = {"torch fp32": _torch_call(model, inputs), "torch fxquant w8a8": _torch_call(qmodel, inputs),
                "torch fxquant w8a8 + int8 attention": _torch_call(attention_model, inputs),
                "ort fp32": _ort_call(export_float_onnx(model, directory / f"{name}-fp32.onnx", inputs,
                                                      dynamic_batch=False), inputs)}
    integer_ops = {}
    exports = [(plan, form, suffix) for plan, forms, suffix in (
        (qmodel, ACT_FORMS, ""), (attention_model, ("per_token", "per_token_symmetric"), " + int8 attention"))
        for form in forms]
    for plan, form, suffix in exports:
        path = fxquant.export_onnx(plan, directory / f"{name}-{form}{suffix.replace(' ', '_')}.onnx", inputs,
                                   act_form=form, dynamic_batch=False)
        variants[f"ort int8 {form}{suffix}"] = _ort_call(path, inputs)
        integer_ops[f"ort int8 {form}{suffix}"] = integer_op_count(path)
        # one per quantized layer, plus one per attention call the model makes without a mask (a masked call, e.g.
        # t2i-dit's cross-attention, keeps the model's own attention)
        assert integer_ops[f"ort int8 {form}{suffix}"] >= len(plan.plan.quantized_layers()), (name, form, suffix)
    outputs = {label: call() for label, call in variants.items()}
    rows = []
    for label, seconds in interleaved_medians(variants, runs).items():
        rows.append({"variant": label, "median_ms": seconds * 1e3,
                     "rel_l2_vs_torch_fp32": relative_l2(outputs[label], outputs["torch fp32"]),
                     "rel_l2_vs_torch_w8a8": relative_l2(outputs[label], outputs["torch fxquant w8a8"])})
        if label in integer_ops:
            rows[-1]["integer_ops"] = integer_ops[label]
        if label.startswith("ort") and label.endswith("int8 attention"):
            rows[-1]["rel_l2_vs_torch_w8a8_int8_attention"] = relative_l2(
                outputs[label], outputs["torch fxquant w8a8 + int8 attention"])
        print(f"{name:24s} {label:42s} {seconds * 1e3:9.1f} ms  vs fp32 {rows[-1]['rel_l2_vs_torch_fp32']:.4f}  "
              f"vs w8a8 {rows[-1]['rel_l2_vs_torch_w8a8']:.4f}", flush=True)
    fp32_ort = next(r["median_ms"] for r in rows if r["variant"] == "ort fp32")
    for row in rows:
        row["speedup_vs_ort_fp32"] = fp32_ort / row["median_ms"]
    return {"model": name, "quantized_layers": len(qmodel.plan.quantized_layers()),
            "quantized_attention_layers": len(attention_model.plan.quantized_attention()),
            "input_shapes": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}, "rows": rows}


def zero_point_columns_ab(model: torch.nn.Module, inputs: dict, runs: int, directory: Path) -> dict:
    """ORT only, interleaved: fp32, the per-token form with zero-point columns per layer (the default) and per weight
    shape (every layer of a shape takes the shape's largest count), and the symmetric per-token form."""
    from fxquant.backends.onnx import export as onnx_export

    qmodel = fxquant.quantize(copy.deepcopy(model), "w8a8", [inputs])
    per_layer = onnx_export.zero_point_columns
    variants = {"ort fp32": _ort_call(export_float_onnx(model, directory / "ab-fp32.onnx", inputs,
                                                        dynamic_batch=False), inputs)}
    for label, columns in (("ort int8 per_token, columns per layer", per_layer),
                           ("ort int8 per_token, columns per shape", lambda q: {
                               key: count for key, count in per_layer(q).items() if not isinstance(key, str)})):
        onnx_export.zero_point_columns = columns
        try:
            path = fxquant.export_onnx(qmodel, directory / "ab.onnx", inputs, dynamic_batch=False)
        finally:
            onnx_export.zero_point_columns = per_layer
        variants[label] = _ort_call(path, inputs)
    variants["ort int8 per_token_symmetric"] = _ort_call(fxquant.export_onnx(
        qmodel, directory / "ab-symmetric.onnx", inputs, act_form="per_token_symmetric", dynamic_batch=False), inputs)
    medians = interleaved_medians(variants, runs)
    rows = [{"variant": label, "median_ms": seconds * 1e3, "speedup_vs_ort_fp32": medians["ort fp32"] / seconds}
            for label, seconds in medians.items()]
    for row in rows:
        print(f"columns A/B {row['variant']:40s} {row['median_ms']:8.1f} ms  {row['speedup_vs_ort_fp32']:.3f}x",
              flush=True)
    return {"rows": rows, "column_counts": sorted(set(per_layer(qmodel).values()))}


def _ab_rows(title: str, variants: dict, parity: dict, runs: int) -> list[dict]:
    """The interleaved medians of `variants` (label -> call; "ort fp32" among them) as rows with their speedup over
    ORT fp32 and, where `parity` has the label, the relative L2 against the plan's torch reference; printed."""
    medians = interleaved_medians(variants, runs)
    rows = [{"variant": label, "median_ms": seconds * 1e3, "speedup_vs_ort_fp32": medians["ort fp32"] / seconds,
             **({"rel_l2_vs_torch_same_plan": parity[label]} if label in parity else {})}
            for label, seconds in medians.items()]
    for row in rows:
        print(f"{title} {row['variant']:44s} {row['median_ms']:8.1f} ms  {row['speedup_vs_ort_fp32']:.3f}x  "
              f"{row.get('rel_l2_vs_torch_same_plan', 0):.4f}", flush=True)
    return rows


def group_wise_ab(model: torch.nn.Module, inputs: dict, runs: int, directory: Path, group: int = 128) -> dict:
    """ORT only, interleaved: fp32, W4A8 per-channel and group-wise (batched MatMulInteger over the groups) in the
    exact and symmetric per-token forms; each int8 graph's parity with its own plan's torch reference."""
    plans = {"per-channel": fxquant.quantize(copy.deepcopy(model), "w4a8", [inputs]),
             f"group {group}": fxquant.quantize(copy.deepcopy(model), "w4a8:weight_granularity=per_group,"
                                                f"weight_group_size={group}", [inputs])}
    variants = {"ort fp32": _ort_call(export_float_onnx(model, directory / "groups-fp32.onnx", inputs,
                                                        dynamic_batch=False), inputs)}
    parity = {}
    for plan_label, qmodel in plans.items():
        reference = _torch_call(qmodel, inputs)()
        for form in ("per_token", "per_token_symmetric"):
            label = f"ort w4a8 {plan_label} {form}"
            path = fxquant.export_onnx(qmodel, directory / f"{label.replace(' ', '-')}.onnx", inputs,
                                       act_form=form, dynamic_batch=False)
            variants[label] = _ort_call(path, inputs)
            parity[label] = relative_l2(variants[label](), reference)
    return {"rows": _ab_rows("group-wise A/B", variants, parity, runs), "group_wise_layers": sum(bool(layer.inputs_per_scale)
                                                   for layer in plans[f"group {group}"].plan.quantized_layers())}


def weight_codes_ab(model: torch.nn.Module, inputs: dict, runs: int, directory: Path) -> dict:
    """ORT only, interleaved: fp32 and W8A8 in the exact and symmetric per-token forms with int8 weight codes (ORT's
    u8 x s8 kernels) and uint8 ones (u8 x u8; `export_onnx`'s weight_codes); each int8 graph's parity with the plan's
    torch reference (u8 x s8 saturates on x86 without VNNI) and whether this CPU is such a one."""
    from fxquant.backends.onnx.export import saturating_u8s8

    qmodel = fxquant.quantize(copy.deepcopy(model), "w8a8", [inputs])
    reference = _torch_call(qmodel, inputs)()
    variants = {"ort fp32": _ort_call(export_float_onnx(model, directory / "codes-fp32.onnx", inputs,
                                                        dynamic_batch=False), inputs)}
    parity = {}
    for form in ("per_token", "per_token_symmetric"):
        for codes in ("int8", "uint8"):
            label = f"ort w8a8 {form} {codes} weights"
            path = fxquant.export_onnx(qmodel, directory / f"{label.replace(' ', '-')}.onnx", inputs, act_form=form,
                                       dynamic_batch=False, weight_codes=codes)
            variants[label] = _ort_call(path, inputs)
            parity[label] = relative_l2(variants[label](), reference)
    return {"rows": _ab_rows("weight codes A/B", variants, parity, runs), "cpu_saturates_u8s8": saturating_u8s8()}


def op_profile(model: torch.nn.Module, inputs: dict, runs: int, directory: Path) -> dict:
    """ORT's kernel time per operator type, per run (its profiler; 3 warm-up runs not counted), for the model's fp32
    graph and each int8 activation form of its W8A8 plan: where each graph's time goes."""
    qmodel = fxquant.quantize(copy.deepcopy(model), "w8a8", [inputs])
    paths = {"fp32": export_float_onnx(model, directory / "profile-fp32.onnx", inputs, dynamic_batch=False)}
    for form in ACT_FORMS:
        paths[f"int8 {form}"] = fxquant.export_onnx(qmodel, directory / f"profile-{form}.onnx", inputs, act_form=form,
                                                    dynamic_batch=False)
    result = {}
    for label, path in paths.items():
        ort_session = session(path, THREADS, profile_prefix=directory / label.replace(" ", "-"))
        feed = {i.name: inputs[i.name].numpy() for i in ort_session.get_inputs()}
        for _ in range(runs + 3):
            ort_session.run(None, feed)
        events = json.loads(Path(ort_session.end_profiling()).read_text())
        run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        counted = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                   and e["ts"] >= run_starts[3]]
        per_op = collections.Counter()
        for event in counted:
            per_op[event["args"]["op_name"]] += event["dur"] / runs / 1e3
        result[label] = {"kernel_ms_per_run": sum(per_op.values()),
                         "ms_per_run_by_op": {op: ms for op, ms in per_op.most_common()}}
        print(f"op profile {label:28s} {result[label]['kernel_ms_per_run']:8.1f} ms: "
              + ", ".join(f"{op} {ms:.1f}" for op, ms in per_op.most_common(6)), flush=True)
    return result


def reference_parity(name: str, directory: Path) -> dict:
    """W8A8 per-token ORT vs torch on a reference model's recorded denoiser calls (CFG batch of 4 prompts).

    Per call, next to the ORT-vs-torch gap: how far torch's own W8A8 output moves when the latent input is scaled
    by (1 + 1e-6) (the quantized model's conditioning: rounding flips cascade through the layers), and the error
    of torch W8A8 and of ORT against full precision (the quantization error each path adds)."""
    model, calls = reference_denoiser(name, prompts=4)
    qmodel = fxquant.quantize(copy.deepcopy(model), "w8a8", calls[::4])
    path = fxquant.export_onnx(qmodel, directory / f"{name}-parity.onnx", calls[0], dynamic_batch=False)
    ort_session = session(path, THREADS, spin=False)
    per_call = []
    for kwargs in calls:
        ort_out = torch.from_numpy(ort_session.run(None, {i.name: kwargs[i.name].numpy()
                                                          for i in ort_session.get_inputs()})[0])
        torch_out, fp_out = _torch_call(qmodel, kwargs)(), _torch_call(model, kwargs)()
        latent = "sample" if "sample" in kwargs else "hidden_states"
        nudged = {**kwargs, latent: kwargs[latent] * (1 + 1e-6)}
        per_call.append({"timestep": float(kwargs["timestep"].flatten()[0]),
                         "ort_vs_torch": relative_l2(ort_out, torch_out),
                         "torch_vs_torch_nudged_1e-6": relative_l2(_torch_call(qmodel, nudged)(), torch_out),
                         "torch_vs_fp": relative_l2(torch_out, fp_out), "ort_vs_fp": relative_l2(ort_out, fp_out)})
    gaps = [c["ort_vs_torch"] for c in per_call]
    result = {"model": name, "calls": len(calls), "max_rel_l2": max(gaps), "mean_rel_l2": statistics.mean(gaps),
              "max_quantization_error_gap": max(abs(c["ort_vs_fp"] - c["torch_vs_fp"]) for c in per_call),
              "integer_ops": integer_op_count(path), "quantized_layers": len(qmodel.plan.quantized_layers()),
              "per_call": per_call}
    print(f"parity {name}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "per_call"), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2, help="blocks of the PixArt-width stack")
    parser.add_argument("--out", default="benchmarks/results/onnx-cpu.json")
    parser.add_argument("--parity-only", action="store_true", help="rerun only the reference parity, keeping the "
                        "speed section already in --out")
    parser.add_argument("--columns-ab", action="store_true", help="only the PixArt-width stack's ORT graphs, "
                        "zero-point columns per layer against per weight shape (written to --out)")
    parser.add_argument("--op-profile", action="store_true", help="only ORT's kernel time per operator type of the "
                        "PixArt-width stack's fp32 and int8 graphs (written to --out)")
    parser.add_argument("--group-wise-ab", action="store_true", help="only the PixArt-width stack's ORT graphs, "
                        "W4A8 group-wise against per-channel weight scales (written to --out)")
    parser.add_argument("--weight-codes-ab", action="store_true", help="only the PixArt-width stack's ORT graphs, "
                        "int8 against uint8 weight codes (written to --out)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    stack_only = {"op_profile": op_profile, "columns_ab": zero_point_columns_ab, "group_wise_ab": group_wise_ab,
                  "weight_codes_ab": weight_codes_ab}
    for option, run in stack_only.items():
        if getattr(args, option):
            with tempfile.TemporaryDirectory() as tmp:
                measured = run(*pixart_width_stack(args.layers), args.runs, Path(tmp))
            result = {"date": time.strftime("%Y-%m-%d"), "threads": THREADS, "onnxruntime": onnxruntime.__version__,
                      "runs": args.runs, "model": f"pixart-width-{args.layers}-blocks",
                      **({"op_profile": measured} if option == "op_profile" else measured)}
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
            return
    if args.parity_only:
        result = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            result["reference_parity"] = [reference_parity(name, Path(tmp)) for name in REFERENCE_MODELS]
        result["parity_date"] = time.strftime("%Y-%m-%d")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        stack, stack_inputs = pixart_width_stack(args.layers)
        t2i, t2i_calls = reference_denoiser("t2i-dit", prompts=16)
        speed = [speed_and_accuracy(f"pixart-width-{args.layers}-blocks", stack, stack_inputs, [stack_inputs],
                                    args.runs, directory),
                 speed_and_accuracy("t2i-dit (batch 32)", t2i, t2i_calls[10], t2i_calls[::5], args.runs, directory)]
        parity = [reference_parity(name, directory) for name in REFERENCE_MODELS]
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": THREADS, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "runs": args.runs, "speed": speed, "reference_parity": parity}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
