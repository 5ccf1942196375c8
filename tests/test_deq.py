"""fixedpoint.torch.deq: DEQ layers with implicit differentiation, solved through DLPack."""

import gc
import weakref

import numpy as np
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

import fixedpoint  # noqa: E402
import fixedpoint.interop  # noqa: E402
from fixedpoint.torch import DEQ, deq_fixed_point, solver_backend_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIGHT = dict(tol=1e-12, max_iter=300, backward_tol=1e-12)


def tanh_problem(B=3, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = (0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)).requires_grad_()
    U = torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64, requires_grad=True)
    return W, U, x


class ConvCell(torch.nn.Module):
    """A small conv map z ↦ GN(relu(z + conv(z) + x)), the shape of the demo's cell."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.norm = torch.nn.GroupNorm(2, c)

    def forward(self, z, x):
        return self.norm(torch.relu(z + self.conv(z) + x))


@pytest.mark.parametrize("method,backend", [("anderson", "auto"), ("forward", "torch")])
def test_gradcheck_float64(method, backend):
    W, U, x = tanh_problem()

    def layer(x, W):
        z, _ = deq_fixed_point(lambda z, x: torch.tanh(z @ W.T + x @ U.T), x, method=method, backend=backend,
                               **TIGHT)
        return z

    assert torch.autograd.gradcheck(layer, (x, W), eps=1e-6, atol=1e-6, rtol=1e-5)


def _unrolled(f, x, n):
    z = torch.zeros_like(x)
    for _ in range(n):
        z = f(z, x)
    return z


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["anderson", "forward"])
def test_implicit_gradient_matches_unrolled_iteration(method, backend):
    torch.manual_seed(0)
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    layer = DEQ(cell, method=method, backend=backend, **TIGHT)
    ((layer(x) - target) ** 2).sum().backward()
    implicit = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone()]
    cell.zero_grad()
    x.grad = None
    ((_unrolled(cell, x, 200) - target) ** 2).sum().backward()
    unrolled = [p.grad for p in cell.parameters()] + [x.grad]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert layer.stats.forward.converged_fraction == 1.0 and layer.stats.backward.converged_fraction == 1.0


def test_stats_after_forward_and_backward():
    torch.manual_seed(1)
    cell = ConvCell()
    layer = DEQ(cell, tol=1e-4)
    assert layer.stats is None
    z = layer(torch.randn(5, 4, 6, 6))
    st = layer.stats
    assert st.backward is None
    f = st.forward
    assert (f.method, f.backend, f.batch_size, f.status) == ("anderson", "numpy", 5, "converged")
    assert f.n_fev >= f.n_iter_max >= f.n_iter_mean > 0 and f.converged_fraction == 1.0
    assert f.residual_max <= 1e-4 and f.wall_time > 0 and f.residual_history.shape == (f.n_fev, 5)
    z.sum().backward()
    b = st.backward
    assert b is not None and b.n_fev > 0 and b.converged_fraction == 1.0 and b.residual_max <= 1e-4
    assert set(f.as_dict()) == set(b.as_dict()) and "residual_history" not in f.as_dict()


def test_eval_mode_and_no_grad_give_the_same_output():
    torch.manual_seed(2)
    cell = ConvCell()
    layer = DEQ(cell, tol=1e-6)
    x = torch.randn(3, 4, 6, 6)
    with_grad = layer(x)
    layer.eval()
    with torch.no_grad():
        without = layer(x)
    assert not without.requires_grad and layer.stats.backward is None
    torch.testing.assert_close(with_grad.detach(), without)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), without)


def test_no_hooks_and_no_reference_cycles_left():
    torch.manual_seed(3)
    cell = ConvCell()
    outputs = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            y = self.cell(z, x)
            if torch.is_grad_enabled():
                outputs.append(weakref.ref(y))
            return y

    layer = DEQ(Spy(), tol=1e-4)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        z = layer(x)
        assert len(outputs) == 1 and outputs[0]() is not None  # the one evaluation of f with the graph
        del z
        assert outputs[0]() is None  # freed by reference counting: no cycle keeps the graph alive
        z = layer(x)
        z.square().sum().backward()
        del z
        assert len(outputs) == 2 and outputs[1]() is None
    finally:
        gc.enable()
    for mod in layer.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    assert x._backward_hooks is None or not x._backward_hooks


def test_dlpack_zero_copy_both_ways(monkeypatch):
    """With the NumPy solver, every tensor f receives and every tensor it returns crosses without a copy."""
    seen = []
    real = fixedpoint.interop.convert

    def spy(x, target, **kw):
        y = real(x, target, **kw)
        seen.append((type(x).__module__.split(".")[0], fixedpoint.interop.same_memory(x, y)))
        return y

    monkeypatch.setattr(fixedpoint.interop, "convert", spy)
    ptrs = []
    W = 0.3 * torch.randn(6, 6)

    def f(z, x):
        ptrs.append(z.data_ptr())
        return torch.tanh(z @ W.T + x)

    iterates = []
    res = fixedpoint.solve(lambda z: f(z, torch.ones(4, 6)), torch.zeros(4, 6), backend="numpy", batch=True,
                           callback=lambda info: iterates.append(info.x.__array_interface__["data"][0]))
    assert res.converged.all() and isinstance(res.x, torch.Tensor)
    assert ptrs == iterates  # f reads the solver's NumPy iterate in place
    kinds = {k for k, _ in seen}
    assert {"torch", "numpy"} <= kinds and all(same for _, same in seen)
    # and in the layer itself, forward and backward:
    seen.clear()
    x = torch.randn(4, 6, requires_grad=True)
    z, stats = deq_fixed_point(f, x, tol=1e-6)
    z.sum().backward()
    assert stats.forward.backend == stats.backward.backend == "numpy"
    map_calls = [same for _, same in seen]
    assert len(map_calls) >= 2 * (stats.forward.n_fev + stats.backward.n_fev) and all(map_calls)


def test_backends_agree():
    W, U, x = tanh_problem(B=4, d=5, seed=4)
    grads = []
    for backend in ("numpy", "torch"):
        z, st = deq_fixed_point(lambda z, x: torch.tanh(z @ W.T + x @ U.T), x, backend=backend, **TIGHT)
        assert st.forward.backend == backend
        z.pow(2).sum().backward()
        grads.append((z.detach().clone(), W.grad.clone(), x.grad.clone()))
        W.grad = x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_per_sample_convergence_and_whole_batch_mode():
    W, U, x = tanh_problem(B=6, d=5, seed=5)
    f = lambda z, x: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    _, st = deq_fixed_point(f, x, tol=1e-8)
    assert st.forward.batch_size == 6 and st.forward.residual_history.shape[1] == 6
    _, whole = deq_fixed_point(f, x, tol=1e-8, batch=False)
    assert whole.forward.batch_size == 1


def test_options_and_errors():
    cell = ConvCell()
    layer = DEQ(cell, m=3, beta=0.8, lam=1e-6, lam_mode="absolute", backward_tol=1e-3)
    assert layer.config.method == fixedpoint.Anderson(m=3, beta=0.8, lam=1e-6, lam_mode="absolute")
    assert layer.config.backward_method == layer.config.method and layer.config.backward_tol == 1e-3
    assert "m=3" in repr(layer)
    assert DEQ(cell, method="forward", backward_method="anderson").config.backward_method == fixedpoint.Anderson()
    obj = DEQ(cell, method=fixedpoint.Broyden(m=7), backward_method=fixedpoint.ForwardIteration(damping=0.5))
    assert obj.config.method == fixedpoint.Broyden(m=7) and obj.config.backward_method.damping == 0.5
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="method"):
        DEQ(cell, method="newton")
    with pytest.raises(TypeError, match="'window'"):
        DEQ(cell, window=5)
    with pytest.raises(TypeError, match="m"):
        DEQ(cell, method="forward", m=5)
    with pytest.raises(TypeError, match="'max_iter'"):
        deq_fixed_point(cell, x, options={"max_iter": 3})
    with pytest.raises(ValueError, match="tol"):
        DEQ(cell, tol=0)
    with pytest.raises(ValueError, match="backward_max_iter"):
        DEQ(cell, backward_max_iter=0)
    with pytest.raises(ValueError, match="backend"):
        DEQ(cell, backend="jax")
    with pytest.raises(ValueError, match="beta"):
        DEQ(cell, beta=2.0)(x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        DEQ(cell)(np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match="z0"):
        DEQ(cell)(x, torch.zeros(3, 4, 5, 5))
    with pytest.raises(TypeError, match="f must be"):
        DEQ(3)


def test_training_mode_batchnorm_or_dropout_in_f_is_refused():
    class WithBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, z, x):
            return torch.tanh(self.bn(0.5 * z) + x)

    f = WithBN()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"f\.bn is a BatchNorm2d in training mode"):
        DEQ(f)(x)
    f.eval()  # running statistics: per sample, fixed during the solve
    assert DEQ(f)(x).shape == x.shape


def test_solver_backend_choice():
    assert solver_backend_for("auto", "cpu") == "numpy"
    assert solver_backend_for("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        solver_backend_for("cupy", "cpu")
    with pytest.raises(ValueError, match="backend"):
        solver_backend_for("gpu", "cpu")


@pytest.mark.gpu
def test_cuda_layer_with_the_cupy_solver_matches_the_torch_solver():
    """Skipped without a usable CUDA device and CuPy: the documented CUDA path (CuPy solver via DLPack)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no usable CUDA device")
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("cupy sees no usable CUDA device")
    torch.manual_seed(6)
    cell = ConvCell().double().cuda()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    results = []
    for backend in ("cupy", "torch"):
        layer = DEQ(cell, backend=backend, **TIGHT)
        z = layer(x)
        assert z.device.type == "cuda" and layer.stats.forward.backend == backend
        z.square().sum().backward()
        results.append((z.detach(), x.grad.clone(), [p.grad.clone() for p in cell.parameters()]))
        x.grad = None
        cell.zero_grad()
    assert solver_backend_for("auto", "cuda") == "cupy"
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-7, atol=1e-9)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kwargs, kind, word", [
    (dict(m=0), ValueError, "m"), (dict(beta=5.0), ValueError, "beta"), (dict(lam=-1.0), ValueError, "lam"),
    (dict(stop_mode="bogus"), ValueError, "stop_mode"), (dict(check_every=0), ValueError, "check_every"),
    (dict(damping=0.0), TypeError, "damping"),  # not an Anderson option
    (dict(method="forward", damping=0.0), ValueError, "damping"),
    (dict(backward_options={"m": 0}), ValueError, "m"),
])
def test_bad_options_are_refused_when_the_layer_is_built(kwargs, kind, word):
    with pytest.raises(kind, match=word):
        DEQ(ConvCell(), **kwargs)  # at construction, before any call


def test_second_derivatives_raise_instead_of_being_wrong():
    W, U, x = tanh_problem()
    layer = DEQ(lambda z, x: torch.tanh(z @ W.T + x @ U.T), **TIGHT)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x)  # first derivatives: fine
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_divergent_cell_is_not_reported_converged():
    x = torch.randn(4, 3)
    with pytest.warns(fixedpoint.ConvergenceWarning, match="forward solve ended unconverged"):
        _, stats = deq_fixed_point(lambda z, x: 2.0 * z + x + 1.0, x, method="forward")
    assert stats.forward.converged_fraction == 0.0 and stats.forward.status == "diverged"
