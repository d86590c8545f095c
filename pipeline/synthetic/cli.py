"""Small, realistic Sentinel-1/Sentinel-2 archives in the published file layouts.

The command line of :mod:`pipeline.synthetic` (the first line above is its description)::

    python -m pipeline.synthetic {ssl4eo-zarr,ssl4eo-tiff,bigearthnet} OUTDIR [--n N] [--size S] [--seed K]
"""

from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.synthetic.bigearthnet import make_bigearthnet
from pipeline.synthetic.ssl4eo_tiff import make_ssl4eo_tiff
from pipeline.synthetic.ssl4eo_zarr import make_ssl4eo_zarr


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("ssl4eo-zarr", "ssl4eo-tiff", "bigearthnet"))
    parser.add_argument("outdir")
    parser.add_argument("--n", type=int, default=None,
                        help="ssl4eo-zarr: samples per file (4); ssl4eo-tiff: locations (3); bigearthnet: patches (12)")
    parser.add_argument("--size", type=int, default=None, help="pixels per side at 10 m (264, 264, 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-files", type=int, default=2, help="ssl4eo-zarr: files in the train split")
    parser.add_argument("--val-files", type=int, default=1, help="ssl4eo-zarr: files in the val split")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the archive named by ``argv`` (default: the command line); returns the writer's summary."""
    args = _parser().parse_args(argv)
    kw = {"seed": args.seed}
    if args.size is not None:
        kw["size"] = args.size
    if args.kind == "ssl4eo-zarr":
        if args.n is not None:
            kw["samples_per_file"] = args.n
        out = make_ssl4eo_zarr(args.outdir, splits={"train": args.train_files, "val": args.val_files}, **kw)
        count = sum(len(s) for sp in out["splits"].values() for s in sp["samples"])
        print(f"wrote {count} locations x {len(out['products'])} products under {args.outdir}")
    elif args.kind == "ssl4eo-tiff":
        if args.n is not None:
            kw["n_locations"] = args.n
        out = make_ssl4eo_tiff(args.outdir, **kw)
        print(f"wrote {len(out['locations'])} locations under {args.outdir}")
    else:
        if args.n is not None:
            kw["n_patches"] = args.n
        out = make_bigearthnet(args.outdir, **kw)
        print(f"wrote {len(out['patches'])} patches under {args.outdir}")
    return out
