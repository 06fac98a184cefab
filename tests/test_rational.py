"""The rational activation (PEDRO, IAPT): its GELU constants, float32 evaluation, finite gradients."""

import torch
import torch.nn.functional as F

from minipara.methods.rational import GELU_A, GELU_B, LIMIT, Rational, fit_gelu, rational


def plain(x, a, b):
    """docs/methods.md's formula (Rational activation) as written, without the clamp."""
    num = sum(a[j] * x**j for j in range(7))
    return num / (1 + sum(b[i - 1] * x**i for i in range(1, 6)).abs())


def test_constants_come_from_fit_gelu():
    """Re-running the fit reproduces the stored constants. A 1e-12 change of the fit's start
    moves its result by ~2e-9; another fit (the linearised start alone, or a stall of L-BFGS
    on |Q|'s kink) differs by 5e-3 to 3e-2, so 1e-7 says the constants are this fit's."""
    a, b = fit_gelu()
    assert torch.allclose(
        torch.tensor(a + b, dtype=torch.float64), torch.tensor(GELU_A + GELU_B, dtype=torch.float64), rtol=0, atol=1e-7
    )


def test_init_is_gelu_on_minus_3_to_3():
    r = Rational()
    assert [n for n, _ in r.named_parameters()] == ["a", "b"] and r.a.shape == (7,) and r.b.shape == (5,)
    x = torch.linspace(-3, 3, 60001)
    with torch.no_grad():
        err = (r(x) - F.gelu(x)).abs().max()
    assert err < 0.02  # docs/methods.md's bound (Rational activation)
    assert err < 2e-4  # what the least-squares fit actually reaches (1.2e-4)


def test_evaluates_in_float32_as_the_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.linspace(-60, 60, 4001, dtype=torch.float64)
    ref = plain(x, a, b)
    got = rational(x.float(), a.float(), b.float())
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref.abs().clamp(min=1)).max() < 1e-4  # float32 rounding
    r = Rational()
    for dtype in (torch.bfloat16, torch.float64):
        assert r(torch.ones(3, dtype=dtype)).dtype == torch.float32


def grads(x, a, b):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = rational(x, a, b)
    y.sum().backward()
    return y, x.grad, a.grad, b.grad


def test_gradients_are_finite_where_the_denominator_polynomial_crosses_zero():
    a = torch.tensor(GELU_A, dtype=torch.float32)
    # Q(x) = x^3 - 4x: roots exactly at 0 and +-2 (both sides of |x| = 1)
    b = torch.tensor([-4.0, 0.0, 1.0, 0.0, 0.0])
    x = torch.tensor([0.0, 2.0, -2.0, 1.0, -1.0])
    assert all(torch.isfinite(t).all() for t in grads(x, a, b))
    # random b-polynomials with real roots, evaluated at their roots (float32-rounded)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        b = torch.randn(5, generator=g) * 3
        coeffs = torch.cat([b.flip(0), torch.zeros(1)]).double()  # b_5 x^5 + ... + b_1 x + 0
        companion = torch.diag(torch.ones(4, dtype=torch.float64), -1)
        companion[0] = -coeffs[1:] / coeffs[0]
        roots = torch.linalg.eigvals(companion)
        x = torch.cat([roots.real[roots.imag.abs() < 1e-9].float(), torch.zeros(1)])
        assert all(torch.isfinite(t).all() for t in grads(x, torch.randn(7, generator=g), b))


def test_gradients_are_finite_for_large_inputs():
    a, b = torch.tensor(GELU_A), torch.tensor(GELU_B)
    x = torch.tensor([1e3, -1e3, 1e5, -1e5, 3e6, -1e9, 1e30, 3e38, float("inf"), float("-inf")])
    assert not torch.isfinite(plain(x, a, b)).all()  # x^6 overflows from 2.6e6: the clamp is needed
    y, *gs = grads(x, a, b)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in gs)
    exact = plain(x[:4].double(), a.double(), b.double())  # up to the clamp, R is the formula
    assert ((y[:4].double() - exact).abs() / exact.abs()).max() < 1e-5
    assert torch.equal(y[4:], rational(x[4:].sign() * LIMIT, a, b))  # beyond, R(+-LIMIT)


def test_gradients_are_exact():
    """Autograd of the Horner form against finite differences (float64)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.tensor([-7.5, -2.3, -0.6, 0.4, 0.9, 1.7, 12.0], dtype=torch.float64)
    torch.autograd.gradcheck(rational, (x.requires_grad_(), a.requires_grad_(), b.requires_grad_()))
