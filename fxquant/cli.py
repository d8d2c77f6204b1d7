"""Command line: `fxquant demo | eval | quantize | export-onnx | inspect`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import RECIPES
from .errors import FxquantError
from .reference.pipeline import REFERENCE_MODELS


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(recipes=args.recipes, out_dir=args.out, samples=args.samples, calibration=args.calibration,
             seed=args.seed)


def _eval(args) -> None:
    from .quality import evaluate_all

    models = list(REFERENCE_MODELS) if args.models == ["all"] else args.models
    recipes = sorted(RECIPES) if args.recipes == ["all"] else args.recipes
    table = evaluate_all(models, recipes, samples=args.samples, seed=args.seed, device=args.device, out_dir=args.out,
                         batch=args.batch, calibration=args.calibration, runner=args.runner)
    print("\n" + table)


def _quantize(args) -> None:
    from diffusers import DiffusionPipeline

    from .api import find_denoiser, quantize_pipeline
    from .checkpoint import save

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    quantize_pipeline(pipe, args.recipe, prompts[: args.num_prompts], num_inference_steps=args.steps,
                      batch_size=args.batch_size, **dict(args.pipe_arg))
    qmodel = getattr(pipe, find_denoiser(pipe))
    print(qmodel.plan.summary())
    print(f"saved: {save(qmodel, args.out)}")


def _export_onnx(args) -> None:
    from diffusers import DiffusionPipeline

    from .api import export_onnx, find_denoiser
    from .backends.onnx import first_denoiser_call, integer_op_count
    from .checkpoint import load

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    name = find_denoiser(pipe)
    setattr(pipe, name, load(args.checkpoint))
    example = first_denoiser_call(pipe, name, prompt=args.prompt, **dict(args.pipe_arg))
    path = export_onnx(getattr(pipe, name), args.out, example, act_form=args.act_form,
                       dynamic_batch=args.dynamic_batch, weight_codes=args.weight_codes)
    print(f"exported: {path} ({integer_op_count(path)} integer matmul / conv ops in ONNX Runtime's optimised graph)")


def _pipe_arg(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value parsed as JSON, or the raw string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--pipe-arg expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _inspect(args) -> None:
    from .plan import QuantPlan

    path = Path(args.checkpoint)
    plan_file = path / "plan.json" if path.is_dir() else path
    if not plan_file.exists():
        raise FxquantError(f"No plan at {plan_file}; pass a checkpoint directory or a plan.json.")
    print(QuantPlan.from_json(plan_file.read_text()).summary())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description="Post-training quantization of diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="quantize the built-in t2i-dit reference model and compare with full "
                                            "precision")
    demo.add_argument("--recipes", nargs="+", default=["w8a8", "w8a8-static"])
    demo.add_argument("--out", default="fxquant-demo", help="directory for demo.json and image grids")
    demo.add_argument("--samples", type=int, default=20)
    demo.add_argument("--calibration", type=int, default=16, help="calibration prompts")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser("eval", help="quality harness: recipes x reference models against full precision")
    evaluate.add_argument("--models", nargs="+", default=["all"], help=f"{sorted(REFERENCE_MODELS)} or all")
    evaluate.add_argument("--recipes", nargs="+", default=["all"],
                          help=f"{sorted(RECIPES)} or all; overrides as NAME:field=value,... "
                               "(e.g. mixdq-w4a8-mp:target_bits=5.0)")
    evaluate.add_argument("--samples", type=int, default=100, help="per image model (video: a quarter, 8 frames)")
    evaluate.add_argument("--calibration", type=int, default=32, help="calibration prompts")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--batch", type=int, default=100)
    evaluate.add_argument("--out", default="fxquant-eval")
    evaluate.add_argument("--runner", default="torch",
                          choices=["torch", "onnx", "onnx:per_token_symmetric", "onnx:per_tensor", "compiled"],
                          help="onnx: quantized denoisers exported and run on ONNX Runtime (CPU; after the colon, "
                               "another activation form of the export); compiled: their repeated blocks compiled "
                               "with backend=fxquant (fused kernels on CUDA)")
    evaluate.set_defaults(run=_eval)

    quantize = commands.add_parser("quantize", help="quantize a saved diffusers pipeline's denoiser and save it")
    quantize.add_argument("--pipeline", required=True, help="directory written by save_pretrained")
    quantize.add_argument("--recipe", default="w8a8",
                          help=f"{sorted(RECIPES)}, with overrides as NAME:field=value,... "
                               "(e.g. mixdq-w4a8-mp:target_bits=5.0)")
    quantize.add_argument("--prompts", required=True, help="text file, one calibration prompt per line")
    quantize.add_argument("--num-prompts", type=int, default=32)
    quantize.add_argument("--steps", type=int, default=20)
    quantize.add_argument("--batch-size", type=int, default=4)
    quantize.add_argument("--pipe-arg", type=_pipe_arg, action="append", default=[], metavar="KEY=VALUE",
                          help="extra pipeline call argument, value as JSON (e.g. height=512); repeatable")
    quantize.add_argument("--out", required=True, help="checkpoint directory to write")
    quantize.set_defaults(run=_quantize)

    export = commands.add_parser("export-onnx", help="export a quantized checkpoint to ONNX for ONNX Runtime")
    export.add_argument("--pipeline", required=True, help="the diffusers pipeline directory it was quantized from")
    export.add_argument("--checkpoint", required=True, help="directory written by fxquant quantize / fxquant.save")
    export.add_argument("--out", required=True, help="path of the .onnx file to write")
    export.add_argument("--act-form", choices=["per_token", "per_token_symmetric", "per_tensor"], default="per_token",
                        help="per_token: fxquant's activations, exact; per_token_symmetric / per_tensor: faster "
                             "forms that change the numbers (README: ONNX Runtime)")
    export.add_argument("--weight-codes", choices=["auto", "int8", "uint8"], default="auto",
                        help="the integer products' weight codes: int8 (ORT's u8 x s8 kernels), uint8 (u8 x u8, exact "
                             "on x86 CPUs without VNNI, where u8 x s8 saturates) or auto (by this CPU)")
    export.add_argument("--dynamic-batch", action="store_true",
                        help="keep the batch dimension symbolic (not every model exports so); default: the call's")
    export.add_argument("--prompt", default="a photo", help="prompt of the pipeline call whose first denoiser call gives the example inputs")
    export.add_argument("--pipe-arg", type=_pipe_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="extra pipeline call argument (the export's shapes follow it), value as JSON")
    export.set_defaults(run=_export_onnx)

    inspect = commands.add_parser("inspect", help="print the plan of a checkpoint")
    inspect.add_argument("checkpoint", help="checkpoint directory or plan.json")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except FxquantError as err:
        print(f"fxquant {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
