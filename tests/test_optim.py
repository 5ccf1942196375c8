"""fixedpoint.torch.AndersonAcceleration: Anderson acceleration of a torch optimizer (arXiv 2110.14813).

References used here are independent of the core solver: Type-II AA weights from NumPy's
least-squares solve of the unconstrained (difference) form, the RSD and the moving average
recomputed from prescribed steps, loss values logged by the closure, and uninterrupted runs.
"""

import dataclasses
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

import fixedpoint  # noqa: E402
from fixedpoint.torch import AndersonAcceleration, ExtrapolationRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------------

def least_squares(n=120, d=20, seed=0, dtype=torch.float64):
    """An ill-conditioned linear least-squares problem: X (n, d), y (n,), its minimum loss, 1/L."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype) * torch.logspace(0, -1.5, d, dtype=dtype)
    y = X @ torch.randn(d, generator=g, dtype=dtype) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    w = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    lmin = 0.5 * torch.mean((X @ w - y) ** 2).item()
    lr = 1.0 / (torch.linalg.matrix_norm(X, 2) ** 2 / n).item()
    return X, y, lmin, lr


def steps_to_target(X, y, lmin, lr, wrap=None, max_steps=3000, rtol=1e-6):
    """Full-batch gradient descent from zero until the loss is within rtol of its minimum."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    if wrap is not None:
        opt = AndersonAcceleration(opt, **wrap)
    for k in range(1, max_steps + 1):
        opt.zero_grad()
        loss = 0.5 * torch.mean((X @ w - y) ** 2)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if 0.5 * torch.mean((X @ w - y) ** 2).item() - lmin <= rtol * lmin:
                return k
    return max_steps + 1


class Prescribed(torch.optim.Optimizer):
    """An "optimizer" whose k-th step adds a given vector to the (single, flat) parameter."""

    def __init__(self, params, steps):
        super().__init__(params, {})
        self.steps, self.k = steps, 0

    @torch.no_grad()
    def step(self, closure=None):
        p = self.param_groups[0]["params"][0]
        p.add_(torch.as_tensor(self.steps[self.k], dtype=p.dtype))
        self.k += 1


def type2_weights(F):
    """α minimising ‖F α‖ subject to Σ α = 1 (F: n × p), from the unconstrained difference form."""
    last = F[:, -1]
    D = F[:, :-1] - last[:, None]
    gamma = np.linalg.lstsq(D, -last, rcond=None)[0]
    return np.append(gamma, 1.0 - gamma.sum())


# --- acceleration --------------------------------------------------------------------------------

def test_full_batch_least_squares_needs_clearly_fewer_steps():
    X, y, lmin, lr = least_squares()
    plain = steps_to_target(X, y, lmin, lr)
    aa = steps_to_target(X, y, lmin, lr, dict(m=10, beta=1.0, store_every=1, average="off"))
    aa_blocks = steps_to_target(X, y, lmin, lr, dict(m=5, beta=1.0, store_every=5, average="off"))
    assert plain > 1000  # the problem is hard for gradient descent ...
    assert aa * 4 < plain  # ... and Anderson on the optimizer's iterates is several times faster
    assert aa_blocks * 2 < plain


def test_iterates_match_an_independent_type2_anderson():
    """Weights after 13 steps equal a NumPy re-implementation: stores of (x_j, g_j), extrapolation
    x ← Σ α_j [(1 − β) x_j + β g_j] every 3 steps with α from a QR least-squares solve."""
    X, y, _, lr = least_squares(n=60, d=6, seed=3)
    m, beta, every, steps = 4, 0.7, 3, 13
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w, b], lr=lr), m=m, beta=beta, lam=0.0, store_every=1,
                               every=every, average="off")
    Xn, yn = X[:, :5].numpy(), y.numpy()

    def grad(v):  # gradient of 0.5 mean((Xw + b − y)²) w.r.t. (w, b)
        r = Xn @ v[:5] + v[5] - yn
        return np.append(Xn.T @ r, r.sum()) / len(yn)

    x, pairs = np.zeros(6), []
    for k in range(1, steps + 1):
        opt.zero_grad()
        (0.5 * torch.mean((X[:, :5] @ w + b - y) ** 2)).backward()
        opt.step()
        gx = x - lr * grad(x)
        pairs = (pairs + [(x, gx)])[-m:]
        x = gx
        if k % every == 0:
            alpha = type2_weights(np.stack([g - xj for xj, g in pairs], 1))
            x = sum(a * ((1 - beta) * xj + beta * g) for a, (xj, g) in zip(alpha, pairs))
    got = torch.cat([w.detach(), b.detach()]).numpy()
    np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-12)
    assert [r.status for r in opt.records] == ["accepted"] * 4


def test_moving_average_and_rsd_from_prescribed_steps():
    """With average="on" a stored iterate is the mean of the block's iterates, f = mean − block start,
    and the RSD is max_i std_t(d_t,i) / max_i |mean_t(d_t,i)| over the block's steps d_t."""
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(4, 3)) + np.array([1.0, -0.5, 0.2])
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.zeros_like(p)  # the wrapper writes only parameters that have a gradient
    opt = AndersonAcceleration(Prescribed([p], steps), m=2, beta=1.0, lam=0.0, store_every=2, every=4, average="on")
    for _ in range(4):
        opt.step()
    x = np.vstack([np.zeros(3), np.cumsum(steps, 0)])       # iterates x_0 .. x_4
    g1, g2 = x[1:3].mean(0), x[3:5].mean(0)                    # block means
    f1, f2 = g1 - x[0], g2 - x[2]                              # residuals from each block's start
    alpha = type2_weights(np.stack([f1, f2], 1))
    np.testing.assert_allclose(p.detach().numpy(), alpha[0] * g1 + alpha[1] * g2, rtol=1e-12)

    def rsd(d):
        return np.sqrt(d.var(0)).max() / np.abs(d.mean(0)).max()

    rec = opt.records[-1]
    assert rec.status == "accepted" and rec.averaged and rec.n_history == 2
    assert rec.rsd == pytest.approx(rsd(steps[2:4]), rel=1e-9)


def noisy_least_squares_run(batch, average="auto", steps=400, seed=0, **kw):
    X, y, lmin, lr = least_squares(n=500, d=20, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=lr / 2), m=5, beta=1.0, store_every=5, average=average, **kw)
    for _ in range(steps):
        idx = slice(None) if batch is None else torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        (0.5 * torch.mean((X[idx] @ w - y[idx]) ** 2)).backward()
        opt.step()
    return opt


def test_auto_average_switches_on_under_minibatch_noise_only():
    noisy = noisy_least_squares_run(batch=16).summary()
    full = noisy_least_squares_run(batch=None).summary()
    assert noisy["stores"] == full["stores"] == 80
    assert noisy["averaged"] >= 0.8 * noisy["stores"]      # noise-dominated steps: averaging on
    assert full["averaged"] <= 0.15 * full["stores"]       # deterministic steps: averaging (almost) off


def test_auto_switch_discards_the_history_of_the_other_map():
    opt = noisy_least_squares_run(batch=64, steps=300, rsd_threshold=2.0)
    recs = opt.records
    flips = [i for i in range(1, len(recs)) if recs[i].averaged != recs[i - 1].averaged]
    assert flips, "the threshold should make the auto mode switch on this problem"
    for i in flips:
        assert recs[i].status == "short_history" and recs[i].n_history == 1


# --- safeguard -----------------------------------------------------------------------------------

def test_safeguard_keeps_the_lower_loss_and_restores_the_plain_weights():
    X, y, _, lr = least_squares(n=400, d=20, seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=lr), m=5, beta=1.0, store_every=2, average="off",
                               safeguard=True)
    seen = []  # (weights, loss) at every closure call
    for _ in range(300):
        idx = torch.randint(0, X.shape[0], (8,), generator=g)

        def closure(idx=idx):
            opt.zero_grad()
            loss = 0.5 * torch.mean((X[idx] @ w - y[idx]) ** 2)
            loss.backward()
            seen.append((w.detach().clone(), loss.item()))
            return loss

        n_before, n_rec = len(seen), len(opt.records)
        opt.step(closure)
        new = opt.records[n_rec:]
        if new and new[0].status in ("accepted", "rejected"):
            (w_plain, l_plain), (w_cand, l_cand) = seen[n_before + 1:]
            rec = new[0]
            assert (rec.loss_plain, rec.loss_extrapolated) == pytest.approx((l_plain, l_cand))
            if rec.accepted:
                assert l_cand <= l_plain and torch.equal(w.detach(), w_cand)
            else:
                assert not l_cand <= l_plain and torch.equal(w.detach(), w_plain)
        else:
            assert len(seen) == n_before + 1  # no extra closure calls without an extrapolation
    summary = opt.summary()
    assert summary["accepted"] > 0 and summary["rejected"] > 0


def test_safeguard_needs_a_closure():
    w = torch.zeros(3, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.1), safeguard=True)
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# --- checkpoints ---------------------------------------------------------------------------------

def small_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
                           lr=1e-2)
    wrapped = AndersonAcceleration(opt, m=4, store_every=3, every=6, average="auto", rsd_threshold=0.5,
                                   safeguard=True)
    return model, wrapped


def batches(k):
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(8, 4, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def mse_step(model, opt, x, t):
    """One optimizer step on the mean squared error of model(x) against t, through a closure."""

    def closure():
        opt.zero_grad()
        loss = torch.mean((model(x) - t) ** 2)
        loss.backward()
        return loss

    opt.step(closure)


def run_steps(model, opt, start, stop):
    for k in range(start, stop):
        mse_step(model, opt, *batches(k))


def test_state_dict_round_trip_continues_bit_for_bit():
    model, opt = small_training()
    run_steps(model, opt, 0, 40)                 # stops in the middle of a block
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(model, opt, 40, 100)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_records = opt.records[:]

    model2, opt2 = small_training(seed=123)      # different initial weights, overwritten by the load
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)   # tensors, numbers and strings only
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run_steps(model2, opt2, 40, 100)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b.detach())
    tail = expected_records[len(expected_records) - len(opt2.records):]
    assert opt2.records == tail and any(r.accepted for r in tail)
    assert opt2.summary() == opt.summary()


def test_load_state_dict_rejects_another_layout():
    model, opt = small_training()
    run_steps(model, opt, 0, 6)
    state = opt.state_dict()
    other = AndersonAcceleration(torch.optim.Adam(model.parameters()), m=4, store_every=3)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(state)
    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    groups = [{"params": twin[0].parameters()}, {"params": twin[2].parameters()}]
    with pytest.raises(ValueError, match="m=4"):
        AndersonAcceleration(torch.optim.Adam(groups), m=3, store_every=3).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"optimizer": state["optimizer"]})


# --- parameters and groups -----------------------------------------------------------------------

def test_groups_frozen_and_unused_parameters():
    torch.manual_seed(0)
    used = torch.nn.Linear(3, 1)
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    unused = torch.nn.Parameter(torch.randn(2))
    scale = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [used.weight, frozen, unused]}, {"params": [used.bias, scale], "lr": 0.05},
                           {"params": [torch.nn.Parameter(torch.ones(2), requires_grad=False)]}], lr=0.1)
    wrapped = AndersonAcceleration(opt, m=3, store_every=2, average="off")
    frozen0, unused0 = frozen.detach().clone(), unused.detach().clone()
    x = torch.randn(32, 3)
    t = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    loss0 = torch.mean((scale * used(x)[:, 0] - t) ** 2).item()
    for _ in range(30):
        wrapped.zero_grad()
        torch.mean((scale * used(x)[:, 0] - t) ** 2).backward()
        wrapped.step()
    assert torch.equal(frozen.detach(), frozen0) and torch.equal(unused.detach(), unused0)
    assert [g.n for g in wrapped.groups] == [3 + 2, 1 + 1, 0]
    accepted = {r.group for r in wrapped.records if r.accepted}
    assert accepted == {0, 1}
    loss = torch.mean((scale * used(x)[:, 0] - t) ** 2).item()
    assert loss < 1e-3 * loss0


def test_half_precision_parameters_use_float32_buffers():
    w = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.1), store_every=2)
    assert opt.groups[0].prev.dtype == torch.float32
    for _ in range(10):
        opt.zero_grad()
        torch.sum((w.float() - 1.0) ** 2).backward()
        opt.step()
    assert w.dtype == torch.bfloat16 and torch.all(torch.isfinite(w.float()))


# --- options and errors --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(m=0), ValueError, "m must be"),
    (dict(m=1), ValueError, "m must be an integer >= 2"),
    (dict(m=2.5), TypeError, "m must be"),
    (dict(beta=0.0), ValueError, "beta must be"),
    (dict(beta=1.5), ValueError, "beta must be"),
    (dict(lam=-1.0), ValueError, "lam must be"),
    (dict(lam_mode="sometimes"), ValueError, "lam_mode must be"),
    (dict(store_every=0), ValueError, "store_every must be"),
    (dict(every=7, store_every=5), ValueError, "every must be a multiple of store_every"),
    (dict(delay=-1), ValueError, "delay must be"),
    (dict(average="yes"), ValueError, "average must be one of"),
    (dict(average="auto", store_every=1), ValueError, "store_every >= 2"),
    (dict(rsd_threshold=0.0), ValueError, "rsd_threshold must be"),
    (dict(rsd_threshold=float("nan")), TypeError, "rsd_threshold must be"),
    (dict(safeguard=1), TypeError, "safeguard must be"),
    (dict(restart_weight=1.0), ValueError, "restart_weight must be"),
])
def test_bad_options_name_the_parameter(kwargs, exc, match):
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(exc, match=match):
        AndersonAcceleration(torch.optim.SGD([w], lr=0.1), **kwargs)


def test_method_object_is_the_same_as_keywords():
    X, y, lmin, lr = least_squares()
    by_kw = steps_to_target(X, y, lmin, lr, wrap=dict(m=4, lam=1e-3, average="off"))
    method = fixedpoint.Anderson(m=4, lam=1e-3, lam_mode="relative_max")
    by_obj = steps_to_target(X, y, lmin, lr, wrap=dict(method=method, average="off"))
    assert by_kw == by_obj < steps_to_target(X, y, lmin, lr)
    w = torch.zeros(3, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=0.1)
    assert AndersonAcceleration(sgd).method == fixedpoint.Anderson(lam=1e-2, lam_mode="relative_max", delay=0)
    # Anderson's own default delay (None: plain steps first in a solve) means no delay here
    assert AndersonAcceleration(sgd, method=fixedpoint.Anderson(m=4)).method.delay == 0
    with pytest.raises(TypeError, match="not both"):
        AndersonAcceleration(sgd, method=fixedpoint.Anderson(), m=3)
    with pytest.raises(TypeError, match="fixedpoint.Anderson"):
        AndersonAcceleration(sgd, method=fixedpoint.Broyden())
    with pytest.raises(ValueError, match="delay"):
        AndersonAcceleration(sgd, method=fixedpoint.Anderson(delay=2))
    with pytest.raises(TypeError, match="did you mean 'lam'"):
        AndersonAcceleration(sgd, lamb=1e-3)


def test_bad_optimizer_and_parameters():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        AndersonAcceleration([torch.zeros(2)])
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match=r"param_groups\[0\] has parameters on several devices"):
        AndersonAcceleration(torch.optim.SGD([p, q], lr=0.1))
    opt = AndersonAcceleration(torch.optim.SGD([p], lr=0.1))
    opt.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="parameter groups changed"):
        opt.step()


def test_records_summary_and_reset():
    opt = noisy_least_squares_run(batch=None, average="off", steps=50)
    assert all(isinstance(r, ExtrapolationRecord) for r in opt.records)
    assert [r.step for r in opt.records] == list(range(5, 51, 5))
    assert opt.records[0].status == "short_history" and math.isnan(opt.records[0].rsd)
    s = opt.summary()
    assert s["steps"] == 50 and s["stores"] == 10 and s["accepted"] + s["short_history"] == 10
    opt.reset()
    assert opt.groups[0].n_history() == 0 and not bool(opt.groups[0].hist.valid.any())
    assert "AndersonAcceleration(SGD" in repr(opt)


# --- distributed data parallel -------------------------------------------------------------------

#: Wrapper settings of the DDP test: with the safeguard (its loss comparison is the one quantity each rank
#: computes on its own data), the "auto" moving average near its threshold, and restarts forced by a tight
#: restart_growth; and without the safeguard (no communication in the wrapper at all), with lam=0 so that
#: nearly collinear optimizer steps give huge weights and restarts.
DDP_SETTINGS = {
    "safeguard": dict(m=3, store_every=2, average="auto", rsd_threshold=0.7, restart_growth=1.2, safeguard=True),
    "plain": dict(m=4, store_every=2, average="auto", rsd_threshold=0.5, lam=0.0, restart_weight=3.0),
}
DDP_STEPS = 60
DDP_TIMEOUT = 150  # seconds for the whole 2-process job: a hang fails the test instead of stalling CI


def _ddp_worker(rank, world, init_file, out_dir):
    """One rank: the same model and optimizer on every rank, its own mini-batches, gradients averaged by DDP.

    Saves the flat weights after every optimizer step, every extrapolation record and the summary."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # a collective that waits on a dead or diverged peer fails after this long instead of blocking forever
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    for name, settings in DDP_SETTINGS.items():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        model = torch.nn.parallel.DistributedDataParallel(net)
        sgd = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.05}],
                              lr=0.1, momentum=0.5)
        opt = AndersonAcceleration(sgd, **settings)
        g = torch.Generator().manual_seed(rank)  # every rank sees its own data
        trajectory = []
        for _ in range(DDP_STEPS):
            x = torch.randn(16, 6, generator=g)
            mse_step(model, opt, x, torch.sin(x @ torch.arange(6.0)[:, None] / 6))
            trajectory.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
        out[name] = {"trajectory": torch.stack(trajectory), "summary": opt.summary(),
                     # repr: exact for floats, and NaN (no loss, no RSD) equals NaN
                     "records": [repr(dataclasses.astuple(r)) for r in opt.records],
                     "statuses": [(r.status, r.averaged) for r in opt.records]}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_data_parallel_ranks_stay_identical(tmp_path):
    """Under DDP (2 processes, gloo, each rank with its own mini-batches) both ranks hold bit-identical weights
    after every optimizer step and log identical records, through accepted and rejected extrapolations,
    restarts and switches of the "auto" moving average.  With the safeguard, each rank's own loss decides
    nothing: the comparison uses the losses averaged over the ranks (without that all_reduce the ranks
    take different decisions and this test fails)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if a rank failed
            if time.monotonic() >= deadline:
                pytest.fail(f"the 2-process DDP run did not finish within {DDP_TIMEOUT} s (a hang?)")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    for name in DDP_SETTINGS:
        a, b = r0[name], r1[name]
        same = [torch.equal(u, v) for u, v in zip(a["trajectory"], b["trajectory"])]
        assert len(same) == DDP_STEPS and all(same), f"{name}: weights differ from step {same.index(False) + 1} on"
        assert a["records"] == b["records"] and a["summary"] == b["summary"], name
        seen = set(a["statuses"])
        assert {status for status, _ in seen} >= {"accepted", "restart", "short_history"}, (name, seen)
        assert {averaged for _, averaged in seen} == {True, False}, (name, seen)  # "auto" switched
    assert any(status == "rejected" for status, _ in r0["safeguard"]["statuses"])


# --- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_match_cpu():
    X, y, lmin, lr = least_squares()
    results = []
    for device in ("cpu", "cuda"):
        Xd, yd = X.to(device), y.to(device)
        w = torch.zeros(X.shape[1], dtype=X.dtype, device=device, requires_grad=True)
        opt = AndersonAcceleration(torch.optim.SGD([w], lr=lr), m=5, store_every=5, average="auto", safeguard=True)
        for _ in range(200):
            def closure(opt=opt, w=w, Xd=Xd, yd=yd):
                opt.zero_grad()
                loss = 0.5 * torch.mean((Xd @ w - yd) ** 2)
                loss.backward()
                return loss
            opt.step(closure)
        assert opt.groups[0].hist.R.device.type == device
        results.append(w.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-8, atol=1e-10)


# --- the demo ------------------------------------------------------------------------------------

def test_demo_quick_run_writes_metrics_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "demos.stable_anderson", "--quick", "--no-progress",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.json", "summary.csv", "rsd.png", "mlp_diabetes_train_loss.png", "mlp_diabetes_test_mse.png",
                 "burgers_pinn_train_loss.png", "burgers_pinn_rel_l2_error.png"):
        assert (out / name).stat().st_size > 0, name
    import csv
    import json

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["problem"], r["method"]) for r in rows} == {
        (p, m) for p in ("mlp_diabetes", "burgers_pinn") for m in ("adam", "anderson", "stable_anderson")}
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["quick"] and len(payload["runs"]) == 12
    # what it prints: the thread count it chose, and the runs' lines without bare None or unexplained columns
    assert proc.stdout.startswith("torch threads: ") and payload["machine"]["torch_threads"] >= 1
    lines = [line for line in proc.stdout.splitlines() if "train loss" in line]
    assert len(lines) == 12 and "None" not in proc.stdout
    assert all("reached Adam's final loss: " in line for line in lines)
    assert "'moving average': the share of stored iterates" in proc.stdout
