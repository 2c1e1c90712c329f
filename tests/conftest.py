import pytest
import torch

from cqf.config import Config, DataConfig, ModelConfig, TrainConfig


@pytest.fixture(autouse=True)
def float64_and_seed():
    """Exactness tests need float64; every test starts from the same RNG state."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_default_dtype(previous)


def tiny_config(model: dict | None = None, **train) -> Config:
    """A model small enough to train a few steps in well under a second (digits, 8x8); `model` replaces
    ModelConfig entries (the model zoo's options), the keywords TrainConfig entries."""
    settings = dict(steps=4, batch_size=16, log_every=1, eval_every=2, sample_every=2, ckpt_every=2,
                    eval_iw_samples=4, device="cpu")
    settings |= train
    model_settings = {"latent_dim": 4, "channels": 8, "flow_couplings": 1, "flow_hidden": 8, "disc_channels": 8,
                      "disc_blocks": 2}
    return Config(
        data=DataConfig(name="digits", val_size=40),
        model=ModelConfig(**model_settings | (model or {})),
        train=TrainConfig(**settings),
    )


@pytest.fixture(scope="session")
def digits():
    from cqf.data import load_dataset

    return load_dataset("digits", val_size=40)


def bits_per_dim_after_fitting(model, shape, steps: int) -> tuple[float, float]:
    """(bits/dim before, after) `steps` Adam steps (lr 3e-3) on one fixed batch of 8 random images of `shape`."""
    x = torch.rand(8, *shape) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def bpd():
        return model.bits_per_dim(model.elbo(x).elbo).mean()

    start = bpd().item()
    for _ in range(steps):
        opt.zero_grad()
        bpd().backward()
        opt.step()
    return start, bpd().item()


def check_elbo_and_sample_match_two_calls(model, shape) -> None:
    """`elbo_and_sample`'s one decoder call on the posterior and prior z together gives what `elbo` then `sample`
    give, draw for draw, and its samples keep their graph (the generator step backpropagates through them)."""
    x = torch.rand(5, *shape) * 2 - 1
    torch.manual_seed(7)
    terms, samples = model.elbo_and_sample(x, 3)
    torch.manual_seed(7)
    reference = model.elbo(x)
    torch.testing.assert_close(terms.elbo, reference.elbo)
    torch.testing.assert_close(terms.kl, reference.kl)
    torch.testing.assert_close(samples, model.sample(3))
    assert samples.requires_grad
