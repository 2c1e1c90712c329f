"""Typed, strict configuration: a frozen dataclass tree loaded from YAML plus `--set key=value` overrides.

Unknown keys and wrong types are errors at load time, each naming the valid choices. Bundled configs live in
`cqf/configs/*.yaml` and are addressed by name (`cqf train mnist-vae-f`); any other argument is a path.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "bundled_configs", "from_dict", "load_config"]


# Metrics of `cqf eval` (cqf.evaluate): bits/dim, FID, KID, Inception Score, precision/recall, density/coverage.
EVAL_METRICS = ("bpd", "fid", "kid", "is", "pr", "dc")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist | cifar10 | npz:PATH
    root: str = ""  # where torchvision data sets live; "" = $CQF_DATA or ~/.cache/cqf
    val_size: int = 200  # held-out validation slice taken from the training split (images)


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 32
    channels: int = 64  # width of the first encoder conv; doubles at each downsampling
    flow_couplings: int = 0  # couplings per mask type and scale; 0 = no flow (VAE, CQ)
    flow_scales: int = 1  # 1 = checkerboard + squeezed channel couplings; 2 = Real-NVP multi-scale
    flow_hidden: int = 64  # hidden channels of each coupling network
    flow_max_log_scale: float = 2.0  # couplings' log-scale bound c in c * tanh(s / c)
    flow_actnorm: bool = True
    sigma_floor: float = 1.0  # decoder sigma >= sigma_floor / levels in model space (DESIGN section 6)
    disc_channels: int = 0  # discriminator width; 0 = chosen from the image size
    disc_blocks: int = 0  # discriminator residual blocks; 0 = chosen from the image size


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    minutes: float = 0.0  # wall-clock budget for this invocation; 0 = none (stop at `steps`)
    batch_size: int = 64
    lr: float = 1e-3  # encoder, decoder and flow
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 100.0  # max global gradient norm of the generator side; 0 = off
    coverage_weight: float = 1.0  # weight of L_C = -ELBO (nats per image)
    quality_weight: float = 0.0  # lambda, weight of L_Q (nats per image); > 0 adds a discriminator
    warmup_steps: int = 0  # likelihood-only steps before L_Q switches on (hybrid runs; ignored by a GAN)
    lr_d: float = 2e-4
    betas_d: tuple[float, float] = (0.0, 0.9)
    d_steps: int = 1  # discriminator steps per generator step
    ema_halflife_kimg: float = 0.0  # EMA of the generator side, half-life in thousands of images; 0 = off
    log_every: int = 50
    eval_every: int = 500  # validation bits/dim (ELBO) on the held-out slice
    sample_every: int = 500  # sample and reconstruction grids
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    eval_iw_samples: int = 100  # K of the IWAE-K bound reported at the end of training
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self):
        if self.train.coverage_weight < 0 or self.train.quality_weight < 0:
            raise ConfigError("train.coverage_weight and train.quality_weight must be >= 0")
        if self.train.coverage_weight == 0 and self.train.quality_weight == 0:
            raise ConfigError("train.coverage_weight and train.quality_weight are both 0: nothing to train")
        if self.train.coverage_weight == 0 and self.model.flow_couplings > 0:
            raise ConfigError("a GAN (train.coverage_weight=0) has no flow: set model.flow_couplings=0")
        if self.model.flow_scales not in (1, 2):
            raise ConfigError(f"model.flow_scales must be 1 or 2, got {self.model.flow_scales}")
        if self.train.batch_size < 1 or self.train.steps < 0:
            raise ConfigError("train.batch_size must be >= 1 and train.steps >= 0")
        if self.model.sigma_floor <= 0:
            raise ConfigError("model.sigma_floor must be > 0")

    @property
    def variant(self) -> str:
        """The paper's name for this combination of switches (DESIGN section 2)."""
        if self.train.coverage_weight == 0:
            return "GAN"
        name = "CQ" if self.train.quality_weight > 0 else "VAE"
        return name + ("-F" if self.model.flow_couplings > 0 else "")


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads "3e-4" as a string
        except ValueError:
            pass
    elif hint in (int, bool, str) and type(value) is hint:  # exact: True is not an int here
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (partial) nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def bundled_configs() -> dict[str, str]:
    """Name -> first comment line (the description) of every config shipped with cqf."""
    found = {}
    for entry in sorted(resources.files("cqf.configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            found[entry.name[: -len(".yaml")]] = first.lstrip("# ").strip()
    return found


def _read_yaml(source: str | Path) -> dict:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = path.read_text()
    else:
        name = str(source)
        if name not in bundled_configs():
            raise ConfigError(f"unknown config {name!r}; bundled configs: {', '.join(bundled_configs())}")
        text = resources.files("cqf.configs").joinpath(name + ".yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {source} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of sections (data, model, train, seed)")
    return data


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}} (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. --set train.lr=3e-4)")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file or bundled config <- `key=value` overrides, validated strictly."""
    data = _read_yaml(source) if source is not None else {}
    for text in overrides:
        data = _merge(data, parse_override(text))
    return from_dict(Config, data)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))
