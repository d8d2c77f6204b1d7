"""The public verbs: prepare, convert, quantize, quantize_pipeline, inspect_passes.

    prepared = fxquant.prepare(model, recipe="w8a8")     # capture + annotate + observe
    ... call `prepared` like the model (or put it in a diffusers pipeline and generate) ...
    qmodel = fxquant.convert(prepared)                    # calibrate, balance, sensitivity, lower

The model is converted in place (its quantized layers are replaced); deepcopy it first to keep a float copy.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import bind_arguments, capture
from .config import QuantConfig, get_config
from .errors import CalibrationError, FxquantError
from .model import PreparedModel, QuantizedModel
from .passes import CONVERT_PASSES, PASS_NAMES, PREPARE_PASSES, run_passes
from .state import QuantState

Calibration = Iterable[dict[str, Any]] | Callable[[PreparedModel], Any]
DENOISER_ATTRIBUTES = ("transformer", "unet")


def prepare(model: nn.Module, recipe: str | QuantConfig = "w8a8",
            example_kwargs: dict[str, Any] | None = None) -> PreparedModel:
    """Wrap `model` for calibration under `recipe`. Its graph is captured from `example_kwargs` if given, else
    from the first call."""
    if isinstance(model, (PreparedModel, QuantizedModel)):
        raise FxquantError(f"The model is already a {type(model).__name__}; pass the original float model.")
    if not isinstance(model, nn.Module):
        raise FxquantError(f"prepare expects a torch.nn.Module, got {type(model).__name__}.")
    config = get_config(recipe)
    model.eval()
    state = QuantState(model=model, config=config)
    prepared = PreparedModel(model, state, lambda s: run_passes(s, PREPARE_PASSES))
    if example_kwargs is not None:
        prepared.capture_and_prepare(bind_arguments(model, (), example_kwargs))
    return prepared


def convert(prepared: PreparedModel) -> QuantizedModel:
    """Calibrated PreparedModel -> QuantizedModel with packed int8 / int4 / int2 / fp8 weights (in place)."""
    if not isinstance(prepared, PreparedModel):
        raise FxquantError(f"convert expects the PreparedModel returned by fxquant.prepare, got {type(prepared).__name__}.")
    state = prepared._state
    if state.captured is None:
        raise CalibrationError(
            "convert() was called before any calibration: call the prepared model (or a pipeline that holds it) on "
            "representative inputs first, or use fxquant.quantize(model, recipe, calibration)."
        )
    run_passes(state, CONVERT_PASSES)
    prepared._converted = True
    return QuantizedModel(state.model, state.plan)


def calibrate(prepared: PreparedModel, calibration: Calibration, description: str = "calibrating") -> None:
    """Run `calibration` through `prepared`: a callable(prepared) or an iterable of forward-kwargs dicts."""
    if callable(calibration) and not isinstance(calibration, (list, tuple)):
        calibration(prepared)
        return
    batches = list(calibration)
    if not batches:
        raise CalibrationError("The calibration iterable is empty: pass at least one dict of forward keyword arguments.")
    for index, kwargs in enumerate(batches):
        if not isinstance(kwargs, dict):
            raise CalibrationError(
                f"Calibration batch {index} is a {type(kwargs).__name__}; each batch must be a dict of the model's "
                f"forward keyword arguments (e.g. {{'hidden_states': x, 'timestep': t, ...}}: inputs get their roles "
                f"from their names), or pass a callable(prepared) that runs the model itself.")
    for kwargs in tqdm(batches, desc=description, unit="batch"):
        prepared(**kwargs)


def quantize(model: nn.Module, recipe: str | QuantConfig, calibration: Calibration) -> QuantizedModel:
    """prepare + calibrate + convert in one call."""
    prepared = prepare(model, recipe)
    calibrate(prepared, calibration)
    return convert(prepared)


def find_denoiser(pipe) -> str:
    """Name of the pipeline attribute holding the denoiser ("transformer" or "unet")."""
    for name in DENOISER_ATTRIBUTES:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise FxquantError(
        f"{type(pipe).__name__} has no denoiser at .transformer or .unet; pass the denoiser to fxquant.quantize."
    )


@contextlib.contextmanager
def _pipeline_progress_hidden(pipe):
    """Hide a diffusers pipeline's own per-call progress bar inside the block; the user's setting comes back after."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        pipe._progress_bar_config = previous


def quantize_pipeline(pipe, recipe: str | QuantConfig, prompts: list[str], num_inference_steps: int = 20,
                      batch_size: int = 4, seed: int = 0, **pipe_kwargs) -> Any:
    """Quantize a diffusers pipeline's denoiser by calibrating through the pipeline itself.

    The prompts are generated in batches (latents only, no VAE decode) with the prepared denoiser in place; then
    the QuantizedModel is swapped in and the pipeline is returned, ready to generate. Mixed-precision recipes with
    content_metric="render" score content layers by generating the first prompts again with the pipeline.
    """
    if not prompts:
        raise CalibrationError("quantize_pipeline needs at least one calibration prompt.")
    name = find_denoiser(pipe)
    prepared = prepare(getattr(pipe, name), recipe)
    setattr(pipe, name, prepared)
    accepts_output_type = "output_type" in inspect.signature(pipe.__call__).parameters
    extra = {"output_type": "latent"} if accepts_output_type and "output_type" not in pipe_kwargs else {}
    state = prepared._state

    def render() -> torch.Tensor:
        """The first config.render_prompts prompts generated with the denoiser as it is now (fixed seed)."""
        state.rendering = True
        try:
            out = pipe(prompts[:state.config.render_prompts], num_inference_steps=num_inference_steps,
                       generator=torch.Generator("cpu").manual_seed(seed), **extra, **pipe_kwargs)
        finally:
            state.rendering = False
        return torch.as_tensor(out.images if hasattr(out, "images") else out[0])

    state.render = render
    label = recipe if isinstance(recipe, str) else recipe.name
    try:
        with _pipeline_progress_hidden(pipe):  # one bar for calibration (and the sensitivity pass's), not one per call
            for start in tqdm(range(0, len(prompts), batch_size), desc=f"calibrating {label}", unit="batch"):
                batch = prompts[start:start + batch_size]
                generator = torch.Generator("cpu").manual_seed(seed + start)
                pipe(batch, num_inference_steps=num_inference_steps, generator=generator, **extra, **pipe_kwargs)
            qmodel = convert(prepared)
    except BaseException:  # hand the pipeline its own model back (converted in part if convert itself failed)
        setattr(pipe, name, prepared.model)
        raise
    setattr(pipe, name, qmodel)
    return pipe


def inspect_passes(model: nn.Module, recipe: str | QuantConfig, calibration: Calibration, until: str) -> QuantState:
    """Run the compiler up to and including pass `until` and return its state (graph, plan, observers).

    For users and tests who look inside: e.g. `inspect_passes(m, "w8a8", [kwargs], until="annotate").plan`.
    """
    if until not in PASS_NAMES:
        raise ValueError(f"Unknown pass {until!r}; passes are {PASS_NAMES}.")
    prepared = prepare(model, recipe)
    state = prepared._state
    batches = [calibration] if isinstance(calibration, dict) else list(calibration)
    if until == "annotate":
        state.captured = capture(model, bind_arguments(model, (), batches[0]))
        return run_passes(state, ("annotate",))
    calibrate(prepared, batches)
    stop = PASS_NAMES.index(until)
    run_passes(state, tuple(name for name in CONVERT_PASSES if PASS_NAMES.index(name) <= stop))
    return state


def export_onnx(qmodel: QuantizedModel, path, example_kwargs: dict, act_form: str = "per_token",
                dynamic_batch: bool = True, weight_codes: str = "auto"):
    """QuantizedModel -> ONNX graph at `path` that ONNX Runtime runs on integer kernels (see
    fxquant.backends.onnx.export_onnx; imported here on first use, so `import fxquant` does not load onnx)."""
    from .backends.onnx import export_onnx as export

    return export(qmodel, path, example_kwargs, act_form=act_form, dynamic_batch=dynamic_batch,
                  weight_codes=weight_codes)
