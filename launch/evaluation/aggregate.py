"""Results over seeds: many ``results.json`` into one table per pretrained checkpoint.

    python -m launch.evaluation.aggregate 'runs/eval/**/results.json' --out runs/eval/summary

Runs are grouped by what they evaluated and how: the pretrained weights (their sha256), protocol,
label fraction, pooled feature, epochs, learning rate, batch size and image size. Within a group each
seed appears once (a repeated seed is an error: the same run twice would narrow the spread); the
metrics are given as mean and sample standard deviation (ddof 1) over the seeds. Writes
``results.md`` (a markdown table per checkpoint, rows comparable across a sweep) and ``summary.json``.
Inputs are paths, folders holding ``results.json``, globs, or any fsspec URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

import fsspec
import numpy as np

from launch.evaluation.run import RESULTS
from pipeline.storage import redact_url, url_to_fs, write_bytes_atomic

METRICS = ("map_macro", "map_micro", "f1_macro", "f1", "accuracy")
"""Top-level metrics of a results document that are aggregated, where present."""
SUMMARY = "summary.json"
GROUP_KEYS = ("protocol", "label_fraction", "pool", "epochs", "lr", "batch_size", "image_size")


class AggregateError(ValueError):
    """The inputs cannot be aggregated (none found, unreadable, or a seed repeated)."""


def find_results(inputs: Iterable[str]) -> list[str]:
    """Every results.json named by ``inputs`` (files, folders, globs, URLs), sorted, without repeats."""
    found: set[str] = set()
    for item in inputs:
        fs, path = url_to_fs(item)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(c in path for c in "*?["):
            matches = fs.glob(path)
        elif fs.isdir(path):
            matches = fs.glob(f"{path.rstrip('/')}/**/{RESULTS}") + fs.glob(f"{path.rstrip('/')}/{RESULTS}")
        elif fs.exists(path):
            matches = [path]
        else:
            raise AggregateError(f"{redact_url(item)}: not found")
        found.update(prefix + m for m in matches if m.rsplit("/", 1)[-1] == RESULTS)
    if not found:
        raise AggregateError(f"no {RESULTS} under {', '.join(redact_url(i) for i in inputs)}")
    return sorted(found)


def _read(url: str) -> dict[str, Any]:
    try:
        with fsspec.open(url, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise AggregateError(f"{redact_url(url)}: not a readable results document ({err})") from err
    if "settings" not in doc or not any(k in doc for k in METRICS):
        raise AggregateError(f"{redact_url(url)}: not a results document of launch.eval (no settings / metrics)")
    return doc


def group_key(doc: dict[str, Any]) -> tuple:
    s = doc["settings"]
    info = s.get("pretrained_info") or {}
    return (s.get("pretrained"), info.get("weights_sha256"), *(s.get(k) for k in GROUP_KEYS))


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "values": [float(v) for v in arr]}


def aggregate(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of ``docs`` (url -> results document), sorted by checkpoint, protocol, fraction."""
    groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for url, doc in docs.items():
        groups[group_key(doc)].append((url, doc))
    rows = []
    for key, members in groups.items():
        seeds: dict[int, str] = {}
        for url, doc in members:
            seed = int(doc["settings"]["seed"])
            if seed in seeds:
                raise AggregateError(f"seed {seed} appears twice for the same evaluation: {redact_url(seeds[seed])} "
                                     f"and {redact_url(url)}; aggregate each sweep separately")
            seeds[seed] = url
        members.sort(key=lambda m: int(m[1]["settings"]["seed"]))
        first = members[0][1]["settings"]
        info = first.get("pretrained_info") or {}
        row: dict[str, Any] = {
            "pretrained": first.get("pretrained"), "step": info.get("step"),
            "weights_sha256": info.get("weights_sha256"),
            **{k: first.get(k) for k in GROUP_KEYS},
            "seeds": [int(m[1]["settings"]["seed"]) for m in members],
            "runs": [redact_url(m[0]) for m in members],
        }
        for metric in METRICS:
            if all(metric in m[1] and m[1][metric] is not None for m in members):
                row[metric] = _stats([m[1][metric] for m in members])
        rows.append(row)
    rows.sort(key=lambda r: (str(r["pretrained"]), str(r["weights_sha256"]), str(r["protocol"]),
                             float(r["label_fraction"] or 0), str(r["pool"])))
    return rows


def _cell(stat: Optional[dict[str, Any]]) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.4f}" if stat["std"] is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table per pretrained checkpoint; metrics as mean ± standard deviation over the seeds."""
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    out = ["# Evaluation results, mean ± standard deviation over seeds\n"]
    by_ckpt: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ckpt[(r["pretrained"], r["weights_sha256"])].append(r)
    for (source, digest), group in by_ckpt.items():
        step = group[0]["step"]
        out.append(f"## {source}" + (f" (step {step})" if step is not None else "")
                   + (f", weights {digest[:12]}" if digest else "") + "\n")
        out.append("| protocol | labels | pool | seeds | " + " | ".join(metrics) + " |")
        out.append("|---|---|---|---|" + "---|" * len(metrics))
        for r in group:
            frac = r["label_fraction"]
            labels = f"{frac:.0%}" if isinstance(frac, (int, float)) and frac >= 0.01 else str(frac)
            out.append(f"| {r['protocol']} | {labels} | {r['pool']} | {len(r['seeds'])} | "
                       + " | ".join(_cell(r.get(m)) for m in metrics) + " |")
        out.append("")
    return "\n".join(out)


def write_summary(rows: list[dict[str, Any]], out: str) -> tuple[str, str]:
    """``<out>/results.md`` and ``<out>/summary.json`` (atomically; not named results.json, so that a glob
    over a sweep's runs never takes a summary for a run); their URLs."""
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    md, js = f"{root.rstrip('/')}/results.md", f"{root.rstrip('/')}/{SUMMARY}"
    write_bytes_atomic(fs, md, markdown(rows).encode())
    write_bytes_atomic(fs, js, json.dumps({"rows": rows}, indent=1).encode())
    return md, js


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.evaluation.aggregate",
                                description="Aggregate launch.eval results over seeds into results.md and summary.json.")
    p.add_argument("inputs", nargs="+", help="results.json files, folders holding them, globs or fsspec URLs")
    p.add_argument("--out", required=True, help="folder for results.md and summary.json")
    args = p.parse_args(argv)
    try:
        urls = find_results(args.inputs)
        rows = aggregate({u: _read(u) for u in urls})
    except AggregateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    md, js = write_summary(rows, args.out)
    print(markdown(rows))
    print(f"{len(urls)} run(s) in {len(rows)} row(s); written to {md} and {js}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
