"""Checkpoint format: a directory that looks and loads like a diffusers model.

    out/config.json        {"_class_name": "QuantizedModel", "_fxquant_version", "model_class", "model_config",
                            "model_fingerprint", "weights": {"file", "sha256", "bytes"}}
    out/plan.json          the QuantPlan
    out/model.safetensors  packed int8 / int4 / fp8 weights, scales, balancing vectors, full-precision layers, buffers

`save` validates, writes everything into a temporary sibling directory, then renames it into place, so a crash
mid-save never leaves a directory that loads wrongly. `load` checks the checksum and that all three files come
from the same model, builds the model skeleton on the meta device (no full-precision weights are allocated for
quantized layers), swaps in the quantized modules and assigns the stored tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import attention
from .capture import model_fingerprint
from .errors import CheckpointError
from .model import QuantizedModel
from .modules import QuantConv2d, QuantLinear
from .passes.lower import replace_module
from .plan import QuantPlan

CONFIG_NAME = "config.json"
PLAN_NAME = "plan.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_CLASS = "QuantizedModel"
# 4- / 2-bit fields: field i of byte j holds element i * K / f + j (1: element f * j + i); 3: fp8 layers' 4-bit codes
# as sign / magnitude fields (quantizer.pack_sign_magnitude; 2: two's complement nibbles)
PACKING_FORMAT = 3
ALLOWED_MODEL_MODULES = ("diffusers.",)  # model classes a checkpoint may name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus non-persistent buffers, contiguous, no two sharing storage (safetensors' rule)."""
    tensors = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def save(qmodel: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write `qmodel` to directory `path` atomically (replacing an existing checkpoint there)."""
    if not isinstance(qmodel, QuantizedModel):
        raise CheckpointError(f"save expects the QuantizedModel returned by fxquant.convert, got {type(qmodel).__name__}.")
    model = qmodel.model
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if getattr(model, "config", None) is None or not hasattr(type(model), "from_config"):
        raise CheckpointError(
            f"save needs a diffusers model (ModelMixin with .config and from_config); {model_class} has none."
        )
    if not model_class.startswith(ALLOWED_MODEL_MODULES):
        raise CheckpointError(f"Model class {model_class} is not from {ALLOWED_MODEL_MODULES}; it cannot be saved.")
    target = Path(path)
    if target.exists() and not (target / CONFIG_NAME).exists():
        raise CheckpointError(f"{target} exists and is not an fxquant checkpoint; choose an empty or new directory.")
    fingerprint = qmodel.plan.model_fingerprint
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weights = tmp / WEIGHTS_NAME
        save_file(_all_tensors(model), str(weights), metadata={"model_fingerprint": fingerprint})
        config = {
            "_class_name": CHECKPOINT_CLASS,
            "_fxquant_version": _version(),
            "model_class": model_class,
            "model_config": {k: v for k, v in dict(model.config).items()},
            "model_fingerprint": fingerprint,
            "packing_format": PACKING_FORMAT,
            "weights": {"file": WEIGHTS_NAME, "sha256": _sha256(weights), "bytes": weights.stat().st_size},
        }
        _write_text(tmp / PLAN_NAME, qmodel.plan.to_json())
        _write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path.parent} is not an fxquant checkpoint: {path.name} is missing.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {err}); save the model again.") from err


def _model_class(name: str) -> type[nn.Module]:
    if not name.startswith(ALLOWED_MODEL_MODULES):
        raise CheckpointError(f"Checkpoint names model class {name!r}, which is not from {ALLOWED_MODEL_MODULES}.")
    module_name, _, class_name = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"Model class {name} of this checkpoint cannot be imported: {err}.") from err


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizedModel:
    """Directory written by `save` -> QuantizedModel on `device`. Raises CheckpointError on any inconsistency."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"No checkpoint directory at {root}.")
    config = _read_json(root / CONFIG_NAME)
    if config.get("_class_name") != CHECKPOINT_CLASS:
        raise CheckpointError(f"{root / CONFIG_NAME} is not an fxquant checkpoint config (_class_name).")
    plan = QuantPlan.from_dict(_read_json(root / PLAN_NAME))
    packed = [layer for layer in plan.quantized_layers() if min(layer.group_weight_bits or [layer.weight_bits]) < 8]
    packing_format = config.get("packing_format", 1)
    if packed and packing_format == 1:
        raise CheckpointError(f"{root} stores packed 4- / 2-bit weights in the interleaved layout of fxquant before "
                              "packing format 2; quantize the model again and save it.")
    if packing_format == 2 and any(layer.number_format == "fp8" and layer.weight_bits == 4 for layer in packed):
        raise CheckpointError(f"{root} stores fp8 layers' 4-bit codes as two's complement nibbles (packing format 2, "
                              "before sign / magnitude fields); quantize the model again and save it.")
    weights = root / config["weights"]["file"]
    if not weights.exists():
        raise CheckpointError(f"{root} is incomplete: {weights.name} is missing.")
    if _sha256(weights) != config["weights"]["sha256"]:
        raise CheckpointError(f"{weights} is corrupted: its sha256 does not match {CONFIG_NAME}. Save the model again.")
    with safe_open(str(weights), framework="pt") as f:
        stored_fingerprint = (f.metadata() or {}).get("model_fingerprint")
    fingerprints = {config["model_fingerprint"], plan.model_fingerprint, stored_fingerprint}
    if len(fingerprints) != 1:
        raise CheckpointError(
            f"{root} mixes files from different models (fingerprints {sorted(map(str, fingerprints))}); "
            "save the quantized model again into an empty directory."
        )

    cls = _model_class(config["model_class"])
    with torch.device("meta"):
        model = cls.from_config(config["model_config"])
    if model_fingerprint(model) != plan.model_fingerprint:
        raise CheckpointError(
            f"The plan in {root} was made for another model than {config['model_class']} with this config "
            "(fingerprint mismatch)."
        )
    tensors = load_file(str(weights), device=str(device))
    for layer in plan.quantized_layers():
        bias = tensors.get(f"{layer.fqn}.bias")
        bias_dtype = bias.dtype if bias is not None else torch.float32
        if layer.op == "conv2d":
            new = QuantConv2d.from_plan(layer, model.get_submodule(layer.fqn), bias_dtype)
        else:
            new = QuantLinear.from_plan(layer, bias is not None, bias_dtype)
        replace_module(model, layer.fqn, new)
    attention.install(model, plan)  # static-format attention modules get their scale buffers before assignment
    _assign(model, tensors, root)
    model.eval()
    return QuantizedModel(model, plan)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], root: Path) -> None:
    """Assign every stored tensor to the skeleton; every parameter and buffer must be covered."""
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{root / WEIGHTS_NAME} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = expected[name]
        if tuple(current.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: stored shape {tuple(tensor.shape)} != model shape {tuple(current.shape)}.")
        if current.dim() == 4 and current.is_contiguous(memory_format=torch.channels_last) and not (
                current.is_contiguous()):  # conv weights: saved contiguous, back to the skeleton's layout
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise CheckpointError(
                    f"{type(module).__name__} at {module_name!r} keeps tensor attribute {attr!r} outside its "
                    "parameters and buffers, so it cannot be restored from a checkpoint."
                )


def _version() -> str:
    from . import __version__

    return __version__
