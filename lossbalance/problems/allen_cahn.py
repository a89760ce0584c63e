r"""1-D Allen-Cahn equation, the benchmark of Wang, Sankaran & Perdikaris (2022) and jaxpi.

``u_t - 1e-4 u_xx + 5 u^3 - 5 u = 0`` for ``t in [0, 1]``, ``x in [-1, 1]`` periodic,
``u(0, x) = x^2 cos(pi x)``. S. Wang, S. Sankaran, P. Perdikaris, "Respecting causality is all
you need for training physics-informed neural networks", arXiv:2203.07404 (2022); S. Wang et al.,
"An expert's guide to training physics-informed neural networks", arXiv:2308.08468 (2023).

The reference solution is computed here (no data file is shipped or downloaded): Fourier
pseudo-spectral in ``x`` and ETDRK4 in ``t`` (Cox & Matthews 2002, with the contour-integral
evaluation of the phi functions of Kassam & Trefethen, "Fourth-order time-stepping for stiff
PDEs", SIAM J. Sci. Comput. 26(4), 2005), in float64 torch. The authors' data (chebfun's
``spin``, 512 points, dt = 1e-5) comes from the same kind of solver.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..pointwise import Residual
from .base import MLP, Problem, _normal_, _xavier_normal_, gradient

__all__ = ["AllenCahn1D", "AllenCahnReference", "JaxpiMLP", "allen_cahn_reference", "etdrk4_coefficients"]

DIFFUSION, REACTION = 1e-4, 5.0
_CONTOUR_POINTS = 64  # Kassam & Trefethen use 32 for real spectra; 64 costs nothing here
_CACHE: dict[tuple, AllenCahnReference] = {}
_BLOCK = 4096  # points per block of the trigonometric interpolation (block x modes tables)


class AllenCahnReference(NamedTuple):
    """``u[i, j] = u(t[i], x[j])`` on ``x_j = -1 + 2 j / modes`` (the periodic grid, ``x = 1`` left out)."""

    t: Tensor
    x: Tensor
    u: Tensor


class Coefficients(NamedTuple):
    """The ETDRK4 coefficients of one step ``h`` for the diagonal linear part ``L`` (per mode)."""

    e: Tensor  # exp(h L)
    e2: Tensor  # exp(h L / 2)
    q: Tensor  # h phi_1(h L / 2) / 2 ... (Kassam & Trefethen's Q)
    f1: Tensor
    f2: Tensor
    f3: Tensor


def etdrk4_coefficients(hl: Tensor, h: float, points: int = _CONTOUR_POINTS) -> Coefficients:
    r"""Kassam & Trefethen (2005), eq. (2.5) and their ``kursiv.m``: with ``z = h L`` (one entry per
    mode) and the mean over ``points`` points ``z + e^{i pi (j - 1/2) / points}`` of a circle of radius 1,

    ``Q = h mean((e^{z/2} - 1) / z)``, ``f1 = h mean((-4 - z + e^z (4 - 3z + z^2)) / z^3)``,
    ``f2 = h mean((2 + z + e^z (z - 2)) / z^3)``, ``f3 = h mean((-4 - 3z - z^2 + e^z (4 - z)) / z^3)``

    (real parts; the contour mean avoids the cancellation of the formulas at small ``|z|``)."""
    roots = torch.exp(1j * math.pi * (torch.arange(1, points + 1, dtype=torch.float64) - 0.5) / points)
    lr = hl.to(torch.complex128)[:, None] + roots.to(hl.device)[None, :]
    ez = torch.exp(lr)

    def mean(values: Tensor) -> Tensor:
        return h * values.mean(1).real

    return Coefficients(
        torch.exp(hl), torch.exp(hl / 2), mean((torch.exp(lr / 2) - 1) / lr),
        mean((-4 - lr + ez * (4 - 3 * lr + lr**2)) / lr**3),
        mean((2 + lr + ez * (lr - 2)) / lr**3),
        mean((-4 - 3 * lr - lr**2 + ez * (4 - lr)) / lr**3),
    )


def _nonlinear(v: Tensor, modes: int) -> Tensor:
    """``fft(-5 u^3)`` for the Fourier coefficients ``v`` (``rfft`` layout)."""
    u = torch.fft.irfft(v, n=modes)
    return torch.fft.rfft(-REACTION * u**3)


def _etdrk4_step(v: Tensor, c: Coefficients, modes: int) -> Tensor:
    """One ETDRK4 step (Cox & Matthews 2002, eq. (26)-(29); Kassam & Trefethen's ``kursiv.m``)."""
    nv = _nonlinear(v, modes)
    a = c.e2 * v + c.q * nv
    na = _nonlinear(a, modes)
    b = c.e2 * v + c.q * na
    nb = _nonlinear(b, modes)
    cc = c.e2 * a + c.q * (2 * nb - nv)
    nc = _nonlinear(cc, modes)
    return c.e * v + nv * c.f1 + 2 * (na + nb) * c.f2 + nc * c.f3


def _solve(modes: int, dt: float, snapshots: int, t_final: float) -> AllenCahnReference:
    steps = round(t_final / dt)
    if steps < 1 or abs(steps * dt - t_final) > 1e-9 * t_final or steps % (snapshots - 1):
        raise ValueError(f"Allen-Cahn reference: dt={dt} must divide t_final={t_final} into a multiple of "
                         f"snapshots - 1 = {snapshots - 1} steps")
    x = -1.0 + 2.0 * torch.arange(modes, dtype=torch.float64) / modes
    k = math.pi * torch.arange(modes // 2 + 1, dtype=torch.float64)  # period 2: k = pi n
    coefficients = etdrk4_coefficients(dt * (REACTION - DIFFUSION * k**2), dt)
    v = torch.fft.rfft(x**2 * torch.cos(math.pi * x))
    every, frames = steps // (snapshots - 1), [torch.fft.irfft(v, n=modes)]
    for step in range(1, steps + 1):
        v = _etdrk4_step(v, coefficients, modes)
        if step % every == 0:
            frames.append(torch.fft.irfft(v, n=modes))
    return AllenCahnReference(torch.linspace(0.0, t_final, snapshots, dtype=torch.float64), x, torch.stack(frames))


def allen_cahn_reference(
    modes: int = 512, dt: float = 1e-4, snapshots: int = 201, *, t_final: float = 1.0, cache_dir: str | None = None,
) -> AllenCahnReference:
    """The reference solution on ``snapshots`` equally spaced times of ``[0, t_final]`` and the
    ``modes`` grid points of ``[-1, 1)``, in float64 on the CPU.

    Computed once per process and set of arguments (kept in memory), and with ``cache_dir``
    also saved there and read back by later processes (``allen_cahn_<modes>_<dt>_<snapshots>_<t_final>.pt``).
    The default (512 modes and 201 times: the grid of the authors' data set) takes about two
    seconds. Accuracy (measured, ``tests/test_allen_cahn.py``): the time error is fourth order
    (halving ``dt`` from 4e-3 shrinks the change 16-fold: 4.6e-9, 2.8e-10, 1.8e-11 in max norm),
    so ``dt = 1e-4`` is at round-off (the authors' chebfun run used 1e-5); the space error of 512
    modes is about 1e-5 in relative L2 (max 6e-4 at early times): ``u0`` has a kink at ``x = +-1``
    in its periodic extension (``u0'(+-1) = -+2``), so the Fourier coefficients decay only
    algebraically until diffusion smooths it; at ``t = 1`` 512 and 1024 modes agree to 1.4e-6.
    """
    if modes < 4 or modes % 2:
        raise ValueError(f"Allen-Cahn reference: modes must be an even integer >= 4, got {modes!r}")
    if snapshots < 2:
        raise ValueError(f"Allen-Cahn reference: snapshots must be >= 2, got {snapshots!r}")
    key = (int(modes), float(dt), int(snapshots), float(t_final))
    if key in _CACHE:
        return _CACHE[key]
    path = None if cache_dir is None else os.path.join(cache_dir, "allen_cahn_{}_{}_{}_{}.pt".format(*key))
    if path is not None and os.path.isfile(path):
        reference = AllenCahnReference(*torch.load(path, weights_only=True))
    else:
        reference = _solve(*key)
        if path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(tuple(reference), path)
    _CACHE[key] = reference
    return reference


def _interpolate(reference: AllenCahnReference, t: Tensor, x: Tensor) -> Tensor:
    """Trigonometric interpolation in ``x`` (exact at the grid points), linear in ``t`` between
    the snapshots (exact at the snapshot times); float64 1-D ``t``, ``x`` of equal length."""
    modes = reference.x.numel()
    coefficients = torch.fft.rfft(reference.u, dim=1) / modes  # (T, modes // 2 + 1)
    return torch.cat([_trigonometric(reference, coefficients, tb, xb)
                      for tb, xb in zip(torch.split(t, _BLOCK), torch.split(x, _BLOCK))])


def _trigonometric(reference: AllenCahnReference, coefficients: Tensor, t: Tensor, x: Tensor) -> Tensor:
    modes = reference.x.numel()
    n = torch.arange(modes // 2 + 1, dtype=torch.float64)
    scale = torch.full_like(n, 2.0)
    scale[0] = 1.0
    scale[-1] = 1.0  # the Nyquist mode, taken as its cosine (real on the grid)
    phase = math.pi * (x[:, None] + 1.0) * n[None, :]
    position = (t / reference.t[-1]).clamp(0, 1) * (reference.t.numel() - 1)
    lo = position.floor().long().clamp(max=reference.t.numel() - 2)
    w = (position - lo)[:, None]
    c = (1 - w) * coefficients[lo] + w * coefficients[lo + 1]
    return (scale * (c.real * torch.cos(phase) - c.imag * torch.sin(phase))).sum(1)


def _periodic_embedding(tx: Tensor) -> Tensor:
    """jaxpi's periodic embedding of ``(t, x)`` columns: ``(t, cos(pi x), sin(pi x))`` (period 2 in ``x``)."""
    t, x = tx[:, :1], tx[:, 1:2]
    return torch.cat((t, torch.cos(math.pi * x), torch.sin(math.pi * x)), dim=-1)


class PeriodicMLP(nn.Module):
    """jaxpi's periodic embedding of ``x`` (``arch.periodicity``, period ``pi`` on axis 1): the
    network sees ``(t, cos(pi x), sin(pi x))``, so ``u`` and all its ``x`` derivatives are
    2-periodic in ``x`` exactly."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, tx: Tensor) -> Tensor:
        return self.mlp(_periodic_embedding(tx))


class _Dense(nn.Module):
    """A linear layer, Xavier-normal, zero bias; with ``rwf=(mean, std)`` random weight
    factorisation (Wang et al. 2023, arXiv:2308.08468, sec. 3.2; jaxpi's ``weight_fact``): the
    kernel is ``exp(s) * v`` per output unit, ``s ~ N(mean, std^2)``, ``v = w / exp(s)``."""

    def __init__(self, n_in: int, n_out: int, rwf: tuple[float, float] | None, generator, device, dtype) -> None:
        super().__init__()
        w = _xavier_normal_(torch.empty(n_out, n_in, device=device, dtype=dtype), generator)
        self.bias = nn.Parameter(torch.zeros(n_out, device=device, dtype=dtype))
        self.rwf = rwf is not None
        if self.rwf:
            s = _normal_(torch.empty(n_out, 1, device=device, dtype=dtype), rwf[1], generator) + rwf[0]
            self.s, self.v = nn.Parameter(s), nn.Parameter(w / torch.exp(s))
        else:
            self.weight = nn.Parameter(w)

    def forward(self, h: Tensor) -> Tensor:
        weight = torch.exp(self.s) * self.v if self.rwf else self.weight
        return nn.functional.linear(h, weight, self.bias)


class JaxpiMLP(nn.Module):
    """The network of jaxpi's Allen-Cahn example (Wang et al., "An expert's guide to training
    physics-informed neural networks", arXiv:2308.08468, sec. 3): input ``(t, x)``, the periodic
    embedding ``(t, cos(pi x), sin(pi x))``, random Fourier features ``[cos(z B), sin(z B)]`` with
    ``B ~ N(0, fourier_scale^2)`` of shape ``(3, fourier_dim // 2)`` (fixed, a buffer;
    ``fourier_dim=0``: none), then ``depth`` tanh layers of ``width``; ``modified=True`` is the
    modified MLP of Wang, Teng & Perdikaris (2021): encoders ``U = tanh(W_u z)``,
    ``V = tanh(W_v z)`` and after every hidden layer ``h <- h * U + (1 - h) * V``. ``rwf``:
    ``(mean, std)`` of the random weight factorisation of every layer (see :class:`_Dense`), or
    ``None``. ``u`` is 2-periodic in ``x`` exactly."""

    def __init__(
        self, width: int = 256, depth: int = 4, *, fourier_scale: float = 2.0, fourier_dim: int = 256,
        modified: bool = True, rwf: tuple[float, float] | None = None, generator: torch.Generator | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if fourier_dim % 2 or fourier_dim < 0 or width < 1 or depth < 1:
            raise ValueError(f"JaxpiMLP: need an even fourier_dim >= 0, width >= 1, depth >= 1; got "
                             f"{fourier_dim}, {width}, {depth}")
        b = torch.empty(3, fourier_dim // 2, device=device, dtype=dtype)
        self.register_buffer("fourier", _normal_(b, fourier_scale, generator) if fourier_dim else b)
        n_in = fourier_dim or 3
        dense = lambda a, b: _Dense(a, b, rwf, generator, device, dtype)  # noqa: E731
        self.modified = bool(modified)
        if self.modified:
            self.encode_u, self.encode_v = dense(n_in, width), dense(n_in, width)
        self.hidden = nn.ModuleList(dense(n_in if i == 0 else width, width) for i in range(depth))
        self.out = dense(width, 1)

    def forward(self, tx: Tensor) -> Tensor:
        z = _periodic_embedding(tx)
        if self.fourier.numel():
            zb = z @ self.fourier
            z = torch.cat((torch.cos(zb), torch.sin(zb)), dim=-1)
        if self.modified:
            u, v = torch.tanh(self.encode_u(z)), torch.tanh(self.encode_v(z))
        h = z
        for layer in self.hidden:
            h = torch.tanh(layer(h))
            if self.modified:
                h = h * u + (1 - h) * v
        return self.out(h)


class AllenCahn1D(Problem):
    r"""``u_t - 1e-4 u_xx + 5 u^3 - 5 u = 0``, ``x in [-1, 1]`` periodic, ``t in [0, 1]``,
    ``u(0, x) = x^2 cos(pi x)``.

    Inputs are ``(t, x)`` columns (time first). Loss terms, as :class:`~lossbalance.Residual`
    terms with ``kind="residual"`` (the balancer reduces them to the mean of ``r^2``, the MSE, or
    weights them pointwise): ``"pde"`` (the residual ``u_t - 1e-4 u_xx + 5u^3 - 5u`` with the
    points' times ``t=``, for :class:`~lossbalance.Causal` weights) and ``"ic"``
    (``u(0, x) - x^2 cos(pi x)``). ``residuals=False`` gives plain scalar MSE terms instead.

    Periodicity: ``periodic="embedding"`` (default, jaxpi's): :meth:`make_model` feeds the
    network ``(t, cos(pi x), sin(pi x))`` (:class:`PeriodicMLP`), which is periodic by
    construction, and there is no boundary term. ``periodic="bc"``: a plain MLP and a third term
    ``"bc"``, the residuals ``u(t, -1) - u(t, 1)`` and ``u_x(t, -1) - u_x(t, 1)`` (both halves of the
    batch in one vector).

    ``sample(batch_size)`` draws ``batch_size`` uniform interior points, ``batch_size`` points
    ``(0, x)`` and (``"bc"``) ``batch_size`` times. Reference and error: :func:`allen_cahn_reference`
    (``reference=`` its arguments); ``relative_l2`` on its grid (201 times x 512 points, the grid
    of the authors' data set without the repeated ``x = 1``), ``exact`` elsewhere by
    trigonometric interpolation in ``x`` and linear interpolation in ``t``.
    """

    name = "allen_cahn"
    input_dim = 2
    default_eval_n = None  # the reference grid

    def __init__(
        self, *, periodic: Literal["embedding", "bc"] = "embedding", residuals: bool = True,
        reference: dict | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        if periodic not in ("embedding", "bc"):
            raise ValueError(f"AllenCahn1D(periodic=...) is 'embedding' (jaxpi's input embedding) or 'bc' (a term), got {periodic!r}")
        super().__init__((0.0, -1.0), (1.0, 1.0), device=device, dtype=dtype)
        self.periodic, self.residuals = periodic, bool(residuals)
        self._reference_options = dict(reference or {})

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "ic", "bc") if self.periodic == "bc" else ("pde", "ic")

    def reference(self) -> AllenCahnReference:
        """The reference solution (:func:`allen_cahn_reference` with this problem's ``reference=``)."""
        return allen_cahn_reference(**self._reference_options)

    def make_model(
        self, hidden: Sequence[int] = (50, 50, 50), *, generator: torch.Generator | None = None,
        activation: Callable[[Tensor], Tensor] = torch.tanh,
    ) -> nn.Module:
        """A tanh MLP; with ``periodic="embedding"`` behind the periodic embedding (3 inputs)."""
        if self.periodic == "bc":
            return super().make_model(hidden, generator=generator, activation=activation)
        mlp = MLP((3, *hidden, 1), (0.0, -1.0, -1.0), (1.0, 1.0, 1.0), activation=activation, generator=generator,
                  device=self.device, dtype=self.dtype)
        return PeriodicMLP(mlp)

    def exact(self, x: Tensor) -> Tensor:
        tx = x.detach().to(device="cpu", dtype=torch.float64)
        u = _interpolate(self.reference(), tx[:, 0], tx[:, 1]) if tx.shape[0] else tx.new_zeros(0)
        return u.to(device=x.device, dtype=x.dtype).unsqueeze(-1)

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """The reference grid (``t``-major), or an ``n x n`` grid of ``[0, 1] x [-1, 1]``."""
        if n is None:
            reference = self.reference()
            t, x = reference.t, reference.x
        else:
            t, x = torch.linspace(0.0, 1.0, int(n), dtype=torch.float64), torch.linspace(-1.0, 1.0, int(n), dtype=torch.float64)
        gt, gx = torch.meshgrid(t, x, indexing="ij")
        return torch.stack((gt.reshape(-1), gx.reshape(-1)), dim=-1).to(device=self.device, dtype=self.dtype)

    def evaluation_data(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """On the reference grid (``n is None``) the solver's values themselves."""
        if n is not None or n in self._eval_cache:
            return super().evaluation_data(n)
        values = self.reference().u.reshape(-1).to(device=self.device, dtype=self.dtype)
        self._eval_cache[n] = (self.evaluation_points(None), values)
        return self._eval_cache[n]

    # ------------------------------------------------------------------ PINN terms
    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        """``u_t - 1e-4 u_xx + 5 u^3 - 5 u`` at ``(t, x)`` points."""
        du = gradient(u, x)
        u_xx = gradient(du[:, 1], x)[:, 1]
        return du[:, 0] - DIFFUSION * u_xx + REACTION * u**3 - REACTION * u

    def sample(self, batch_size: int = 128, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        interior = self._uniform(n, self.lower, self.upper, generator, dim=2)
        x0 = self._uniform(n, -1.0, 1.0, generator)
        batch = {"pde": interior, "ic": torch.cat((torch.zeros_like(x0), x0), dim=-1)}
        if self.periodic == "bc":
            batch["bc"] = self._uniform(n, 0.0, 1.0, generator)
        return batch

    def _periodicity(self, model: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        """``[u(t, -1) - u(t, 1), u_x(t, -1) - u_x(t, 1)]`` (2N,)."""
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            ends = [torch.cat((t, torch.full_like(t, s)), dim=-1).detach().requires_grad_(True) for s in (-1.0, 1.0)]
            u = [self._outputs(model, p) for p in ends]
            u_x = [gradient(v, p)[:, 1] for v, p in zip(u, ends)]
            r = torch.cat((u[0] - u[1], u_x[0] - u_x[1]))
        return r if keep_graph else r.detach()

    def losses(self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]) -> dict:
        x_pde, x_ic = batch["pde"], batch["ic"]
        s = x_ic[:, 1]
        terms = {
            "pde": (self.residual(model, x_pde), x_pde[:, 0]),
            "ic": (self._outputs(model, x_ic) - s**2 * torch.cos(math.pi * s), None),
        }
        if self.periodic == "bc":
            terms["bc"] = (self._periodicity(model, batch["bc"]), None)
        if not self.residuals:
            return {name: r.square().mean() for name, (r, _) in terms.items()}
        return {name: Residual(r, t=None if t is None else t.detach(), kind="residual") for name, (r, t) in terms.items()}
