"""The quantization core: numerics, histograms, observers, fake-quantize states, qconfig, prepare, convert,
calibrate, a generic QAT loop and prepared-model files.

It imports nothing from the CIFAR example, the analysis tools or the tutorial (import-linter checks this in the
test suite), so it works the same on any model: pass it your own modules, batches, loss and augmentation.
"""

from calibkit.quant.numerics import fake_quantize, qrange, quantize, quantize_dequantize, scale_from_amax, sqnr_db
from calibkit.quant.observers import (
    FixedScaleObserver, KLObserver, MinMaxObserver, MixObserver, MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver, MSEObserver, ObserverBase, PercentileObserver, get_observer_class,
    observer_names, register_observer,
)
from calibkit.quant.fake_quantize import (
    FakeQuantize, FakeQuantState, fix_activation_scales, get_fake_quantize_state, named_quantizers, reset_observers,
    set_fake_quantize,
)
from calibkit.quant.qconfig import QConfig, QuantSpec, get_default_qconfig
from calibkit.quant.prepare import prepare
from calibkit.quant.convert import convert, named_int_ops
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.io import load_prepared, save_prepared
from calibkit.quant.onnx_export import export_float_onnx, export_onnx
