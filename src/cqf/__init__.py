"""cqf: coverage and quality driven training of generative image models (Lucas et al., NeurIPS 2019).

A VAE whose decoder puts a factorized Gaussian on features y = f(x) of an invertible Real-NVP flow f,
trained with the ELBO (coverage) plus an adversarial loss (quality).
"""

__version__ = "0.1.0"


def load(path, device="cpu", weights="auto"):
    """Load a model from a `ckpt-*.pt` or `model.safetensors` file, in eval mode (see `cqf.checkpoint.load`)."""
    from .checkpoint import load as _load

    return _load(path, device=device, weights=weights)


__all__ = ["__version__", "load"]
