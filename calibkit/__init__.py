"""calibkit: post-training quantization calibration and QAT, taught on a real CIFAR-10 model.

The core API is imported here; the notebook helpers (plots, widgets, experiments, debug, QAT) are
submodules loaded on first use (``calibkit.widgets``, ``calibkit.experiments`` ...), so
``import calibkit`` stays light.

Typical use::

    import calibkit as ck
    qconfig = ck.get_default_qconfig(activation_observer="mse", weight_observer="min_max")
    qmodel = ck.prepare(float_model.eval(), qconfig, example_inputs=(x[:1],))
    seconds = ck.calibrate(qmodel, calib_batches)            # CALIBRATION state
    ck.set_fake_quantize(qmodel, ck.FakeQuantState.VALIDATION)
    acc = ck.evaluate(qmodel, val_images, val_labels)
    int_model = ck.convert(qmodel)                            # integer reference model
"""

import importlib

__version__ = "0.1.0"

from .errors import CalibKitError, CalibrationError, CheckpointError, DataNotFoundError, PrepareError, StateError
from .quant import fake_quantize, qrange, quantize, quantize_dequantize, scale_from_amax, sqnr_db
from .observers import (
    FixedScaleObserver, KLObserver, MinMaxObserver, MixObserver, MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver, MSEObserver, ObserverBase, PercentileObserver, get_observer_class,
    observer_names, register_observer,
)
from .fake_quantize import (
    FakeQuantize, FakeQuantState, fix_activation_scales, get_fake_quantize_state, named_quantizers, reset_observers,
    set_fake_quantize,
)
from .qconfig import QConfig, QuantSpec, get_default_qconfig
from .prepare import prepare
from .convert import convert, named_int_ops
from .calibrate import calibrate, evaluate
from .data import (
    CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CifarTensors, ImageTensors, calibration_batches, denormalize,
    load_cifar10, load_image_folder, normalize, resolve_cache_dir, resolve_data_dir, unpack_archive,
)
from .models import build_model, cifar_resnet
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

_SUBMODULES = ("activation_stats", "calib_plots", "debug", "experiments", "histogram", "percentile_gallery", "plots",
               "qat", "runner", "train", "tutorial", "widgets")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'calibkit' has no attribute {name!r}")
