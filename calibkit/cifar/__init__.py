"""The CIFAR-10 example: data (CIFAR-10 and any image folder), the models, float training and checkpoints.

It knows nothing of quantization: it imports nothing from :mod:`calibkit.quant` or :mod:`calibkit.analysis`
(import-linter checks this), so the float side can be read, trained and replaced on its own.
"""
