"""Complex iterates (complex64, complex128): the dtype rules, Kernels' Hermitian products and solves, and the loop.

References are independent: numpy.linalg.solve for the fixed point of a complex linear contraction and for
Hermitian positive definite systems, explicit conj/vdot sums for the products.  CuPy is marked ``gpu`` and
skipped without a usable CUDA device (as in test_gpu.py).
"""

import contextlib
import dataclasses
import importlib.util

import numpy as np
import pytest

import fixedpoint
from fixedpoint.backend import emulate_accelerator, is_complex_dtype, resolve_namespace, working_dtype
from fixedpoint.comm import Communicator
from fixedpoint.interop import to_numpy
from fixedpoint.kernels import SHORT_ROWS, Kernels, ldl_solve, ldl_solve_one_hermitian

TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not TORCH, reason="torch is not installed")


def _cnormal(rng, *shape, dtype=np.complex128):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def _contraction(n, radius=0.7, seed=0):
    """A complex A with spectral radius ``radius`` and ‖A‖₂ < 1, b, and the fixed point of x = A x + b."""
    rng = np.random.default_rng(seed)
    A = _cnormal(rng, n, n)
    A *= radius / np.linalg.norm(A, 2)
    b = _cnormal(rng, n)
    return A, b, np.linalg.solve(np.eye(n) - A, b)


def _hpd(rng, B, k, dtype=np.complex128):
    """B random Hermitian positive definite k×k systems and right-hand sides."""
    M = _cnormal(rng, B, k, k)
    return (M @ M.conj().transpose(0, 2, 1) + k * np.eye(k)).astype(dtype), _cnormal(rng, B, k).astype(dtype)


# --- dtype rules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_working_dtypes_are_kept(dtype):
    assert working_dtype(np, np.zeros(2, dtype=dtype)) == dtype
    assert is_complex_dtype(np.dtype(dtype)) and not is_complex_dtype(np.dtype(np.float32))


@needs_torch
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_torch_complex32_is_refused_with_a_clear_message():
    import torch

    x0 = torch.zeros(3, dtype=torch.complex32)
    with pytest.raises(TypeError, match="half-precision complex.*complex64"):
        fixedpoint.solve(lambda x: x, x0, method="forward")
    assert working_dtype(resolve_namespace("torch"), torch.zeros(1, dtype=torch.complex64)) == torch.complex64
    assert working_dtype(resolve_namespace("torch"), torch.zeros(1, dtype=torch.float16)) == torch.float16


@dataclasses.dataclass(frozen=True)
class _RealOnly(fixedpoint.ForwardIteration):
    """A method that does not declare complex support (forward iteration's state, the attribute reset)."""

    name = "real_only"
    supports_complex = False


def test_a_method_without_complex_support_refuses_complex_x0():
    with pytest.raises(TypeError, match="complex.*'real_only'"):
        fixedpoint.solve(lambda x: 0.5 * x, np.ones(2, dtype=complex), method=_RealOnly())


# --- Kernels: Hermitian products, real norms -------------------------------------------------------------------


def _kernels_case(lib, B, n, dtype, seed=1):
    rng = np.random.default_rng(seed)
    A, v = _cnormal(rng, 4, B, n, dtype=dtype), _cnormal(rng, B, n, dtype=dtype)
    if lib.startswith("torch"):
        import torch

        with emulate_accelerator() if lib == "torch-emulated" else contextlib.nullcontext():
            kern = Kernels(resolve_namespace("torch"))  # emulated: PyTorch's own kernels, small state in torch
        return kern, torch.from_numpy(A), torch.from_numpy(v), A, v
    return Kernels(np), A, v, A, v


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=needs_torch),
                                 pytest.param("torch-emulated", marks=needs_torch)])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("B, n", [(1, 7), (3, 7), (1, SHORT_ROWS + 5), (3, SHORT_ROWS + 5)])
def test_products_are_hermitian_and_norms_real(lib, dtype, B, n):
    kern, A, v, An, vn = _kernels_case(lib, B, n, dtype)
    mv, d, dr, sq, sd = kern.sums(("matvec", A, v), ("dot", A[0], v), ("dot", v, A[0]), ("sqnorm", v),
                                  ("sqdiff", A[1], v))
    assert mv.dtype == kern.small_dtype(v.dtype) == kern.csdtype and sq.dtype == sd.dtype == kern.sdtype
    mv, d, dr, sq, sd = (to_numpy(a) for a in (mv, d, dr, sq, sd))
    An, vn = An.astype(np.complex128), vn.astype(np.complex128)
    tol = 1e-12 if dtype == np.complex128 else 2e-5
    np.testing.assert_allclose(mv, np.einsum("kbn,bn->bk", An.conj(), vn), rtol=tol)
    np.testing.assert_allclose(d, [np.vdot(An[0, b], vn[b]) for b in range(B)], rtol=tol)
    np.testing.assert_allclose(dr, np.conj(d), rtol=tol)  # <a, b> = conj(<b, a>)
    np.testing.assert_allclose(sq, np.linalg.norm(vn, axis=1) ** 2, rtol=tol)
    np.testing.assert_allclose(sd, np.linalg.norm(An[1] - vn, axis=1) ** 2, rtol=tol)
    np.testing.assert_allclose(to_numpy(kern.norms(v)), np.linalg.norm(vn, axis=1), rtol=tol)


@pytest.mark.parametrize("n", [7, SHORT_ROWS + 5])
def test_a_samples_products_do_not_depend_on_the_batch(n):
    kern, A, v, _, _ = _kernels_case("numpy", 3, n, np.complex128)
    (whole,) = kern.sums(("matvec", A, v))
    (alone,) = kern.sums(("matvec", np.ascontiguousarray(A[:, 1:2]), np.ascontiguousarray(v[1:2])))
    assert np.array_equal(whole[1], alone[0])


def test_real_vectors_keep_real_small_state():
    rng = np.random.default_rng(2)
    A, v = rng.standard_normal((4, 3, 9)).astype(np.float32), rng.standard_normal((3, 9)).astype(np.float32)
    kern = Kernels(np)
    mv, sq = kern.sums(("matvec", A, v), ("sqnorm", v))
    assert mv.dtype == sq.dtype == kern.small_dtype(v.dtype) == np.float64
    np.testing.assert_allclose(mv, np.einsum("kbn,bn->bk", A, v), rtol=1e-5)


def test_overflowing_complex_products_and_norms_are_rescued():
    kern = Kernels(np)
    big = np.full((1, 4), 1e30 + 1e30j, dtype=np.complex64)  # |a|² = 2e60 overflows complex64, not float64
    with kern.solver_context():
        (sq,) = kern.sums(("sqnorm", big))
        norm = kern.root(sq, ("sqnorm", big))
        value = kern.dot(big, (1j * big).astype(np.complex64))  # Σ conj(a) i a = 8e60 i
    np.testing.assert_allclose(norm, [np.sqrt(8) * 1e30], rtol=1e-6)
    np.testing.assert_allclose(value, [8e60j], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_coefficients_in_the_elementwise_kernels(dtype):
    rng = np.random.default_rng(3)
    kern = Kernels(np)
    a, b, out = _cnormal(rng, 2, 5, dtype=dtype), _cnormal(rng, 2, 5, dtype=dtype), np.empty((2, 5), dtype)
    alpha = np.array([0.5 - 1j, 2j], dtype=kern.small_dtype(a.dtype))
    kern.add_scaled(out, a, alpha, b)
    np.testing.assert_allclose(out, a + alpha[:, None] * b, rtol=1e-6)
    kern.scale(out, a, 1 + 1j)
    np.testing.assert_allclose(out, (1 + 1j) * a, rtol=1e-6)
    w = np.array([[1j, 2.0], [0.5, -1j]], dtype=kern.small_dtype(a.dtype))
    stack = np.stack([a, b])
    kern.vecmat(out, w, stack)
    np.testing.assert_allclose(out, w[:, :1] * a + w[:, 1:] * b, rtol=1e-6)


def test_sharded_complex_sums_travel_as_real_parts():
    class TwoEqualShards(Communicator):
        """Two processes holding the same shard: a sum doubles; complex arrays must not reach the collective."""

        def __init__(self):
            self.kind, self.rank, self.size, self.abort_on_error = "fake", 0, 2, False

        def sum(self, a):
            assert not np.iscomplexobj(a)
            return 2 * a

        def max(self, a):
            return a

    kern, A, v, _, _ = _kernels_case("numpy", 2, 6, np.complex128)
    alone = Kernels(np).sums(("matvec", A, v), ("sqnorm", v))
    sharded = Kernels(np, comm=TwoEqualShards()).sums(("matvec", A, v), ("sqnorm", v))
    assert sharded[0].dtype == np.complex128 and sharded[1].dtype == np.float64
    np.testing.assert_allclose(sharded[0], 2 * alone[0], rtol=1e-15)
    np.testing.assert_allclose(sharded[1], 2 * alone[1], rtol=1e-15)


# --- the small solves ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6, 8])
@pytest.mark.parametrize("B", [2, 40])
def test_hermitian_solves_match_numpy(k, B):
    H, b = _hpd(np.random.default_rng(k + B), B, k)
    ref = np.linalg.solve(H, b[:, :, None])[:, :, 0]
    kern = Kernels(np)
    np.testing.assert_allclose(kern.solve_spd(H, b), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kern.solve(H, b), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_the_batched_ldlh_gives_each_system_the_bits_it_gets_alone(k):
    H, b = _hpd(np.random.default_rng(k), 30, k)
    batched = ldl_solve(H, b)
    one = np.array([ldl_solve_one_hermitian(a.ravel().tolist(), r.tolist()) for a, r in zip(H, b)])
    assert np.array_equal(batched, one)
    assert np.array_equal(Kernels(np).solve_spd(H[:3], b[:3]), batched[:3])  # the one-system path


@needs_torch
@pytest.mark.parametrize("float64", [True, False])
def test_device_small_state_solves_complex_systems(float64):
    import torch

    H, b = _hpd(np.random.default_rng(5), 4, 3)
    with emulate_accelerator(float64=float64):
        kern = Kernels(resolve_namespace("torch"))
        dt = kern.small_dtype(torch.complex64)
        assert dt == (torch.complex128 if float64 else torch.complex64)
        x = kern.solve_spd(torch.from_numpy(H).to(dt), torch.from_numpy(b).to(dt))
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(H, b[:, :, None])[:, :, 0], rtol=1e-5 if not float64
                               else 1e-12)


# --- forward iteration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_forward_iteration_on_numpy_complex(dtype, stop_mode):
    A, b, exact = _contraction(8)
    A, b = A.astype(dtype), b.astype(dtype)
    tol = 1e-11 if dtype == np.complex128 else 1e-5
    res = fixedpoint.solve(lambda x: A @ x + b, np.zeros(8, dtype), method="forward", tol=tol, stop_mode=stop_mode)
    assert res.converged and res.x.dtype == dtype
    assert isinstance(res.residual, float) and res.residual_history.dtype == np.float64
    np.testing.assert_allclose(res.x, exact, atol=30 * tol * max(1.0, np.linalg.norm(exact)))


@needs_torch
@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_forward_iteration_on_torch_complex(dtype, emulated):
    import torch

    A, b, exact = _contraction(8, seed=1)
    At, bt = torch.from_numpy(A).to(getattr(torch, dtype)), torch.from_numpy(b).to(getattr(torch, dtype))
    tol = 1e-11 if dtype == "complex128" else 1e-5
    with emulate_accelerator() if emulated else contextlib.nullcontext():
        res = fixedpoint.solve(lambda x: At @ x + bt, torch.zeros(8, dtype=At.dtype), method="forward", tol=tol,
                               damping=0.9)
    assert res.converged and isinstance(res.x, torch.Tensor) and res.x.dtype == At.dtype
    np.testing.assert_allclose(res.x.numpy(), exact, atol=30 * tol * max(1.0, np.linalg.norm(exact)))


def test_a_batch_sample_equals_its_solve_alone():
    n, B = 6, 3
    A, _, _ = _contraction(n, seed=2)
    rng = np.random.default_rng(7)
    bs = _cnormal(rng, B, n)

    def g(X, b=bs):
        return (A[None] @ X[:, :, None])[:, :, 0] + b  # each sample's product alone

    res = fixedpoint.solve(g, np.zeros((B, n), complex), method="forward", tol=1e-10, batch=True, max_iter=400)
    one = fixedpoint.solve(lambda X: g(X, bs[1:2]), np.zeros((1, n), complex), method="forward", tol=1e-10,
                           batch=True, max_iter=400)
    assert res.converged.all() and res.residual.dtype == np.float64
    for s in range(B):
        np.testing.assert_allclose(res.x[s], np.linalg.solve(np.eye(n) - A, bs[s]), atol=1e-9)
    assert one.n_iter[0] == res.n_iter[1] and np.array_equal(one.x[0], res.x[1])


# --- every method ---------------------------------------------------------------------------------------------

#: The methods that declare complex support, with options that take each of their code paths.
COMPLEX_METHODS = [
    ("forward", {}),
    ("anderson", {}),
    ("anderson", {"beta": 0.5, "lam_mode": "absolute", "lam": 1e-12}),
    ("anderson", {"m": 8}),  # beyond the LDLᴴ sizes: LAPACK's Hermitian solve
    ("broyden", {}),
    ("broyden", {"m": 3, "beta": 0.7}),  # the ring buffer wraps, pairs are dropped
]


@pytest.mark.parametrize("method, options", COMPLEX_METHODS)
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_every_method_finds_the_fixed_point_of_a_complex_contraction(method, options, dtype):
    A, b, exact = _contraction(30, radius=0.9, seed=5)
    A, b = A.astype(dtype), b.astype(dtype)
    tol = 1e-11 if dtype == np.complex128 else 1e-5
    res = fixedpoint.solve(lambda x: A @ x + b, np.zeros(30, dtype), method=method, tol=tol, max_iter=2000,
                           **options)
    assert res.converged and res.x.dtype == dtype and res.residual_history.dtype == np.float64
    np.testing.assert_allclose(res.x, exact, atol=50 * tol * np.linalg.norm(exact))
    if method != "forward" and "beta" not in options:  # complex weights: fewer evaluations than forward's
        plain = fixedpoint.solve(lambda x: A @ x + b, np.zeros(30, dtype), method="forward", tol=tol, max_iter=2000)
        assert res.n_iter < plain.n_iter


@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_complex_anderson_iterates_are_the_least_squares_ones_over_the_complex_numbers(beta):
    """Type-II AA textbook form: min ‖Σ α_j f_j‖ over complex α with Σ α_j = 1, by complex lstsq (no ridge)."""
    A, b, _ = _contraction(20, radius=0.95, seed=11)
    m, x, xs, gs, weights = 4, np.zeros(20, complex), [], [], []
    textbook = [x]
    for _ in range(8):
        gx = A @ x + b
        xs, gs = (xs + [x])[-m:], (gs + [gx])[-m:]
        F = np.stack([gv - xv for gv, xv in zip(gs, xs)], axis=1)
        if F.shape[1] == 1:
            alpha = np.ones(1, complex)
        else:
            coef = np.linalg.lstsq(F[:, :-1] - F[:, -1:], -F[:, -1], rcond=None)[0]
            alpha = np.append(coef, 1 - coef.sum())
        weights.append(alpha)
        x = sum(a * (beta * gv + (1 - beta) * xv) for a, gv, xv in zip(alpha, gs, xs))
        textbook.append(x)
    seen = []
    fixedpoint.solve(lambda v: A @ v + b, np.zeros(20, complex), method="anderson", m=m, beta=beta, lam=0.0,
                     delay=0, max_iter=9, tol=1e-300, callback=lambda info: seen.append(np.array(info.x)))
    assert max(np.abs(w.imag).max() for w in weights) > 0.1  # complex weights: not a real combination
    np.testing.assert_allclose(np.array(seen), np.array(textbook), rtol=1e-8, atol=1e-10)


def test_complex_broyden_iterates_are_the_dense_good_broyden_ones():
    """With memory for every pair, the iterates of good Broyden over ℂ with a dense inverse Jacobian H:
    H ← H + (s − H y) sᴴ H / (sᴴ H y), H_0 = −β I (Broyden 1965 with Hermitian transposes)."""
    A, b, _ = _contraction(10, radius=0.95, seed=12)
    F = lambda v: A @ v + b - v  # noqa: E731
    beta, x, H = 0.8, np.zeros(10, complex), -0.8 * np.eye(10, dtype=complex)
    dense, fx = [x], F(x)
    for _ in range(8):
        x_new = x - H @ fx
        f_new = F(x_new)
        s_, y_ = x_new - x, f_new - fx
        Hy = H @ y_
        H = H + np.outer(s_ - Hy, s_.conj() @ H) / (s_.conj() @ Hy)
        x, fx = x_new, f_new
        dense.append(x)
    seen = []
    fixedpoint.solve(lambda v: A @ v + b, np.zeros(10, complex), method="broyden", m=20, beta=beta, max_iter=9,
                     tol=1e-300, callback=lambda info: seen.append(np.array(info.x)))
    np.testing.assert_allclose(np.array(seen), np.array(dense), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method, options", COMPLEX_METHODS)
def test_every_method_gives_a_complex_sample_the_bits_it_gets_alone(method, options):
    n, B = 12, 3
    A, _, _ = _contraction(n, radius=0.9, seed=8)
    bs = _cnormal(np.random.default_rng(9), B, n)

    def g(X, b=bs):
        return (A[None] @ X[:, :, None])[:, :, 0] + b  # each sample's product alone

    res = fixedpoint.solve(g, np.zeros((B, n), complex), method=method, tol=1e-12, batch=True, **options)
    one = fixedpoint.solve(lambda X: g(X, bs[1:2]), np.zeros((1, n), complex), method=method, tol=1e-12,
                           batch=True, **options)
    assert res.converged.all()
    assert one.n_iter[0] == res.n_iter[1] and np.array_equal(one.x[0], res.x[1])


@needs_torch
@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("method, options", [COMPLEX_METHODS[1], COMPLEX_METHODS[4]])
def test_every_method_on_torch_complex(method, options, emulated):
    import torch

    A, b, exact = _contraction(16, radius=0.9, seed=10)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    with emulate_accelerator() if emulated else contextlib.nullcontext():
        res = fixedpoint.solve(lambda x: At @ x + bt, torch.zeros(16, dtype=At.dtype), method=method, tol=1e-11,
                               **options)
    assert res.converged and res.x.dtype == torch.complex128
    np.testing.assert_allclose(res.x.numpy(), exact, atol=1e-9)


@needs_torch
def test_a_numpy_complex_problem_solved_through_torch():
    A, b, exact = _contraction(5, seed=3)
    res = fixedpoint.solve(lambda x: A @ x + b, np.zeros(5, complex), method="forward", tol=1e-11,
                           backend="torch")
    assert isinstance(res.x, np.ndarray) and res.x.dtype == np.complex128
    np.testing.assert_allclose(res.x, exact, atol=1e-9)


@pytest.mark.gpu
def test_forward_iteration_on_cupy_complex():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    import cupy

    if not cupy.cuda.is_available():
        pytest.skip("cupy is installed but no CUDA device is usable")
    A, b, exact = _contraction(8, seed=4)
    Ac, bc = cupy.asarray(A), cupy.asarray(b)
    for method, options in COMPLEX_METHODS:
        res = fixedpoint.solve(lambda x: Ac @ x + bc, cupy.zeros(8, complex), method=method, tol=1e-11, **options)
        assert res.converged and isinstance(res.x, cupy.ndarray) and res.x.dtype == cupy.complex128
        np.testing.assert_allclose(to_numpy(res.x), exact, atol=1e-9)
    kern = Kernels(resolve_namespace("cupy"))
    rng = np.random.default_rng(0)
    S, v = _cnormal(rng, 3, 2, 50), _cnormal(rng, 2, 50)
    mv, sq, sd = kern.sums(("matvec", cupy.asarray(S), cupy.asarray(v)), ("sqnorm", cupy.asarray(v)),
                           ("sqdiff", cupy.asarray(S[0]), cupy.asarray(v)))
    np.testing.assert_allclose(cupy.asnumpy(mv), np.einsum("kbn,bn->bk", S.conj(), v), rtol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(sq), np.linalg.norm(v, axis=1) ** 2, rtol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(sd), np.linalg.norm(S[0] - v, axis=1) ** 2, rtol=1e-12)


def test_the_standards_kernels_and_loop_take_complex():
    xs = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(6)
    S, v = _cnormal(rng, 3, 2, 4), _cnormal(rng, 2, 4)
    mv, sq, sd = Kernels(xs).sums(("matvec", xs.asarray(S), xs.asarray(v)), ("sqnorm", xs.asarray(v)),
                                  ("sqdiff", xs.asarray(S[0]), xs.asarray(v)))
    assert mv.dtype == xs.complex128 and sq.dtype == sd.dtype == xs.float64
    np.testing.assert_allclose(np.asarray(mv), np.einsum("kbn,bn->bk", S.conj(), v), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sd), np.linalg.norm(S[0] - v, axis=1) ** 2, rtol=1e-12)
    A, b, exact = _contraction(5, seed=5)
    res = fixedpoint.solve(lambda x: A @ x + b, np.zeros(5, complex), method="forward", tol=1e-11,
                           backend="array_api_strict")
    assert res.x.dtype == np.complex128
    np.testing.assert_allclose(res.x, exact, atol=1e-9)
