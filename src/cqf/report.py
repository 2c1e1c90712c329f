"""Reports: one evaluation as a table (`cqf eval`), and the paper's Table 1 layout over several runs with a
BPD-vs-FID plot (`cqf report`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CQFError

__all__ = ["bpd_fid_plot", "collect", "format_table", "markdown_table", "write_json", "write_report"]

COLUMNS = [("variant", "variant"), ("bpd", "BPD"), ("bpd_iwae", "BPD IWAE"), ("is", "IS"), ("fid", "FID"),
           ("kid", "KID"), ("precision", "precision"), ("recall", "recall"), ("density", "density"),
           ("coverage", "coverage")]


def format_table(result: dict) -> str:
    """The result of `cqf.evaluate.evaluate` as a two-column Markdown table, then notes and what could not be
    computed and why: one line per reason, listing every metric it holds back. A reason that is also the
    result's `error` is left to the caller, which reports it once."""
    protocol, bpd, scored = result["protocol"], result.get("bits_per_dim"), result["metrics"]
    generated, reference = protocol["generated"], protocol["reference"]
    rows = [("source", f"{generated['source']} ({generated.get('variant', generated['kind'])})")]
    if bpd is not None:
        mark = " (approximate, GAN *)" if bpd.get("approximate") else ""
        exact = bpd.get("estimators", "").startswith("exact")  # the NVP baseline: no bound, the likelihood
        rows.append((f"bits/dim {bpd['split']}, {'exact' if exact else 'ELBO'}{mark}", f"{bpd['bpd_elbo']:.4f}"))
        if "bpd_iwae" in bpd and not exact:
            rows.append((f"bits/dim {bpd['split']}, IWAE-{bpd['iw_samples']}{mark}", f"{bpd['bpd_iwae']:.4f}"))
    names = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS", "precision": "precision", "recall": "recall",
             "density": "density", "coverage": "coverage"}
    for key, label in names.items():
        if key in scored:
            value = f"{scored[key]:.4f}"
            if key in ("kid_mean", "is_mean"):
                value += f" ± {scored[key.replace('mean', 'std')]:.4f}"
            rows.append((label, value))
    if "extractor" in protocol:
        rows.append(("generated / reference", f"{generated['num_images']} / {reference['num_images']} "
                     f"({reference['data']} {reference['split']})"))
        extractor = protocol["extractor"]
        rows.append(("features", f"{extractor['name']} sha256 {extractor['weights_sha256'][:12]}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    if protocol.get("note"):
        lines.append(f"note: {protocol['note']}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    by_reason: dict[str, list[str]] = {}
    for metric, why in result.get("unavailable", {}).items():
        by_reason.setdefault(why, []).append(metric)
    lines += [f"unavailable: {', '.join(ms)}: {why}" for why, ms in by_reason.items() if why != result.get("error")]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    """The result as indented JSON, written atomically."""
    from .files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))


def collect(run_dir: Path) -> dict:
    """One row from a run directory: eval.json (cqf eval) and/or results.json (cqf train's test bits/dim)."""
    run_dir = Path(run_dir)
    row = {"run": run_dir.name}
    results, evaluation = run_dir / "results.json", run_dir / "eval.json"
    if not results.is_file() and not evaluation.is_file():
        raise CQFError(f"{run_dir} has neither eval.json nor results.json; run `cqf eval {run_dir}/model.safetensors`")
    if results.is_file():
        r = json.loads(results.read_text())
        row |= {"variant": r.get("variant"), "bpd": r.get("bpd_elbo"), "bpd_iwae": r.get("bpd_iwae")}
    if evaluation.is_file():
        e = json.loads(evaluation.read_text())
        row["variant"] = e["protocol"]["generated"].get("variant", row.get("variant"))
        if e["protocol"].get("temperature", 1.0) != 1.0:  # a tempered model (cqf eval --temperature), not the run's
            row["variant"] = f"{row['variant']} at T={e['protocol']['temperature']:g}"
        bpd = e.get("bits_per_dim")
        if bpd:
            row |= {"bpd": bpd["bpd_elbo"], "bpd_iwae": bpd.get("bpd_iwae"), "bpd_approximate": bpd.get("approximate")}
        m = e.get("metrics", {})
        row |= {"is": m.get("is_mean"), "fid": m.get("fid"), "kid": m.get("kid_mean"), "precision": m.get("precision"),
                "recall": m.get("recall"), "density": m.get("density"), "coverage": m.get("coverage")}
        row["protocol"] = e["protocol"]
    return row


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.4f}" if key in ("kid",) else f"{value:.3f}"
        return text + (" (*)" if key.startswith("bpd") and row.get("bpd_approximate") else "")
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    header = "| run | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join([row["run"]] + [_cell(row, key) for key, _ in COLUMNS]) + " |" for row in rows]
    if any(row.get("bpd_approximate") for row in rows):
        lines.append("\n(*) GAN: approximate bound (frozen generator, fitted encoder and isotropic sigma).")
    protocols = {json.dumps({k: v for k, v in row["protocol"].items() if k != "generated"}, sort_keys=True)
                 for row in rows if "protocol" in row}
    if len(protocols) > 1:
        lines.append("\nwarning: the runs were evaluated under different protocols (reference, counts or features).")
    return "\n".join(lines)


def bpd_fid_plot(out: Path, points: list[tuple[str, float, float, bool]]) -> Path:
    """BPD against FID, one labelled point per (label, bpd, fid, bpd_is_approximate); x marks approximate BPD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, bpd, fid, approximate in points:
        ax.scatter(bpd, fid, marker="x" if approximate else "o")
        ax.annotate(label, (bpd, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits/dim (test ELBO; x = approximate)")
    ax.set_ylabel("FID")
    ax.set_title("coverage (BPD) vs quality (FID): lower-left is better")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(run_dirs: list[Path], out: Path) -> tuple[str, Path]:
    """report.md and bpd_fid.png (one labelled point per run with both numbers) in `out`."""
    rows = [collect(r) for r in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "report.md").write_text(table + "\n")
    plot = bpd_fid_plot(out / "bpd_fid.png", [(row.get("variant") or row["run"], row["bpd"], row["fid"],
                                               bool(row.get("bpd_approximate"))) for row in rows
                                              if row.get("bpd") is not None and row.get("fid") is not None])
    return table, plot
