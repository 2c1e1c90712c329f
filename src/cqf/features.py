"""Feature extractors for sample-quality metrics, all as torch-fidelity extractors.

- `inception`: torch-fidelity's `inception-v3-compat` (the TF-Inception of the FID/IS papers). Its weights are
  downloaded by torch-fidelity when online, or read from a local file (`--inception-weights PATH` or the
  `CQF_INCEPTION_WEIGHTS` variable).
- `classifier:PATH`: a small CNN trained by `cqf classifier train DATASET` on the labelled training split; its
  penultimate layer gives the features of small images (digits, MNIST) where Inception's mean little.

Every extractor takes uint8 images (B, C, H, W) in 0..255 and returns a tuple of features in the order of its
`features_list`. Results name the extractor and the SHA-256 of its weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from .data import levels_to_uint8
from .errors import CQFError
from .files import read_safetensors, sha256_file, write_safetensors

__all__ = ["ClassifierExtractor", "Extractor", "FeatureError", "extract", "make_extractor", "train_classifier"]

CLASSIFIER_FORMAT = "cqf-classifier-v1"
INCEPTION_HINT = (
    "TF-Inception weights are unavailable (offline?): pass --inception-weights PATH or set CQF_INCEPTION_WEIGHTS "
    "to torch-fidelity's weights-pt_inception-2015-12-05 file; bits/dim and classifier features need no weights"
)


class FeatureError(CQFError):
    """A feature extractor cannot be built (missing weights, wrong image shape)."""


class ClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a `cqf` classifier file: features "features" (penultimate) and "logits"."""

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        from .nets import Classifier

        if feature_extractor_weights_path is None or not Path(feature_extractor_weights_path).is_file():
            raise FeatureError(
                f"classifier weights {feature_extractor_weights_path} not found; train one with "
                "`cqf classifier train DATASET --out PATH`"
            )
        state, meta = read_safetensors(feature_extractor_weights_path, CLASSIFIER_FORMAT,
                                       "a cqf classifier (`cqf classifier train`)", FeatureError)
        self.info = {k: v for k, v in meta.items() if k != "format"}
        self.image_shape = tuple(self.info["image_shape"])
        self.net = Classifier(self.image_shape, self.info["num_classes"], self.info["width"]).float()
        self.net.load_state_dict(state)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != self.image_shape:
            raise FeatureError(
                f"classifier expects uint8 images {self.image_shape}, got {x.dtype} {tuple(x.shape[1:])}")
        features, logits = self.net(x.float() / 255)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def _register():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if "cqf-classifier" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("cqf-classifier", ClassifierExtractor)


_register()


@dataclass
class Extractor:
    """A torch-fidelity extractor plus what the results must say about it."""

    module: FeatureExtractorBase
    name: str  # "inception-v3-compat" or "classifier"
    weights: str  # path or "torch-fidelity download"
    sha256: str
    feature_key: str  # features for FID, KID, precision/recall, density/coverage
    logits_key: str | None  # logits for the Inception Score; None when unavailable
    rgb: bool  # the extractor needs 3 channels (grey images are replicated)

    @property
    def protocol(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.sha256,
                "feature": self.feature_key}


def _inception(weights: str | None) -> Extractor:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = weights or os.environ.get("CQF_INCEPTION_WEIGHTS") or None
    if weights is not None and not Path(weights).is_file():
        raise FeatureError(f"Inception weights file {weights} not found; {INCEPTION_HINT}")
    try:
        module = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
        )
    except CQFError:
        raise
    except Exception as err:  # download failure: URLError, HTTPError, OSError, RuntimeError...
        raise FeatureError(f"{INCEPTION_HINT} ({type(err).__name__})") from None
    if weights is None:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        found = sorted(hub.glob("weights-inception-2015-12-05*"))
        weights = str(found[0]) if found else "torch-fidelity download"
    sha = sha256_file(weights) if Path(weights).is_file() else "unknown"
    # A pool3-only weights file has a NaN classifier: then there is no Inception Score.
    logits_ok = bool(torch.isfinite(module.fc.weight).all()) if hasattr(module, "fc") else True
    return Extractor(module, "inception-v3-compat", weights, sha, "2048", "logits_unbiased" if logits_ok else None,
                     rgb=True)


def make_extractor(spec: str = "inception", inception_weights: str | None = None, device: str = "cpu") -> Extractor:
    """`inception` or `classifier:PATH` -> an `Extractor` in eval mode on `device`."""
    if spec == "inception":
        extractor = _inception(inception_weights)
        if torch.device(device).type == "cpu":
            extractor.module = extractor.module.to(memory_format=torch.channels_last)  # about 2x on CPU
    elif spec.startswith("classifier:"):
        path = spec[len("classifier:") :]
        module = ClassifierExtractor("cqf-classifier", ["features", "logits"], feature_extractor_weights_path=path)
        extractor = Extractor(module, "classifier", path, sha256_file(path), "features", "logits", rgb=False)
    else:
        raise FeatureError(f"unknown feature extractor {spec!r}; choose inception or classifier:PATH")
    extractor.module.requires_grad_(False).eval().to(device)
    return extractor


@torch.no_grad()
def extract(
    extractor: Extractor, images: Tensor, batch_size: int = 64, device: str = "cpu", progress: bool = False
) -> dict[str, Tensor]:
    """Features of uint8 images (N, C, H, W) -> {name: (N, F) float32 on CPU}, batch by batch."""
    from tqdm.auto import tqdm

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise FeatureError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    names = extractor.module.features_list
    out = {name: [] for name in names}
    channels_last = extractor.rgb and torch.device(device).type == "cpu"
    for start in tqdm(range(0, len(images), batch_size), desc=f"features ({extractor.name})", disable=not progress,
                      unit="batch"):
        batch = images[start : start + batch_size].to(device)
        if extractor.rgb and batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        for name, value in zip(names, extractor.module(batch), strict=True):
            out[name].append(value.float().cpu())
    return {name: torch.cat(values) for name, values in out.items()}


CLASSIFIER_MIN_STEPS = 1000  # the default number of epochs gives at least this many steps (and 5 epochs)


def classifier_epochs(num_train: int, batch_size: int) -> int:
    """The default epochs of `train_classifier`: 5, or more where an epoch is short (the digits' 9 steps),
    so that training makes at least CLASSIFIER_MIN_STEPS steps."""
    return max(5, math.ceil(CLASSIFIER_MIN_STEPS / max(num_train // batch_size, 1)))


def train_classifier(
    data, out: str | Path, epochs: int | None = None, batch_size: int = 128, lr: float = 1e-3, width: int = 32,
    device: str = "cpu", seed: int = 0, progress: bool = True,
) -> dict:
    """Train the domain classifier on the labelled training split; save it with its test accuracy. `epochs`
    None: `classifier_epochs`.

    Images enter as uint8 0..255 (the evaluation pipeline's format), so digits' 17 levels are rescaled. Images
    labelled -1 (STL-10's unlabelled split) are left out.
    """
    from tqdm.auto import tqdm

    from .nets import Classifier

    torch.manual_seed(seed)
    labelled = data.y_train >= 0
    y_train = data.y_train[labelled]
    num_classes = int(y_train.max()) + 1
    net = Classifier(data.image_shape, num_classes, width).float().to(device)  # float32 whatever the default
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_train = levels_to_uint8(data.x_train[labelled], data.levels)
    if epochs is None:
        epochs = classifier_epochs(len(x_train), batch_size)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x_train) // batch_size)
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            logits = net(x_train[idx].to(device).float() / 255)[1]
            loss = nn.functional.cross_entropy(logits, y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    with torch.no_grad():
        x_test = levels_to_uint8(data.x_test, data.levels)
        predictions = torch.cat([net(x_test[i : i + 500].to(device).float() / 255)[1].argmax(1).cpu()
                                 for i in range(0, len(x_test), 500)])
    accuracy = (predictions == data.y_test).double().mean().item()
    info = {"image_shape": list(data.image_shape), "num_classes": num_classes, "width": width,
            "test_accuracy": accuracy, "data": data.name, "epochs": epochs}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, net.state_dict(), {"format": CLASSIFIER_FORMAT} | info)
    return info | {"path": str(out), "sha256": sha256_file(out)}
