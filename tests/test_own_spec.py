"""Any traceable model in: a model spec ("package.module:callable") with keyword arguments and a state_dict file;
untraceable submodules and ops without an integer kernel are kept in float by name or type, and say so."""

import warnings

import pytest
import torch
from torch import nn

import calibkit as ck
from calibkit.errors import CheckpointError, ModelSpecError, PrepareError
from calibkit.own.spec import load_model
from calibkit.quant.convert import FloatOpsWarning
from calibkit.quant.qconfig import KEEP_FLOAT

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = '''
import torch
from torch import nn

def build(width=4, classes=3):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))

NOT_CALLABLE = 3

def not_a_module():
    return "model"
'''


@pytest.fixture
def mypkg(tmp_path, monkeypatch):
    (tmp_path / "mypkg_h14").mkdir()
    (tmp_path / "mypkg_h14" / "__init__.py").write_text("")
    (tmp_path / "mypkg_h14" / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_model_builds_loads_weights_and_returns_eval(mypkg):
    torch.manual_seed(0)
    ref = load_model("mypkg_h14.nets:build", {"width": 5})
    assert isinstance(ref, nn.Sequential) and not ref.training and ref[0].out_channels == 5
    torch.save(ref.state_dict(), mypkg / "w.pt")
    torch.manual_seed(1)
    m = load_model("mypkg_h14.nets:build", {"width": 5}, mypkg / "w.pt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(m(x), ref(x)) and not m.training
    tv = load_model("torchvision.models:resnet18", {"num_classes": 3})
    assert tv.fc.out_features == 3 and not tv.training


def test_weights_that_do_not_fit_name_the_first_keys(mypkg):
    torch.save(load_model("mypkg_h14.nets:build", {"width": 5}).state_dict(), mypkg / "w.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: 0.weight \(5, 3, 3, 3\) vs model \(4, 3, 3, 3\)"):
        load_model("mypkg_h14.nets:build", None, mypkg / "w.pt")
    state = load_model("mypkg_h14.nets:build").state_dict()
    state["extra.weight"] = state.pop("4.weight")
    torch.save(state, mypkg / "w2.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: 4.weight; unexpected keys: extra.weight"):
        load_model("mypkg_h14.nets:build", None, mypkg / "w2.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model("mypkg_h14.nets:build", None, mypkg / "missing.pt")
    torch.save({"model": nn.Linear(2, 2)}, mypkg / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model("mypkg_h14.nets:build", None, mypkg / "pickled.pt")


@pytest.mark.parametrize("spec, match", [
    ("mypkg_h14.nets", "does not parse; expected 'package.module:callable'"),
    ("mypkg_h14.nets:build:x", "does not parse"),
    ("no_such_pkg_h14.nets:build", "cannot import module 'no_such_pkg_h14.nets'"),
    ("mypkg_h14.nets:nope", "has no attribute 'nope'"),
    ("mypkg_h14.nets:NOT_CALLABLE", "names int, not a callable"),
    ("mypkg_h14.nets:not_a_module", "returned str, not a torch.nn.Module"),
])
def test_bad_specs_say_the_expected_form(mypkg, spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_model(spec)
    assert issubclass(ModelSpecError, ValueError)


def test_bad_kwargs_name_the_spec(mypkg):
    with pytest.raises(ModelSpecError, match=r"cannot be called with kwargs=\{'depth': 3\}"):
        load_model("mypkg_h14.nets:build", {"depth": 3})


class Router(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.mean() > 0:
            return self.lin(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.router = Router()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        return self.head(self.norm(self.router(h)))


def test_untraceable_module_is_named_and_keep_float_override_works():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(16, 3, 8, 8) + 0.5
    qc = ck.get_default_qconfig("min_max")
    with pytest.raises(PrepareError, match=r"(?s)inside module 'router' \(Router\).*overrides=\{'router': KEEP_FLOAT\}"
                                           r" or overrides=\{Router: KEEP_FLOAT\}"):
        ck.prepare(model, qc, (x[:1],))
    with torch.no_grad():
        ref = model(x)
    for key in ("router", Router):
        p = ck.prepare(model, qc, (x[:1],), overrides={key: KEEP_FLOAT})
        names = list(ck.named_quantizers(p))
        assert "router.out" in names and not any(n.startswith("router.lin") for n in names)
        assert type(p.get_submodule("router.lin")) is nn.Linear  # not swapped for a quantized linear
        ck.calibrate(p, [x[:8], x[8:]], progress=False)
        ck.set_fake_quantize(p, ck.FakeQuantState.VALIDATION)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = ck.convert(p)
        msgs = [str(w.message) for w in caught if issubclass(w.category, FloatOpsWarning)]
        assert len(msgs) == 1 and "router.out (Router)" in msgs[0] and "norm.out (LayerNorm)" in msgs[0]
        assert c.float_ops["router.out"] == "Router" and c.float_ops["norm.out"] == "LayerNorm"
        assert "head.out" not in c.float_ops and "conv.out" not in c.float_ops  # integer ops
        with torch.no_grad():
            fq, out = p(x), c(x)
        assert torch.equal(fq, out)  # the converted model reproduces VALIDATION
        assert ck.sqnr_db(ref, fq) > 25  # 8-bit min/max on this net measures 36.6 dB
    assert p.meta["calibkit_float_modules"] == ["router"]


def test_keep_float_keys_are_checked():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    qc = ck.get_default_qconfig("min_max")
    with pytest.raises(ValueError, match="'ruter'.*KEEP_FLOAT needs a submodule name.*'router'"):
        ck.prepare(model, qc, (x[:1],), overrides={"ruter": KEEP_FLOAT})
    with pytest.raises(ValueError, match="GELU: KEEP_FLOAT matches no submodule"):
        ck.prepare(model, qc, (x[:1],), overrides={nn.GELU: KEEP_FLOAT})
    p = ck.prepare(model, qc, (x[:1],), overrides={"router": KEEP_FLOAT, nn.Linear: KEEP_FLOAT})
    assert not any(n.endswith(".weight") and n != "conv.weight" for n in ck.named_quantizers(p))
    assert ck.KEEP_FLOAT is KEEP_FLOAT and repr(KEEP_FLOAT) == "KEEP_FLOAT"
