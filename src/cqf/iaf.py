"""Inverse autoregressive flow posterior (Kingma et al. 2016, "Improved Variational Inference with IAF").

    z_0 = m(x) + s(x) * eps,  eps ~ N(0, I);   for t = 1..T:  [m_t, s_t] = MADE_t(z_{t-1}, h(x)),
    sigma_t = sigmoid(s_t),   z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t   (the IAF paper's stable update)

Each step's Jacobian dz_t/dz_{t-1} is triangular in its variable ordering with diagonal sigma_t, so

    ln q(z_T | x) = ln N(eps; 0, I) - sum ln s(x) - sum_t sum ln sigma_t     (nats, exact).

The ordering is reversed from one step to the next. `IAFPosterior` is the posterior module a `cqf.models.VAE`
takes in place of a Gaussian encoder: it returns z and ln q(z | x), and the KL term becomes the one-sample
estimate ln q(z|x) - ln p(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses

__all__ = ["IAFPosterior", "IAFStep", "MaskedLinear", "gaussian_sample"]


def gaussian_sample(eps: Tensor, mean: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """z = mean + exp(log_scale) * eps and ln N(z; mean, exp(log_scale)^2) = ln N(eps; 0, I) - sum log_scale.

    Args:
        eps: (..., B, L) standard normal noise; leading dims (K importance samples) broadcast over the batch.
        mean, log_scale: (B, L).
    Returns:
        z (..., B, L) and ln q(z | x) (..., B) in nats.
    """
    z = mean + log_scale.exp() * eps
    log_q = losses.standard_normal_log_prob(eps.reshape(-1, eps.shape[-1])).view(eps.shape[:-1]) - log_scale.sum(-1)
    return z, log_q


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed binary mask (out_features, in_features) (MADE)."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step: a MADE (Germain et al. 2015) with context, z -> (sigma * z + (1 - sigma) * m, sum ln sigma).

    Input i has degree order[i] + 1 (1..L); hidden units have degrees 0..L-1 (degree-0 units see only the
    context h, and carry it to the first variable); an output of degree d sees the hidden units of degree < d,
    so m_i and s_i depend on the z_j that come before z_i in `order` (and on h), never on z_i or later ones.

    Args:
        latent_dim: L.
        context_dim: size of h (0: no context).
        hidden: width of the MADE's two hidden layers.
        order: (L,) permutation; order[i] is the position of variable i (default: 0..L-1).
        forget_bias: added to s, so that sigma = sigmoid(s + forget_bias) starts near 1 (the IAF paper's
            advice: each step starts close to the identity).
    """

    def __init__(self, latent_dim: int, context_dim: int, hidden: int, order: Tensor | None = None,
                 forget_bias: float = 1.0):
        super().__init__()
        order = torch.arange(latent_dim) if order is None else torch.as_tensor(order)
        self.register_buffer("order", order.clone())
        degree_in = order + 1  # (L,)
        degree_hidden = torch.arange(hidden) % latent_dim  # (H,) in 0..L-1
        self.input = MaskedLinear(degree_hidden[:, None] >= degree_in[None, :])
        self.context = nn.Linear(context_dim, hidden, bias=False) if context_dim > 0 else None
        self.middle = MaskedLinear(degree_hidden[:, None] >= degree_hidden[None, :])
        self.output = MaskedLinear((degree_in[:, None] > degree_hidden[None, :]).repeat(2, 1))  # (2L, H): m, s
        self.forget_bias = forget_bias

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """(..., B, L) and context (B, context_dim) -> z' (..., B, L) and sum ln sigma (..., B), nats."""
        h = self.input(z)
        if self.context is not None:
            h = h + self.context(context)  # (B, H), broadcast over leading sample dims
        h = F.elu(self.middle(F.elu(h)))
        m, s = self.output(h).to(z.dtype).chunk(2, dim=-1)  # float32 under bf16 autocast: ln q sums L terms
        log_sigma = F.logsigmoid(s + self.forget_bias)  # ln sigma, stable for large |s|
        sigma = log_sigma.exp()
        return sigma * z + (1 - sigma) * m, log_sigma.sum(-1)


class IAFPosterior(nn.Module):
    """q(z | x): a Gaussian encoder with context followed by T IAF steps with alternating orderings.

    Args:
        encoder: a net with `encode(x) -> (mean, log_scale, context)` (`nets.ConvEncoder`,
            `resnets.ResEncoder` built with `context_dim`).
        latent_dim, context_dim, hidden: as in `IAFStep`.
        num_steps: T >= 1.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, context_dim: int, hidden: int, num_steps: int):
        super().__init__()
        self.gaussian = encoder
        forward_order = torch.arange(latent_dim)
        self.steps = nn.ModuleList(
            IAFStep(latent_dim, context_dim, hidden, forward_order if t % 2 == 0 else forward_order.flip(0))
            for t in range(num_steps)
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder's (mean, log_scale, context) for x (B, C, H, W): computed once for any number of z."""
        return self.gaussian.encode(x)

    def transform(self, eps: Tensor, mean: Tensor, log_scale: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """z_T and ln q(z_T | x) for noise eps (..., B, L): leading dims are importance samples.

        Returns:
            z (..., B, L) and ln q(z | x) (..., B) in nats.
        """
        z, log_q = gaussian_sample(eps, mean, log_scale)
        for step in self.steps:
            z, log_sigma = step(z, context)
            log_q = log_q - log_sigma
        return z, log_q

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(z, ln q(z | x)) for images x (B, C, H, W) and noise eps (..., B, L)."""
        return self.transform(eps, *self.encode(x))

    def mode(self, x: Tensor) -> Tensor:
        """z at eps = 0 (B, L): the image of the base's mode, for reconstructions."""
        mean, log_scale, context = self.encode(x)
        return self.transform(torch.zeros_like(mean), mean, log_scale, context)[0]
