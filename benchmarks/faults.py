"""Faults table: bad input, kills, broken checkpoints and a full disk against the installed `cqf` command.

Each case runs `cqf` in a fresh folder and checks what a user must be able to count on: a one-line
`cqf: error: ...` naming the problem, a non-zero exit, and nothing already written lost (the last checkpoint
loads, the run resumes). Prints one Markdown table: case, expected, observed, pass/fail.

    python benchmarks/faults.py                    # about 2 minutes on 2 CPU cores
    python benchmarks/faults.py --keep runs/faults # keep the folders

The full-disk case mounts a small tmpfs and needs root; elsewhere it is reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cqf import checkpoint

TINY = ["train.steps=40", "train.ckpt_every=10", "train.eval_every=0", "train.sample_every=0",
        "train.eval_iw_samples=0", "train.num_threads=1", "train.device=cpu", "train.log_every=10"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def _command(args) -> list[str]:
    """The installed `cqf` with `args` (or `python -m cqf` where the script is not on PATH)."""
    installed = shutil.which("cqf")
    return [installed, *args] if installed else [sys.executable, "-m", "cqf", *args]


def cqf(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = _command(args)
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


def train_args(out: Path, config: str = "digits-cq-f", extra: list[str] = ()) -> list[str]:
    return ["train", config, "--out", str(out), "--quiet", *[a for s in [*TINY, *extra] for a in ("--set", s)]]


def one_line_error(result: subprocess.CompletedProcess, pattern: str) -> tuple[bool, str]:
    """Exit 2 and exactly one `cqf: error:` line that contains `pattern`, no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cqf: error:")]
    ok = (result.returncode == 2 and len(lines) == 1 and pattern.lower() in lines[0].lower()
          and "Traceback" not in result.stderr)
    seen = lines[0] if lines else (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return ok, f"exit {result.returncode}: {seen[:150]}"


def loads(path: Path) -> bool:
    try:
        checkpoint.load(path)
        return True
    except Exception:
        return False


def npz(folder: Path, **arrays) -> str:
    base = {"x_train": np.zeros((40, 8, 8), np.uint8), "y_train": np.zeros(40, np.int64),
            "x_test": np.zeros((10, 8, 8), np.uint8), "y_test": np.zeros(10, np.int64)}
    base |= arrays
    path = folder / "data.npz"
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return f"npz:{path}"


def data_case(pattern: str, **arrays):
    def case(folder: Path):
        name = npz(folder, **arrays) if arrays else pattern.split("|")[1]
        result = cqf(*train_args(folder / "run", "digits-vae", [f"data.name={name}", "data.val_size=5"]))
        return one_line_error(result, pattern.split("|")[0])
    return case


def case_config_unknown_key(folder: Path):
    return one_line_error(cqf(*train_args(folder / "run", extra=["train.learning_rate=1e-3"])), "train.learning_rate")


def case_config_incompatible(folder: Path):
    extra = ["train.coverage_weight=0", "model.flow_couplings=2"]
    return one_line_error(cqf(*train_args(folder / "run", extra=extra)), "GAN")


def config_case(pattern: str, *overrides: str):
    """`cqf train` with bad overrides: exit 2 and one line containing `pattern`."""
    def case(folder: Path):
        return one_line_error(cqf(*train_args(folder / "run", extra=list(overrides))), pattern)
    return case


def case_train_missing_gpu(folder: Path):
    if torch.cuda.is_available():
        return None, "skipped: this machine has a GPU"
    return config_case("no CUDA device", "train.device=cuda")(folder)


def case_eval_missing_gpu(folder: Path):
    if torch.cuda.is_available():
        return None, "skipped: this machine has a GPU"
    return one_line_error(cqf("eval", str(folder / "x.npz"), "--data", "digits", "--device", "cuda"),
                          "no CUDA device")


def case_npz_moved(folder: Path):
    """An npz run resumes after its file moved: the data set is known by its content, not its path."""
    first, moved = folder / "a" / "data.npz", folder / "b" / "data.npz"
    first.parent.mkdir()
    name = npz(first.parent)
    run = folder / "run"
    first_run = cqf(*train_args(run, "digits-vae", [f"data.name={name}", "data.val_size=5", "train.steps=10"]))
    assert first_run.returncode == 0, first_run.stderr[-500:]
    moved.parent.mkdir()
    first.rename(moved)
    result = cqf(*train_args(run, "digits-vae", [f"data.name=npz:{moved}", "data.val_size=5", "train.steps=20"]))
    resumed = result.returncode == 0 and "resuming from" in result.stderr
    return resumed, f"exit {result.returncode}, {'resumed' if resumed else 'NOT resumed'} at ckpt-0000010.pt"


def _trained(folder: Path, extra: list[str] = ()) -> Path:
    run = folder / "run"
    result = cqf(*train_args(run, extra=["train.steps=10", *extra]))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def case_resume_other_shape(folder: Path):
    run = _trained(folder)
    before = sorted(p.name for p in run.glob("ckpt-*.pt"))
    ok, seen = one_line_error(cqf(*train_args(run, extra=["model.channels=16"])), "does not fit")
    kept = sorted(p.name for p in run.glob("ckpt-*.pt")) == before and loads(run / before[-1])
    return ok and kept, seen + ("" if kept else "; checkpoints changed")


def case_resume_other_seed(folder: Path):
    run = _trained(folder)
    return one_line_error(cqf(*train_args(run, extra=["seed=1"])), "other data or seed")


def case_non_finite(folder: Path):
    run = folder / "run"
    result = cqf(*train_args(run, extra=["train.lr=1e12", "train.grad_clip=0", "train.ckpt_every=1",
                                         "train.log_every=1"]))
    ok, seen = one_line_error(result, "non-finite")
    last = checkpoint.latest(run)
    intact = last is None or loads(last)
    return ok and intact, seen + (f"; {last.name} loads" if last and intact else "")


def case_truncated_checkpoint(folder: Path):
    run = _trained(folder)
    path = run / "ckpt-0000010.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return one_line_error(cqf("eval", str(path), "--metrics", "bpd", "-k", "0"), "corrupt, truncated")


def case_foreign_checkpoint(folder: Path):
    path = folder / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    return one_line_error(cqf("eval", str(path), "--metrics", "bpd"), "not a cqf checkpoint")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('CQF_FAULTS_MARKER', '/tmp/cqf-pwned')}",))


def case_pickle_checkpoint(folder: Path):
    marker = folder / "executed"
    os.environ["CQF_FAULTS_MARKER"] = str(marker)
    path = folder / "evil.pt"
    torch.save({"model": _Payload()}, path)
    ok, seen = one_line_error(cqf("eval", str(path), "--metrics", "bpd"), "corrupt")
    return ok and not marker.exists(), seen + ("; payload ran!" if marker.exists() else "; payload not run")


KILL = ["train.steps=300", "train.ckpt_every=25", "train.warmup_steps=20", "train.quality_ramp_steps=20",
        "train.augment=color,translation,cutout", "train.r1_gamma=0.1"]


def _final(run: Path, step: int) -> dict:
    payload = torch.load(run / f"ckpt-{step:07d}.pt", weights_only=True)
    payload.pop("config")
    return payload


def _kill_when(run: Path, args: list[str], ready, sig=signal.SIGKILL) -> tuple[int, str]:
    """Start `cqf ARGS`, send `sig` once `ready()` holds; (exit status, stderr)."""
    command = _command(args)
    log = run.parent / f"{run.name}-{sig.name}.log"  # stderr to a file: a pipe nobody reads could fill up
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + 300
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait()
    return proc.returncode, log.read_text()


def case_sigkill_resume(folder: Path):
    straight, killed = folder / "straight", folder / "killed"
    assert cqf(*train_args(straight, extra=KILL)).returncode == 0
    _kill_when(killed, train_args(killed, extra=KILL), lambda: (killed / "ckpt-0000100.pt").exists())
    at = checkpoint.latest(killed).name
    if (killed / "model.safetensors").exists():
        return False, "the run finished before the kill"
    result = cqf(*train_args(killed, extra=KILL))
    resumed = f"resuming from {killed / at}" in result.stderr
    same = (result.returncode == 0 and resumed
            and checkpoint.first_difference(_final(straight, 300), _final(killed, 300)) is None)
    return same, f"killed at {at}, {'resumed from it' if resumed else 'NOT resumed'}: final state " \
                 f"{'bit-identical' if same else 'DIFFERS'}"


def case_kill_during_save(folder: Path):
    """Kill while a checkpoint is being written (every step saves, so most kills land in a save)."""
    run = folder / "run"
    extra = ["train.ckpt_every=1", "train.keep_checkpoints=2", "train.steps=100000"]
    hits, trials, ok = 0, 5, True
    for _ in range(trials):  # kill as soon as a checkpoint's temporary file is seen (after the first save)
        _kill_when(run, train_args(run, extra=extra), lambda: any(run.glob("ckpt-*.pt")) and any(run.glob("*.tmp")))
        hits += bool(list(run.glob("*.tmp")))
        ok &= loads(checkpoint.latest(run))
    resumed = cqf(*train_args(run, extra=["train.ckpt_every=1", "train.steps=" + str(
        int(checkpoint.latest(run).stem.split("-")[1]) + 2)]))
    ok &= resumed.returncode == 0
    return ok, f"{hits}/{trials} kills left a .tmp (mid-save); newest checkpoint loaded every time; resume exit " \
               f"{resumed.returncode}"


def case_sigint(folder: Path):
    run = folder / "run"
    code, stderr = _kill_when(run, train_args(run, extra=["train.steps=100000"]),
                              lambda: (run / "ckpt-0000010.pt").exists(), signal.SIGINT)
    ok = code == 130 and "last checkpoint in the run directory is intact" in stderr and \
        loads(checkpoint.latest(run))
    return ok, f"exit {code}: {stderr.strip().splitlines()[-1][:120] if stderr.strip() else ''}"


def case_full_disk(folder: Path):
    mount = folder / "small"
    mount.mkdir()
    size = (_trained(folder / "probe") / "ckpt-0000010.pt").stat().st_size
    limit = int(2.6 * size) + 200_000  # two checkpoints and the logs fit; the third write does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        return None, "skipped: mounting a small tmpfs needs root"
    try:
        run = mount / "run"
        result = cqf(*train_args(run, extra=["train.keep_checkpoints=3"]))
        ok, seen = one_line_error(result, "could not write")
        kept = sorted(run.glob("ckpt-*.pt"))
        ok &= bool(kept) and loads(kept[-1]) and not list(run.glob("*.tmp"))
        moved = folder / "moved"
        shutil.copytree(run, moved)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    resumed = cqf(*train_args(moved, extra=["train.keep_checkpoints=3"]))
    ok &= resumed.returncode == 0 and (moved / "model.safetensors").exists()
    return ok, f"{seen}; {kept[-1].name if kept else 'none'} loads; resumed elsewhere: exit {resumed.returncode}"


CASES = [
    ("data: unknown data set", "exit 2, names the choices", data_case("unknown data set|nosuch")),
    ("data: missing npz file", "exit 2, names the path", data_case("not found|npz:/nonexistent/data.npz")),
    ("data: npz images of the wrong shape", "exit 2, names the shape",
     data_case("NHW or NHWC", x_train=np.zeros((40, 64), np.uint8))),
    ("data: npz float images in [0, 1]", "exit 2, asks for uint8",
     data_case("must be uint8", x_train=np.zeros((40, 8, 8), np.float32))),
    ("data: npz without labels", "exit 2, names the arrays", data_case("lacks arrays y_train", y_train=None)),
    ("data: labels and images differ in number", "exit 2", data_case("labels differ", y_train=np.zeros(7, np.int64))),
    ("config: unknown key", "exit 2, names the key", case_config_unknown_key),
    ("config: GAN with a flow", "exit 2, names the conflict", case_config_incompatible),
    ("config: negative learning rate", "exit 2, names the key", config_case("train.lr", "train.lr=-1")),
    ("config: infinite learning rate", "exit 2, names the key", config_case("train.lr", "train.lr=inf")),
    ("config: unknown device (`gpu`)", "exit 2, names the choices", config_case("cuda:N", "train.device=gpu")),
    ("config: CUDA on a machine without one", "exit 2, no traceback", case_train_missing_gpu),
    ("eval: CUDA on a machine without one", "exit 2, no traceback", case_eval_missing_gpu),
    ("config: 2 flow scales without a flow", "exit 2, names the fix",
     config_case("needs a flow", "model.flow_couplings=0", "model.flow_scales=2")),
    ("resume: the npz file moved", "resumes (the data set is its content)", case_npz_moved),
    ("resume: model shape differs", "exit 2, checkpoints untouched", case_resume_other_shape),
    ("resume: other seed", "exit 2, refused", case_resume_other_seed),
    ("training: non-finite loss", "exit 2, names step and term; last checkpoint loads", case_non_finite),
    ("checkpoint: truncated", "exit 2, names it", case_truncated_checkpoint),
    ("checkpoint: foreign file", "exit 2, names it", case_foreign_checkpoint),
    ("checkpoint: pickle with code", "exit 2, the code never runs", case_pickle_checkpoint),
    ("SIGKILL mid-training, resume", "final state bit-identical to an uninterrupted run", case_sigkill_resume),
    ("SIGKILL during checkpoint saves", "newest checkpoint always loads; resume works", case_kill_during_save),
    ("Ctrl-C (SIGINT)", "exit 130, checkpoint intact", case_sigint),
    ("full disk during a save", "exit 2, last checkpoint loads, no partial file, resumes", case_full_disk),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="keep the case folders here")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="cqf-faults-"))
    rows, failed = [], 0
    for i, (name, expected, case) in enumerate(CASES):
        if args.only and args.only not in name:
            continue
        folder = root / f"case{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            ok, observed = case(folder)
        except Exception as err:  # a case that crashes is a failure with its reason
            ok, observed = False, f"{type(err).__name__}: {err}"[:150]
        verdict = "skip" if ok is None else ("pass" if ok else "FAIL")
        failed += verdict == "FAIL"
        rows.append(f"| {name} | {expected} | {observed.replace('|', '/')} | {verdict} |")
        print(f"{verdict:4s} {name} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    print("| case | expected | observed | result |\n|---|---|---|---|\n" + "\n".join(rows))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
