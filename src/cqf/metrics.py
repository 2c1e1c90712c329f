"""Sample-quality metrics as pure functions of feature tensors (N, F), generated first, reference second.

FID, KID, precision/recall and the Inception Score are torch-fidelity's own feature-level functions, so our
numbers are theirs on the same features. Density and coverage (Naeem et al. 2020) are computed here, in
chunks so that 50,000 x 50,000 distance matrices are never held at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["density_coverage", "fid", "inception_score", "kid", "precision_recall"]


def fid(features_gen: Tensor, features_ref: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), via torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    # float32 features as torch-fidelity itself passes them; np.cov accumulates the covariance in float64
    stats_gen = fid_features_to_statistics(features_gen.float())
    stats_ref = fid_features_to_statistics(features_ref.float())
    return float(fid_statistics_to_metric(stats_gen, stats_ref, verbose=False)[KEY_METRIC_FID])


def kid(features_gen: Tensor, features_ref: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of unbiased MMD^2 over random subsets."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    subset_size = min(subset_size, len(features_gen), len(features_ref))
    out = kid_features_to_metric(features_gen, features_ref, kid_subsets=subsets, kid_subset_size=subset_size,
                                 rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(features_gen: Tensor, features_ref: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls, via torch-fidelity."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(features_gen.float(), features_ref.float(), prc_neighborhood=k, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def _kth_neighbour_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of each row to its k-th nearest other row."""
    radii = []
    for block in features.split(chunk):
        radii.append(torch.cdist(block, features).kthvalue(k + 1, dim=1).values)  # +1: the point itself
    return torch.cat(radii)


def density_coverage(features_gen: Tensor, features_ref: Tensor, k: int = 5, chunk: int = 2048) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN balls around the reference (real) features.

    density  = 1/(k M) sum_j sum_i 1[ ||Y_j - X_i|| < r_k(X_i) ]   (can exceed 1)
    coverage = 1/N sum_i 1[ exists j: ||Y_j - X_i|| < r_k(X_i) ]
    """
    real, fake = features_ref.double(), features_gen.double()
    radii = _kth_neighbour_radii(real, k, chunk)  # (N,)
    inside_count = 0.0
    nearest_fake = torch.full((len(real),), float("inf"), dtype=torch.float64)
    for block in fake.split(chunk):
        dist = torch.cdist(real, block)  # (N, chunk)
        inside_count += (dist < radii[:, None]).sum().item()
        nearest_fake = torch.minimum(nearest_fake, dist.min(dim=1).values)
    density = inside_count / (k * len(fake))
    coverage = (nearest_fake < radii).double().mean().item()
    return float(density), float(coverage)


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from unbiased logits: mean and std over splits, via torch-fidelity."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
