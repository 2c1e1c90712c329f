"""The two losses' scale at initialisation: L_C and L_Q and their gradient norms on the parameters both reach
(decoder and flow), for bundled configs, on one batch of real training images.

    python benchmarks/grad_balance.py cifar10-cq-f mnist-cq-f --data npz:../shared/data/cifar10.npz \
        npz:../shared/data/mnist.npz

L_C is the model-space negative ELBO in nats per image, D (bpd ln 2 - ln(levels/2)): negative once the model
beats log2(levels/2) bits/dim; the integer image's NLL differs from it by a constant with no gradient.
"""

from __future__ import annotations

import argparse

import torch

from cqf import losses
from cqf.config import load_config
from cqf.data import dequantize, load_dataset
from cqf.models import build_model
from cqf.run import build_discriminator
from cqf.step import generating_parameters, grad_norm


def measure(config: str, data_name: str, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = load_config(config, [f"data.name={data_name}"])
    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.val_size)
    x = dequantize(data.x_train[:batch], data.levels)
    model = build_model(cfg.model, data.image_shape, data.levels)
    disc = build_discriminator(cfg, data.image_shape)
    with torch.no_grad():
        model.elbo(x)  # ActNorm's data-dependent init, as in training
    shared = generating_parameters(model)
    terms = model.elbo(x)
    loss_c = -terms.elbo.mean()
    loss_q = losses.quality_loss(disc(model.sample(batch)))

    grad_c = grad_norm(torch.autograd.grad(loss_c, shared, allow_unused=True)).item()
    grad_q = grad_norm(torch.autograd.grad(loss_q, shared, allow_unused=True)).item()
    return {"config": config, "bpd": model.bits_per_dim(terms.elbo).mean().item(), "L_C": loss_c.item(),
            "L_Q": loss_q.item(), "grad_C": grad_c, "grad_Q": grad_q, "ratio": grad_c / grad_q}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--data", nargs="+", required=True, help="one data set per config")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| config | bits/dim | L_C (nats/image) | L_Q (nats/image) | ‖∇L_C‖ | ‖∇L_Q‖ | ratio |")
    print("|---|---|---|---|---|---|---|")
    for config, data_name in zip(args.configs, args.data, strict=True):
        m = measure(config, data_name, args.batch, args.seed)
        print(f"| {config} | {m['bpd']:.3f} | {m['L_C']:.1f} | {m['L_Q']:.2f} | {m['grad_C']:.1f} | "
              f"{m['grad_Q']:.2f} | {m['ratio']:.0f} |")


if __name__ == "__main__":
    main()
