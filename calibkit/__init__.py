"""calibkit: post-training quantization calibration and QAT, taught on a real CIFAR-10 model.

Four floors, imported in one direction only (checked by import-linter in the test suite):

* :mod:`calibkit.quant` -- the quantization core (observers, fake-quantize states, prepare, calibrate, convert,
  QAT); knows nothing of CIFAR or plotting;
* :mod:`calibkit.analysis` -- activation statistics, per-op error report, sensitivity, overrides;
* :mod:`calibkit.cifar` -- the CIFAR-10 example: data, models, float training, checkpoints;
* :mod:`calibkit.tutorial` -- what the notebooks stand on; nothing imports it.

The core API and the CIFAR data/model helpers are imported here, so ``import calibkit as ck`` is enough::

    qconfig = ck.get_default_qconfig(activation_observer="mse", weight_observer="min_max")
    qmodel = ck.prepare(float_model.eval(), qconfig, example_inputs=(x[:1],))
    seconds = ck.calibrate(qmodel, calib_batches)            # CALIBRATION state
    ck.set_fake_quantize(qmodel, ck.FakeQuantState.VALIDATION)
    acc = ck.evaluate(qmodel, val_images, val_labels)
    int_model = ck.convert(qmodel)                            # integer reference model
    ck.export_onnx(qmodel, x[:1], "model.onnx")                # ONNX QDQ, int8 in ONNX Runtime

How each method works: ``docs/methods.md``.
"""

from calibkit.version import __version__

from calibkit.errors import (
    CalibKitError, CalibrationError, CheckpointError, DataNotFoundError, ModelSpecError, PrepareError, StateError,
)
from calibkit.quant import (
    FakeQuantize, FakeQuantState, FixedScaleObserver, KLObserver, MinMaxObserver, MixObserver,
    MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, MSEObserver, ObserverBase,
    PercentileObserver, QConfig, QuantSpec, calibrate, convert, evaluate, fake_quantize, fix_activation_scales,
    get_default_qconfig, get_fake_quantize_state, get_observer_class, named_int_ops, named_quantizers,
    observer_names, prepare, qrange, quantize, quantize_dequantize, register_observer, reset_observers,
    scale_from_amax, set_fake_quantize, sqnr_db, save_prepared, load_prepared,
    export_float_onnx, export_onnx,
)
from calibkit.quant.calibrate import Accuracy
from calibkit.quant.qconfig import KEEP_FLOAT
from calibkit.cifar.data import (
    CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CifarTensors, ImageTensors, calibration_batches, denormalize,
    load_cifar10, load_image_folder, normalize, resolve_cache_dir, resolve_data_dir, unpack_archive,
)
from calibkit.cifar.models import build_model, cifar_resnet
from calibkit.cifar.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
