"""Float training of the CIFAR-10 model: the recipe, the augmentation and the profiles.

Recipe (airbench-style, all in-memory): Nesterov SGD, label smoothing, a linear warm-up then a linear decay of
the learning rate to zero, per-step weight decay on every trained tensor, frozen BN weights with fast BN biases,
lookahead, and batched augmentation on the uint8 image tensor (random horizontal flip and a random translation of
up to ``translate`` pixels with reflect padding); the model's stages pool before BN while training (see
``calibkit.cifar.models.Stage``). Channels-last activations on every device, and bfloat16 autocast for
forward/backward where the device has fast bf16 (``bf16_supported``). The steps themselves run in the one
training loop, :func:`calibkit.loop.train_steps`, which QAT uses too.

Everything random draws from one ``torch.Generator`` seeded by ``seed``, so on a given device and thread count the
same seed gives the same weights. Images passed to ``train`` are uint8 ``[N, 3, H, W]`` (0..255), normalized with
``calibkit.cifar.data.normalize`` on the fly, batch by batch.
"""

import json
import time

import torch
import torch.nn.functional as F

from calibkit.checks import check_int, check_number
from calibkit.cifar.data import normalize
from calibkit.cifar.evaluate import accuracy, bf16_supported, check_tta
from calibkit.cifar.models import Stage, cifar_resnet, whiten_stem_
from calibkit.devices import model_device
from calibkit.loop import lr_multiplier, train_steps

__all__ = ["PROFILES", "augment", "train", "train_profile", "profile_dataset", "profile_config", "profile_settings"]

# Both profiles use an airbench-style recipe (Keller Jordan's fast CIFAR-10 training, see ``train``): batch 1024
# (smoke: 128), lr 1.5 per 1024 images for the mean loss with a per-step weight decay of lr * 1.3e-3, Nesterov
# momentum 0.85, BN weights frozen and BN biases at 64x lr, logits scaled by 1/9 in the loss, lookahead, alternating
# flips, a frozen whitened stem, stages that pool before BN while training. "full": the wider 64/256/256 net for
# 22 epochs, sized to about 40 minutes on 2 CPU cores with fast bf16 (on slower machines notebook 01 trains fewer
# epochs: calibkit.cifar.budget); "smoke": a narrow net on a 20k/2k subset for 2 epochs, well above 50 %.
# Measured accuracy and time: benchmarks/train_float.py.
_RECIPE = dict(momentum=0.85, weight_decay=1.3e-3, label_smoothing=0.2, translate=2, head_lr_scale=1.0,
               bias_lr_scale=64.0, freeze_bn_weight=True, bn_momentum=0.4, logit_scale=1 / 9, lookahead=True,
               alternate_flip=True, whiten=True, pool_first=True)
PROFILES = {
    "full": dict(width=(64, 256, 256), epochs=22, batch_size=1024, lr=1.5, warmup_epochs=5.0, eval_every=3,
                 num_train=None, num_test=None, **_RECIPE),
    "smoke": dict(width=(16, 32, 32), epochs=2, batch_size=128, lr=0.4, warmup_epochs=0.5, eval_every=1,
                  num_train=20000, num_test=2000, **_RECIPE),
}
# the profile entries that are ``train`` keywords (the others choose the model, the epochs and the data subset)
_TRAIN_KEYS = tuple(k for k in PROFILES["full"] if k not in ("width", "epochs", "num_train", "num_test"))



def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range indices back into ``[0, size)`` (edge pixel not repeated, like ``F.pad(mode="reflect")``)."""
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool = True, translate: int = 2,
            flip_mask: torch.Tensor | None = None, cutout: int = 0, cutout_fill=None) -> torch.Tensor:
    """Random flip + translate (+ cutout) a batch; returns a new tensor of the same shape, dtype and device.

    Args:
        images: ``[N, C, H, W]`` tensor (any dtype; uint8 in training).
        generator: CPU ``torch.Generator`` all random draws come from.
        flip: mirror each image left-right with probability 0.5.
        flip_mask: bool ``[N]`` on the CPU; when given, mirror exactly the images where it is True (instead of
            the random draw of ``flip``).
        translate: shift each image by an integer offset drawn uniformly from ``[-translate, translate]``
            pixels, independently in x and y; pixels shifted in come from reflect padding
            (``out[y, x] = in[reflect(y + dy), reflect(x + dx)]``). 0 disables it.
        cutout: side (pixels) of a square set to ``cutout_fill`` in every image, centred on a pixel drawn
            uniformly (the square may be cut by the border; DeVries & Taylor 2017). 0 (default) disables it
            and draws no random numbers. cutout_fill: per-channel values (length C) or None for 0.
    The flip is applied after the shift, cutout last. Labels are unaffected.
    """
    if images.ndim != 4:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected [N, C, H, W]")
    n, c, h, w = images.shape
    check_int("translate", translate, 0, min(h, w) - 1)
    check_int("cutout", cutout, 0, min(h, w))
    rows = torch.arange(h).expand(n, h)
    cols = torch.arange(w).expand(n, w)
    if translate:
        rows = _reflect(rows + torch.randint(-translate, translate + 1, (n, 1), generator=generator), h)
        cols = _reflect(cols + torch.randint(-translate, translate + 1, (n, 1), generator=generator), w)
    if flip_mask is not None:
        if flip_mask.shape != (n,) or flip_mask.dtype != torch.bool:
            raise ValueError(f"flip_mask must be a bool tensor of shape [{n}]; got {flip_mask.dtype} {tuple(flip_mask.shape)}")
        cols = torch.where(flip_mask.cpu()[:, None], cols.flip(1), cols)
    elif flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    dev = images.device
    out = images[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]
    if cutout:
        lo_y = torch.randint(0, h, (n, 1), generator=generator) - cutout // 2
        lo_x = torch.randint(0, w, (n, 1), generator=generator) - cutout // 2
        in_y = (torch.arange(h)[None] >= lo_y) & (torch.arange(h)[None] < lo_y + cutout)   # [n, h]
        in_x = (torch.arange(w)[None] >= lo_x) & (torch.arange(w)[None] < lo_x + cutout)   # [n, w]
        mask = (in_y[:, None, :, None] & in_x[:, None, None, :]).to(dev)
        fill = torch.zeros((), dtype=images.dtype, device=dev) if cutout_fill is None else \
            torch.as_tensor(cutout_fill, device=dev).to(images.dtype).reshape(1, c, 1, 1)
        out = torch.where(mask, fill, out)
    return out


class _Lookahead:
    """Lookahead on the weights (Zhang et al. 2019, as in airbench): a slow copy of every float tensor of the
    state dict (weights and BN running statistics); ``update(decay)`` moves the slow copy towards the model by
    ``1 - decay`` and copies it back into the model."""

    def __init__(self, model):
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, decay: float):
        state = model.state_dict()
        for k, slow in self.slow.items():
            slow.lerp_(state[k], 1 - decay)
            state[k].copy_(slow)


def _check_recipe(n: int, epochs, batch_size, lr, momentum, weight_decay, label_smoothing, warmup_epochs,
                  head_lr_scale, bias_lr_scale, bn_momentum, logit_scale, eval_every, tta) -> None:
    """Every argument check of ``train``, before anything changes."""
    check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1, n, why=" (the training set size is the upper bound)")
    for name, v in (("lr", lr), ("head_lr_scale", head_lr_scale), ("bias_lr_scale", bias_lr_scale),
                    ("logit_scale", logit_scale)):
        check_number(name, v, 0, low_open=True)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
    check_number("warmup_epochs", warmup_epochs, 0)
    if bn_momentum is not None:
        check_number("bn_momentum", bn_momentum, 0, 1, low_open=True, why=" (or None)")
    check_int("eval_every", eval_every, 0)
    check_tta(tta)


def _pool_first_stages(model, pool_first, freeze_bn_weight) -> list:
    """The ``Stage`` modules that pool before BN while training (checked: that needs frozen, positive BN weights)."""
    stages = [m for m in model.modules() if isinstance(m, Stage)] if pool_first else []
    if stages and not freeze_bn_weight:
        raise ValueError("pool_first=True needs freeze_bn_weight=True: pooling before BN gives the same eval-mode "
                         "function only while every BN weight stays positive")
    if any((m.conv.bn.weight <= 0).any() for m in stages):
        raise ValueError("pool_first=True needs positive BN weights in every Stage's conv block (max-pool commutes "
                         "only with increasing per-channel maps); re-initialize the model or pass pool_first=False")
    return stages


def _whiten_stem(model, images, gen, dev) -> torch.nn.Parameter:
    """Initialize ``model.stem.conv`` from 5,000 training images drawn with ``gen``; returns its weight (to freeze)."""
    stem = getattr(getattr(model, "stem", None), "conv", None)
    if not isinstance(stem, torch.nn.Conv2d):
        raise ValueError("whiten=True needs a model with a `stem.conv` nn.Conv2d (like calibkit.cifar.models.cifar_resnet)")
    pick = torch.randperm(len(images), generator=gen)[:5000]
    whiten_stem_(stem, normalize(images[pick].to(dev)))
    return stem.weight


def _optimizer(model, frozen, bn_biases, lr, momentum, weight_decay, head_lr_scale, bias_lr_scale):
    """Nesterov SGD with one group per lr factor (head, BN biases, the rest); each group's weight decay is divided
    by its factor, so every tensor decays by the same ``lr * weight_decay`` fraction per step."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = set(linears[-1].parameters()) if linears else set()
    groups = {}
    for p in model.parameters():
        if p.requires_grad and p not in frozen:
            scale = head_lr_scale if p in head else bias_lr_scale if p in bn_biases else 1.0
            groups.setdefault(scale, []).append(p)
    return torch.optim.SGD([{"params": ps, "lr": lr * s, "weight_decay": weight_decay / s} for s, ps in groups.items()],
                           lr=lr, momentum=momentum, nesterov=momentum > 0)


def _epoch_batches(images, labels, gen, epochs, batch_size, dev, base_flips, **augment_kw):
    """``(inputs, labels)`` for every step of every epoch: a fresh order per epoch (the last incomplete batch
    dropped), augmented on the uint8 images, then normalized in channels-last. With ``base_flips`` (alternating
    flips) every image is mirrored in exactly every other epoch."""
    steps = len(images) // batch_size
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(images), generator=gen)[: steps * batch_size].view(steps, batch_size)
        for idx in order:
            mask = None if base_flips is None else base_flips[idx] ^ (epoch % 2 == 0)
            xb = augment(images[idx].to(dev), gen, flip_mask=mask, **augment_kw)
            yield normalize(xb).contiguous(memory_format=torch.channels_last), labels[idx].to(dev)


class _TrainingSwitches:
    """Module state changed for training only and restored on exit: frozen tensors without gradients, stages that
    pool first, the BN momentum."""

    def __init__(self, frozen, stages, norms, bn_momentum):
        self.frozen, self.stages, self.norms, self.bn_momentum = frozen, stages, norms, bn_momentum

    def __enter__(self):
        self.saved = [m.pool_first for m in self.stages], [m.momentum for m in self.norms]
        for p in self.frozen:
            p.requires_grad_(False)
        for m in self.stages:
            m.pool_first = True
        for m in self.norms if self.bn_momentum is not None else ():
            m.momentum = self.bn_momentum

    def __exit__(self, *exc):
        for m, old in zip(self.stages, self.saved[0]):
            m.pool_first = old
        for m, old in zip(self.norms, self.saved[1]):
            m.momentum = old
        for p in self.frozen:
            p.requires_grad_(True)


def _finish(model, slow, step: int, logit_scale: float) -> None:
    """End of training: the model becomes the lookahead copy (as airbench does) and the loss's logit scale is
    folded into the last ``nn.Linear``."""
    if slow is not None and step >= 5:
        slow.update(model, 1.0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if logit_scale != 1 and linears:
        with torch.no_grad():
            for p in linears[-1].parameters():
                p.mul_(logit_scale)


def train(model, ds, epochs: int, batch_size: int = 1024, lr: float = 1.5, seed: int = 0, *, momentum: float = 0.85,
          weight_decay: float = 1.3e-3, label_smoothing: float = 0.2, warmup_epochs: float = 2.0, flip: bool = True,
          alternate_flip: bool = True, translate: int = 2, cutout: int = 0, head_lr_scale: float = 1.0,
          bias_lr_scale: float = 64.0, freeze_bn_weight: bool = True, bn_momentum: float | None = 0.4,
          logit_scale: float = 1 / 9, lookahead: bool = True, whiten: bool = True, pool_first: bool | None = None,
          amp: bool | None = None, eval_every: int = 1, tta: bool | int = False, eval_batch_size: int = 1000,
          progress: bool = True) -> dict:
    """Train ``model`` in place on ``ds.train_images`` / ``ds.train_labels`` (uint8 ``[N,3,H,W]``, int64 ``[N]``) with
    the recipe of the module docstring; every argument is checked before anything changes.

    Schedule: ``epochs`` passes (>= 1, last incomplete batch dropped) of ``batch_size`` (in [1, N]) images; peak
    ``lr`` (> 0) after ``warmup_epochs`` (>= 0) of linear warm-up, then linear decay to 0; Nesterov ``momentum`` in
    [0, 1); every trained tensor decays by ``lr * weight_decay`` (>= 0) per step whatever its lr factor
    (``head_lr_scale`` for the last ``nn.Linear``, ``bias_lr_scale`` for BN biases, both > 0); ``label_smoothing``
    in [0, 1); the loss sees ``logit_scale * logits`` (> 0), folded into the last ``nn.Linear`` at the end.
    ``seed``: data order and augmentation (seed the init yourself). ``flip`` / ``translate`` / ``cutout``: see
    ``augment`` (``alternate_flip``: mirror every other epoch). ``freeze_bn_weight``, ``bn_momentum`` (in (0, 1] while
    training, None keeps the model's), ``lookahead`` (sync every 5 steps; the slow copy is returned), ``whiten``
    (whitened, frozen ``stem.conv``), ``pool_first`` (None = ``freeze_bn_weight``), ``amp`` (bf16 autocast, None =
    where fast). ``eval_every`` epochs (0 = last only) the test accuracy is measured with test-time augmentation
    ``tta`` (see ``calibkit.cifar.evaluate.predict``).

    Returns a history dict: per-epoch ``epoch``, ``train_loss``, ``train_accuracy`` (augmented batches),
    ``test_accuracy`` (None where not evaluated), ``epoch_seconds``, ``eval_seconds``; plus ``train_seconds``,
    ``test_accuracy_final``, ``steps`` and the settings. The model ends in eval mode, channels-last.
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "ds", "progress", "eval_batch_size")}
    n = len(ds.train_images)
    _check_recipe(n, epochs, batch_size, lr, momentum, weight_decay, label_smoothing, warmup_epochs, head_lr_scale,
                  bias_lr_scale, bn_momentum, logit_scale, eval_every, tta)
    pool_first = settings["pool_first"] = freeze_bn_weight if pool_first is None else bool(pool_first)
    stages = _pool_first_stages(model, pool_first, freeze_bn_weight)
    dev = model_device(model)
    amp = settings["amp"] = bf16_supported(dev) if amp is None else bool(amp)
    gen = _generator(seed)
    images = ds.train_images
    frozen = {_whiten_stem(model, images, gen, dev)} if whiten else set()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen |= {m.weight for m in norms if m.weight is not None} if freeze_bn_weight else set()
    frozen = {p for p in frozen if p.requires_grad}  # no gradient is computed for them while training
    model.to(memory_format=torch.channels_last).train()
    opt = _optimizer(model, frozen, {m.bias for m in norms if m.bias is not None}, lr, momentum, weight_decay,
                     head_lr_scale, bias_lr_scale)
    slow = _Lookahead(model) if lookahead else None
    base_flips = torch.rand(n, generator=gen) < 0.5 if flip and alternate_flip else None
    # cutout fills with the mean training pixel (about 0 after normalization), from every class: a strided
    # sample, since an image folder is sorted by class
    sample = images[::max(1, len(images) // 5000)]
    fill = sample.to(torch.float32).mean((0, 2, 3)).round().to(images.dtype) if cutout else None
    batches = _epoch_batches(images, ds.train_labels, gen, epochs, batch_size, dev, base_flips, flip=flip,
                             translate=translate, cutout=cutout, cutout_fill=fill)

    def loss_fn(model, x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        return F.cross_entropy(logit_scale * logits.float(), y, label_smoothing=label_smoothing), logits

    with _TrainingSwitches(frozen, stages, norms, bn_momentum):
        hist = _run_epochs(model, ds, batches, loss_fn, opt, slow, settings, eval_batch_size, progress)
    model.eval()
    hist.update(train_seconds=sum(hist["epoch_seconds"]), test_accuracy_final=hist["test_accuracy"][-1],
                **settings, num_train=n, num_test=len(ds.test_images))
    return hist


def _run_epochs(model, ds, batches, loss_fn, opt, slow, settings: dict, eval_batch_size: int, progress: bool) -> dict:
    """The training loop with ``train``'s per-step lookahead and per-epoch bookkeeping and evaluation."""
    epochs, eval_every = settings["epochs"], settings["eval_every"]
    steps_per_epoch = len(ds.train_images) // settings["batch_size"]
    total = epochs * steps_per_epoch
    warmup = round(settings["warmup_epochs"] * steps_per_epoch)
    hist = {k: [] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "epoch_seconds", "eval_seconds")}
    hist["steps"] = total
    dev = model_device(model)
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.int64)
    t0 = time.perf_counter()
    for s in train_steps(model, batches, loss_fn, opt, lambda i: lr_multiplier(i, total, warmup), total, "train",
                         progress):
        if slow is not None and s.index % 5 == 0:
            slow.update(model, 0.95 ** 5 * (s.index / total) ** 3)
        loss_sum += s.loss
        correct += (s.logits.argmax(1) == s.labels).sum()
        if s.index % steps_per_epoch:
            continue
        epoch = s.index // steps_per_epoch
        if epoch == epochs:
            _finish(model, slow, s.index, settings["logit_scale"])
        hist["epoch"].append(epoch)
        hist["train_loss"].append(loss_sum.item() / steps_per_epoch)
        hist["train_accuracy"].append(correct.item() / (steps_per_epoch * settings["batch_size"]))
        hist["epoch_seconds"].append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        test_acc = None
        if epoch == epochs or (eval_every and epoch % eval_every == 0):
            test_acc = accuracy(model, ds.test_images, ds.test_labels, eval_batch_size, tta=settings["tta"])
            model.train()
        hist["test_accuracy"].append(test_acc)
        hist["eval_seconds"].append(time.perf_counter() - t1)
        s.bar.set_postfix(epoch=epoch, loss=f"{hist['train_loss'][-1]:.3f}",
                          train_acc=f"{hist['train_accuracy'][-1]:.3f}",
                          test_acc="-" if test_acc is None else f"{test_acc:.4f}")
        loss_sum.zero_()
        correct.zero_()
        t0 = time.perf_counter()
    return hist


def profile_settings(profile: str) -> dict:
    """The settings of the named profile (``PROFILES``); ``ValueError`` naming the known ones."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is unknown: use one of {sorted(PROFILES)}")
    return PROFILES[profile]


def profile_config(profile: str = "full", epochs: int | None = None, **overrides) -> dict:
    """The complete settings ``train_profile(ds, profile, epochs=epochs, **overrides)`` trains with, as JSON
    types (tuples become lists): the profile's entries, then ``epochs`` (None = the profile's), then
    ``overrides``. Stored in checkpoints so that a changed recipe is never mistaken for a reusable model."""
    cfg = {**profile_settings(profile), **({} if epochs is None else {"epochs": epochs}), **overrides}
    return json.loads(json.dumps(cfg))


def profile_dataset(ds, profile: str = "full", seed: int = 0, **overrides):
    """The data a profile trains and evaluates on: ``ds`` itself, or ``ds.subset(train=num_train, test=num_test,
    seed=seed)`` when the profile (or ``overrides``) sets ``num_train`` / ``num_test``."""
    cfg = {**profile_settings(profile), **overrides}
    if cfg["num_train"] is None and cfg["num_test"] is None:
        return ds
    return ds.subset(train=cfg["num_train"], test=cfg["num_test"], seed=seed)


def train_profile(ds, profile: str = "full", seed: int = 0, epochs: int | None = None, progress: bool = True,
                  device=None, **overrides):
    """Build ``cifar_resnet`` for ``profile`` (a key of ``PROFILES``), seeded by ``seed``, and train it.

    The profile's ``num_train`` / ``num_test`` subset ``ds`` first (``ds.subset(..., seed=seed)``); ``epochs``
    (None = profile default) and ``overrides`` (any ``train`` keyword) replace profile values.
    ``device``: where to train (default: CPU). Returns ``(model, history)``; ``history`` also holds
    ``profile``, ``arch``, ``arch_kwargs``, ``data_source`` and ``classes``.
    """
    cfg = profile_config(profile, epochs, **overrides)
    ds = profile_dataset(ds, profile, seed, num_train=cfg["num_train"], num_test=cfg["num_test"])
    arch_kwargs = {"width": list(cfg["width"]), "blocks": list(cfg.get("blocks", (1, 1, 1))), "num_classes": len(ds.classes)}
    torch.manual_seed(seed)
    model = cifar_resnet(**arch_kwargs).to(device or "cpu")
    train_kw = {k: cfg[k] for k in _TRAIN_KEYS}
    train_kw.update({k: v for k, v in overrides.items() if k not in PROFILES[profile] and k != "blocks"})
    history = train(model, ds, cfg["epochs"], seed=seed, progress=progress, **train_kw)
    history.update(profile=profile, arch="cifar_resnet", arch_kwargs=model.config, data_source=ds.source,
                   classes=list(ds.classes), config=cfg)
    return model, history
