"""Looking inside a calibrated model: activation statistics, the per-op error report, sensitivity and per-op
overrides. Built on :mod:`calibkit.quant` alone; no plotting here (the figures live in :mod:`calibkit.tutorial`)."""
