"""The demo's report: loss curves, reconstructions and the probe results as Markdown and HTML."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Optional


def write_report(out: Path, run_dir: Path, base_url: str, ranks: int, timings: list, pretrained: dict,
                 baseline: dict, mirror: bool) -> Path:
    """report.md, report.html, summary.json and the pictures in ``out``; with ``mirror``, a local copy of
    the bucket (the loopback endpoint keeps objects in memory and stops with the demo)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curves = plot_losses(rows, out / "loss_curves.png", resume_step=rows[-1]["step"] // 2)
    recon = sorted(run_dir.glob("reconstruction-step-*.png"))
    if recon:
        shutil.copy(recon[-1], out / "reconstructions.png")
    summary = {
        "store": base_url,
        "shards": {"ssl4eo": f"{base_url}/shards/ssl4eo", "bigearthnet": f"{base_url}/shards/bigearthnet"},
        "checkpoints": f"{base_url}/runs/pretrain",
        "encoder": f"{base_url}/runs/pretrain/encoder",
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "steps": rows[-1]["step"],
        "probe_pretrained": {k: pretrained[k] for k in ("map_macro", "map_micro", "f1")},
        "probe_random_init": {k: baseline[k] for k in ("map_macro", "map_micro", "f1")},
        "stages": [{"stage": n, "seconds": round(s, 1)} for n, s in timings],
    }
    if mirror:
        # The loopback endpoint keeps objects in memory and stops with the demo: keep a copy to look at.
        import s3fs

        mirror = out / "s3-mirror"
        shutil.rmtree(mirror, ignore_errors=True)
        s3fs.S3FileSystem(skip_instance_cache=True).get(base_url, str(mirror), recursive=True)
        summary["s3_mirror"] = str(mirror)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [
        "# Fus-MAE demo report", "",
        f"Object store: `{base_url}`; shards `{summary['shards']['ssl4eo']}`, "
        f"`{summary['shards']['bigearthnet']}`; checkpoints `{summary['checkpoints']}`; "
        f"exported encoder `{summary['encoder']}`."
        + (f" The local S3 endpoint stops with the demo; a copy of the bucket is in `{summary['s3_mirror']}`."
           if "s3_mirror" in summary else ""), "",
        f"Pretraining: {summary['steps']} steps on {ranks} ranks, stopped half-way and resumed from the "
        f"committed checkpoint (resume=auto); loss {summary['loss_first']:.4f} → {summary['loss_last']:.4f}.", "",
        "## BigEarthNet linear probe (test split)", "",
        "| encoder | mAP macro | mAP micro | F1 (micro, 0.5) |", "|---|---:|---:|---:|",
        f"| Fus-MAE pretrained | {pretrained['map_macro']:.4f} | {pretrained['map_micro']:.4f} | {pretrained['f1']:.4f} |",
        f"| random initialisation | {baseline['map_macro']:.4f} | {baseline['map_micro']:.4f} | {baseline['f1']:.4f} |",
        "", "## Loss curves", "", f"![loss curves]({curves.name})", "",
        "## Reconstructions (S2 true colour, S1 VV/VH composite)", "", "![reconstructions](reconstructions.png)", "",
        "## Stages", "", "| stage | seconds |", "|---|---:|",
        *[f"| {n} | {s:.1f} |" for n, s in timings], "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(markdown_to_html(md))
    return out / "report.md"




def plot_losses(rows: list[dict], path: Path, resume_step: Optional[int] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "total"), ("loss_s1", "S1 (SAR)"), ("loss_s2", "S2 (optical)")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    if resume_step is not None:
        ax.axvline(resume_step, color="grey", linestyle=":", label="stop / resume=auto")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (normalised units)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_to_html(lines: list[str]) -> str:
    """The report's few Markdown constructs (headings, tables, images, paragraphs) as one HTML page."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Fus-MAE demo report</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style></head><body>"]
    table: list[list[str]] = []

    def flush():
        if table:
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in table[0]) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in table[2:])
            out.append("</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            out.append(f"<p><img alt='{html.escape(alt)}' src='{html.escape(src.rstrip(')'))}'></p>")
        elif line:
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    out.append("</body></html>")
    return "\n".join(out)
