"""Looking inside a calibrated model. Built on :mod:`calibkit.quant` alone; no plotting here (the figures live in
:mod:`calibkit.tutorial`).

* :mod:`~calibkit.analysis.activation_stats` -- activation statistics collected once, percentile thresholds
  re-derived from them without recalibrating;
* :mod:`~calibkit.analysis.report` -- the per-op error report (accumulated and isolated error of every quantizer),
  with its numbers in :mod:`~calibkit.analysis.error_stats`;
* :mod:`~calibkit.analysis.sensitivity` -- accuracy with one candidate quantizer on, or off;
* :mod:`~calibkit.analysis.overrides` -- new observers for the worst ops, by name, recalibrating only those;
* :mod:`~calibkit.analysis.selection` -- which quantizers fake-quantize, by name, and the shared checks.
"""
