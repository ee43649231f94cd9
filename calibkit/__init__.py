"""calibkit: post-training quantization calibration and QAT, taught on a real CIFAR-10 model."""

__version__ = "0.1.0"

from .errors import CalibKitError, CalibrationError, CheckpointError, DataNotFoundError, PrepareError, StateError
from .quant import fake_quantize, qrange, quantize, quantize_dequantize, scale_from_amax, sqnr_db
