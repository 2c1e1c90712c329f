"""A training run's state: the networks, their optimizers, the EMA and the step; built fresh or resumed.

Resuming restores every state dict of the newest `ckpt-*.pt` in the run directory, then applies the
optimizer hyper-parameters of the current config (lr, betas): lowering `train.lr` after a divergence takes
effect from the resumed step. Every config key that differs from the checkpoint's is logged; a changed data
set or seed is refused, since the run would go on with other images or other batches.
"""

from __future__ import annotations

import copy
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint, distributed, flows, nets, resnets
from .config import Config, check_device, from_dict, to_dict
from .data import ImageData, batch_indices, dequantize
from .errors import CheckpointError, ConfigError, TrainingError
from .models import DensityModel, build_model

__all__ = ["FiniteGuard", "Run", "apply_hyperparameters", "build_discriminator", "build_run", "compile_networks",
           "config_changes", "resolve_device"]

log = logging.getLogger("cqf")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda` or `cuda:N` as a torch device; a one-line ConfigError
    naming `key` for a malformed name or a GPU this machine does not have."""
    ok, message = check_device(name, key)
    if not ok:
        raise ConfigError(message)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        have = f"only {count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(f"{key}={name}, but this machine has {have}: use {key}=cpu (or auto)")
    return device


def build_discriminator(cfg: Config, image_shape: tuple[int, int, int]) -> nn.Module | None:
    """The SNGAN-style D of a run with an adversarial term (`quality_weight > 0`), else None: `model.disc_size`
    by the image size, unless `model.disc_channels` / `model.disc_blocks` say otherwise."""
    if not cfg.has_discriminator:
        return None
    channels, blocks = nets.default_disc_size(image_shape, cfg.model.disc_size)
    return nets.Discriminator(image_shape, cfg.model.disc_channels or channels, cfg.model.disc_blocks or blocks)


class FiniteGuard:
    """Records, on the device, the first step at which each watched term (the losses and the gradient's norm)
    was not finite; `check` raises.

    A training step only adds device ops here (no host sync); `check` runs at the log interval and before every
    checkpoint, so no checkpoint ever holds weights updated from a non-finite loss or gradient (a finite loss
    can have a non-finite gradient: an overflow under bf16).
    """

    def __init__(self):
        self.first: dict[str, tuple[Tensor, Tensor]] = {}  # term -> (first bad step or -1, its value)

    def watch(self, step: int, **terms: Tensor) -> None:
        for name, value in terms.items():
            value = value.detach()
            if name not in self.first:
                self.first[name] = (torch.full((), -1, dtype=torch.int64, device=value.device),
                                    torch.zeros((), dtype=value.dtype, device=value.device))
            first_step, first_value = self.first[name]
            new = ~torch.isfinite(value) & (first_step < 0)
            first_step.copy_(torch.where(new, step, first_step))
            first_value.copy_(torch.where(new, value, first_value))

    def check(self) -> None:
        """A one-line TrainingError naming the term and the step of the first non-finite loss, if any (on every
        rank when any rank saw one: the ranks stop together)."""
        names = sorted(self.first)
        if not names:
            return
        never = torch.iinfo(torch.int64).max
        steps = torch.stack([torch.where(self.first[n][0] < 0, never, self.first[n][0]) for n in names])
        steps = distributed.min_over_ranks(steps).tolist()
        # At one step a loss goes before a gradient norm: a non-finite loss makes its gradient non-finite too.
        bad = [(s, not n.startswith("loss"), n, float(self.first[n][1]) if int(self.first[n][0]) == s else float("nan"))
               for s, n in zip(steps, names, strict=True) if s != never]
        if bad:
            step, _, name, value = min(bad)
            raise TrainingError(
                f"non-finite {name} ({value}) at step {step}; the last checkpoint in the run directory is intact: "
                "lower train.lr, raise model.sigma_floor, set train.grad_clip or use train.precision=fp32"
            )


@dataclass
class Run:
    """Everything a training step changes, and what a checkpoint stores."""

    cfg: Config
    model: nn.Module  # the VAE family, or the GAN's generator
    disc: nn.Module | None
    ema: nn.Module | None  # EMA of `model` (train.ema_halflife_kimg > 0)
    opt_g: torch.optim.Optimizer  # encoder, decoder and flow
    opt_d: torch.optim.Optimizer | None
    device: torch.device
    meta: dict  # image_shape, levels, data_name, data_identity: what a checkpoint needs to rebuild the model
    step: int = 0
    changed: list[str] = field(default_factory=list)  # config keys the resume changed, "key: old -> new"
    guard: FiniteGuard = field(default_factory=FiniteGuard)

    @property
    def eval_model(self) -> nn.Module:
        """The weights used for samples, validation and export: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    def state(self) -> dict:
        return {"model": self.model, "ema": self.ema, "disc": self.disc, "opt_g": self.opt_g, "opt_d": self.opt_d}

    def save_best(self, run_dir: Path, val_bpd: float) -> None:
        """`best.pt` (atomic; rank 0): this step's state, with its validation bits/dim."""
        self.guard.check()
        if distributed.context().is_main:
            checkpoint.save(Path(run_dir) / checkpoint.BEST, step=self.step, config=to_dict(self.cfg),
                            val_bpd_elbo=val_bpd, **self.meta, **self.state())

    def save(self, run_dir: Path) -> Path:
        """`ckpt-{step}.pt` (atomic; rank 0 only), then prune to the newest `train.keep_checkpoints`. Refuses
        (TrainingError) when a loss was non-finite since the last check: the previous checkpoint stays the newest."""
        self.guard.check()
        path = Path(run_dir) / f"ckpt-{self.step:07d}.pt"
        if distributed.context().is_main:
            checkpoint.save(path, step=self.step, config=to_dict(self.cfg), **self.meta, **self.state())
            checkpoint.prune(run_dir, self.cfg.train.keep_checkpoints)
        return path


def apply_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, betas: tuple[float, float]) -> None:
    """Set lr and betas of every parameter group (a restored optimizer state brings its own)."""
    for group in optimizer.param_groups:
        group["lr"], group["betas"] = lr, tuple(betas)


def config_changes(saved: dict, current: Config) -> list[str]:
    """Keys of `current` that differ from a checkpoint's config, as "train.lr: 0.001 -> 0.0001" (sorted)."""
    try:
        saved = to_dict(from_dict(Config, saved))  # fills keys added since the checkpoint with their defaults
    except ConfigError:
        pass  # a key removed since: compare what is there

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    old, new = flat(saved), flat(to_dict(current))
    return [f"{key}: {old.get(key, '(absent)')} -> {new[key]}" for key in sorted(new) if old.get(key) != new[key]]


def build_run(cfg: Config, data: ImageData, run_dir: Path, device: str | None = None) -> Run:
    """A fresh run (seeded, ActNorm initialised on the first batch), or the newest checkpoint of `run_dir`.
    `device` overrides `train.device` (a rank's own GPU under torchrun)."""
    tc = cfg.train
    device = resolve_device(device or tc.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.image_shape, data.levels, gan=cfg.is_gan).to(device)
    with torch.random.fork_rng(devices=[]):  # D's init draws leave the model's stream (ActNorm's init batch) as
        torch.manual_seed(cfg.seed + 1)       # it is: a hybrid and its likelihood-only twin start as one run
        disc = build_discriminator(cfg, data.image_shape)
    disc = disc.to(device) if disc is not None else None
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        disc = disc.to(memory_format=torch.channels_last) if disc is not None else None
    fused = device.type == "cuda"  # one kernel per parameter group; the same update as the for-loop Adam
    opt_g = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.betas, fused=fused)
    opt_d = (torch.optim.Adam(disc.parameters(), lr=tc.lr_d, betas=tc.betas_d, fused=fused) if disc is not None
             else None)
    ema = copy.deepcopy(model).requires_grad_(False) if tc.ema_halflife_kimg > 0 else None
    meta = {"image_shape": list(data.image_shape), "levels": data.levels, "data_name": data.name,
            "data_identity": data.key}
    run = Run(cfg, model, disc, ema, opt_g, opt_d, device, meta)
    if (last := checkpoint.latest(run_dir)) is not None:
        _resume(run, last)
    elif isinstance(model, DensityModel):
        # Data-dependent ActNorm init on the first batch, before the EMA copy and the first step.
        x0 = dequantize(data.x_train[batch_indices(0, len(data.x_train), tc.batch_size, cfg.seed)], data.levels)
        with torch.no_grad():
            model.elbo(x0.to(device))
        if ema is not None:
            ema.load_state_dict(model.state_dict())
    if tc.compile:
        compile_networks(model, disc if tc.r1_gamma == 0 else None)
    return run


def compile_networks(model: nn.Module, disc: nn.Module | None) -> None:
    """`torch.compile` in place (state-dict keys unchanged) of the networks a step runs: the encoder, decoder,
    coupling conditioners and D (not with the R1 penalty: compiled graphs have no double backward). The
    probability code around them stays eager."""
    for module in [*model.modules(), *(disc.modules() if disc is not None else [])]:
        if isinstance(module, (nets.ConvEncoder, nets.ConvDecoder, nets.Discriminator, resnets.ResEncoder,
                               resnets.ResDecoder)):
            module.compile()
        elif isinstance(module, flows.AffineCoupling):
            module.net.compile()


def _resume(run: Run, path: Path) -> None:
    try:
        payload = checkpoint.load_payload(path)
    except CheckpointError as err:  # damaged outside cqf (writes are atomic): the run can go on from an earlier one
        earlier = checkpoint.checkpoints(path.parent)[:-1]
        then = (f"the run resumes from {earlier[-1].name}" if earlier else "the run starts again from step 0")
        what = str(err).split("; ")[0]  # without the load's own advice, which is for `cqf eval`
        moved = shlex.quote(f"{path}.bad")
        raise TrainingError(f"cannot resume: {what}; move it aside (mv {shlex.quote(str(path))} {moved}) and rerun "
                            f"the same command: {then}") from None
    run.changed = config_changes(payload.get("config", {}), run.cfg)
    _refuse_other_data(run, payload, path)  # before the state dicts: another image shape must name data.name
    for key, target in run.state().items():
        if target is None:
            continue
        if payload.get(key) is None:
            raise TrainingError(f"{path} has no '{key}' state: it was written by another config; use a new --out")
        try:
            target.load_state_dict(payload[key])
        except (RuntimeError, ValueError, KeyError) as err:
            model_keys = [c for c in run.changed if c.startswith("model.")]
            differs = ", ".join(model_keys) if model_keys else type(err).__name__
            raise TrainingError(f"{path} does not fit this config ({differs}); use a new --out directory") from None
    for optimizer in (run.opt_g, run.opt_d):  # Adam's moments in the parameters' layout (channels_last may change)
        for p, state in (optimizer.state.items() if optimizer is not None else []):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)
    run.step = int(payload["step"])
    # The optimizer states restore the old lr and betas: the current config's values win.
    tc = run.cfg.train
    apply_hyperparameters(run.opt_g, tc.lr, tc.betas)
    if run.opt_d is not None:
        apply_hyperparameters(run.opt_d, tc.lr_d, tc.betas_d)
    log.info("resuming from %s at step %d", path, run.step)
    if run.changed:
        log.info("resume: the config changed %s; the new values apply from step %d", ", ".join(run.changed),
                 run.step)


def _refuse_other_data(run: Run, payload: dict, path: Path) -> None:
    """A resume on other images or batches is refused: another data set (by its identity, so that a moved npz
    file resumes), another validation slice or another seed."""
    saved, current = payload.get("data_identity"), run.meta["data_identity"]
    renamed = [c for c in run.changed if c.startswith("data.name:")]
    if saved is not None and saved == current:
        renamed = []  # the same images under another path
    elif saved is not None and not renamed:  # the same name, other images: the file was rewritten
        renamed = [f"data.name: {run.cfg.data.name} holds other images than when the run started"]
    refused = renamed + [c for c in run.changed if c.startswith(("data.", "seed:"))
                         and not c.startswith(("data.root:", "data.name:"))]
    if refused:
        raise TrainingError(f"{path} was trained with other data or seed ({refused[0]}): resuming would continue "
                            "on other images or batches; use a new --out directory")
