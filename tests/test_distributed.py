"""Calibration under torch.distributed (docs/methods.md#many-processes): 2 gloo ranks on CPU, each calibrating
its shard, give the scales of one process calibrated on all batches fed step by step, rank by rank.

Tolerances: ``min_max`` (a moving average of batch min/max), per-channel weight ``min_max`` and ``kl`` (histogram
counts, max, searches and scale) must match exactly; the moving averages of per-batch clips (``percentile``,
``mse``, ``mix``) within ``CLIP_RTOL`` relative (they are replayed in the same order with the same float
operations, so on CPU they match exactly too; the tolerance leaves room for GPUs, where the batch clips
themselves may differ in the last bits between a batch computed alone and one computed in another process).
A hang fails the test: the process group has a ``TIMEOUT_S`` timeout and the parent kills the ranks after
``JOIN_S`` seconds.
"""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import calibkit as ck
from calibkit.quant import distributed as D
from calibkit.quant.accumulating_histogram import _start_width

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 3
METHODS = ("min_max", "kl", "percentile", "mse", "mix")
CLIP_RTOL = 1e-6
TIMEOUT_S = 30
JOIN_S = 90
ACTIVATION_KWARGS = {"min_max": {"averaging_constant": 0.3}, "kl": {"averaging_constant": 0.3, "bins": 160},
                     "percentile": {"averaging_constant": 0.3, "percentile": 99.9},
                     "mse": {"averaging_constant": 0.3}, "mix": {"averaging_constant": 0.3}}


def all_batches() -> list[torch.Tensor]:
    """``WORLD * STEPS`` batches, heavy-tailed, each step's batches scaled differently (the order matters)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(WORLD * STEPS):
        x = torch.randn(8, 3, 32, 32, generator=g) * (0.5 * 1.8 ** i)  # kl: the range grows ~19 x
        x[0, 0, :2, :2] *= 6.0  # a few outliers
        out.append(x)
    return out


def shard(batches: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches: the global order is step by step, rank by rank."""
    return batches[rank::WORLD]


def prepared(method: str):
    torch.manual_seed(0)
    model = ck.cifar_resnet(width=(8, 16, 16)).eval()
    qc = ck.get_default_qconfig(activation_observer=method, weight_observer="min_max",
                                activation_kwargs=ACTIVATION_KWARGS[method],
                                weight_kwargs={"averaging_constant": 0.3})
    return ck.prepare(model, qc, (torch.zeros(2, 3, 32, 32),))


def results(model) -> dict:
    """Every quantizer's scale and observer state (kl: the histogram too)."""
    out = {}
    for name, fq in ck.named_quantizers(model).items():
        obs = fq.observer
        r = {"scale": fq.scale.clone(), "steps": int(obs.steps), "amax": obs.amax.clone()}
        hist = getattr(obs, "histogram", None)
        if hist is not None:
            r.update(counts=hist.counts.clone(), width=hist.width, total=hist.total, max_value=hist.max_value,
                     searches=int(obs.searches), fallbacks=obs.fallbacks)
        out[name] = r
    return out


def _worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        mine = shard(all_batches(), rank)
        got = {}
        for method in METHODS:
            m = prepared(method)
            ck.calibrate(m, mine, progress=False)
            got[method] = results(m)
        for case, fewer in (("mismatch", mine[:STEPS - rank]), ("empty", mine[:STEPS * (1 - rank)])):
            m = prepared("min_max")  # ranks with different numbers of batches: a named error on every rank
            try:
                ck.calibrate(m, fewer, progress=False)
                got[case] = "no error"
            except D.StepMismatchError as e:
                got[case] = type(e).__name__
                got[case + "_untouched"] = all(int(fq.observer.steps) == 0 for fq in ck.named_quantizers(m).values())
        m = prepared("min_max")  # sync=False: each rank on its own
        ck.calibrate(m, mine, progress=False, sync=False)
        got["unsynced"] = results(m)
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 gloo ranks computed (spawned once for the module)."""
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(f"file://{tmp / 'rendezvous'}", str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = JOIN_S
    try:
        while not ctx.join(timeout=5):
            deadline -= 5
            if deadline <= 0:
                pytest.fail(f"the {WORLD} ranks did not finish within {JOIN_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(method: str, batches: list[torch.Tensor]) -> dict:
    m = prepared(method)
    ck.calibrate(m, batches, progress=False)
    return results(m)


def _assert_same(got: dict, want: dict, rtol: float, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        for key, w in want[name].items():
            g = got[name][key]
            if isinstance(w, torch.Tensor):
                assert g.shape == w.shape, (what, name, key)
                if rtol == 0 or w.dtype == torch.int64:
                    assert torch.equal(g, w), (what, name, key, (g - w).abs().max())
                else:
                    torch.testing.assert_close(g, w, rtol=rtol, atol=0, msg=f"{what} {name} {key}")
            elif isinstance(w, float) and rtol:
                assert math.isclose(g, w, rel_tol=rtol), (what, name, key, g, w)
            else:
                assert g == w, (what, name, key, g, w)


@pytest.mark.parametrize("method", METHODS)
def test_ranks_give_the_scales_of_one_process_on_all_batches_in_step_order(ranks, method):
    want = single_process(method, all_batches())
    rtol = 0.0 if method in ("min_max", "kl") else CLIP_RTOL
    for r in range(WORLD):
        _assert_same(ranks[r][method], want, rtol, f"rank {r} vs one process")
    assert all(v["steps"] == WORLD * STEPS for v in want.values())
    if method == "kl":  # the comparison covered non-trivial histograms, regrown by merging bin pairs
        kl = [v for v in want.values() if "counts" in v]
        assert kl and all(v["total"] > 0 and v["searches"] == WORLD * STEPS for v in kl)
        first = _start_width(float(all_batches()[0].abs().max()), 160)
        assert want["input"]["width"] > first  # merged while growing (the width each rank bins at differs)


def test_order_matters_so_the_comparison_can_fail(ranks):
    """Another order of the same batches gives other moving averages: the exact match above is not a coincidence."""
    batches = all_batches()
    other = single_process("min_max", shard(batches, 0) + shard(batches, 1))
    acts = [n for n in other if not n.endswith(".weight")]
    assert any(not torch.equal(other[n]["scale"], ranks[0]["min_max"][n]["scale"]) for n in acts)


@pytest.mark.parametrize("case", ["mismatch", "empty"])
def test_unequal_batch_counts_raise_a_named_error_on_every_rank(ranks, case):
    """Rank 1 has one batch fewer ("mismatch") or none ("empty"): every rank raises, none hangs, models untouched."""
    assert [ranks[r][case] for r in range(WORLD)] == ["StepMismatchError"] * WORLD
    assert all(ranks[r][case + "_untouched"] for r in range(WORLD))


def test_sync_false_keeps_each_ranks_own_scales(ranks):
    batches = all_batches()
    for r in range(WORLD):
        _assert_same(ranks[r]["unsynced"], single_process("min_max", shard(batches, r)), 0.0, f"rank {r} alone")


def test_one_process_calls_no_collective(monkeypatch):
    """Without an initialized process group nothing is gathered (and syncing can be switched off)."""
    assert D.world_size() == 1 and D.rank() == 0
    monkeypatch.setattr(D, "gather_in_step_order", lambda *a: pytest.fail("collective called"))
    m = prepared("kl")
    ck.calibrate(m, all_batches()[:2], progress=False)
    with D.syncing(False):
        assert D.world_size() == 1
    with pytest.raises(TypeError, match="sync="):
        ck.calibrate(m, all_batches()[:1], progress=False, sync="yes")


def test_histogram_replay_equals_adding_in_order():
    """The kl replay without processes: batches binned at the widths ``plan`` gives and added with ``add_counts``
    build the same histogram as ``add`` in order (all-zero batches first, growth with pair merges, tiny batches)."""
    from calibkit.quant.accumulating_histogram import AccumulatingHistogram
    g = torch.Generator().manual_seed(1)
    xs = [torch.zeros(50), torch.zeros(7)] + [torch.randn(300, generator=g) * 3.0 ** i for i in range(6)]
    xs.insert(4, torch.zeros(9))
    one, replay = AccumulatingHistogram(160), AccumulatingHistogram(160)
    for step in range(0, len(xs), 3):
        group = xs[step:step + 3]
        for x in group:
            one.add(x)
        amaxes = [float(x.abs().max()) for x in group]
        plan = replay.plan(amaxes)
        for x, a, p in zip(group, amaxes, plan):
            counts = torch.zeros(0, dtype=torch.int64) if p is None else replay.counts_at(x, *p)
            replay.add_counts(counts, a, x.numel())
        assert torch.equal(replay.counts, one.counts) and replay.width == one.width
        assert (replay.total, replay.max_value) == (one.total, one.max_value)
    assert one.counts[0] >= 66 and one.width > 2.0 ** -3  # the zeros went to bin 0; the range grew by merging
