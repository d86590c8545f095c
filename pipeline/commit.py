"""The commit point of a split: what is already committed in the output, and committing a finished set.

``manifest.json`` is written last and its presence commits the shard set. Before a job
starts, `check_output` decides from it whether there is anything to do; after the shard
tasks, `commit_split` combines their records in shard order (the same bytes whatever
order the tasks finished in), checks that every input is accounted for, and writes the
quarantine report and then the manifest; a split that wrote no sample gets the report
and no manifest, and stops the job with the quarantine reasons counted.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from typing import Any, Optional

from pipeline.index import index_table, write_index
from pipeline.job import QUARANTINE, STAGING_PREFIX, PreprocessError, PreprocessSettings
from pipeline.manifest import MANIFEST, Manifest, ManifestError, read_committed
from pipeline.plan import SplitPlan
from pipeline.sources import Source
from pipeline.stats import BandMoments
from pipeline.workers import ShardPhase, ray_cluster
from pipeline.storage import (
    check_writable,
    is_local,
    join,
    redact_argv,
    redact_url,
    retrying,
    sha256_remote,
    url_to_fs,
    write_bytes_atomic,
)

STATS_NOTE = "float64 mean and population std over every valid pixel (finite, not no-data) of every written sample"


def check_output(settings: PreprocessSettings, split: str, out_url: str) -> Optional[dict[str, Any]]:
    """The committed manifest's body when ``out_url`` already holds this job's set of ``split``.

    Otherwise None, with the output made ready: a set committed with different settings is
    uncommitted (only with ``overwrite``; else PreprocessError), the folder is checked
    writable and staging folders a killed run left are removed."""
    fs, root = url_to_fs(out_url, settings.storage_options)
    try:
        existing = read_committed(out_url, settings.storage_options)
    except ManifestError as err:  # whatever it is, it is not this job's set
        if not settings.overwrite:
            raise PreprocessError(f"{err}; choose another --output or pass --overwrite") from err
        existing = {}
    if existing is not None and existing.get("fingerprint") == settings.job_fingerprint(split):
        damaged = damaged_shards(fs, root, existing, settings.verify_existing)
        if not damaged:
            print(f"[{split}] {redact_url(out_url)} already holds a complete shard set for this invocation "
                  f"({existing['totals']['samples']} samples in {existing['totals']['shards']} shards, "
                  f"checked by {settings.verify_existing}); nothing to do.")
            return existing
        # Uncommit, then rebuild: the progress records' own checks redo exactly the damaged shards.
        print(f"[{split}] {redact_url(out_url)}: the committed set has {len(damaged)} damaged or missing "
              f"shard(s) ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}); rebuilding them")
        retrying(fs.rm_file)(f"{root}/{MANIFEST}")
    elif existing is not None:
        if not settings.overwrite:
            raise PreprocessError(
                f"{redact_url(out_url)} already holds a shard set made with different settings; "
                "choose another --output or pass --overwrite"
            )
        retrying(fs.rm_file)(f"{root}/{MANIFEST}")  # the old set is no longer committed from here on
    check_writable(fs, root)
    if is_local(fs):  # staging folders of shards a killed run was still writing (the lease makes them ours)
        for stale in fs.glob(f"{root}/{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    return None


def damaged_shards(fs: Any, root: str, manifest: dict[str, Any], verify: str) -> list[str]:
    """Names of the committed shards whose size (and, with ``verify`` 'sha256', content) no longer matches."""
    bad = []
    for shard in manifest.get("shards", []):
        path = f"{root}/{shard['name']}"
        try:
            ok = retrying(fs.size)(path) == shard["bytes"] and (verify != "sha256" or sha256_remote(fs, path) == shard["sha256"])
        except FileNotFoundError:
            ok = False
        if not ok:
            bad.append(shard["name"])
    return bad


def commit_split(settings: PreprocessSettings, plan: SplitPlan, records: dict[int, dict[str, Any]],
                 source: Source, out_url: str, phase: Optional[ShardPhase] = None) -> Manifest:
    """Write the quarantine report and the manifest of a split whose every shard has a record; returns the manifest.

    ``phase``, how this run's shard tasks went, goes into the manifest's ``run`` section with the planning time."""
    fs, root = url_to_fs(out_url, settings.storage_options)
    ordered = [records[task.index] for task in plan.tasks]
    rejections = [r.to_dict() for r in plan.rejections] + [rj for rec in ordered for rj in rec["rejections"]]
    published = [rec for rec in ordered if rec["samples"]]
    n_written = sum(rec["samples"] for rec in published)
    if n_written + len(rejections) != plan.input_samples:  # every input is accounted for, or the job must not commit
        raise PreprocessError(f"[{plan.split}] internal accounting error: {plan.input_samples} inputs, "
                              f"{n_written} written, {len(rejections)} quarantined")
    quarantine = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejections).encode()
    write_bytes_atomic(fs, f"{root}/{QUARANTINE}", quarantine)
    if n_written == 0:  # a set without samples is a failed run, not a finished one: no manifest
        raise PreprocessError(empty_run_message(plan, rejections, join(out_url, QUARANTINE)))
    table = index_table(published)
    index = write_index(fs, root, table) if table is not None and published else None

    manifest = Manifest.build(
        split=plan.split, source=source.describe(), settings=plan.content, job_fingerprint=plan.job_fingerprint,
        shards=published, input_samples=plan.input_samples, quarantined=len(rejections),
        image_size=next((rec["shape"] for rec in published), ()),
        modalities=modalities(source, next((rec["dtypes"] for rec in published), {})),
        stats=combined_stats(source, ordered),
        # Everything outside `run` is deterministic; `run` describes this particular execution.
        run={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": redact_argv(sys.argv),
             "workers": settings.workers, "seconds": round(time.time() - plan.started, 3), **ray_cluster(),
             **({"plan_seconds": round(plan.planned - plan.started, 3)} if plan.planned is not None else {}),
             **(phase.as_run() if phase is not None else {})},
        index=index,
    )
    manifest.write(out_url, settings.storage_options)
    if settings.overwrite:  # shards of an older, different plan that this one did not rewrite
        keep = {rec["name"] for rec in published}
        for path in retrying(fs.glob)(f"{root}/{plan.split}-*.tar"):
            if path.rsplit("/", 1)[-1] not in keep:
                retrying(fs.rm_file)(path)
    print(f"[{plan.split}] wrote {n_written} samples in {len(published)} shards, quarantined {len(rejections)}, "
          f"manifest {redact_url(join(out_url, MANIFEST))}")
    return manifest


def empty_run_message(plan: SplitPlan, rejections: list[dict[str, Any]], report_url: str) -> str:
    """Why a split wrote nothing: every input quarantined, the reasons counted (most frequent first)."""
    counts = Counter(r["reason"] for r in rejections)
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"[{plan.split}] no sample written: all {plan.input_samples} input samples were quarantined "
            f"({reasons}); see {redact_url(report_url)}")


def combined_stats(source: Source, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-band statistics of the shard records, merged in the given (shard) order."""
    s1 = BandMoments.zeros(len(source.s1_bands))
    s2 = BandMoments.zeros(len(source.s2_bands))
    for rec in records:
        s1 = s1.merge(BandMoments.from_dict(rec["stats"]["s1"]))
        s2 = s2.merge(BandMoments.from_dict(rec["stats"]["s2"]))
    return {"s1": s1.summary(list(source.s1_bands)), "s2": s2.summary(list(source.s2_bands)), "note": STATS_NOTE}


def modalities(source: Source, dtypes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The manifest's description of the stored arrays; ``dtypes`` as the shards recorded them (empty: none written)."""
    nodata = source.nodata()
    return {
        "s1": {"bands": list(source.s1_bands), "dtype": dtypes.get("s1"), "units": "backscatter dB",
               "nodata": nodata["s1"], "member": "s1.npy", "layout": "(bands, H, W)"},
        "s2": {"bands": list(source.s2_bands), "dtype": dtypes.get("s2"), "units": "reflectance x 10000",
               "nodata": nodata["s2"], "member": "s2.npy", "layout": "(bands, H, W)"},
    }
