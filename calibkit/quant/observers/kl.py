"""``kl``: TensorRT-style entropy calibration on a histogram of ``|x|`` accumulated over batches
(docs/methods.md#kl)."""

from __future__ import annotations

import torch

from calibkit.errors import CalibrationError
from calibkit.quant.accumulating_histogram import AccumulatingHistogram
from calibkit.quant.histogram import MAX_BINS
from calibkit.quant.kl_search import kl_threshold_bins
from calibkit.quant.observers.base import ObserverBase, check_int_range


class KLObserver(ObserverBase):
    """``kl``: the clip ``min(i * width, max|x|)`` whose kept bins ``i`` minimize ``KL(P_i || Q_i)``.

    One histogram of ``|x|`` collects every batch (:class:`~calibkit.quant.accumulating_histogram.
    AccumulatingHistogram`: power-of-two bin width, exact growth and pair merging, at most ``8 * bins`` bins).
    Every ``update_interval`` steps, inside ``forward``, all candidate thresholds ``i = 2**(bits-1) .. L`` are
    searched at once (:func:`calibkit.quant.kl_search.kl_divergences`): ``P_i`` is the first ``i`` bins with
    the clipped mass added to bin ``i - 1``, ``Q_i`` merges them into ``2**(bits-1)`` groups spread evenly over
    their non-empty bins; ties go to the widest range. Each search result is one sample of the moving average
    (the first sets it). Before the search, bin 0 (``[0, width)``) gets the count of bin 1 (as in NVIDIA
    ModelOpt): it holds the exact zeros of ReLU outputs, which every grid represents exactly and which would
    otherwise dominate the divergence; for smooth densities of ``|x|`` bins 0 and 1 hold about the same count.
    Search cost ``O(L * 2**(bits-1))`` for ``L <= 8 * bins`` bins.

    Args:
        bins: resolution of the first batch's range (the power-of-two bin width just below
            ``max|x| / bins``); an integer in [2**(bits-1) + 1, 2**20] (default 2048): the search needs
            more bins than the ``2**(bits-1)`` quantization levels per sign.
        update_interval: search for the threshold every this many steps (an integer >= 1, default 1);
            it must not exceed the number of calibration steps, else no threshold exists and reading
            the qparams raises :class:`CalibrationError`.
        bits, averaging_constant: see :class:`ObserverBase`. Per tensor only (``ch_axis=None``).

    Buffers: ``amax``, ``steps``, ``searches`` (saved); the histogram is not saved, so calibrating again after
    loading starts a new one. See docs/methods.md#kl.
    """

    name = "kl"
    supports_per_channel = False

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: None = None,
                 bins: int = 2048, update_interval: int = 1):
        super().__init__(bits, averaging_constant, ch_axis)
        levels = 2 ** (self.bits - 1)
        self.bins = check_int_range("bins", bins, levels + 1, MAX_BINS,
                                    f" for the kl observer at bits={self.bits} (it needs more bins than the "
                                    f"2**(bits-1) = {levels} quantization levels per sign)")
        self.update_interval = check_int_range("update_interval", update_interval, 1)
        self.register_buffer("searches", torch.tensor(0, dtype=torch.int64))
        self.histogram = AccumulatingHistogram(self.bins)

    def _scans_input(self, x: torch.Tensor) -> bool:
        # after the first batch, the compiled kernel bins a CPU float32 batch and finds its max and NaN/Inf in one pass
        return self.histogram.native_ready(x)

    def _observe(self, x: torch.Tensor) -> None:
        self.histogram.add(x, self._tensor_minmax(), owner=type(self).__name__)
        if (int(self.steps) + 1) % self.update_interval == 0:
            self._search()

    def _search(self) -> None:
        """One search over the histogram so far; its clip is one sample of the moving average."""
        hist = self.histogram
        if hist.counts is None:
            clip = 0.0
        else:
            counts = hist.counts.clone()
            if counts.numel() > 1:
                counts[0] = counts[1]  # bin 0 holds the exact zeros (ReLU): see the class docstring
            clip = min(kl_threshold_bins(counts, 2 ** (self.bits - 1)) * hist.width, hist.max_value)
        new = torch.tensor(clip, dtype=torch.float32, device=self.amax.device)
        self.amax = new if int(self.searches) == 0 else self.amax + self.averaging_constant * (new - self.amax)
        self.searches += 1

    def _require_data(self) -> None:
        super()._require_data()
        if int(self.searches) == 0:
            raise CalibrationError(
                f"update_interval={self.update_interval} is larger than the {int(self.steps)} calibration steps run: "
                "use update_interval <= number of calibration steps")

    def reset(self) -> None:
        super().reset()
        self.searches.zero_()
        self.histogram.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, update_interval={self.update_interval}"
