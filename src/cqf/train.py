"""The one training loop. VAE, VAE-F, CQ, CQ-F and GAN differ only in config (DESIGN sections 2-3).

    build_run (cqf.run)  ->  training_step (cqf.step), repeated  ->  finish
                                   |
                              Periodic: logging, validation, grids, checkpoints

A run directory holds config.yaml, metrics.jsonl, tb/ (TensorBoard), samples-*.png, recon-*.png,
ckpt-*.pt (resumable; the newest `train.keep_checkpoints`), best.pt (lowest validation bits/dim so far), and at
the end model.safetensors and results.json (test bits/dim).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from . import checkpoint, distributed
from .config import Config, check_new_training, to_dict
from .data import ImageData, dequantize, load_dataset, to_unit
from .errors import TrainingError
from .images import save_grid
from .likelihood import bits_per_dim
from .models import DensityModel
from .report import write_json
from .run import Run, build_run
from .schedule import quality_started
from .step import training_step

__all__ = ["Periodic", "finish", "train"]

log = logging.getLogger("cqf")

SHOWN = ("loss_coverage", "bpd", "loss_quality", "loss_d", "d_acc_real", "d_acc_fake")  # in the progress bar


class _Logger:
    """metrics.jsonl and TensorBoard, written together (by rank 0 only; the other ranks' logger writes nothing)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.active = distributed.context().is_main
        self.path = run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tb")) if self.active else None

    def write(self, step: int, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, images: Tensor, step: int) -> None:
        if self.active:
            self.writer.add_image(tag, save_grid(images, path), step)

    def close(self) -> None:
        if self.active:
            self.writer.close()


class Periodic:
    """The work between steps: metrics, validation bits/dim, sample/reconstruction grids and checkpoints."""

    def __init__(self, run: Run, data: ImageData, run_dir: Path, progress: bool):
        from tqdm.auto import tqdm

        self.run, self.data, self.run_dir = run, data, run_dir
        self.logger = _Logger(run_dir)
        tc = run.cfg.train
        latent = torch.Generator().manual_seed(run.cfg.seed)
        self.fixed_z = torch.randn(64, run.model.latent_dim, generator=latent).to(run.device)
        self.x_show = (data.x_val if len(data.x_val) >= 32 else data.x_train)[:32].to(run.device)
        self.start_time, self.first_step, self.last_logged = time.monotonic(), run.step, run.step
        self.start_cpu = time.process_time()
        self.last_ckpt: Path | None = None
        self.best_bpd = checkpoint.best_bpd(run_dir)  # of best.pt, kept beside the last checkpoints
        self.stats: dict = {}
        self.quality_on = quality_started(run.cfg, run.step)
        self.bar = tqdm(total=tc.steps, initial=run.step, disable=not (progress and distributed.context().is_main),
                        desc="train", unit="step", dynamic_ncols=True)
        if run.changed:
            self.logger.write(run.step, {"event": "resume", "changed": run.changed})

    def out_of_time(self) -> bool:
        """Whether `train.minutes` of `train.clock` are spent since this invocation started. The process clock
        (CPU time) gives runs that share a machine equal budgets whatever else runs beside them; with one
        thread each (`train.num_threads=1`) it equals the wall-clock time of a run alone on a core."""
        tc = self.run.cfg.train
        spent = time.process_time() - self.start_cpu if tc.clock == "process" else time.monotonic() - self.start_time
        if tc.minutes > 0 and distributed.any_rank(spent > tc.minutes * 60, self.run.device):
            log.info("%s budget of %.1f minutes reached at step %d", "CPU-time" if tc.clock == "process" else
                     "wall-clock", tc.minutes, self.run.step)
            return True
        return False

    def log_stats(self) -> dict:
        """Write the last step's statistics (means over the ranks) and the throughput."""
        run = self.run
        names = sorted(self.stats)
        values = torch.stack([torch.as_tensor(self.stats[k], dtype=torch.float64).to(run.device) for k in names])
        values = distributed.sum_over_ranks(values) / distributed.context().world
        record = dict(zip(names, values.tolist(), strict=True))
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        record["images_per_s"] = (run.step - self.first_step) * run.cfg.train.batch_size / elapsed
        self.logger.write(run.step, record)
        self.last_logged = run.step
        return record

    def after_step(self, stats: dict) -> None:
        run, tc, step = self.run, self.run.cfg.train, self.run.step
        self.stats = stats
        self.bar.update(1)
        if not self.quality_on and quality_started(run.cfg, step):
            log.info("step %d: warm-up over, L_Q switched on", step)
            self.quality_on = True
        if step % tc.log_every == 0 or step == tc.steps:
            run.guard.check()
            record = self.log_stats()
            self.bar.set_postfix({k: f"{record[k]:.3g}" for k in SHOWN if k in record})
        model = run.eval_model
        if isinstance(model, DensityModel) and tc.eval_every > 0 and step % tc.eval_every == 0 and len(self.data.x_val):
            run.guard.check()  # a diverged model is named by its first non-finite loss, not by its bits/dim
            val = sharded_bits_per_dim(model, self.data.x_val, self.data.levels, 0, run.device)
            self.logger.write(step, {"val_bpd_elbo": val["bpd_elbo"]})
            if distributed.main_decides(val["bpd_elbo"] < self.best_bpd, run.device):  # best.pt is rank 0's file
                run.save_best(self.run_dir, val["bpd_elbo"])
                self.best_bpd = val["bpd_elbo"]
        if tc.sample_every > 0 and step % tc.sample_every == 0:
            self.grids()
        if tc.ckpt_every > 0 and step % tc.ckpt_every == 0:
            self.last_ckpt = run.save(self.run_dir)

    def grids(self) -> None:
        """samples-{step}.png from the fixed z and noise seed (progress is watchable); recon-{step}.png."""
        if not distributed.context().is_main:
            return
        model, levels, step = self.run.eval_model, self.data.levels, self.run.step
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same decoder noise at every step
            samples = to_unit(model.sample(len(self.fixed_z), z=self.fixed_z), levels)
            self.logger.image("samples", self.run_dir / f"samples-{step:07d}.png", samples.float().cpu(), step)
            if isinstance(model, DensityModel):
                x = dequantize(self.x_show, levels)
                recon = to_unit(model.reconstruct(x), levels)
                pairs = torch.stack([to_unit(x, levels), recon], 1).flatten(0, 1)  # original, reconstruction
                self.logger.image("reconstructions", self.run_dir / f"recon-{step:07d}.png", pairs.float().cpu(),
                                  step)
        model.train(was_training)


def finish(run: Run, data: ImageData, run_dir: Path, periodic: Periodic) -> nn.Module:
    """Last metrics, checkpoint and grids; export model.safetensors; test bits/dim into results.json."""
    tc, step = run.cfg.train, run.step
    run.guard.check()
    if step != periodic.last_logged and periodic.stats:  # stopped by the time budget between two log steps
        periodic.log_stats()
    if periodic.last_ckpt is None or not periodic.last_ckpt.name.endswith(f"{step:07d}.pt"):
        run.save(run_dir)
    periodic.grids()
    model = run.eval_model
    distributed.check_replicas([run.model, run.disc, run.ema], run.device)
    main = distributed.context().is_main
    if main:
        checkpoint.save_safetensors(run_dir / "model.safetensors", model, run.cfg,
                                    weights="ema" if run.ema is not None else "model", **run.meta)
    if isinstance(model, DensityModel):
        results = sharded_bits_per_dim(model, data.x_test, data.levels, tc.eval_iw_samples, run.device)
        results |= {"split": "test", "step": step, "variant": run.cfg.variant, "data": data.name}
        if main:
            write_json(results, run_dir / "results.json")
        periodic.logger.write(step, {f"test_{k}": v for k, v in results.items() if isinstance(v, float)})
        if run.cfg.variant == "NVP":  # no latent: the ELBO is the likelihood itself
            log.info("test bits/dim: exact %.4f", results["bpd_elbo"])
        else:
            log.info("test bits/dim: ELBO %.4f%s", results["bpd_elbo"],
                     f", IWAE-{tc.eval_iw_samples} {results['bpd_iwae']:.4f}" if tc.eval_iw_samples else "")
    periodic.logger.close()
    return model.eval()


def sharded_bits_per_dim(model: DensityModel, x_int: Tensor, levels: int, num_importance: int,
                         device: torch.device) -> dict:
    """`bits_per_dim` of all of `x_int`, each rank scoring a contiguous share (no padding, no image twice).
    With several ranks the dequantization and importance draws differ from a single process's: rank r scores
    its contiguous share with seed r, and the results say so (`dequantization_seed` [0, 1, ...] and
    `images_per_rank`, in rank order): the same estimator, other noise."""
    ctx = distributed.context()
    if not ctx.distributed:
        return bits_per_dim(model, x_int, levels, num_importance, device=device)
    share = torch.tensor_split(torch.arange(len(x_int)), ctx.world)[ctx.rank]
    part = bits_per_dim(model, x_int[share], levels, num_importance, device=device, seed=ctx.rank) if len(share) \
        else {"bpd_elbo": 0.0, "bpd_iwae": 0.0}
    n = float(len(share))
    sums = distributed.sum_over_ranks(torch.tensor(
        [n * part["bpd_elbo"], n * part.get("bpd_iwae", 0.0), n], dtype=torch.float64, device=device)).tolist()
    result = {"bpd_elbo": sums[0] / sums[2]} | ({"bpd_iwae": sums[1] / sums[2]} if num_importance > 0 else {})
    shares = [len(s) for s in torch.tensor_split(torch.arange(len(x_int)), ctx.world)]
    return result | {"iw_samples": num_importance, "num_images": len(x_int), "ranks": ctx.world,
                     "dequantization_seed": list(range(ctx.world)), "images_per_rank": shares}


def train(cfg: Config, run_dir: str | Path, data: ImageData | None = None, progress: bool = True) -> nn.Module:
    """Train (or resume from the newest checkpoint in run_dir) and return the model used for evaluation
    (the EMA when `train.ema_halflife_kimg > 0`), in eval mode. Under torchrun (WORLD_SIZE > 1) every rank
    calls this; see `cqf.distributed`."""
    check_new_training(cfg)
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        with _deterministic(cfg.train.deterministic):
            model = _train(cfg, run_dir, data, progress)
        distributed.finish(synchronize=True)
        return model
    except BaseException:
        with contextlib.suppress(OSError):  # a run that failed before writing anything leaves no empty folder
            for folder in created:  # (only those made here; rmdir stops at the first that is not empty)
                folder.rmdir()
        raise
    finally:
        distributed.finish()


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """`train.deterministic`: torch's deterministic algorithms (an op without one raises), no cuDNN autotuning,
    cuBLAS's fixed workspace; the previous settings are restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _train(cfg: Config, run_dir: Path, data: ImageData | None, progress: bool) -> nn.Module:
    data = data if data is not None else load_dataset(cfg.data.name, cfg.data.root, cfg.data.val_size,
                                                      cfg.data.image_size)
    num_train = len(data.x_train)  # a batch is at most the training set
    distributed.check_global_batches(batch_size=min(cfg.train.batch_size, num_train),
                                     quality_batch_size=min(cfg.train.quality_batch, num_train))
    ctx, device = distributed.init_from_env(cfg.train.device)
    run = build_run(cfg, data, run_dir, device)
    if not distributed.same_on_all_ranks(run.step, run.device):
        raise TrainingError(f"rank {ctx.rank} resumed at step {run.step}, not at the step of every other rank: the "
                            "run directory must be one folder that every machine sees (shared storage)")
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    periodic = Periodic(run, data, run_dir, progress)
    run.model.train()
    try:
        while run.step < cfg.train.steps and not periodic.out_of_time():
            periodic.after_step(training_step(run, data))
    finally:
        periodic.bar.close()
    return finish(run, data, run_dir, periodic)
