"""Exception types raised by calibkit.

Every error names the parameter (or object) at fault and, where one exists, the allowed range,
so that a user can fix the call without reading the source.
"""


class CalibKitError(Exception):
    """Base class for every calibkit-specific error."""


class CalibrationError(CalibKitError, RuntimeError):
    """Calibration cannot produce quantization parameters (no data seen, NaN/Inf input, ...)."""


class DataNotFoundError(CalibKitError, FileNotFoundError):
    """No dataset could be found or downloaded; the message says which command fixes it."""


class CheckpointError(CalibKitError, ValueError):
    """A checkpoint file is missing, corrupt, or does not match what the caller expects."""


class ModelSpecError(CalibKitError, ValueError):
    """A model spec (``"package.module:callable"``) does not parse, import, or build a ``torch.nn.Module``."""


class PrepareError(CalibKitError, RuntimeError):
    """`prepare` cannot insert quantizers into a model (for example, it is not traceable by torch.fx)."""


class StateError(CalibKitError, RuntimeError):
    """A fake-quantize state was requested in the wrong model mode (train vs eval)."""
