"""Shared protocol for the reference PINN problems, and the MLP used to solve them.

Every problem is a :class:`Problem` subclass.  A problem knows its domain, how to draw
a minibatch of collocation / boundary / initial points (``sample``), how to turn a
model and a minibatch into a dict of scalar mean-squared loss terms (``losses``), its
exact or reference solution (``exact``) and how to score a model against it on a fixed
grid (``relative_l2``).

Conventions
-----------
* Inputs are 2-D tensors of shape ``(N, input_dim)``; models map them to ``(N, 1)``.
  ``exact`` returns ``(N, 1)`` as well, so ``problem.exact`` can stand in for a model.
* Point sets are drawn on ``generator.device`` (CPU for a default generator) and then
  moved to ``problem.device``, so a seeded CPU generator gives the same points on any
  device.
* PDE residuals are computed with ``torch.autograd.grad(..., create_graph=True)`` on a
  detached copy of the collocation points that requires grad, so the loss terms can be
  back-propagated to the model parameters.  Under ``torch.no_grad()`` the input
  derivatives are still taken (inside ``enable_grad``) but every returned loss is
  detached, which is handy for monitoring.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "Problem", "gradient"]

Bounds = Sequence[float] | Tensor


def gradient(outputs: Tensor, inputs: Tensor) -> Tensor:
    """``d outputs / d inputs`` of a per-point quantity, keeping the graph.

    ``outputs`` has shape ``(N,)`` (one value per point of ``inputs``, shape ``(N, d)``);
    the result has the shape of ``inputs``.  Unused inputs give zeros, not ``None``.
    """
    if not outputs.requires_grad:  # e.g. a model that ignores its input
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=torch.ones_like(outputs),
        create_graph=True,
        allow_unused=True,
    )
    return torch.zeros_like(inputs) if grad is None else grad


def _normal_(tensor: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """In-place ``N(0, std^2)`` fill that also works when the generator lives elsewhere."""
    with torch.no_grad():
        if generator is None:
            return tensor.normal_(0.0, std)
        draw = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
        draw.normal_(0.0, std, generator=generator)
        return tensor.copy_(draw)


def _xavier_normal_(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    """Xavier-normal (Glorot) fill of an ``(out, in)`` weight: ``N(0, 2 / (in + out))``."""
    fan_out, fan_in = weight.shape
    return _normal_(weight, math.sqrt(2.0 / (fan_in + fan_out)), generator)


class MLP(nn.Module):
    """Fully connected network ``layers[0] -> ... -> layers[-1]`` with built-in input scaling.

    The input is first mapped by the fixed affine map ``(x - mean) / std`` where ``mean``
    and ``std`` are those of the uniform distribution on the box ``[lower, upper]``
    (``mean = (lower + upper) / 2``, ``std = (upper - lower) / sqrt(12)``), i.e. every
    coordinate of a uniform domain sample has mean 0 and standard deviation 1 -- the
    normalisation Wang, Teng & Perdikaris (2021) apply with the moments of their domain
    samples.  Without bounds the map is the identity.  The statistics are buffers, not
    parameters.

    Hidden layers use ``activation`` (``tanh`` by default); the last layer is linear.
    Weights are Xavier-normal (``std = sqrt(2 / (fan_in + fan_out))``, as in the
    authors' code), biases zero.  Passing a seeded ``generator`` makes the
    initialisation reproducible (independently of ``device``).
    """

    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        layers: Sequence[int],
        lower: Bounds | None = None,
        upper: Bounds | None = None,
        *,
        activation: Callable[[Tensor], Tensor] = torch.tanh,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(int(width) for width in layers)
        if len(layers) < 2 or min(layers) < 1:
            raise ValueError(f"layers must list >= 2 positive widths, got {layers}")
        if (lower is None) != (upper is None):
            raise ValueError("give both lower and upper, or neither")
        self.layers = layers
        self.activation = activation
        self.linears = nn.ModuleList(
            nn.Linear(n_in, n_out, device=device, dtype=dtype)
            for n_in, n_out in zip(layers[:-1], layers[1:])
        )
        factory = {"device": self.linears[0].weight.device, "dtype": self.linears[0].weight.dtype}
        if lower is None:
            mean = torch.zeros(layers[0], **factory)
            std = torch.ones(layers[0], **factory)
        else:
            lo = torch.as_tensor(lower, **factory).reshape(-1).expand(layers[0])
            hi = torch.as_tensor(upper, **factory).reshape(-1).expand(layers[0])
            if not bool((hi > lo).all()):
                raise ValueError("need upper > lower in every coordinate")
            mean = (lo + hi) / 2
            std = (hi - lo) / math.sqrt(12.0)
        self.register_buffer("input_mean", mean.clone())
        self.register_buffer("input_std", std.clone())
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-normal weights, zero biases."""
        for linear in self.linears:
            _xavier_normal_(linear.weight, generator)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = (x - self.input_mean) / self.input_std
        for linear in self.linears[:-1]:
            h = self.activation(linear(h))
        return self.linears[-1](h)

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


class Problem(ABC):
    """A PINN problem on a box domain ``[lower, upper]`` (see the module docstring).

    Subclasses set ``name``, ``input_dim``, ``default_eval_n`` and implement
    ``term_names``, ``sample``, ``losses``, ``exact`` and ``evaluation_points``.
    """

    name: str = ""
    input_dim: int = 1
    output_dim: int = 1
    #: grid resolution used by ``relative_l2`` / ``evaluation_data`` when ``n is None``
    default_eval_n: int = 100
    #: the error the runner reports: ``"rel_l2"`` (``relative_l2``) or ``"mse"`` (mean squared error
    #: against ``exact`` on the evaluation grid, for solutions that may vanish)
    error_metric: str = "rel_l2"

    def __init__(
        self,
        lower: Bounds,
        upper: Bounds,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.lower = torch.as_tensor(lower, dtype=self.dtype, device=self.device).reshape(-1)
        self.upper = torch.as_tensor(upper, dtype=self.dtype, device=self.device).reshape(-1)
        if self.lower.numel() != self.input_dim or self.upper.numel() != self.input_dim:
            raise ValueError(f"{type(self).__name__}: bounds must have {self.input_dim} entries")
        self._eval_cache: dict[int | None, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ protocol
    @property
    @abstractmethod
    def term_names(self) -> tuple[str, ...]:
        """Names of the loss terms, in the order ``losses`` returns them ("pde" first)."""

    @abstractmethod
    def sample(
        self, batch_size: int = 128, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Fresh random points for one training step, keyed by point set."""

    @abstractmethod
    def losses(self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalar mean-squared loss terms keyed by ``term_names`` (in that order)."""

    @abstractmethod
    def exact(self, x: Tensor) -> Tensor:
        """Exact (or reference) solution at points ``x`` of shape ``(N, input_dim)``; ``(N, 1)``."""

    @abstractmethod
    def evaluation_points(self, n: int | None = None) -> Tensor:
        """Fixed evaluation grid, shape ``(M, input_dim)``, on ``self.device``."""

    # ------------------------------------------------------------ shared helpers
    def make_model(
        self,
        hidden: Sequence[int] = (50, 50, 50),
        *,
        generator: torch.Generator | None = None,
        activation: Callable[[Tensor], Tensor] = torch.tanh,
    ) -> MLP:
        """A tanh :class:`MLP` ``input_dim -> hidden... -> 1`` normalised to this domain."""
        return MLP(
            (self.input_dim, *hidden, self.output_dim),
            self.lower,
            self.upper,
            activation=activation,
            generator=generator,
            device=self.device,
            dtype=self.dtype,
        )

    def evaluation_data(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """``(points, u_exact)`` on the evaluation grid; ``u_exact`` is 1-D.  Cached per ``n``."""
        if n not in self._eval_cache:
            points = self.evaluation_points(n)
            with torch.no_grad():
                values = self.exact(points).reshape(-1)
            self._eval_cache[n] = (points, values)
        return self._eval_cache[n]

    @torch.no_grad()
    def relative_l2(self, model: Callable[[Tensor], Tensor], n: int | None = None) -> Tensor:
        """``||u_model - u*||_2 / ||u*||_2`` on the evaluation grid (no autograd graph)."""
        points, target = self.evaluation_data(n)
        pred = model(points).reshape(-1).to(target.dtype)
        return torch.linalg.vector_norm(pred - target) / torch.linalg.vector_norm(target)

    def _uniform(
        self,
        n: int,
        lower: Tensor | float,
        upper: Tensor | float,
        generator: torch.Generator | None,
        dim: int = 1,
    ) -> Tensor:
        """``n`` i.i.d. uniform points in ``[lower, upper]^dim``, shape ``(n, dim)``."""
        draw_device = generator.device if generator is not None else self.device
        u = torch.rand(n, dim, generator=generator, device=draw_device, dtype=self.dtype)
        u = u.to(self.device)
        lo = torch.as_tensor(lower, dtype=self.dtype, device=self.device)
        hi = torch.as_tensor(upper, dtype=self.dtype, device=self.device)
        return lo + (hi - lo) * u

    @staticmethod
    def _check_batch_size(batch_size: int) -> int:
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size

    @staticmethod
    def _outputs(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Model values at ``x`` as a 1-D tensor of length ``N``."""
        return model(x).reshape(x.shape[0])

    def residual(self, model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """The PDE residual at the points ``x``, shape ``(N,)``; differentiable w.r.t. the model
        when grad mode is on (derivatives w.r.t. ``x`` are taken in any case)."""
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            r = self._residual(self._outputs(model, x), x)
        return r if keep_graph else r.detach()

    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        """The residual from the model values ``u`` (N,) at the points ``x`` (which require grad)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(terms={self.term_names}, device={self.device}, dtype={self.dtype})"
