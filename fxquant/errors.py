"""Exceptions fxquant raises. Every message names the layer, argument or file at fault and the fix."""


class FxquantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class CaptureError(FxquantError):
    """The model could not be captured into an FX graph with torch.export."""


class RecipeError(FxquantError, ValueError):
    """Unknown recipe name or an invalid configuration value."""


class CalibrationError(FxquantError):
    """Calibration is missing, or saw values that cannot be quantized (NaN / Inf)."""


class CheckpointError(FxquantError):
    """A checkpoint directory is incomplete, corrupted, or belongs to another model."""
