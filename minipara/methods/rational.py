"""The rational activation of PEDRO and IAPT (Padé activation unit, orders m=6, n=5):

    R(x) = (a_0 + a_1 x + ... + a_6 x^6) / (1 + |b_1 x + ... + b_5 x^5|)

evaluated in float32. `a`, `b` start as the least-squares fit of GELU on [-3, 3] that
`fit_gelu()` below derives; the constants are stored so that start-up does no fitting
(tests/test_rational.py re-runs the fit and checks it reproduces them).

Overflow guard: x^6 exceeds float32's range for |x| > 2.6e6, and R becomes inf/inf = NaN,
in the output and in every gradient of a training step. Inputs are down-projected hidden
states, O(1) and at most O(1e3) even at LLaMA's "massive activations", so x is clamped to
+-1e5: R is exact wherever an input can plausibly land, x^6 <= 1e30 leaves ~1e8 of float32
headroom for the largest gradient (dR/da_6 = x^6 / (1 + |Q|)), and R and its gradients are
finite for every input, inf included. Where the b-polynomial Q crosses zero the gradients
are finite too: the denominator is >= 1 and |.| has gradient 0 at 0.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minipara.errors import UserError

# fit_gelu() on this file's grid (float64; b_1 = b_3 = b_5 = 0, see there).
GELU_A = (
    2.7958403487266028e-05,
    0.4999999999907111,
    0.3985031977579699,
    0.16223387411041676,
    0.0639959401609636,
    0.01830169723203025,
    0.0020992082896436953,
)
GELU_B = (0.0, 0.3244677482036004, 0.0, 0.03660339446644223, 0.0)
LIMIT = 1e5  # |x| beyond this is clamped (see the module docstring)

# The generator activations PEDRO and IAPT accept (docs/methods.md, Activation variants): the learnable
# rational, or fixed ones for the papers' ablations (PEDRO-5/6/7, IAPT-4..7), split by depth in the last two.
ACTIVATIONS = ("rational", "relu", "gelu", "relu-gelu", "gelu-relu")


def rational(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R(x) elementwise for a (7,), b (5,), in the dtype of its arguments (Horner's rule);
    or, for x (B, n), each row's own a (B, 7), b (B, 5)."""
    x = x.clamp(-LIMIT, LIMIT)
    num, q = a[..., 6, None], b[..., 4, None]
    for j in range(5, -1, -1):
        num = num * x + a[..., j, None]
    for i in range(3, -1, -1):
        q = q * x + b[..., i, None]
    return num / (1 + (q * x).abs())


class Rational(nn.Module):
    """A learnable rational activation: parameters a (7) and b (5), GELU-shaped at init."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(GELU_A, dtype=torch.float32))
        self.b = nn.Parameter(torch.tensor(GELU_B, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x.float(), self.a.float(), self.b.float())


def rational_per_row(x: torch.Tensor, rows, act) -> torch.Tensor:
    """R(x) in float32 for x (B, ...), each row with its own tenant's Rational, act(adapter)
    (a Mixture's rows, base.per_row)."""
    a, b = rows(lambda ad: act(ad).a).float(), rows(lambda ad: act(ad).b).float()
    return rational(x.float().flatten(1), a, b).view(x.shape)


def fit_gelu(points: int = 6001) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The least-squares fit of GELU (exact, erf form) on `points` even steps over [-3, 3]:
    (a, b) as float64 tuples; max |R - GELU| on the grid is 1.2e-4. Deterministic; under a
    second on a CPU once torch is warm.

    Start: the linearised problem P(x) - GELU(x) Q(x) = GELU(x), one linear least-squares
    solve, which weights the true residual by (1 + Q)^2. Then L-BFGS on the true mean
    squared error until it stops improving. b_1, b_3, b_5 are held at 0: the linearised
    fit makes them ~1e-11 anyway, and the true error is smallest at 0 along them, but
    |Q| has a kink there (Q(0) = 0), on which L-BFGS stalls at rounding-dependent points
    nearby with a larger error and a corner in R near x = 0. With Q even and >= 0, R is
    smooth and has no pole, and the fit is well-conditioned (moves of 1e-12 in the start
    move the result by ~2e-9). The result also has R's odd part equal to x/2 (a_3 = b_2/2,
    a_5 = b_4/2), as GELU's is.
    """
    x = torch.linspace(-3, 3, points, dtype=torch.float64)
    f = F.gelu(x)
    lin = torch.stack([x**j for j in range(7)] + [-f * x**i for i in range(1, 6)], -1)
    start = torch.linalg.lstsq(lin, f[:, None], driver="gelsd").solution[:, 0]
    free = torch.tensor([1.0] * 7 + [0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    p = (start * free).requires_grad_()

    def mse():
        return (rational(x, p[:7], p[7:] * free[7:]) - f).pow(2).mean()

    with torch.no_grad():
        scale = 1.0 / mse()  # a loss near 1 keeps L-BFGS's step and curvature tests meaningful
    opt = torch.optim.LBFGS(
        [p], max_iter=1000, history_size=100, line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0
    )

    def closure():
        opt.zero_grad()
        loss = mse() * scale
        loss.backward()
        return loss

    opt.step(closure)
    p = p.detach()
    return tuple(p[:7].tolist()), tuple((p[7:] * free[7:]).tolist())


def check_activation(kind: str, method: str):
    if kind not in ACTIVATIONS:
        raise UserError(f"unknown {method} activation {kind!r}; use one of {', '.join(ACTIVATIONS)}", ("activation",))


def fixed_activation(kind: str, layer: int, n_layers: int):
    """The fixed function of a non-rational `kind` at `layer`: "relu-gelu" is ReLU on the first
    half of the layers (the first 16 of LLaMA-2-7B's 32, as the papers split it) and GELU on
    the rest, "gelu-relu" the reverse."""
    name = kind if "-" not in kind else kind.split("-")[0 if layer < n_layers // 2 else 1]
    return F.relu if name == "relu" else F.gelu
