import pytest
import torch
import torch.nn.functional as F

from calibkit.cifar.data import ImageTensors, normalize
from calibkit.cifar.models import cifar_resnet
from calibkit.cifar.evaluate import accuracy, confusion_matrix, per_class_accuracy, predict
from calibkit.cifar.train import PROFILES, augment, train, train_profile
from calibkit.loop import lr_multiplier



pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_data(n_train=256, n_test=128, seed=0, size=16):
    """Learnable synthetic 4-class data: class = which quadrant holds a bright blob, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % 4
        x = torch.randint(0, 90, (n, 3, size, size), generator=g).float()
        h = size // 2
        for c in range(4):
            r, q = divmod(c, 2)
            x[labels == c, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 140
        return x.clamp(0, 255).to(torch.uint8), labels

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return ImageTensors(xtr, ytr, xte, yte, ["tl", "tr", "bl", "br"], "toy")


# the toy data are easy and tiny: plain logits, no lookahead and ordinary BN-bias steps learn them in a few steps
TINY = dict(batch_size=64, lr=0.2, warmup_epochs=0.5, eval_every=0, progress=False, amp=False, logit_scale=1.0,
            lookahead=False, bias_lr_scale=1.0)


def test_augment_identity_and_shapes():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, g, flip=False, translate=0), x)
    y = augment(x, g)
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_augment_flip_only_mirrors_each_image():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(1), flip=True, translate=0)
    same = [torch.equal(y[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48, "flip probability should be about 0.5"


def test_augment_translate_is_reflect_padded_shift():
    x = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(2), flip=False, translate=2)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(padded[i, :, 2 + dy:14 + dy, 2 + dx:14 + dx], y[i].float())]
        assert len(hits) == 1, f"image {i} is not a reflect-padded shift of its input"
        shifts.add(hits[0])
    assert len(shifts) > 10, "shifts should vary across the batch"


def test_augment_keeps_images_with_their_labels():
    labels = torch.arange(50) % 10
    x = (labels * 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
    y = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(y.flatten(1).float().mean(1), labels.float() * 20)


def test_augment_rejects_bad_translate():
    with pytest.raises(ValueError, match="translate"):
        augment(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.Generator(), translate=4)


def test_augment_cutout_fills_one_square_per_image():
    x = torch.full((200, 3, 10, 10), 250, dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(4), flip=False, translate=0, cutout=4, cutout_fill=(7, 8, 9))
    for c, v in enumerate((7, 8, 9)):
        assert torch.equal(y[:, c] == v, y[:, 0] == 7)  # the same square in every channel, with its own fill
    sizes = set()
    for i in range(len(x)):
        ys, xs = torch.nonzero(y[i, 0] == 7, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert len(ys) == h * w and h <= 4 and w <= 4  # one axis-aligned rectangle, at most 4 x 4
        assert torch.all((y[i, 0] == 7) | (y[i, 0] == 250))
        sizes.add((h, w))
    assert (4, 4) in sizes and len(sizes) > 3  # whole squares inside, cut ones at the border
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment(x, g1, cutout=0), augment(x, g2))  # cutout=0 draws nothing: same stream as before
    with pytest.raises(ValueError, match=r"cutout=11 is out of range: use an integer in \[0, 10\]"):
        augment(x, torch.Generator(), cutout=11)


def test_lr_multiplier_shape():
    vals = [lr_multiplier(s, 10, 4) for s in range(10)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert vals[4] == 1.0 and vals[-1] == pytest.approx(1 / 6)
    assert all(a >= b for a, b in zip(vals[3:], vals[4:]))


def test_confusion_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2, 2])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    torch.testing.assert_close(per_class_accuracy(cm), torch.tensor([0.5, 1.0, 2 / 3]))
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(preds, torch.tensor([0, 0, 1, 1, 2, 2, 3]), 3)


def test_predict_and_accuracy_match_manual():
    ds = _toy_data(n_test=50)
    torch.manual_seed(0)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8).eval()
    with torch.no_grad():
        ref = model(normalize(ds.test_images))
        ref_tta = 0.5 * (ref + model(normalize(ds.test_images).flip(3)))
    torch.testing.assert_close(predict(model, ds.test_images, batch_size=16), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict(model, ds.test_images, batch_size=64, tta=True), ref_tta, rtol=1e-5, atol=1e-5)
    acc = accuracy(model, ds.test_images, ds.test_labels, batch_size=7)
    assert acc == pytest.approx((ref.argmax(1) == ds.test_labels).float().mean().item())



def test_predict_tta2_matches_manual_views():
    """tta=2: half the image+mirror mean plus half the mean of the four 1-pixel-shifted (reflect-padded) views."""
    ds = _toy_data(n_test=20)
    torch.manual_seed(1)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8).eval()
    imgs = ds.test_images
    h, w = imgs.shape[2:]

    def shifted(d):  # out[y, x] = in[reflect(y + d), reflect(x + d)], built by index arithmetic, not F.pad
        r = (torch.arange(h) + d).abs()
        r = torch.where(r > h - 1, 2 * (h - 1) - r, r)
        c = (torch.arange(w) + d).abs()
        c = torch.where(c > w - 1, 2 * (w - 1) - c, c)
        return imgs[:, :, r][:, :, :, c]

    with torch.no_grad():
        f = lambda x: model(normalize(x))
        plain = 0.5 * (f(imgs) + f(imgs.flip(3)))
        shifts = sum(f(v) for d in (-1, 1) for v in (shifted(d), shifted(d).flip(3))) / 4
    torch.testing.assert_close(predict(model, imgs, batch_size=8, tta=2), 0.5 * plain + 0.5 * shifts,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict(model, imgs, tta=1), predict(model, imgs, tta=True))
    torch.testing.assert_close(predict(model, imgs, tta=0), predict(model, imgs, tta=False))


@pytest.mark.parametrize("bad", [3, -1, 1.5, "2", None])
def test_tta_level_rejected(bad):
    ds = _toy_data(n_test=4)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    with pytest.raises(ValueError, match=r"tta=.*use 0/False .*1/True .* or 2"):
        predict(model, ds.test_images, tta=bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tta="):  # checked before any training step: weights untouched
        train(model, ds, 1, tta=bad, **TINY)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

def _fit(seed, epochs=1, **kw):
    ds = _toy_data()
    torch.manual_seed(0)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    hist = train(model, ds, epochs, seed=seed, **{**TINY, **kw})
    return model, hist


def test_training_is_deterministic_per_seed():
    a, ha = _fit(seed=5)
    b, hb = _fit(seed=5)
    c, _ = _fit(seed=6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), f"{k} differs between two runs with the same seed"
    assert ha["train_loss"] == hb["train_loss"]
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_bf16_autocast_training_is_deterministic():
    a, _ = _fit(seed=1, amp=True)
    b, _ = _fit(seed=1, amp=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tiny_training_learns():
    # flip=False: the class is the bright quadrant, which a mirror image would move (the toy is not flip-invariant)
    model, hist = _fit(seed=0, epochs=4, eval_every=2, whiten=True, head_lr_scale=0.5, flip=False)
    assert hist["train_loss"][-1] < 0.8 * hist["train_loss"][0], hist["train_loss"]
    assert hist["test_accuracy"][0] is None and hist["test_accuracy"][1] is not None
    assert hist["test_accuracy_final"] > 0.75  # chance is 0.25
    assert len(hist["epoch_seconds"]) == 4 and hist["train_seconds"] > 0
    assert hist["steps"] == 4 * (256 // 64) and not model.training


def test_whiten_freezes_stem():
    ds = _toy_data()
    torch.manual_seed(0)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    train(model, ds, 1, seed=0, whiten=True, **TINY)
    w = model.stem.conv.weight.detach().clone()
    train(model, ds, 1, seed=1, whiten=False, **TINY)
    assert not torch.equal(model.stem.conv.weight, w), "stem trains when whiten=False"
    model2 = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    train(model2, ds, 1, seed=0, whiten=True, **TINY)
    from calibkit.cifar.models import whiten_stem_
    ref = torch.nn.Conv2d(3, 8, 2, bias=False)
    g = torch.Generator().manual_seed(0)
    whiten_stem_(ref, normalize(ds.train_images[torch.randperm(256, generator=g)[:5000]]))
    torch.testing.assert_close(model2.stem.conv.weight.contiguous(), ref.weight)


@pytest.mark.parametrize("kw, word", [({"epochs": 0}, "epochs"), ({"batch_size": 1000}, "batch_size"),
                                      ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                                      ({"label_smoothing": 1.0}, "label_smoothing"), ({"head_lr_scale": 0}, "head_lr_scale")])
def test_train_rejects_bad_arguments(kw, word):
    ds = _toy_data()
    args = {"epochs": 1, **TINY, **kw}
    with pytest.raises(ValueError, match=word):
        train(cifar_resnet((8, 8, 8), num_classes=4, stem_width=8), ds, args.pop("epochs"), **args)


def test_profiles_and_train_profile_errors():
    assert set(PROFILES) >= {"full", "smoke"}
    assert PROFILES["smoke"]["epochs"] <= 2 and max(PROFILES["smoke"]["width"]) < max(PROFILES["full"]["width"])
    with pytest.raises(ValueError, match="profile"):
        train_profile(_toy_data(), profile="huge")


def test_train_profile_records_metadata():
    ds = _toy_data(n_train=256, n_test=64)
    model, hist = train_profile(ds, "smoke", seed=0, epochs=1, progress=False, num_train=128, num_test=32,
                                batch_size=64, amp=False)
    assert hist["num_train"] == 128 and hist["num_test"] == 32 and hist["profile"] == "smoke"
    assert hist["arch"] == "cifar_resnet" and hist["arch_kwargs"] == model.config
    assert hist["data_source"].startswith("toy") and hist["classes"] == ds.classes


def test_profile_config_is_json_and_applies_epochs_then_overrides():
    import json

    from calibkit.cifar.train import PROFILES, profile_config

    cfg = profile_config("full")
    assert cfg["width"] == list(PROFILES["full"]["width"]) and json.loads(json.dumps(cfg)) == cfg
    assert profile_config("full", epochs=3)["epochs"] == 3
    assert profile_config("full", epochs=3, lr=0.1)["lr"] == 0.1 and PROFILES["full"]["lr"] != 0.1
    with pytest.raises(ValueError, match="profile='nope'"):
        profile_config("nope")


def test_augment_flip_mask_mirrors_exactly_the_masked_images():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    mask = torch.tensor([True, False] * 4)
    y = augment(x, torch.Generator().manual_seed(0), translate=0, flip_mask=mask)
    assert torch.equal(y[mask], x[mask].flip(-1)) and torch.equal(y[~mask], x[~mask])
    with pytest.raises(ValueError, match="flip_mask"):
        augment(x, torch.Generator(), flip_mask=torch.ones(7, dtype=torch.bool))


def test_recipe_switches_frozen_bn_weights_restored_momentum_and_folded_logit_scale():
    ds = _toy_data()
    torch.manual_seed(0)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    bn_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    fc = [p.detach().clone() for p in model.fc.parameters()]
    train(model, ds, 1, seed=0, **{**TINY, "lr": 1e-12, "logit_scale": 0.25, "freeze_bn_weight": True, "bn_momentum": 0.7})
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, bn_w[n]), f"{n}.weight trained although frozen"
            assert m.momentum == 0.1, "the model's BN momentum is restored after training"
    # with a negligible lr the head only carries the folded logit scale
    for p, p0 in zip(model.fc.parameters(), fc):
        torch.testing.assert_close(p.detach(), 0.25 * p0, rtol=1e-6, atol=1e-9)
    model2 = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    train(model2, ds, 1, seed=0, **{**TINY, "freeze_bn_weight": False})
    assert any(not torch.equal(m.weight, bn_w[n]) for n, m in model2.named_modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_lookahead_returns_the_slow_weights():
    a, _ = _fit(seed=3, epochs=2, lookahead=False)   # 8 steps
    b, _ = _fit(seed=3, epochs=2, lookahead=True)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = _fit(seed=3, epochs=1, lookahead=True)    # 4 steps: no synchronisation, plain weights
    d, _ = _fit(seed=3, epochs=1, lookahead=False)
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values()))


@pytest.mark.parametrize("kw, word", [({"bias_lr_scale": 0}, "bias_lr_scale"), ({"logit_scale": -1.0}, "logit_scale"),
                                      ({"bn_momentum": 1.5}, "bn_momentum")])
def test_train_rejects_bad_recipe_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        train(cifar_resnet((8, 8, 8), num_classes=4, stem_width=8), _toy_data(), 1, **{**TINY, **kw})


def test_pool_first_runs_while_training_and_is_switched_back():
    ds = _toy_data()
    torch.manual_seed(0)
    model = cifar_resnet((8, 8, 8), num_classes=4, stem_width=8)
    bn_input = []
    model.stage1.conv.bn.register_forward_hook(lambda m, i, o: bn_input.append((m.training, i[0].shape[-1])))
    train(model, ds, 1, seed=0, **{**TINY, "eval_every": 1})          # pool_first=None: on, as BN weights are frozen
    assert (True, 7) in bn_input and (False, 15) in bn_input          # pooled map in training, full map in eval
    assert not any(s.pool_first for s in (model.stage1, model.stage2, model.stage3))
    assert all(p.requires_grad for p in model.parameters()), "frozen tensors get requires_grad back"
    bn_input.clear()
    train(model, ds, 1, seed=0, **{**TINY, "freeze_bn_weight": False})  # None follows freeze_bn_weight: off
    assert bn_input and all(shape == 15 for _, shape in bn_input)
    with pytest.raises(ValueError, match="pool_first=True needs freeze_bn_weight=True"):
        train(model, ds, 1, **{**TINY, "freeze_bn_weight": False, "pool_first": True})
    with torch.no_grad():
        model.stage2.conv.bn.weight[0] = -1.0
    with pytest.raises(ValueError, match="pool_first=True needs positive BN weights"):
        train(model, ds, 1, **TINY)
    train(model, ds, 1, **{**TINY, "pool_first": False})               # allowed without pooling first
