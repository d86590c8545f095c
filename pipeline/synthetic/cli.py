"""Small, realistic Sentinel-1/Sentinel-2 archives in the published file layouts.

The command line of :mod:`pipeline.synthetic` (the first line above is its description)::

    python -m pipeline.synthetic {ssl4eo-zarr,ssl4eo-wds,terramesh,ssl4eo-tiff,bigearthnet,sen12ms} OUTDIR \\
        [--n N] [--size S] [--seed K]
"""

from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.synthetic.bigearthnet import make_bigearthnet
from pipeline.synthetic.sen12ms import make_sen12ms
from pipeline.synthetic.ssl4eo_tiff import make_ssl4eo_tiff
from pipeline.synthetic.ssl4eo_wds import make_ssl4eo_wds
from pipeline.synthetic.ssl4eo_zarr import make_ssl4eo_zarr
from pipeline.synthetic.terramesh import make_terramesh


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("ssl4eo-zarr", "ssl4eo-wds", "terramesh", "ssl4eo-tiff", "bigearthnet",
                                         "sen12ms"))
    parser.add_argument("outdir")
    parser.add_argument("--n", type=int, default=None,
                        help="ssl4eo-zarr: samples per file (4); ssl4eo-wds, terramesh: locations per tar (3); "
                             "ssl4eo-tiff: locations (3); bigearthnet: patches (12); sen12ms: patches per scene (3)")
    parser.add_argument("--size", type=int, default=None,
                        help="pixels per side at 10 m (264; ssl4eo-wds, terramesh: 48; bigearthnet: 120; sen12ms: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-files", type=int, default=2,
                        help="ssl4eo-zarr: files, ssl4eo-wds: shards, terramesh: shards per subset in train")
    parser.add_argument("--val-files", type=int, default=1, help="the same for the val split")
    return parser


def _ssl4eo_zarr(args, kw: dict) -> dict:
    if args.n is not None:
        kw["samples_per_file"] = args.n
    out = make_ssl4eo_zarr(args.outdir, splits={"train": args.train_files, "val": args.val_files}, **kw)
    count = sum(len(s) for sp in out["splits"].values() for s in sp["samples"])
    print(f"wrote {count} locations x {len(out['products'])} products under {args.outdir}")
    return out


def _wds(args, kw: dict) -> dict:
    if args.n is not None:
        kw["samples_per_shard"] = args.n
    if args.kind == "ssl4eo-wds":
        out = make_ssl4eo_wds(args.outdir, splits={"train": args.train_files, "val": args.val_files}, **kw)
    else:
        splits = {"train": {"majortom": args.train_files, "ssl4eos12": args.train_files},
                  "val": {"majortom": args.val_files, "ssl4eos12": args.val_files}}
        out = make_terramesh(args.outdir, splits=splits, **kw)
    count = sum(len(keys) for sp in out["splits"].values() for keys in sp["members"].values())
    print(f"wrote {count} locations x {len(out['products'])} products under {args.outdir}")
    return out


def _ssl4eo_tiff(args, kw: dict) -> dict:
    if args.n is not None:
        kw["n_locations"] = args.n
    out = make_ssl4eo_tiff(args.outdir, **kw)
    print(f"wrote {len(out['locations'])} locations under {args.outdir}")
    return out


def _bigearthnet(args, kw: dict) -> dict:
    if args.n is not None:
        kw["n_patches"] = args.n
    out = make_bigearthnet(args.outdir, **kw)
    print(f"wrote {len(out['patches'])} patches under {args.outdir}")
    return out


def _sen12ms(args, kw: dict) -> dict:
    if args.n is not None:
        kw["patches_per_scene"] = args.n
    out = make_sen12ms(args.outdir, **kw)
    print(f"wrote {len(out['patches'])} patch triplets under {args.outdir}")
    return out


_WRITERS = {"ssl4eo-zarr": _ssl4eo_zarr, "ssl4eo-wds": _wds, "terramesh": _wds, "ssl4eo-tiff": _ssl4eo_tiff,
            "bigearthnet": _bigearthnet, "sen12ms": _sen12ms}


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the archive named by ``argv`` (default: the command line); returns the writer's summary."""
    args = _parser().parse_args(argv)
    kw = {"seed": args.seed}
    if args.size is not None:
        kw["size"] = args.size
    return _WRITERS[args.kind](args, kw)
