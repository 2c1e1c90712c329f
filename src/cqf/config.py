"""Typed, strict configuration: a frozen dataclass tree loaded from YAML plus `--set key=value` overrides.

Unknown keys and wrong types are errors at load time, each naming the valid choices. Bundled configs live in
`cqf/configs/*.yaml` and are addressed by name (`cqf train mnist-vae-f`); any other argument is a path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .dictconfig import bundled_configs, from_dict, merge, parse_override, read_yaml, to_dict
from .errors import ConfigError

__all__ = [
    "EVAL_METRICS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "bundled_configs",
    "check_device",
    "check_new_training",
    "from_dict",
    "load_config",
    "to_dict",
]


# Metrics of `cqf eval` (cqf.evaluate): bits/dim, FID, KID, Inception Score, precision/recall, density/coverage.
EVAL_METRICS = ("bpd", "fid", "kid", "is", "pr", "dc")
FULL_PROTOCOL_SAMPLES = 50_000  # DESIGN section 4
CLOCKS = ("wall", "process")  # what train.minutes counts (cqf.train.Periodic)
PRECISIONS = ("fp32", "bf16")  # training arithmetic (cqf.step.autocast)
BALANCES = ("fixed", "per_dim", "adaptive")  # how L_C and L_Q are weighted (cqf.step.generator_step)
AUGMENTATIONS = ("color", "translation", "cutout")  # cqf.augment
ARCHS = ("conv", "resnet")  # encoder/decoder/generator networks (cqf.nets, cqf.resnets)
DISC_SIZES = ("base", "large")  # cqf.nets.default_disc_size


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raise a one-line ConfigError for the first failed (condition, message) pair."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what cqf runs on; whether that device exists is checked when used


def check_device(name: str, key: str) -> tuple[bool, str]:
    """(valid, message) for a device string of `key`: auto, cpu, cuda or cuda:N."""
    return bool(DEVICE.fullmatch(name)), f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}"


def _finite(obj, prefix: str) -> list[tuple[bool, str]]:
    """Every float field (and each number of a float pair) of dataclass `obj` finite: an inf or a nan learning
    rate, weight or budget is a typo, never a setting."""
    checks = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            what = "finite numbers" if isinstance(value, tuple) else "a finite number"
            checks.append((False, f"{prefix}{f.name} must be {what}, got {value!r}"))
    return checks


def _beta_pair(name: str, betas: tuple[float, float]) -> tuple[bool, str]:
    return all(0 <= b < 1 for b in betas), f"{name} must be two numbers in [0, 1), got {list(betas)}"


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist | cifar10 | npz:PATH
    root: str = ""  # where torchvision data sets live; "" = $CQF_DATA or ~/.cache/cqf
    val_size: int = 200  # held-out validation slice taken from the training split (images)
    image_size: int = 0  # square size to resize to; 0 = the data set's own (folder:PATH needs > 0; cqf.datasets)

    def __post_init__(self):
        root = Path(self.root).expanduser()
        _require([
            (self.val_size >= 0, f"data.val_size must be >= 0, got {self.val_size}"),
            (self.image_size >= 0, f"data.image_size must be >= 0 (0 = own size), got {self.image_size}"),
            (not self.root or root.is_dir() or not root.exists(),
             f"data.root must be a folder, got the file {self.root!r}: set data.root to the folder that holds "
             "the data set's files"),
        ])


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 32  # 0 = no latent variable: the NVP baseline, the flow alone over N(0, I) (cqf.nvp)
    channels: int = 64  # conv: width of the first encoder conv, doubling per downsampling; resnet: every block's
    arch: str = "conv"  # conv | resnet (SNGAN-style residual encoder and decoder, also the GAN's generator)
    iaf_steps: int = 0  # IAF steps after the Gaussian encoder (Kingma et al. 2016); 0 = Gaussian q, analytic KL
    iaf_context: int = 32  # size of the encoder's context h that conditions every IAF step
    iaf_hidden: int = 256  # width of each IAF step's MADE (two hidden layers)
    flow_couplings: int = 0  # couplings per mask type and scale; 0 = no flow (VAE, CQ)
    flow_scales: int = 1  # 1 = checkerboard + squeezed channel couplings; 2 = Real-NVP multi-scale
    flow_hidden: int = 64  # hidden channels of each coupling network
    flow_max_log_scale: float = 2.0  # couplings' log-scale bound c in c * tanh(s / c)
    flow_actnorm: bool = True
    flow_blocks: int = 0  # residual blocks of each coupling's conditioner (Real NVP's); 0 = the plain 3-layer net
    sigma_floor: float = 1.0  # decoder sigma >= sigma_floor / levels in model space (DESIGN section 6)
    disc_channels: int = 0  # discriminator width; 0 = chosen from the image size
    disc_blocks: int = 0  # discriminator residual blocks; 0 = chosen from the image size
    disc_size: str = "base"  # base (SNGAN's, 128 x 4 at 32x32) | large (256 x 6 at 32x32), when the above are 0

    def __post_init__(self):
        _require([
            (self.latent_dim >= 0, f"model.latent_dim must be >= 1, or 0 for the NVP baseline, got {self.latent_dim}"),
            (self.channels >= 1, f"model.channels must be >= 1, got {self.channels}"),
            (self.flow_couplings >= 0, f"model.flow_couplings must be >= 0 (0 = no flow), got {self.flow_couplings}"),
            *_finite(self, "model."),
            (self.flow_scales in (1, 2), f"model.flow_scales must be 1 or 2, got {self.flow_scales}"),
            (self.flow_scales == 1 or self.flow_couplings > 0,
             f"model.flow_scales={self.flow_scales} needs a flow: set model.flow_couplings > 0, or flow_scales=1"),
            (self.flow_blocks >= 0, f"model.flow_blocks must be >= 0 (0 = plain conditioner), got {self.flow_blocks}"),
            (self.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.iaf_steps >= 0, f"model.iaf_steps must be >= 0 (0 = Gaussian posterior), got {self.iaf_steps}"),
            (self.iaf_context >= 0, f"model.iaf_context must be >= 0, got {self.iaf_context}"),
            (self.iaf_hidden >= 1, f"model.iaf_hidden must be >= 1, got {self.iaf_hidden}"),
            (self.disc_size in DISC_SIZES,
             f"model.disc_size must be one of {', '.join(DISC_SIZES)}, got {self.disc_size!r}"),
            (self.latent_dim > 0 or self.flow_couplings > 0,
             "model.latent_dim=0 is the NVP baseline, the flow alone: set model.flow_couplings > 0"),
            (self.latent_dim > 0 or self.iaf_steps == 0,
             "model.latent_dim=0 (the NVP baseline) has no posterior: set model.iaf_steps=0"),
            (self.flow_hidden >= 1, f"model.flow_hidden must be >= 1, got {self.flow_hidden}"),
            (self.flow_max_log_scale > 0, f"model.flow_max_log_scale must be > 0, got {self.flow_max_log_scale}"),
            (self.sigma_floor > 0, f"model.sigma_floor must be > 0, got {self.sigma_floor}"),
            (self.disc_channels >= 0, f"model.disc_channels must be >= 0 (0 = from the image size), got "
                                      f"{self.disc_channels}"),
            (self.disc_blocks >= 0,
             f"model.disc_blocks must be >= 0 (0 = from the image size), got {self.disc_blocks}"),
        ])


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    minutes: float = 0.0  # time budget for this invocation (see `clock`); 0 = none (stop at `steps`)
    clock: str = "wall"  # what `minutes` counts: wall (wall-clock) | process (this process's CPU time)
    batch_size: int = 64
    lr: float = 1e-3  # encoder, decoder and flow
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 100.0  # max global gradient norm of the generator side; 0 = off
    coverage_weight: float = 1.0  # weight of L_C = -ELBO (nats per image)
    free_nats: float = 0.0  # L_C's KL term is max(batch-mean KL, free_nats) in training (docs); 0 = the ELBO
    quality_weight: float = 0.0  # lambda, weight of L_Q (nats per image); > 0 adds a discriminator
    balance: str = "fixed"  # fixed: L_C + w L_Q | per_dim: L_C / (D ln 2) + w L_Q | adaptive (see cqf.step)
    quality_weight_max: float = 1e4  # clamp of the adaptive weight
    warmup_steps: int = 0  # likelihood-only steps before L_Q switches on (hybrid runs; ignored by a GAN)
    quality_ramp_steps: int = 0  # after the warm-up, lambda rises linearly from 0 over this many steps
    quality_every: int = 1  # hybrids: L_Q and the D step(s) on every k-th step only, plain ELBO steps between
    lr_d: float = 2e-4
    betas_d: tuple[float, float] = (0.0, 0.9)
    d_steps: int = 1  # discriminator steps per generator step (when there is a discriminator)
    quality_batch_size: int = 0  # L_Q's samples and D's real/generated images per step; 0 = batch_size (at most
    # the training set, as the batch); not for a GAN, whose batch is batch_size
    quality_sigma: bool = True  # L_Q's gradient passes through the decoder's sigma; False: none does (docs)
    quality_decoder: bool = True  # L_Q's gradient reaches the decoder (mu, sigma); False: only the flow (docs)
    quality_mean: bool = True  # L_Q's gradient passes through the decoder's mu; False: none does (docs)
    quality_flow: bool = True  # L_Q's gradient reaches the flow's parameters; False: only the decoder's (docs)
    quality_clip: bool = False  # D sees generated images clipped to the data range [-1, 1], as a saved sample is
    augment: str = ""  # DiffAugment of every image D sees: comma list of color, translation, cutout; "" = none
    r1_gamma: float = 0.0  # R1 penalty gamma/2 E|grad_x D(x_real)|^2 in the D step; 0 = off
    ema_halflife_kimg: float = 0.0  # EMA of the generator side, half-life in thousands of images; 0 = off
    ema_rampup: float = 0.05  # the half-life is at most this fraction of the images seen so far; 0 = off
    log_every: int = 50
    eval_every: int = 500  # validation bits/dim (ELBO) on the held-out slice; 0 = off
    sample_every: int = 500  # sample and reconstruction grids; 0 = off
    ckpt_every: int = 1000  # 0 = only at the end
    keep_checkpoints: int = 2
    eval_iw_samples: int = 100  # K of the IWAE-K bound reported at the end of training; 0 = ELBO only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16: autocast of the networks; log-dets, likelihood sums and KL in float32
    channels_last: bool = False  # NHWC memory layout of every network (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the networks (encoder, decoder, coupling nets, discriminator)
    deterministic: bool = False  # deterministic GPU kernels (slower; an op without one raises), see README
    num_threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self):
        _require([
            *_finite(self, "train."),
            (self.steps >= 0, f"train.steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}"),
            (self.minutes >= 0, f"train.minutes must be >= 0 (0 = no time budget), got {self.minutes}"),
            (self.clock in CLOCKS, f"train.clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}"),
            (self.lr > 0, f"train.lr must be > 0, got {self.lr}"),
            (self.lr_d > 0, f"train.lr_d must be > 0, got {self.lr_d}"),
            _beta_pair("train.betas", self.betas),
            _beta_pair("train.betas_d", self.betas_d),
            (self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.coverage_weight >= 0, f"train.coverage_weight must be >= 0, got {self.coverage_weight}"),
            (self.free_nats >= 0, f"train.free_nats must be >= 0 nats per image (0 = off), got {self.free_nats}"),
            (self.quality_weight >= 0, f"train.quality_weight must be >= 0, got {self.quality_weight}"),
            (self.coverage_weight > 0 or self.quality_weight > 0,
             "train.coverage_weight and train.quality_weight are both 0: nothing to train"),
            (self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.quality_ramp_steps >= 0, f"train.quality_ramp_steps must be >= 0, got {self.quality_ramp_steps}"),
            (self.quality_every >= 1, f"train.quality_every must be >= 1 step, got {self.quality_every}"),
            (self.quality_every <= 1 or self.coverage_weight > 0,
             f"train.quality_every={self.quality_every} needs L_C (a GAN step without L_Q trains nothing); "
             "set train.quality_every=1"),
            (self.quality_every <= 1 or self.log_every < 1 or self.quality_weight == 0 or self.coverage_weight == 0
             or self.log_every % self.quality_every == 0,
             f"train.log_every ({self.log_every}) must be a multiple of train.quality_every ({self.quality_every}), "
             "so that the logged balance is measured on an adversarial step; change one of them"),
            (self.balance in BALANCES, f"train.balance must be one of {', '.join(BALANCES)}, got {self.balance!r}"),
            (self.quality_weight_max > 0, f"train.quality_weight_max must be > 0, got {self.quality_weight_max}"),
            (set(self.augment_policy) <= set(AUGMENTATIONS),
             f"train.augment: unknown augmentation in {self.augment!r}; use a comma list of "
             f"{', '.join(AUGMENTATIONS)} (or '' for none)"),
            (self.r1_gamma >= 0, f"train.r1_gamma must be >= 0 (0 = off), got {self.r1_gamma}"),
            (self.d_steps >= 1 or self.quality_weight == 0,
             f"train.d_steps must be >= 1 discriminator step per generator step, got {self.d_steps}; "
             "for no discriminator set train.quality_weight=0"),
            (self.quality_batch_size >= 0,
             f"train.quality_batch_size must be >= 0 (0 = train.batch_size), got {self.quality_batch_size}"),
            (self.ema_rampup >= 0, f"train.ema_rampup must be >= 0 (0 = off), got {self.ema_rampup}"),
            (self.ema_halflife_kimg >= 0,
             f"train.ema_halflife_kimg must be >= 0 (0 = no EMA), got {self.ema_halflife_kimg}"),
            (self.log_every >= 1, f"train.log_every must be >= 1 step, got {self.log_every}"),
            (self.eval_every >= 0, f"train.eval_every must be >= 0 (0 = off), got {self.eval_every}"),
            (self.sample_every >= 0, f"train.sample_every must be >= 0 (0 = off), got {self.sample_every}"),
            (self.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 = only at the end), got {self.ckpt_every}"),
            (self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.eval_iw_samples >= 0, f"train.eval_iw_samples must be >= 0 (0 = ELBO only), got "
                                        f"{self.eval_iw_samples}"),
            (self.num_threads >= 0, f"train.num_threads must be >= 0 (0 = torch's default), got {self.num_threads}"),
            check_device(self.device, "train.device"),
            (self.precision in PRECISIONS,
             f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ])

    @property
    def quality_batch(self) -> int:
        """Samples per step for L_Q, and real and generated images per D step (global, over all ranks)."""
        return self.quality_batch_size or self.batch_size

    @property
    def augment_policy(self) -> tuple[str, ...]:
        """`augment` as a tuple of transform names (cqf.augment), empty for none."""
        return tuple(name.strip() for name in self.augment.split(",") if name.strip())


def check_new_training(cfg: Config) -> None:
    """Options that a run would silently ignore, refused when training starts or resumes (`cqf.train.train`),
    not when a checkpoint is read: runs made before these checks existed still load, sample and evaluate."""
    m = cfg.model
    _require([
        (m.flow_blocks == 0 or m.flow_couplings > 0,
         f"model.flow_blocks={m.flow_blocks} shapes the flow's couplings, and there is no flow: set "
         "model.flow_couplings > 0, or model.flow_blocks=0"),
        (m.disc_size == "base" or not (m.disc_channels and m.disc_blocks) or not cfg.has_discriminator,
         f"model.disc_size={m.disc_size} has no effect with model.disc_channels={m.disc_channels} and "
         f"model.disc_blocks={m.disc_blocks} both set: add --set model.disc_channels=0 --set model.disc_blocks=0 "
         "for the preset's D, or --set model.disc_size=base to keep this D (a run begun with it)"),
    ])


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self):
        _require([(0 <= self.seed < 2**32, f"seed must be an integer in [0, 2**32), got {self.seed}")])
        if self.is_gan and self.model.flow_couplings > 0:
            raise ConfigError("a GAN (train.coverage_weight=0) has no flow: set model.flow_couplings=0")
        if self.model.latent_dim == 0 and (self.is_gan or self.has_discriminator):
            raise ConfigError("the NVP baseline (model.latent_dim=0) is trained by likelihood only: set "
                              "train.quality_weight=0 and train.coverage_weight > 0")
        for switch, what in (("quality_sigma", "sigma"), ("quality_mean", "mean mu")):
            if not getattr(self.train, switch) and (self.is_gan or not self.has_discriminator):
                raise ConfigError(f"train.{switch}=false keeps L_Q's gradient from the decoder's {what}: it needs a "
                                  "hybrid (train.quality_weight > 0 and train.coverage_weight > 0); remove "
                                  f"train.{switch}=false")
        for switch, what in (("quality_decoder", "lets L_Q's gradient reach only the flow"),
                             ("quality_flow", "keeps L_Q's gradient from the flow's parameters")):
            if not getattr(self.train, switch) and (self.is_gan or not self.has_discriminator
                                                    or self.model.flow_couplings == 0):
                raise ConfigError(f"train.{switch}=false {what}: it needs a hybrid with a flow "
                                  f"(train.quality_weight > 0, train.coverage_weight > 0, model.flow_couplings > 0), "
                                  f"this config is {self.variant}; remove train.{switch}=false")
        if self.train.quality_clip and not (self.is_gan or self.has_discriminator):
            raise ConfigError(f"train.quality_clip=true clips the generated images a discriminator sees: it needs "
                              f"train.quality_weight > 0 (CQ, CQ-F or a GAN), this config is {self.variant}; remove "
                              "train.quality_clip=true")
        if self.train.free_nats > 0 and (self.is_gan or self.model.latent_dim == 0):
            raise ConfigError(f"train.free_nats={self.train.free_nats} frees part of the ELBO's KL term: it needs a "
                              f"model with an encoder and L_C (VAE, VAE-F, CQ, CQ-F), this config is "
                              f"{self.variant}; remove train.free_nats")
        if not self.train.quality_flow and not self.train.quality_decoder:
            raise ConfigError("train.quality_flow=false with train.quality_decoder=false leaves L_Q nothing to "
                              "train: remove one of them")
        for switch in ("quality_sigma", "quality_mean"):
            if not self.train.quality_decoder and not getattr(self.train, switch):
                raise ConfigError(f"train.{switch}=false has no effect with train.quality_decoder=false (L_Q "
                                  f"reaches neither mu nor sigma): remove train.{switch}=false")
        if not self.train.quality_sigma and not self.train.quality_mean:
            if self.model.flow_couplings == 0:
                raise ConfigError("train.quality_sigma=false with train.quality_mean=false leaves L_Q nothing to "
                                  "train (there is no flow): remove one of them")
            raise ConfigError("train.quality_sigma=false with train.quality_mean=false keeps L_Q from the whole "
                              "decoder: that is train.quality_decoder=false (L_Q on the flow alone); set that instead")
        if self.is_gan and self.train.quality_batch != self.train.batch_size:
            raise ConfigError("a GAN's batch is train.batch_size (it has no L_C batch to keep apart): set "
                              "train.batch_size instead of train.quality_batch_size")

    @property
    def has_discriminator(self) -> bool:
        """An adversarial term, hence a discriminator: CQ, CQ-F and the GAN."""
        return self.train.quality_weight > 0

    @property
    def is_gan(self) -> bool:
        """No likelihood term: the model is the GAN generator (the decoder mean), with no density."""
        return self.train.coverage_weight == 0

    @property
    def variant(self) -> str:
        """The paper's name for this combination of switches (DESIGN section 2)."""
        if self.is_gan:
            return "GAN"
        if self.model.latent_dim == 0:
            return "NVP"
        name = "CQ" if self.has_discriminator else "VAE"
        return name + ("-F" if self.model.flow_couplings > 0 else "")


@dataclass(frozen=True)
class EvalConfig:
    """What `cqf eval` computes and how (DESIGN section 4); every choice is written into the results."""

    data: str = ""  # reference data set; "" = the checkpoint's own (required for image folders and .npz)
    metrics: tuple[str, ...] = ()  # subset of EVAL_METRICS; () = the default set for the data (`default_metrics`)
    bpd_split: str = "test"
    reference: str = "train"  # reference split of the feature metrics: train (convention) or test (paper)
    num_samples: int = FULL_PROTOCOL_SAMPLES
    num_reference: int = 0  # a fixed random subset of the reference split; 0 = all of it
    features: str = "inception"  # inception | classifier:PATH
    inception_weights: str = ""  # local TF-Inception weights; "" = $CQF_INCEPTION_WEIGHTS or torch-fidelity's
    iw_samples: int = 100  # K of the IWAE-K bound; 0 = ELBO only
    gan_bpd_steps: int = 0  # > 0: fit the GAN's approximate bound with this many steps
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    npz_key: str = ""  # array of an .npz source; "" = the first of x, samples, images, arr_0, x_test
    neighbours: str = ""  # PNG path for samples beside their nearest reference images; "" = none
    cache_dir: str = ""  # reference feature cache; "" = no cache
    max_images: int = 0  # bits/dim on the first N images only; 0 = the whole split
    sample_noise: bool = True  # False: samples f^-1(mu(z)) without the decoder noise (a diagnostic, not the protocol)
    temperature: float = 1.0  # != 1: the tempered model's bits/dim and samples (`models.tempered`; a diagnostic)
    progress: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(EVAL_METRICS))
        _require([
            (not unknown, f"unknown metric {unknown[0]!r}: --metrics takes a comma list of "
                          f"{', '.join(EVAL_METRICS)}, or 'all' alone" if unknown else ""),
            (self.bpd_split in ("train", "val", "test"), f"--split (bits/dim) must be train, val or test, got "
                                                         f"{self.bpd_split!r}"),
            (self.reference in ("train", "test"), f"--reference must be train or test, got {self.reference!r}"),
            (self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}"),
            (self.num_reference >= 0, f"--num-reference must be >= 0 (0 = all), got {self.num_reference}"),
            (self.iw_samples >= 0, f"-k/--iw-samples must be >= 0 (0 = ELBO only), got {self.iw_samples}"),
            (self.temperature > 0 and math.isfinite(self.temperature),
             f"--temperature must be a positive number (1 = the model as trained), got {self.temperature}"),
            (self.sample_noise or self.temperature == 1.0,
             "--no-noise and --temperature both set the decoder noise (--no-noise is temperature 0, which has no "
             "density): use one of them"),
            (self.gan_bpd_steps >= 0, f"--gan-bpd-steps must be >= 0, got {self.gan_bpd_steps}"),
            (self.max_images >= 0, f"--max-images must be >= 0 (0 = all), got {self.max_images}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (0 <= self.seed < 2**32, f"--seed must be an integer in [0, 2**32), got {self.seed}"),
            check_device(self.device, "--device"),
            (self.features == "inception" or (self.features.startswith("classifier:") and
                                              len(self.features) > len("classifier:")),
             f"--features must be inception or classifier:PATH, got {self.features!r}"),
        ])


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file or bundled config <- `key=value` overrides, validated strictly."""
    data = read_yaml(source) if source is not None else {}
    for text in overrides:
        data = merge(data, parse_override(text))
    return from_dict(Config, data)
