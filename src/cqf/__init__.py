"""cqf: coverage and quality driven training of generative image models (Lucas et al., NeurIPS 2019).

A VAE whose decoder puts a factorized Gaussian on features y = f(x) of an invertible Real-NVP flow f,
trained with the ELBO (coverage) plus an adversarial loss (quality).
"""

from ._version import __version__


def load(path, device="cpu", weights="auto"):
    """The model of a `ckpt-*.pt` or `model.safetensors` file, in eval mode.

    `cqf.checkpoint.load` returns it together with its config and data description.
    """
    from .checkpoint import load as _load

    return _load(path, device=device, weights=weights).model


def __getattr__(name):
    """Submodules on first use (`cqf.checkpoint.load(...)` after `import cqf`), without importing torch early."""
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cqf' has no attribute {name!r}")

__all__ = ["__version__", "load"]
