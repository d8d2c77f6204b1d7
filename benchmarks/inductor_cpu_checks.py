"""Inductor-side questions answered on the CPU: nested whole-model compilation against flat, and compiled-vs-eager
gaps against each model's own noise floor.

    python benchmarks/inductor_cpu_checks.py --out benchmarks/results/inductor-cpu-checks.json

The backend applies fxquant's rewrites and hands the graph to Inductor's CPU compiler; fxquant's ops stay opaque and
run their CPU references, so what differs from eager is Inductor's own work (nested regions, fusions, float
rounding). Residual fusion is off for PixArt and the UNet: linear_residual's CPU reference returns other strides than
its fake tensor, which CPU Inductor asserts on (on CUDA the op lowers to a Triton kernel). Each compile takes about a
minute here; none of this belongs in the test suite.

- `nested`: tiny models deep enough that nested regions get real subgraphs, quantized with R, at batch 1 and 2;
  relative L2 of the flat and the nested (`nest_blocks`) whole-model compile against eager. Batch 1 matters: a token
  range of a batch-1 tensor is a dense slice, whose clone Inductor drops (session 20: Flux nested 134 % off). And
  PixArt with static scales per timestep group, called in both groups, flat and nested.
- `precision`: bf16 tiny Flux and UNet. Flux: the whole-model compile, the regional one, the whole one with
  `time_text_embed` left eager, and the whole one under `emulate_precision_casts`, against eager. UNet: the
  whole-model compile against eager, and eager itself with its latent moved by 2^-8 (one bf16 step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch._inductor.config as inductor_config
from torch._inductor.compile_fx import compile_fx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from families import FAMILIES, inputs_at_timesteps  # noqa: E402

import fxquant  # noqa: E402
from fxquant.backends.triton.backend import fxquant_backend  # noqa: E402
from fxquant.metrics import relative_l2  # noqa: E402
from fxquant.model import compile_repeated_blocks  # noqa: E402

R = ("w8a8-fp8:static_hidden_activations=true,keep_condition_layers=false,attention=fp8-static,"
     "static_attention_outputs=true")


# blocks enough that nested regions are called more than once (a region called once is traced inline)
DEEPER = {"pixart": dict(num_layers=4), "sd3": dict(num_layers=4), "flux": dict(num_layers=3, num_single_layers=4),
          "cogvideox": dict(num_layers=4), "unet": {}}


def _backend(residuals: bool):
    def backend(gm, example_inputs):
        fxquant_backend(gm, example_inputs, options={"fxquant.fuse_residuals": residuals})
        return compile_fx(gm, example_inputs)
    return backend


def _compiled(model, inputs: dict, residuals: bool) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=_backend(residuals))(**inputs, return_dict=False)[0]


def _eager(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def nested_check(name: str, batch: int) -> dict:
    family, residuals = FAMILIES[name], name not in ("pixart", "unet")
    calls = [family.inputs(batch=batch, seed=seed) for seed in range(2)]
    qmodel = fxquant.quantize(family.build(**DEEPER[name]), R, calls)
    inputs = family.inputs(batch=batch, seed=5)
    eager = _eager(qmodel, inputs)
    row = {}
    for nested in (False, True):
        qmodel.nest_blocks(nested)
        row["nested_vs_eager" if nested else "flat_vs_eager"] = relative_l2(_compiled(qmodel, inputs, residuals), eager)
    return row


def nested_timestep_groups_check() -> dict:
    """PixArt with static scales per timestep group (the group index a buffer the nested blocks take in): one
    compiled model, flat and nested, called in both groups against eager."""
    family = FAMILIES["pixart"]
    steps = inputs_at_timesteps(family, [800, 200, 700, 300])
    qmodel = fxquant.quantize(family.build(**DEEPER["pixart"]), "w8a8-static:timestep_groups=[500]", steps)
    row = {}
    for nested in (False, True):
        qmodel.nest_blocks(nested)
        torch._dynamo.reset()
        compiled = torch.compile(qmodel, backend=_backend(False))
        for inputs in inputs_at_timesteps(family, [900, 100]):
            with torch.no_grad():
                out = compiled(**inputs, return_dict=False)[0]
            row[f"{'nested' if nested else 'flat'}_t{int(inputs['timestep'][0])}_vs_eager"] = relative_l2(
                out, _eager(qmodel, inputs))
    return row


def _bf16(inputs: dict, keep: tuple = ()) -> dict:
    return {key: value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() and key not in keep
            else value for key, value in inputs.items()}


def flux_precision_check() -> dict:
    family, ids = FAMILIES["flux"], ("img_ids", "txt_ids")
    model = family.build(**DEEPER["flux"]).to(torch.bfloat16)
    qmodel = fxquant.quantize(model, "w8a8-fp8", [_bf16(family.inputs(batch=1, seed=s), ids) for s in range(2)])
    qmodel.nest_blocks(False)  # the flat whole-model graph, and blocks compiled alone
    inputs = _bf16(family.inputs(batch=1, seed=5), ids)
    eager = _eager(qmodel, inputs)
    row = {"whole_vs_eager": relative_l2(_compiled(qmodel, inputs, True), eager)}
    embed = qmodel.model.time_text_embed
    embed.forward = torch.compiler.disable(embed.forward)
    row["whole_with_time_text_embed_eager_vs_eager"] = relative_l2(_compiled(qmodel, inputs, True), eager)
    del embed.forward
    with inductor_config.patch(emulate_precision_casts=True):
        row["whole_emulating_precision_casts_vs_eager"] = relative_l2(_compiled(qmodel, inputs, True), eager)
    torch._dynamo.reset()
    compile_repeated_blocks(qmodel.model, backend=_backend(True))
    row["regional_vs_eager"] = relative_l2(_eager(qmodel, inputs), eager)
    return row


def unet_precision_check() -> dict:
    family = FAMILIES["unet"]
    recipe = "w8a8-fp8:static_conv_activations=true,static_hidden_activations=true,keep_condition_layers=false"
    model = family.build().to(torch.bfloat16).eval()
    qmodel = fxquant.quantize(model, recipe, [_bf16(family.inputs(batch=2, seed=s)) for s in range(2)])
    qmodel.nest_blocks(False)  # the flat whole-model graph
    inputs = _bf16(family.inputs(batch=2, seed=5))
    eager = _eager(qmodel, inputs)
    nudged = _eager(qmodel, {**inputs, "sample": inputs["sample"] * (1 + 2**-8)})
    return {"whole_vs_eager": relative_l2(_compiled(qmodel, inputs, False), eager),
            "eager_nudged_input_vs_eager": relative_l2(nudged, eager)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", nargs="+", default=["nested", "precision"], choices=["nested", "precision"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"torch": torch.__version__, "recipe_nested": R}

    def save(key: str, row: dict) -> None:
        results[key] = row
        print(key, row, flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if "nested" in args.checks:
        for name in DEEPER:
            for batch in (1, 2):
                save(f"nested {name} batch {batch}", nested_check(name, batch))
        save("nested pixart timestep groups", nested_timestep_groups_check())
    if "precision" in args.checks:
        save("precision flux bf16", flux_precision_check())
        save("precision unet bf16", unet_precision_check())


if __name__ == "__main__":
    main()
