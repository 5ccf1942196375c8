"""Methods as objects: validation, aliases, the public protocol (a method written from the docs), Broyden."""

import dataclasses
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration, problems

DOCS = Path(__file__).resolve().parent.parent / "docs" / "algorithm.md"


# ---------------------------------------------------------------- the objects

@pytest.mark.parametrize("cls, option, value, kind", [
    (Anderson, "m", 0, ValueError), (Anderson, "m", 2.5, TypeError), (Anderson, "beta", 1.5, ValueError),
    (Anderson, "lam", -1.0, ValueError), (Anderson, "lam_mode", "scaled", ValueError),
    (Anderson, "delay", -1, ValueError), (Anderson, "restart_weight", 1.0, ValueError),
    (ForwardIteration, "damping", 0.0, ValueError), (ForwardIteration, "damping", "1", TypeError),
    (Broyden, "m", 0, ValueError), (Broyden, "beta", 0.0, ValueError), (Broyden, "degenerate_tol", 1.0, ValueError),
    (Broyden, "restart_growth", 0.5, ValueError), (Broyden, "m", None, TypeError),
])
def test_bad_option_is_refused_at_construction(cls, option, value, kind):
    with pytest.raises(kind, match=option):
        cls(**{option: value})


def test_objects_are_frozen_comparable_and_readable():
    a = Anderson(m=10, lam=1e-8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.m = 3
    assert a == Anderson(m=10, lam=1e-8) and hash(a) == hash(Anderson(m=10, lam=1e-8)) and a != Anderson()
    assert repr(a).startswith("Anderson(m=10, beta=1.0, lam=1e-08, lam_mode='relative'")
    assert repr(ForwardIteration(damping=0.5)) == "ForwardIteration(damping=0.5)"
    assert "Broyden(m=20" in repr(Broyden())
    assert Anderson(m=np.int64(3)).m == 3 and type(Anderson(m=np.int64(3)).m) is int  # normalised
    assert {k: fixedpoint.METHODS[k] for k in ("anderson", "forward", "broyden")} == {
        "anderson": Anderson, "forward": ForwardIteration, "broyden": Broyden}


@pytest.mark.parametrize("name, options, obj", [
    ("anderson", dict(m=3, beta=0.7, lam=1e-7), Anderson(m=3, beta=0.7, lam=1e-7)),
    ("forward", dict(damping=0.6), ForwardIteration(damping=0.6)),
    ("broyden", dict(m=4, beta=0.9), Broyden(m=4, beta=0.9)),
])
def test_string_alias_gives_exactly_the_same_iterates(name, options, obj):
    p = problems.chandrasekhar(40, 0.95)
    by_name = fixedpoint.solve(p.g, p.x0, method=name, tol=1e-11, **options)
    by_obj = fixedpoint.solve(p.g, p.x0, method=obj, tol=1e-11)
    assert by_name.method == by_obj.method == name and by_name.converged
    np.testing.assert_array_equal(by_name.residual_history, by_obj.residual_history)
    np.testing.assert_array_equal(by_name.x, by_obj.x)
    assert by_obj.options["tol"] == 1e-11 and all(by_obj.options[k] == v for k, v in options.items())
    short = {"anderson": fixedpoint.anderson, "forward": fixedpoint.forward_iteration, "broyden": fixedpoint.broyden}
    np.testing.assert_array_equal(short[name](p.g, p.x0, tol=1e-11, **options).x, by_obj.x)


def test_mixing_objects_and_options_is_an_error():
    with pytest.raises(TypeError, match="'m'"):
        fixedpoint.solve(np.cos, np.zeros(2), method=Anderson(), m=3)
    with pytest.raises(TypeError, match="instance"):
        fixedpoint.solve(np.cos, np.zeros(2), method=Anderson)
    with pytest.raises(TypeError, match="method object"):
        fixedpoint.solve(np.cos, np.zeros(2), method=3)
    with pytest.raises(TypeError, match="did you mean 'degenerate_tol'"):
        fixedpoint.solve(np.cos, np.zeros(2), method="broyden", degenerate_to=1e-3)
    with pytest.raises(ValueError, match="method"):
        fixedpoint.solve(np.cos, np.zeros(2), method="newton")


# ---------------------------------------------------------------- the protocol

def _docs_method():
    """The method written from scratch in docs/algorithm.md ("Writing a method"), executed from the page."""
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"<!-- method-example.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, str(DOCS), "exec"), scope)
    return scope["TypeOneAnderson"]


def _type_one_reference(g, x0, iters):
    """The same method as a plain NumPy loop over one vector (independent of the protocol)."""
    xs = [np.array(x0, dtype=float)]
    gs = [g(xs[0])]
    xs.append(gs[0])
    for _ in range(iters - 1):
        gs.append(g(xs[-1]))
        dx, df = xs[-1] - xs[-2], (gs[-1] - xs[-1]) - (gs[-2] - xs[-2])
        gamma = dx @ (gs[-1] - xs[-1]) / (dx @ df)
        xs.append(gs[-1] - gamma * (gs[-1] - gs[-2]))
    return np.array(xs[:iters])


def test_method_written_from_the_docs_matches_its_reference():
    TypeOneAnderson = _docs_method()
    p = problems.chandrasekhar(30, 0.9)
    seen = []
    res = fixedpoint.solve(p.g, p.x0, method=TypeOneAnderson(), tol=1e-300, max_iter=8,
                           callback=lambda info: seen.append(np.array(info.x)))
    np.testing.assert_allclose(np.array(seen), _type_one_reference(p.g, p.x0, 8), rtol=1e-12, atol=1e-14)
    assert res.method == "anderson_type1" and res.n_fev == 8 and res.status == "max_iter"


def test_method_written_from_the_docs_gets_batch_mode_and_every_backend(backend):
    TypeOneAnderson = _docs_method()
    p = problems.tanh_layer(d=10, batch=4, rho=0.9, backend=backend.xp, dtype=backend.xp.float64,
                            device=backend.device)
    res = fixedpoint.solve(p.g, p.x0, method=TypeOneAnderson(), batch=True, tol=1e-11)
    ref = fixedpoint.solve(p.g, p.x0, method="forward", batch=True, tol=1e-11)
    assert res.converged.all() and res.n_iter.max() < ref.n_iter.max()
    np.testing.assert_allclose(backend.numpy(res.x), backend.numpy(ref.x), atol=1e-9)
    assert res.residual_history.shape == (res.n_fev, 4) and res.n_restarts.tolist() == [0, 0, 0, 0]


def test_history_driven_by_hand_equals_the_solve_loop():
    """AndersonHistory.push / extrapolate, driven by another loop, give the solver's iterates."""
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import Kernels

    p = problems.chandrasekhar(30, 0.99)
    seen = []
    fixedpoint.solve(p.g, p.x0, method=Anderson(m=4), tol=1e-300, max_iter=10,
                     callback=lambda info: seen.append(np.array(info.x)))
    kern = Kernels(resolve_namespace("numpy"))
    hist = Anderson(m=4).init(kern, 1, 30, np.float64)
    x, out, mine = p.x0[None].copy(), np.empty((1, 30)), []
    active = np.ones(1, dtype=bool)
    for _ in range(10):
        mine.append(x[0].copy())
        gx = p.g(x)
        hist.push(gx, gx - x)  # any array, copied into the history
        assert not hist.extrapolate(active, out).any()
        x, out = out, x
    np.testing.assert_allclose(np.array(mine), np.array(seen), rtol=1e-13)
    assert int(hist.size()[0]) == 4


# ---------------------------------------------------------------- Broyden

def _broyden_reference(g, x0, iters, m, beta=1.0):
    """Limited-memory good Broyden by its definition: H is -beta I updated by the good Broyden formula
    H <- H + (s - H y) s^T H / (s^T H y) with each of the last m secant pairs in turn, oldest first, as a
    dense matrix rebuilt every iteration (not the compact representation the solver keeps)."""
    pairs = []
    x = np.array(x0, dtype=float)
    xs, f = [x], g(x) - x
    n = x.size

    def H():
        Hm = -beta * np.eye(n)
        for s_, y_ in pairs:
            Hy = Hm @ y_
            Hm = Hm + np.outer(s_ - Hy, s_ @ Hm) / (s_ @ Hy)
        return Hm

    x_new = x - H() @ f
    for _ in range(iters - 1):
        xs.append(x_new)
        f_new = g(x_new) - x_new
        pairs = (pairs + [(x_new - x, f_new - f)])[-m:]
        x, f = x_new, f_new
        x_new = x - H() @ f
    return np.array(xs)


@pytest.mark.parametrize("m, beta", [(3, 1.0), (20, 1.0), (2, 0.6)])
def test_broyden_iterates_match_a_plain_implementation(m, beta):
    p = problems.chandrasekhar(25, 0.99)
    seen = []
    fixedpoint.solve(p.g, p.x0, method=Broyden(m=m, beta=beta), tol=1e-300, max_iter=9,
                     callback=lambda info: seen.append(np.array(info.x)))
    np.testing.assert_allclose(np.array(seen), _broyden_reference(p.g, p.x0, 9, m, beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c", [0.9, 0.99])
def test_broyden_h_equation_in_at_most_20_iterations(c):
    p = problems.chandrasekhar(200, c)
    res = fixedpoint.solve(p.g, p.x0, method=Broyden(), tol=1e-10)
    assert res.converged and res.n_iter <= 20, res
    np.testing.assert_allclose(res.x, p.solution, rtol=1e-8)  # Newton's root from H = 1: the physical one


def test_broyden_on_every_backend(backend):
    """With memory for every pair, Broyden's method on a linear problem of size n needs at most 2n steps (Gay 1979)."""
    p = problems.linear_contraction(40, rho=0.95, backend=backend.xp, dtype=backend.xp.float64,
                                    device=backend.device)
    res = fixedpoint.solve(p.g, p.x0, method="broyden", m=80, tol=1e-12, stop_mode="abs")
    fw = fixedpoint.solve(p.g, p.x0, method="forward", tol=1e-12, stop_mode="abs")
    assert res.converged and res.n_iter <= 2 * 40 + 1 < fw.n_iter and res.n_restarts == 0
    np.testing.assert_allclose(backend.numpy(res.x), np.linalg.solve(np.eye(40) - p.params["A"], p.params["b"]),
                               atol=1e-10)


def test_broyden_batch_equals_independent_solves():
    p = problems.tanh_layer(d=12, batch=5, rho=0.95, seed=2)
    res = fixedpoint.solve(p.g, p.x0, method=Broyden(m=4), batch=True, tol=1e-11)
    assert res.converged.all()
    for i in range(5):
        def gi(z, i=i):
            zz = p.x0.copy()
            zz[i] = z
            return p.g(zz)[i]

        one = fixedpoint.solve(gi, p.x0[i], method=Broyden(m=4), tol=1e-11)
        assert one.n_iter == res.n_iter[i]
        np.testing.assert_allclose(res.x[i], one.x, rtol=1e-9, atol=1e-12)


def test_broyden_restarts_on_a_degenerate_update():
    # F(x) = g(x) - x is constant: every secant pair has ΔF = 0, so every update is degenerate
    res = fixedpoint.solve(lambda x: x + 1.0, np.zeros(3), method="broyden", max_iter=6)
    assert res.status == "max_iter" and res.n_restarts == 5 and np.isfinite(res.x).all()
    # per sample: only the second sample's map is degenerate
    shift = np.array([[0.0], [1.0]])

    def g(x):
        return np.where(shift > 0, x + 1.0, 0.5 * x + 1.0)

    res = fixedpoint.solve(g, np.zeros((2, 3)), method="broyden", batch=True, max_iter=8, tol=1e-12)
    assert res.n_restarts[0] == 0 and res.n_restarts[1] == 7 and res.sample_status[0] == "converged"


def test_broyden_allocates_nothing_of_size_n_inside_the_loop():
    n = 200_000
    buf, c = np.empty(n), np.linspace(0.0, 1.0, n)

    def g(x):
        np.multiply(x, 0.5, out=buf)
        np.add(buf, c, out=buf)
        return buf

    mark = {}

    def cb(info):
        if info.iteration == 3:
            tracemalloc.reset_peak()
            mark["base"] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        fixedpoint.solve(g, np.zeros(n), method=Broyden(m=3), tol=1e-300, max_iter=30, callback=cb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - mark["base"] < n * 8 // 4


def test_a_method_from_the_docs_in_a_new_file_is_solved_by_name(tmp_path):
    """The docs' recipe saved as one new module: importing it is all it takes for solve and the DEQ layer to take
    its name (nothing of fixedpoint is edited; a fresh process, so no other test's registration helps)."""
    text = DOCS.read_text(encoding="utf-8")
    (tmp_path / "type_one_anderson.py").write_text(
        re.search(r"<!-- method-example.*?-->\s*```python\n(.*?)```", text, re.S).group(1), encoding="utf-8")
    code = textwrap.dedent("""
        import numpy as np, torch, fixedpoint, type_one_anderson
        from fixedpoint import problems
        from fixedpoint.torch import DEQ
        assert "anderson_type1" not in dir(fixedpoint)
        p = problems.chandrasekhar(30, 0.9)
        by_name = fixedpoint.solve(p.g, p.x0, method="anderson_type1", tol=1e-10)
        by_object = fixedpoint.solve(p.g, p.x0, method=type_one_anderson.TypeOneAnderson(), tol=1e-10)
        assert by_name.converged and by_name.method == "anderson_type1" and np.array_equal(by_name.x, by_object.x)
        layer = DEQ(lambda z, x: 0.5 * torch.tanh(z) + x, method="anderson_type1", tol=1e-8)
        z = layer(torch.linspace(-1, 1, 6).reshape(2, 3))
        assert layer.stats.forward.converged_fraction == 1.0
        torch.testing.assert_close(z, 0.5 * torch.tanh(z) + torch.linspace(-1, 1, 6).reshape(2, 3))
        print(sorted(fixedpoint.METHODS))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['anderson', 'anderson_type1', 'broyden', 'forward']"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".py"] == ["type_one_anderson.py"]


@dataclasses.dataclass(frozen=True)
class _Halfway(fixedpoint.Method):
    """x_{k+1} = (x_k + g(x_k)) / 2: a method of this test module, for the registry's rules."""

    name = "halfway"

    def init(self, kern, B, n, dtype):
        return fixedpoint.ForwardIteration(damping=0.5).init(kern, B, n, dtype)


def test_register_method_rules():
    assert fixedpoint.register_method("halfway_test", _Halfway) is _Halfway
    res = fixedpoint.solve(np.cos, np.zeros(2), method="halfway_test", tol=1e-12)
    ref = fixedpoint.solve(np.cos, np.zeros(2), method=ForwardIteration(damping=0.5), tol=1e-12)
    assert res.converged and np.array_equal(res.x, ref.x) and res.n_fev == ref.n_fev
    fixedpoint.register_method("halfway_test", _Halfway)  # the same class again: accepted
    with pytest.raises(ValueError, match="already registered to .*_Halfway; pass replace=True"):
        fixedpoint.register_method("halfway_test", Anderson)
    with pytest.raises(ValueError, match="already registered"):
        fixedpoint.register_method("anderson", _Halfway)  # a built-in cannot be taken over by mistake
    fixedpoint.register_method("halfway_test", Anderson, replace=True)
    assert fixedpoint.METHODS["halfway_test"] is Anderson
    with pytest.raises(TypeError, match="cls must be a subclass of fixedpoint.Method"):
        fixedpoint.register_method("halfway_test2", object)
    with pytest.raises(TypeError, match="cls must be a subclass"):
        fixedpoint.register_method("halfway_test2", Anderson())  # an instance, not the class
    with pytest.raises(ValueError, match="Python identifier"):
        fixedpoint.register_method("half way", _Halfway)
    with pytest.raises(ValueError, match="option common to every method"):
        fixedpoint.register_method("tol", _Halfway)
    with pytest.raises(TypeError):
        fixedpoint.METHODS["x"] = _Halfway  # read-only: register_method is the one way in


def test_unknown_method_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"method must be one of .*'anderson'.*'broyden'.*'forward'.*got 'andersen'"):
        fixedpoint.solve(np.cos, np.zeros(2), method="andersen")
    torch = pytest.importorskip("torch")
    from fixedpoint.torch import DEQ

    with pytest.raises(ValueError, match="method must be one of .*'anderson'"):
        DEQ(lambda z, x: torch.tanh(z) + x, method="andersen")
