"""Your own model and your own images: calibrate and compare every method on any traceable classifier.

An application of the quantization core beside :mod:`calibkit.cifar` (it imports :mod:`calibkit.quant`,
:mod:`calibkit.analysis` and the shared modules, never the CIFAR example or the tutorial):

* :mod:`calibkit.own.spec` -- a model from a spec such as ``torchvision.models:resnet18`` and a ``state_dict``;
* :mod:`calibkit.own.data` -- an image folder (``torchvision.datasets.ImageFolder``) with inference
  preprocessing from ``torchvision.transforms.v2``, split with a seed into calibration and evaluation images;
* :mod:`calibkit.own.compare` -- every method calibrated on the same batches: accuracy, time, worst ops;
* :mod:`calibkit.own.report_files` -- ``report.json``, ``report.md`` and PNG plots, written all or nothing;
* :mod:`calibkit.own.cli` -- ``python -m calibkit compare ...`` / ``python -m calibkit calibrate ...``.
"""

from calibkit.own.compare import METHODS, Comparison, MethodResult, compare, method_qconfig
from calibkit.own.data import ImageData, Preprocessing, image_data, image_folder
from calibkit.own.report_files import write_report
from calibkit.own.spec import load_model

__all__ = ["METHODS", "Comparison", "MethodResult", "compare", "method_qconfig", "ImageData", "Preprocessing",
           "image_data", "image_folder", "write_report", "load_model"]
