"""`cqf eval`: one evaluator for a checkpoint, an image folder or an .npz of images, under one written protocol.

It loads the source and the reference data set once, runs the likelihood evaluation (`cqf.likelihood`) and
the sample-quality evaluation (`cqf.quality`) that `EvalConfig` asks for, and returns a result whose
`protocol` block records every choice (DESIGN section 4). `cqf.report` turns it into a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from .checkpoint import LoadedModel, load
from .config import FULL_PROTOCOL_SAMPLES, DataConfig, EvalConfig
from .data import load_dataset
from .errors import CQFError
from .files import sha256_file

__all__ = ["EvalConfig", "evaluate"]

OUT_OF_RANGE_NOTE = 0.01  # the share of sample pixels far beyond the data range (|x| > 2) the result notes


def _source_kind(source: Path) -> str:
    if source.suffix in (".pt", ".safetensors"):
        return "checkpoint"
    return "folder" if source.is_dir() else "npz"


def evaluate(source: str | Path, config: EvalConfig | None = None, **fields) -> dict:
    """Evaluate `source` (ckpt-*.pt / model.safetensors, a folder of images, or an .npz of images).

    Args:
        config: what to compute; `fields` replace single entries of it (e.g. `num_samples=5000`).
    Returns:
        {"protocol": every choice made, "bits_per_dim": dict or None, "metrics": {name: value},
         "unavailable": {metric: reason}, "notes": [...]} and "error" when the feature extractor could not
        be built (then the other results are still there).
    """
    from .models import check_temperature, tempered
    from .quality import check_no_noise, default_metrics
    from .run import resolve_device

    cfg = dataclasses.replace(config or EvalConfig(), **fields)
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device, "--device")))  # auto -> cpu or cuda
    source = Path(source)
    kind = _source_kind(source)
    loaded: LoadedModel | None = load(source, device=cfg.device) if kind == "checkpoint" else None
    if not cfg.sample_noise:
        check_no_noise(loaded.config.variant if loaded is not None else None)
    if cfg.temperature != 1.0 and loaded is None:
        raise CQFError("--temperature changes how a checkpoint is sampled and scored; images given as files are "
                       "what they are: drop --temperature")
    if loaded is not None:
        check_temperature(loaded.model, cfg.temperature)  # a GAN is refused before any data is read
    if loaded is None and not cfg.data:
        raise CQFError("images given without a data set: add --data NAME (the reference images)")
    # The training split excludes the validation slice the model's run held out (the default one for images).
    data_cfg = loaded.config.data if loaded is not None else DataConfig()
    data = load_dataset(cfg.data or loaded.data_name, data_cfg.root, data_cfg.val_size, data_cfg.image_size)
    if loaded is not None and (loaded.image_shape != data.image_shape or loaded.levels != data.levels):
        raise CQFError(f"{source} models {loaded.image_shape} images with {loaded.levels} levels, but {data.name} "
                       f"has {data.image_shape} with {data.levels}; evaluate on its own data set")
    wanted, note = cfg.metrics, ""
    if not wanted:
        has_density = loaded is not None and (not loaded.config.is_gan or cfg.gan_bpd_steps > 0)
        wanted, note = default_metrics(data.image_shape, cfg.features, loaded is not None, has_density, data.name)
    result = {
        "protocol": {
            "generated": {"source": str(source), "kind": kind, "seed": cfg.seed}
            | ({} if cfg.sample_noise else {"decoder_noise": False}),
            "reference": {"data": data.name, "split": cfg.reference},
            "design": "cqf DESIGN section 4: FID/KID/precision/recall against the training split by default, "
                      "the test split with --reference test; bits/dim on the test split",
            "metrics": list(wanted),
        },
        "bits_per_dim": None, "metrics": {}, "unavailable": {}, "notes": [note] if note else [],
    }
    if loaded is not None:
        result["protocol"]["generated"] |= {"sha256": sha256_file(source), "variant": loaded.config.variant}
    if cfg.temperature != 1.0:
        result["protocol"]["temperature"] = cfg.temperature
        result["notes"].append(f"temperature {cfg.temperature:g}: bits/dim and samples of the tempered model (decoder "
                               "sigma times T; NVP: base N(0, T^2 I)), not of the checkpoint as trained")
    with tempered(loaded.model, cfg.temperature) if loaded is not None else contextlib.nullcontext():
        _score(result, source, kind, loaded, data, cfg, wanted)
    return result


def _score(result: dict, source: Path, kind: str, loaded: LoadedModel | None, data, cfg: EvalConfig,
           wanted: tuple[str, ...]) -> None:
    """Bits/dim and the feature metrics of `wanted` into `result` (in place)."""
    from .likelihood import checkpoint_bits_per_dim

    if "bpd" in wanted:
        if loaded is None:
            result["unavailable"]["bpd"] = "bits/dim needs a model checkpoint, not a set of images"
        elif loaded.config.is_gan and cfg.gan_bpd_steps <= 0:
            result["unavailable"]["bpd"] = "a GAN has no density: add --gan-bpd for the approximate bound"
        else:
            result["bits_per_dim"] = checkpoint_bits_per_dim(loaded, data, cfg)
    feature_wanted = tuple(m for m in wanted if m != "bpd")
    if feature_wanted:
        _sample_quality(result, source, kind, loaded, data, cfg, feature_wanted)


def _sample_quality(result: dict, source: Path, kind: str, loaded: LoadedModel | None, data, cfg: EvalConfig,
                    wanted: tuple[str, ...]) -> None:
    """Fill result["metrics"] and the protocol's feature entries (in place)."""
    from .features import FeatureError, extract, make_extractor
    from .images import load_image_folder, load_npz_images
    from .quality import (
        feature_metrics,
        fixed_subset,
        neighbours_grid,
        reference_features,
        reference_images,
        sample_images,
    )

    try:
        extractor = make_extractor(cfg.features, cfg.inception_weights or None, cfg.device)
    except FeatureError as err:
        result["unavailable"] |= {m: str(err) for m in wanted}
        result["error"] = str(err)
        return
    if loaded is not None:
        sampled = {}
        x_gen = sample_images(loaded.model, cfg.num_samples, seed=cfg.seed, progress=cfg.progress,
                              noise=cfg.sample_noise, stats=sampled)
        result["protocol"]["generated"] |= sampled
        if sampled["far_out_of_range"] > OUT_OF_RANGE_NOTE:
            result["notes"].append(
                f"{sampled['far_out_of_range']:.1%} of the samples' pixels lay far beyond the data range [-1, 1] "
                f"(|x| > 2; {sampled['out_of_range']:.1%} beyond it) and are clipped in the scored images, as in a "
                "saved sample: the metrics score saturated images")
    else:
        x_gen = load_image_folder(source, data.image_shape[0]) if kind == "folder" else load_npz_images(source,
                                                                                                       cfg.npz_key)
        x_gen = fixed_subset(x_gen, cfg.num_samples)
    if tuple(x_gen.shape[1:]) != data.image_shape:
        raise CQFError(f"generated images are {tuple(x_gen.shape[1:])} but {data.name} images are {data.image_shape}")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    ref, cached = reference_features(extractor, data, cfg.reference, cfg.num_reference, cache_dir, cfg.batch_size,
                                     cfg.device, cfg.progress)
    gen = extract(extractor, x_gen, cfg.batch_size, cfg.device, cfg.progress)
    scored = feature_metrics(gen, ref, extractor, wanted)
    result["metrics"] = scored["metrics"]
    result["unavailable"] |= scored["unavailable"]
    num_ref = len(ref[extractor.feature_key])
    protocol = result["protocol"]
    protocol["generated"]["num_images"] = len(x_gen)
    protocol["reference"] |= {"num_images": num_ref, "features_cached": cached}
    protocol["extractor"] = extractor.protocol
    protocol["neighbourhoods"] = {"precision_recall_k": 3, "density_coverage_k": 5, "kid_subsets": 100,
                                  "kid_subset_size": min(1000, len(x_gen), num_ref)}
    if len(x_gen) < FULL_PROTOCOL_SAMPLES:
        protocol["note"] = (
            f"{len(x_gen)} generated images, fewer than the protocol's {FULL_PROTOCOL_SAMPLES}: a quick check; "
            "FID and KID are biased by the sample count, compare only at equal counts")
    if cfg.neighbours:
        x_ref = reference_images(data, cfg.reference, cfg.num_reference)
        neighbours_grid(x_gen, gen[extractor.feature_key], x_ref, ref[extractor.feature_key], Path(cfg.neighbours))
        result["neighbours_png"] = cfg.neighbours
