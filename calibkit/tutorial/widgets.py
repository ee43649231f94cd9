"""Interactive percentile explorer (notebook 03): sliders re-derive thresholds and re-measure accuracy.

:func:`explore_percentile` is the plain, tested compute function behind the sliders: from collected
:class:`~calibkit.analysis.activation_stats.ActivationStats` it re-derives every activation threshold for a
global ``percentile`` / ``bins`` (bit-identical to a ``percentile`` calibration with those
settings), loads them at ``bits`` into a prepared model and measures validation accuracy on a fixed
image subset. No calibration batch is run again, so a slider move costs one evaluation pass.

:func:`percentile_explorer` builds the ipywidgets around it (``live=True``) or, for non-interactive
runs such as papermill (``live=False``), computes once with the given values and displays the same
figure and numbers statically. Widgets carry stable CSS classes for browser tests:
``calibkit-percentile`` (slider over "nines"), ``calibkit-percentile-value`` (exact percentile box),
``calibkit-bins``, ``calibkit-bits``, ``calibkit-layer``, ``calibkit-accuracy`` (readout HTML),
``calibkit-plot`` (figure output) and ``calibkit-explorer`` (the whole box).
"""

from __future__ import annotations

import html
import math
import time
from typing import Mapping, Sequence

import torch
from torch import nn

from calibkit.analysis.activation_stats import ActivationStats
from calibkit.quant.calibrate import evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.numerics import check_bits

__all__ = ["explore_percentile", "percentile_explorer", "PercentileExplorer", "nines_to_percentile",
           "percentile_to_nines", "accuracy_readout", "explorer_figure", "NINES_RANGE", "BITS_OPTIONS"]

#: Range and step of the "nines" slider: n = 2 is 99 %, 4 is 99.99 %, 6 is 99.9999 %.
NINES_RANGE = (2.0, 6.0, 0.05)
#: Bit widths offered for activations.
BITS_OPTIONS = (4, 6, 8, 16)


def nines_to_percentile(nines: float) -> float:
    """``100 - 10**(2 - nines)`` rounded to 6 decimals (3 -> 99.9, 4.5 -> 99.996838)."""
    return round(100.0 - 10.0 ** (2.0 - float(nines)), 6)


def percentile_to_nines(percentile: float) -> float:
    """Inverse of :func:`nines_to_percentile` (``inf`` for 100)."""
    p = float(percentile)
    return math.inf if p >= 100.0 else 2.0 - math.log10(100.0 - p)


def explore_percentile(stats: ActivationStats, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       percentile: float = 99.99, bins: int = 2048, bits: int = 8, layer: str | None = None,
                       averaging_constant: float = 0.01, batch_size: int = 500, hist_bins: int = 256,
                       cache: dict | None = None, channels_last: bool = True) -> dict:
    """Accuracy of ``model`` with every activation threshold re-derived from ``stats``.

    Args:
        stats: statistics collected on the calibration batches (``ActivationStats.collect``).
        model: a prepared model whose weight quantizers are calibrated (``collect`` does it by default);
            its activation scales are overwritten (fixed) on every call: use a dedicated copy.
        images, labels: the fixed evaluation subset (normalized float ``[N, 3, H, W]``, int64 ``[N]``).
        percentile: in (0, 100]; bins: divides ``stats.fine_bins``; averaging_constant: in [0, 1] --
            the ``PercentileObserver`` settings, applied to every activation quantizer.
        bits: activation bit width (2..16); weights keep their own bit width and calibrated scales.
        layer: activation quantizer whose threshold and histogram are returned (default: the first).
        batch_size: evaluation batch size.
        hist_bins: bins of the returned plotting histogram.
        cache: optional dict reused across calls: the accuracy of an already-evaluated set of
            thresholds (same bits, same subset) is returned without a forward pass.
        channels_last: evaluate 4-d inputs in channels-last memory format (faster CPU convolutions; the
            prepared model's integer accumulation makes the result independent of the layout for
            tensors up to 8 bits). Converts ``model`` in place.

    Returns a dict: ``accuracy`` (fraction in [0, 1]), ``num_images``, ``percentile``, ``bins``, ``bits``,
    ``averaging_constant``, ``layer``, ``amax`` (threshold of ``layer``), ``amaxes`` (all thresholds),
    ``histogram`` (``(edges, counts)`` of ``layer``), ``seconds`` (wall time of this call), ``cached``.
    """
    t0 = time.perf_counter()
    check_bits(bits)
    layer = stats.names[0] if layer is None else layer
    if layer not in stats.names:
        raise ValueError(f"layer={layer!r} is not an activation quantizer of the statistics: use one of {stats.names}")
    amaxes = stats.percentile_amax(percentile, bins, averaging_constant)
    key = (int(bits), tuple(amaxes[n] for n in stats.names), images.data_ptr(), int(images.shape[0]))
    cached = cache is not None and key in cache
    if cached:
        accuracy = cache[key]
    else:
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
            model.to(memory_format=torch.channels_last)
        stats.apply(model, amaxes, bits)
        set_fake_quantize(model, FakeQuantState.VALIDATION)
        accuracy = evaluate(model, images, labels, batch_size=batch_size, progress=False)
        if cache is not None:
            cache[key] = accuracy
    hist = stats.histogram(layer, hist_bins)
    return {"accuracy": accuracy, "num_images": int(labels.shape[0]), "percentile": float(percentile), "bins": int(bins),
            "bits": int(bits), "averaging_constant": float(averaging_constant), "layer": layer,
            "amax": amaxes[layer], "amaxes": amaxes, "histogram": hist, "seconds": time.perf_counter() - t0,
            "cached": cached}


def accuracy_readout(result: Mapping, subset: str, float_accuracy: float | None = None) -> str:
    """HTML text for a result of :func:`explore_percentile` (accuracy, settings, threshold, time)."""
    ref = f" (float model: {100 * float_accuracy:.2f} %)" if float_accuracy is not None else ""
    return (f"<b>accuracy {100 * result['accuracy']:.2f} %</b>{ref} on {html.escape(subset)}<br>"
            f"percentile {result['percentile']:.6g} %, {result['bins']} bins, {result['bits']}-bit activations, "
            f"averaging constant {result['averaging_constant']:g}; clip of <code>{html.escape(result['layer'])}</code>: "
            f"{result['amax']:.5g}<br><small>answered in {result['seconds']:.2f} s"
            f"{' (cached)' if result.get('cached') else ''}</small>")


def explorer_figure(result: Mapping, method_clips: Mapping[str, Mapping[str, float]] | None = None):
    """The explorer's figure for a result of :func:`explore_percentile`: the layer's histogram with the
    slider's clip (black) and, if given, other methods' clips ``method_clips[layer]``."""
    from calibkit.tutorial.figures import plot_histogram_with_clips

    clips = dict((method_clips or {}).get(result["layer"], {}))
    label = f"slider p={result['percentile']:.6g}"
    clips[label] = result["amax"]
    title = (f"{result['layer']}: |x| over all calibration batches; clip at percentile {result['percentile']:.6g} "
             f"({result['bins']} bins)")
    return plot_histogram_with_clips(result["histogram"], clips, title=title, log=True, figsize=(8, 3.4),
                                     colors={label: "black"})


class PercentileExplorer:
    """The live widgets of :func:`percentile_explorer` (see there for the arguments).

    Attributes: ``controls`` (dict of the input widgets: ``nines``, ``percentile``, ``bins``, ``bits``,
    ``layer``), ``readout`` (``widgets.HTML``, class ``calibkit-accuracy``), ``output``
    (``widgets.Output`` with the figure), ``widget`` (the whole ``VBox``), ``result`` (latest
    :func:`explore_percentile` dict) and ``history`` (every result, oldest first).
    """

    def __init__(self, stats: ActivationStats, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 percentile: float = 99.99, bins: int = 2048, bits: int = 8, layer: str | None = None,
                 averaging_constant: float = 0.01, subset: str | None = None, float_accuracy: float | None = None,
                 method_clips: Mapping[str, Mapping[str, float]] | None = None, bins_options: Sequence[int] | None = None,
                 bits_options: Sequence[int] = BITS_OPTIONS, batch_size: int = 500):
        import ipywidgets as W

        if images.dim() == 4:  # converted once here instead of on every move
            images = images.contiguous(memory_format=torch.channels_last)
        self.stats, self.model, self.images, self.labels = stats, model, images, labels
        self.averaging_constant, self.batch_size = averaging_constant, batch_size
        self.subset = subset or f"{len(labels)} test images (fixed subset)"
        self.float_accuracy, self.method_clips = float_accuracy, method_clips
        self.cache: dict = {}
        self.history: list[dict] = []
        self.result: dict | None = None
        bins_options = list(bins_options or [b for b in stats.allowed_bins(1024)])
        if bins not in bins_options:
            bins_options = sorted(set(bins_options) | {stats.check_bins(bins)})
        bits_options = list(bits_options)
        if bits not in bits_options:
            bits_options = sorted(set(bits_options) | {check_bits(bits)})
        lo, hi, step = NINES_RANGE
        style = {"description_width": "90px"}
        nines = min(max(percentile_to_nines(percentile), lo), hi)
        self.controls = {
            "nines": W.FloatSlider(value=nines, min=lo, max=hi, step=step, description="percentile", readout=False,
                                   continuous_update=False, style=style, layout=W.Layout(width="420px")),
            "percentile": W.BoundedFloatText(value=percentile, min=50.0, max=100.0, step=0.0001, description="",
                                             layout=W.Layout(width="120px")),
            "bins": W.Dropdown(options=bins_options, value=bins, description="bins", style=style),
            "bits": W.Dropdown(options=bits_options, value=bits, description="act. bits", style=style),
            "layer": W.Dropdown(options=list(stats.names), value=layer or stats.names[0], description="layer",
                                style=style, layout=W.Layout(width="420px")),
        }
        css = {"nines": "percentile", "percentile": "percentile-value"}
        for name, w in self.controls.items():
            w.add_class(f"calibkit-{css.get(name, name)}")
        self.readout = W.HTML(value="")
        self.readout.add_class("calibkit-accuracy")
        self.output = W.Output()
        self.output.add_class("calibkit-plot")
        hint = W.HTML("<small>slider: 2 = 99 %, 3 = 99.9 %, 4 = 99.99 %, 5 = 99.999 %, 6 = 99.9999 %; "
                      "or type an exact percentile</small>")
        c = self.controls
        self.widget = W.VBox([W.HBox([c["nines"], c["percentile"]]), hint, W.HBox([c["bins"], c["bits"]]), c["layer"],
                              self.readout, self.output])
        self.widget.add_class("calibkit-explorer")
        self._syncing = False
        c["nines"].observe(self._on_nines, names="value")
        c["percentile"].observe(self._on_percentile, names="value")
        for k in ("bins", "bits", "layer"):
            c[k].observe(lambda change: self.update(), names="value")

    # -- events ---------------------------------------------------------------------------------------
    def _on_nines(self, change) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self.controls["percentile"].value = nines_to_percentile(change["new"])
        finally:
            self._syncing = False
        self.update()

    def _on_percentile(self, change) -> None:
        if self._syncing:
            return
        lo, hi, _ = NINES_RANGE
        self._syncing = True
        try:
            self.controls["nines"].value = min(max(percentile_to_nines(change["new"]), lo), hi)
        finally:
            self._syncing = False
        self.update()

    # -- compute + render ---------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Current widget values as :func:`explore_percentile` arguments."""
        c = self.controls
        return {"percentile": float(c["percentile"].value), "bins": int(c["bins"].value), "bits": int(c["bits"].value),
                "layer": c["layer"].value}

    def update(self) -> dict:
        """Compute with the current widget values, redraw the figure and the readout; returns the result."""
        from IPython.display import display
        import matplotlib.pyplot as plt

        self.readout.value = "<i>computing ...</i>"
        try:
            result = explore_percentile(self.stats, self.model, self.images, self.labels,
                                        averaging_constant=self.averaging_constant, batch_size=self.batch_size,
                                        cache=self.cache, **self.settings())
        except Exception as e:  # show the message where the user looks, then re-raise
            self.readout.value = f"<b>error:</b> {html.escape(str(e))}"
            raise
        self.result = result
        self.history.append(result)
        self.readout.value = accuracy_readout(result, self.subset, self.float_accuracy)
        fig = explorer_figure(result, self.method_clips)
        with self.output:
            self.output.clear_output(wait=True)
            display(fig)
        plt.close(fig)
        return result


def percentile_explorer(stats: ActivationStats, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        percentile: float = 99.99, bins: int = 2048, bits: int = 8, layer: str | None = None,
                        averaging_constant: float = 0.01, live: bool = True, subset: str | None = None,
                        float_accuracy: float | None = None,
                        method_clips: Mapping[str, Mapping[str, float]] | None = None,
                        bins_options: Sequence[int] | None = None, bits_options: Sequence[int] = BITS_OPTIONS,
                        batch_size: int = 500, show: bool = True):
    """Percentile / bins / layer / bit-width explorer over :func:`explore_percentile`.

    Args:
        stats, model, images, labels, percentile, bins, bits, layer, averaging_constant, batch_size:
            see :func:`explore_percentile` (the values are the widgets' start values).
        live: ``True`` builds ipywidgets (sliders with ``continuous_update=False``: one evaluation per
            release) and returns the :class:`PercentileExplorer`; ``False`` (papermill, CI) computes once
            and displays the static figure and readout, returning the result dict.
        subset: description of the evaluation images for the readout, e.g.
            ``"2000 test images (fixed subset, seed 0)"``.
        float_accuracy: the float model's accuracy on the same subset, shown for reference.
        method_clips: ``{layer: {method: amax}}`` thresholds of other calibrations drawn on the histogram.
        bins_options: bins offered (default: powers of two from 1024 to ``stats.fine_bins``).
        bits_options: activation bit widths offered (default 4, 6, 8, 16).
        show: display the widget / figure (``False`` only builds and computes, e.g. in tests).
    """
    from IPython.display import HTML, display
    import matplotlib.pyplot as plt

    if live:
        explorer = PercentileExplorer(stats, model, images, labels, percentile=percentile, bins=bins, bits=bits,
                                      layer=layer, averaging_constant=averaging_constant, subset=subset,
                                      float_accuracy=float_accuracy, method_clips=method_clips,
                                      bins_options=bins_options, bits_options=bits_options, batch_size=batch_size)
        explorer.update()
        if show:
            display(explorer.widget)
        return explorer
    result = explore_percentile(stats, model, images, labels, percentile=percentile, bins=bins, bits=bits, layer=layer,
                                averaging_constant=averaging_constant, batch_size=batch_size)
    subset = subset or f"{len(labels)} test images (fixed subset)"
    fig = explorer_figure(result, method_clips)
    if show:
        display(HTML(f'<div class="calibkit-accuracy">{accuracy_readout(result, subset, float_accuracy)}</div>'))
        display(fig)
    plt.close(fig)
    result["figure"] = fig
    return result
