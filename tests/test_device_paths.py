"""The code paths taken only on accelerators, run on CPU tensors under a test-only emulation.

``fixedpoint.backend.emulate_accelerator`` makes PyTorch CPU tensors take the GPU paths: vector work
in PyTorch itself, small state in PyTorch (no host reads, hence no overflow rescue), the
``check_every`` cadence of 10, and optionally a device without float64 (float32 small solves).
"""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration, problems
from fixedpoint.backend import emulate_accelerator, resolve_namespace
from fixedpoint.kernels import Kernels

torch = pytest.importorskip("torch")

METHODS = [Anderson(), ForwardIteration(), Broyden(), Anderson(beta=0.5, m=3)]


@pytest.mark.parametrize("float64", [True, False])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_h_equation_on_emulated_device_matches_numpy(method, float64):
    ref = problems.chandrasekhar(60, 0.99)
    host = fixedpoint.solve(ref.g, ref.x0, method=method, tol=1e-9)
    p = problems.chandrasekhar(60, 0.99, backend="torch", dtype=torch.float64)
    with emulate_accelerator(float64=float64):
        kern = Kernels(resolve_namespace("torch"), torch.device("cpu"))
        assert kern.mode == "torch" and not kern.small_on_host
        assert kern.sdtype == (torch.float64 if float64 else torch.float32)
        res = fixedpoint.solve(p.g, p.x0, method=method, tol=1e-9)
    assert res.converged and res.n_fev % 10 == 0 and res.n_fev - res.n_iter < 10  # checked every 10 iterations
    if float64:
        assert res.n_iter == host.n_iter
        np.testing.assert_allclose(res.x.numpy(), host.x, rtol=1e-10)
    else:  # float32 weights: the same root, perhaps in a different number of iterations
        np.testing.assert_allclose(res.x.numpy(), ref.solution, rtol=1e-8)


def test_batch_freezing_restarts_and_best_iterate_on_emulated_device():
    p = problems.tanh_layer(d=16, batch=6, rho=0.95, backend="torch", dtype=torch.float64)
    host = fixedpoint.solve(p.g, p.x0, batch=True, tol=1e-10, method=Anderson(m=3))
    with emulate_accelerator():
        res = fixedpoint.solve(p.g, p.x0, batch=True, tol=1e-10, method=Anderson(m=3))
    assert res.converged.all() and (res.n_iter == host.n_iter).all()
    torch.testing.assert_close(res.x, host.x, rtol=1e-10, atol=1e-12)
    with emulate_accelerator():  # a degenerate Broyden update restarts per sample, on the device too
        res = fixedpoint.solve(lambda x: x + 1.0, torch.zeros(2, 3, dtype=torch.float64), method="broyden",
                               batch=True, max_iter=6)
    assert res.n_restarts.tolist() == [5, 5]


def test_no_overflow_rescue_on_a_device_but_never_a_false_convergence():
    """On a device the norms are not checked on the host (that would synchronise): a float32 problem beyond
    1e19 reports "nonfinite" there, where the host rescues it; neither says "converged" wrongly."""
    def g(x):
        return 0.5 * x + 1e19

    on_host = fixedpoint.solve(g, torch.zeros(10))
    assert on_host.converged
    with emulate_accelerator():
        on_device = fixedpoint.solve(g, torch.zeros(10))
        diverging = fixedpoint.solve(lambda x: 2 * x + 1, torch.zeros(10), method="forward")
    assert on_device.status == "nonfinite" and not on_device.converged
    assert diverging.status in ("diverged", "nonfinite") and not diverging.converged


def test_half_precision_and_in_place_check_on_emulated_device():
    with emulate_accelerator():
        res = fixedpoint.solve(lambda x: 0.5 * x + 100, torch.zeros(4, dtype=torch.bfloat16))
        assert res.converged and res.x.dtype == torch.bfloat16

        def in_place(x):
            return x.mul_(0.5).add_(1)

        with pytest.raises(ValueError, match="in place"):
            fixedpoint.solve(in_place, torch.zeros(4))


def test_deq_layer_on_emulated_device():
    from fixedpoint.torch import deq_fixed_point

    gen = torch.Generator().manual_seed(0)
    W = (0.3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def run():
        z, _ = deq_fixed_point(lambda z, x: torch.tanh(z @ W.T + x), x, backend="torch", tol=1e-11,
                               backward_tol=1e-11)
        (gx, gw) = torch.autograd.grad(z.square().sum(), (x, W))
        return z.detach(), gx, gw

    host = run()
    with emulate_accelerator():
        dev = run()
    for a, b in zip(host, dev):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        Kernels(resolve_namespace("torch"), torch.device("cuda:0"))
