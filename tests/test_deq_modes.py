"""fixedpoint.torch.deq, issue 11: compaction, phantom and Jacobian-free gradients, Jacobian regularisation,
Broyden in the layer.  Every check is against an independent reference (the layer without compaction, an
unrolled autograd loop, a closed-form gradient, the exact Frobenius norm of a linear cell)."""

import numpy as np
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

import fixedpoint  # noqa: E402
from fixedpoint.torch import DEQ, deq_fixed_point, jacobian_frobenius  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


class RateCell(torch.nn.Module):
    """f(z, x) = 1 + a(x) (tanh(z Wᵀ + x) − 1)... a contraction whose rate per sample is set by x's first entry.

    Precisely f(z, x) = x₀ · tanh(z Wᵀ) + x with ‖W‖₂ = 1, so that a sample contracts at a rate of
    at most |x₀|: x₀ = 0.05 (1 decade in under 1 iteration) or 0.9 (22 iterations per decade).
    The map uses every entry of x, so a mismatch between the rows of z and of x changes the answer.
    """

    def __init__(self, d=5, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen, dtype=F64)
        self.weight = torch.nn.Parameter(w / torch.linalg.matrix_norm(w, 2))
        self.rows_seen = []

    def forward(self, z, x):
        self.rows_seen.append(z.shape[0])
        return x[:, :1] * torch.tanh(z @ self.weight.T) + x


def half_fast_batch(B=8, d=5, seed=1):
    """Half the samples converge about 20 times sooner than the other half (forward iteration)."""
    gen = torch.Generator().manual_seed(seed)
    rate = torch.tensor([0.05, 0.9] * (B // 2), dtype=F64)  # interleaved: the slow rows are not a prefix
    rest = torch.randn(B, d - 1, generator=gen, dtype=F64)
    return torch.cat([rate[:, None], rest], 1).requires_grad_()


def grads_of(layer, x, target):
    x.grad = None
    layer.zero_grad()
    z = layer(x)
    ((z - target) ** 2).sum().backward()
    return z.detach().clone(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("method", ["forward", "anderson", "broyden"])
def test_compaction_gives_the_same_fixed_point_and_gradients_with_fewer_rows(method):
    cell = RateCell()
    x = half_fast_batch()
    target = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    results, rows = {}, {}
    for compact in (False, True, "auto"):
        layer = DEQ(cell, method=method, compact=compact, tol=1e-11, backward_tol=1e-11, max_iter=2000)
        cell.rows_seen.clear()
        results[compact] = grads_of(layer, x, target)
        st = layer.stats
        rows[compact] = (st.forward.n_rows, st.backward.n_rows, sum(cell.rows_seen))
        assert st.forward.converged_fraction == st.backward.converged_fraction == 1.0
        assert st.forward.compacted == (compact is not False)
        # f saw exactly the rows the forward solve reports, the graph at z*, and the adjoint's rebuilds
        assert sum(cell.rows_seen) == st.forward.n_rows + x.shape[0] + st.backward.n_graph_rows
    for compact in (True, "auto"):
        for a, b in zip(results[compact], results[False]):
            for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)
    B = x.shape[0]
    full_fwd, full_bwd, _ = rows[False]
    assert full_fwd % B == 0 and full_bwd % B == 0
    for compact in (True, "auto"):
        assert rows[compact][0] < full_fwd and rows[compact][1] < full_bwd, (compact, rows)
    if method == "forward":  # the target: f sees at most 60 % of the rows of the whole-batch solve
        assert rows[True][0] <= 0.6 * full_fwd, rows


def test_compaction_keeps_rows_of_x_matched_and_rebuilds_the_adjoint_graph():
    """A cell whose answer depends on every row of x: z* and the gradients with compaction equal the
    per-sample references, whichever graph the adjoint's products run on."""
    x = half_fast_batch(B=6, seed=3)
    target = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    reference = None
    for fraction in (0.0, 0.5, 1.0):  # never rebuild (products on the full graph), the default, at every change
        cell = RateCell(seed=5)
        layer = DEQ(cell, method="forward", compact=True, tol=1e-12, backward_tol=1e-12, max_iter=3000,
                    rebuild_fraction=fraction)
        got = grads_of(layer, x, target)
        if fraction == 0.0:
            assert layer.stats.backward.n_graph_rows == 0
        else:
            assert layer.stats.backward.n_graph_rows > 0
        if reference is None:  # each sample solved alone, without any batch
            zs, gx, gw = [], [], torch.zeros_like(cell.weight)
            for i in range(x.shape[0]):
                xi = x[i:i + 1].detach().requires_grad_()
                lone = DEQ(cell, method="forward", compact=False, tol=1e-12, backward_tol=1e-12, max_iter=3000)
                zi = lone(xi)
                cell.zero_grad()
                ((zi - target[i:i + 1]) ** 2).sum().backward()
                zs.append(zi.detach())
                gx.append(xi.grad)
                gw += cell.weight.grad
            reference = (torch.cat(zs), torch.cat(gx), gw)
        torch.testing.assert_close(got[0], reference[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[1], reference[1], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[2][0], reference[2], rtol=1e-8, atol=1e-10)


def test_rebuild_fraction_moves_the_adjoint_products_to_smaller_graphs_without_changing_the_answers():
    """rebuild_fraction = 0 never evaluates f again (every product on the graph at z*), 1 at every change of
    the rows: the same z*, the same gradients, the same forward solve; only the rows of the products differ."""
    x = half_fast_batch(B=8, seed=6)
    target = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    cell = RateCell(seed=8)
    got, stats = {}, {}
    for fraction in (0, 1.0):  # an int is a real number too
        layer = DEQ(cell, method="forward", compact=True, tol=1e-12, backward_tol=1e-12, max_iter=3000,
                    rebuild_fraction=fraction)
        assert layer.config.rebuild_fraction == float(fraction)
        cell.rows_seen.clear()
        got[fraction] = grads_of(layer, x, target)
        stats[fraction] = (layer.stats, sum(cell.rows_seen))
    (never, never_f), (always, always_f) = stats[0], stats[1.0]
    for a, b in zip(got[0][:2], got[1.0][:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0][2][0], got[1.0][2][0], rtol=1e-10, atol=1e-12)
    assert never.forward.n_fev == always.forward.n_fev and never.forward.n_rows == always.forward.n_rows
    assert never.backward.n_fev == always.backward.n_fev
    assert never.backward.n_graph_rows == 0 < always.backward.n_graph_rows
    assert never.backward.n_rows == x.shape[0] * never.backward.n_fev  # every product on the whole graph
    assert always.backward.n_rows < never.backward.n_rows
    # f saw the forward rows, the graph at z*, and (only with rebuilds) the adjoint's rows again
    assert always_f - never_f == always.backward.n_graph_rows
    assert "rebuild_fraction=0" in repr(DEQ(cell, rebuild_fraction=0)) and "rebuild" not in repr(DEQ(cell))


def test_compaction_needs_no_change_in_a_cell_with_a_scalar_injection():
    cell = torch.nn.Linear(3, 3).double()
    x = torch.tensor(0.5, dtype=F64)
    z0 = torch.zeros(4, 3, dtype=F64)
    a, _ = deq_fixed_point(lambda z, x: 0.5 * torch.tanh(cell(z)) + x, x, z0, compact=True, tol=1e-10)
    b, _ = deq_fixed_point(lambda z, x: 0.5 * torch.tanh(cell(z)) + x, x, z0, compact=False, tol=1e-10)
    torch.testing.assert_close(a, b)


def _tanh_cell(seed=0, d=4, scale=0.6):
    """f(z, x) = tanh(z Wᵀ + x Uᵀ) with ‖W‖₂ = ``scale``: a contraction."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=gen, dtype=F64)
    W = (scale * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    U = torch.randn(d, d, generator=gen, dtype=F64).requires_grad_()
    x = torch.randn(3, d, generator=gen, dtype=F64, requires_grad=True)
    return (lambda z, x: torch.tanh(z @ W.T + x @ U.T)), W, U, x


def _grads(f, x, params, weights, **kw):
    for t in (x, *params):
        t.grad = None
    z, stats = deq_fixed_point(f, x, tol=1e-13, max_iter=500, **kw)
    (z * weights).sum().backward()
    return z.detach(), [t.grad.clone() for t in (x, *params)], stats


def test_phantom_with_many_undamped_steps_is_the_implicit_gradient():
    f, W, U, x = _tanh_cell()
    weights = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    _, implicit, _ = _grads(f, x, (W, U), weights, backward_tol=1e-13)
    z, phantom, st = _grads(f, x, (W, U), weights, gradient="phantom", gradient_steps=200, gradient_damping=1.0)
    for a, b in zip(phantom, implicit):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    _, few, _ = _grads(f, x, (W, U), weights, gradient="phantom", gradient_steps=2, gradient_damping=1.0)
    assert not torch.allclose(few[1], implicit[1], rtol=1e-3)  # two steps are only an approximation
    assert st.gradient == "phantom" and st.graph_evals == 200 and st.backward is None
    assert st.backward_vjps == 200 and st.backward_rows == 200 * 3 and st.backward_time > 0


def test_phantom_is_backpropagation_through_damped_steps_from_the_fixed_point():
    f, W, U, x = _tanh_cell(seed=1)
    weights = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    z, phantom, _ = _grads(f, x, (W, U), weights, gradient="phantom", gradient_steps=3, gradient_damping=0.6)
    # reference: the fixed point held constant, three damped steps built by hand
    with torch.no_grad():
        zs = torch.zeros_like(x)
        for _ in range(300):
            zs = f(zs, x)
    for t in (x, W, U):
        t.grad = None
    zk = zs
    for _ in range(3):
        zk = 0.4 * zk + 0.6 * f(zk, x)
    (zk * weights).sum().backward()
    torch.testing.assert_close(z, zk.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(phantom, (x.grad, W.grad, U.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_jfb_is_the_gradient_of_f_with_the_fixed_point_held_fixed():
    """f(z, x) = tanh(z Wᵀ + x Uᵀ), L = Σ c ⊙ f(z*, x):  dL/dW = (c ⊙ (1 − f²))ᵀ z*,
    dL/dU = (c ⊙ (1 − f²))ᵀ x,  dL/dx = (c ⊙ (1 − f²)) U."""
    f, W, U, x = _tanh_cell(seed=2)
    c = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    z, (gx, gW, gU), st = _grads(f, x, (W, U), c, gradient="jfb")
    with torch.no_grad():
        zs = torch.zeros_like(x)
        for _ in range(300):
            zs = f(zs, x)
        s = c * (1 - f(zs, x) ** 2)
    torch.testing.assert_close(gW, s.T @ zs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gU, s.T @ x.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, s @ U.detach(), rtol=1e-10, atol=1e-12)
    assert st.backward is None and st.backward_vjps == 1 and st.backward_rows == 3 and st.graph_evals == 1


def test_backward_cost_is_reported_in_every_mode():
    f, W, U, x = _tanh_cell(seed=3)
    weights = torch.ones_like(x)
    _, _, implicit = _grads(f, x, (W, U), weights, backward_tol=1e-10)
    b = implicit.backward
    assert implicit.gradient == "implicit" and b is not None and b.n_fev > 0
    assert implicit.backward_vjps == b.n_fev + 1 and implicit.backward_rows == b.n_rows + 3
    assert implicit.backward_time >= b.wall_time > 0
    for mode, kw in (("phantom", dict(gradient_steps=4)), ("jfb", {})):
        _, _, st = _grads(f, x, (W, U), weights, gradient=mode, **kw)
        assert st.gradient == mode and st.backward is None and st.backward_time > 0
        assert st.backward_vjps == (4 if mode == "phantom" else 1)


@pytest.mark.parametrize("mode", ["implicit", "phantom", "jfb"])
def test_output_is_the_same_with_and_without_grad(mode):
    f, W, U, x = _tanh_cell(seed=4)
    layer = DEQ(f, gradient=mode, tol=1e-8)
    with_grad = layer(x)
    with torch.no_grad():
        without = layer(x)
    torch.testing.assert_close(with_grad.detach(), without)


def test_jacobian_frobenius_of_a_linear_cell_against_the_exact_value_and_its_variance():
    """f(z, x) = s ⊙ (z Wᵀ) + x: J_b = s_b W, ‖J_b‖²_F = s_b² ‖W‖²_F exactly; a single probe's variance
    is 2 ‖J_b J_bᵀ‖²_F (Gaussian probes)."""
    gen = torch.Generator().manual_seed(0)
    d, B = 6, 3
    W = torch.randn(d, d, generator=gen, dtype=F64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=F64)[:, None]
    z = torch.randn(B, d, generator=gen, dtype=F64, requires_grad=True)
    fz = s * (z @ W.T) + 1.0
    exact = (s[:, 0] ** 2) * (W.detach() ** 2).sum()
    n = 4000
    est = jacobian_frobenius(fz, z, n_probes=n, generator=torch.Generator().manual_seed(1))
    A = W.detach() @ W.detach().T
    std_one = torch.sqrt(2 * (A ** 2).sum()) * s[:, 0] ** 2  # standard deviation of one probe
    assert est.shape == (B,) and est.dtype == F64
    assert (abs(est.detach() - exact) <= 4 * std_one / np.sqrt(n)).all(), (est, exact)
    singles = torch.stack([jacobian_frobenius(fz, z, generator=torch.Generator().manual_seed(100 + i))
                           for i in range(2000)]).detach()
    torch.testing.assert_close(singles.std(0), std_one, rtol=0.1, atol=0.0)
    # differentiable: with the probes fixed, d/dW Σ_b ‖J_bᵀ v_b‖² = Σ_b 2 s_b² v_b v_bᵀ W
    v = torch.randn((B, d), generator=torch.Generator().manual_seed(5), dtype=F64)
    jacobian_frobenius(fz, z, generator=torch.Generator().manual_seed(5)).sum().backward()
    expected = 2 * (v * s ** 2).T @ v @ W.detach()
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)


def test_layer_returns_the_jacobian_estimate_of_its_own_evaluation_of_f():
    f, W, U, x = _tanh_cell(seed=5)
    for mode in ("implicit", "phantom", "jfb"):
        layer = DEQ(f, gradient=mode, tol=1e-12)
        torch.manual_seed(3)
        z, jac = layer(x, jacobian_probes=2)
        calls = layer.stats.graph_evals
        # reference: f evaluated at the layer's z* by hand, the same probes
        with torch.no_grad():
            zs = torch.zeros_like(x)
            for _ in range(300):
                zs = f(zs, x)
        zl = zs.clone().requires_grad_()
        torch.manual_seed(3)
        ref = jacobian_frobenius(f(zl, x), zl, n_probes=2)
        torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-12)
        assert calls == (5 if mode == "phantom" else 1)
        # trainable: the loss with the regulariser has gradients for the parameters, and the implicit
        # adjoint still runs through the same graph
        W.grad = None
        (z.sum() + 0.1 * jac.mean()).backward()
        assert W.grad is not None and torch.isfinite(W.grad).all()
    with torch.no_grad(), pytest.raises(ValueError, match="jacobian_probes"):
        layer(x, jacobian_probes=1)


def test_jacobian_regulariser_gradient_adds_to_the_implicit_gradient():
    """With the regulariser, the gradient is the implicit gradient of the task loss plus the gradient
    of the estimate, each computed on its own."""
    f, W, U, x = _tanh_cell(seed=6)
    layer = DEQ(f, tol=1e-12, backward_tol=1e-12)
    torch.manual_seed(0)
    z, jac = layer(x, jacobian_probes=1)
    W.grad = None
    (z.sum() + jac.sum()).backward()
    both = W.grad.clone()
    W.grad = None
    layer(x).sum().backward()
    task = W.grad.clone()
    W.grad = None
    torch.manual_seed(0)
    _, jac2 = layer(x, jacobian_probes=1)
    jac2.sum().backward()
    torch.testing.assert_close(both, task + W.grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_with_broyden_in_both_solves():
    f, W, U, x = _tanh_cell(seed=7, scale=0.3)

    def layer(x, W):
        z, stats = deq_fixed_point(lambda z, x: torch.tanh(z @ W.T + x @ U.detach().T), x, method="broyden",
                                   tol=1e-12, backward_tol=1e-12, max_iter=300)
        return z

    assert torch.autograd.gradcheck(layer, (x, W), eps=1e-6, atol=1e-6, rtol=1e-5)
    layer_obj = DEQ(f, method="broyden", m=4, tol=1e-8)
    layer_obj(x).sum().backward()
    st = layer_obj.stats
    assert st.forward.method == st.backward.method == "broyden" and st.backward.converged_fraction == 1.0


@pytest.mark.parametrize("kwargs, kind, word", [
    (dict(gradient="neumann"), ValueError, "gradient"),
    (dict(compact="yes"), ValueError, "compact"),
    (dict(compact=1), ValueError, "compact"),
    (dict(compact=True, batch=False), ValueError, "compact"),
    (dict(gradient="phantom", gradient_steps=0), ValueError, "gradient_steps"),
    (dict(gradient="phantom", gradient_steps=2.5), TypeError, "gradient_steps"),
    (dict(gradient="phantom", gradient_damping=0.0), ValueError, "gradient_damping"),
    (dict(gradient="phantom", gradient_damping=1.5), ValueError, "gradient_damping"),
    (dict(gradient="implicit", gradient_steps=3), ValueError, "gradient_steps"),
    (dict(gradient="jfb", backward_tol=1e-3), ValueError, "backward_tol"),
    (dict(rebuild_fraction=-0.1), ValueError, "rebuild_fraction"),
    (dict(rebuild_fraction=1.5), ValueError, "rebuild_fraction"),
    (dict(rebuild_fraction=float("nan")), TypeError, "rebuild_fraction"),
    (dict(rebuild_fraction="half"), TypeError, "rebuild_fraction"),
    (dict(rebuild_fraction=True), TypeError, "rebuild_fraction"),
])
def test_bad_gradient_and_compact_values_are_refused_at_construction(kwargs, kind, word):
    with pytest.raises(kind, match=word):
        DEQ(torch.nn.Linear(2, 2), **kwargs)
    with pytest.raises(kind, match=word):
        deq_fixed_point(lambda z, x: z, torch.ones(2, 2), **kwargs)


def test_bad_jacobian_inputs_name_what_is_wrong():
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="n_probes"):
        jacobian_frobenius(z * 2, z, n_probes=0)
    with pytest.raises(ValueError, match="require grad"):
        jacobian_frobenius(z.detach() * 2, z.detach())
    with torch.no_grad():
        fz = z * 2
    with pytest.raises(ValueError, match="no autograd graph"):
        jacobian_frobenius(fz, z)
    with pytest.raises(ValueError, match="shape"):
        jacobian_frobenius(z[:1] * 2, z)


def straggler_batch(B=12, d=30, slow=0.97, seed=11):
    """One sample contracts at a rate of at most ``slow``, the others at most 0.05 (for :class:`RateCell`
    of width ``d``, wide enough that Anderson and Broyden need a few times more iterations for it too)."""
    gen = torch.Generator().manual_seed(seed)
    rate = torch.full((B,), 0.05, dtype=F64)
    rate[B // 3] = slow
    rest = torch.randn(B, d - 1, generator=gen, dtype=F64)
    return torch.cat([rate[:, None], rest], 1).requires_grad_()


@pytest.mark.parametrize("method", ["forward", "anderson", "broyden"])
def test_a_straggler_costs_its_own_rows_with_the_same_answers(method):
    # One slow sample among fast ones: with compaction f sees, at every evaluation, exactly the samples still
    # iterating (those whose residual history goes on), and the answers and gradients are those without it.
    x = straggler_batch()
    target = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(12))
    cell = RateCell(d=30, seed=13)
    ref_layer = DEQ(cell, method=method, compact=False, tol=1e-11, backward_tol=1e-11, max_iter=3000)
    ref = grads_of(ref_layer, x, target)
    cell.rows_seen.clear()
    layer = DEQ(cell, method=method, compact=True, tol=1e-11, backward_tol=1e-11, max_iter=3000)
    got = grads_of(layer, x, target)
    seen = cell.rows_seen
    fw, bw = layer.stats.forward, layer.stats.backward
    assert fw.converged_fraction == bw.converged_fraction == 1.0 and fw.status == "converged"
    ran = np.isfinite(fw.residual_history)  # (n_fev, B): which samples each evaluation was for
    assert seen[:fw.n_fev] == ran.sum(axis=1).tolist() and fw.n_rows == int(ran.sum())
    assert fw.n_rows < ref_layer.stats.forward.n_rows and fw.n_iter_max == ref_layer.stats.forward.n_iter_max
    np.testing.assert_array_equal(fw.residual_history.shape, ref_layer.stats.forward.residual_history.shape)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[2][0], ref[2][0], rtol=1e-8, atol=1e-10)


def test_a_straggler_that_does_not_converge_stops_at_the_iteration_cap():
    x = straggler_batch()
    layer = DEQ(RateCell(d=30, seed=14), method="anderson", compact=True, tol=1e-11, max_iter=20)
    with torch.no_grad(), pytest.warns(fixedpoint.ConvergenceWarning, match="forward solve ended unconverged"):
        layer(x)
    fw = layer.stats.forward
    assert fw.n_iter_max == 20 and fw.status == "max_iter"
    assert fw.converged_fraction == (x.shape[0] - 1) / x.shape[0]
