"""The model card of an exported encoder: README.md, a rendering of its config.json.

`render_card(config)` is a pure function of the config (see `model.hub`), so the card the export writes and the
one ``FusMAEEncoder.save_pretrained`` / ``push_to_hub`` write are the same. It states what a user needs to
feed the encoder correctly: the bands and their order, the units, the no-data values and the normalisation
statistics, and where the weights came from (the shard set and its fingerprint, the step), with the
evaluation results when the export was given them.
"""

from __future__ import annotations

from typing import Any, Mapping

FUSION_TEXT = {
    "xattn": "Fus-MAE early fusion: a two-way cross-attention block (S1 attends to S2 and S2 to S1), then joint "
             "self-attention over the tokens of both modalities",
    "concat": "joint self-attention over the tokens of both modalities from the first block",
    "stack": "one channel-stacked S1 + S2 image (the SatViT / DINO-MM baseline)",
    "s1": "Sentinel-1 only",
    "s2": "Sentinel-2 only",
}
TAGS = ("earth-observation", "remote-sensing", "sentinel-1", "sentinel-2", "masked-autoencoder", "fus-mae",
        "model_hub_mixin", "pytorch_model_hub_mixin")
METRICS = (("map_macro", "mAP macro"), ("map_micro", "mAP micro"), ("f1", "F1 micro"), ("f1_macro", "F1 macro"))


def render_card(config: Mapping[str, Any]) -> str:
    """README.md (YAML front matter + Markdown) for the encoder described by ``config`` (config.json)."""
    m = config.get("model", {})
    parts = [
        _front_matter(),
        f"# Fus-MAE encoder ({m.get('size')}, fusion={m.get('fusion')}, patch {m.get('patch_size')})\n",
        _what_it_is(config),
        _inputs(config),
        _training_data(config),
        _loading(config),
        _evaluation(config),
    ]
    return "\n".join(parts)


def _front_matter() -> str:
    tags = "\n".join(f"- {t}" for t in TAGS)
    return f"---\nlibrary_name: fusmae\npipeline_tag: image-feature-extraction\ntags:\n{tags}\n---\n"


def _what_it_is(config: Mapping[str, Any]) -> str:
    m = config.get("model", {})
    rows = [("preset", m.get("size")), ("width / depth / heads", f"{m.get('embed_dim')} / {m.get('depth')} / "
            f"{m.get('num_heads')}"), ("patch size", f"{m.get('patch_size')} px (10 m grid)"),
            ("fusion", f"`{m.get('fusion')}`: {FUSION_TEXT.get(m.get('fusion'), '?')}"),
            ("pooled features", f"`{m.get('pool')}` ("
             f"{'CLS token' if m.get('pool') == 'cls' else 'mean of all patch tokens'})"),
            ("masking in pretraining", f"{m.get('masking')}, ratio {m.get('mask_ratio')}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return ("## What it is\n\n"
            "The encoder of a masked autoencoder pretrained on co-registered Sentinel-1 SAR and Sentinel-2 "
            "multispectral patches (Fus-MAE: Chan-To-Hing & Veeravalli, IGARSS 2024, arXiv 2401.02764), without "
            "its decoder: a ViT with one patch embedding and one learned modality embedding per modality, a fixed "
            "2-D sin-cos positional embedding and a CLS token.\n\n"
            f"| | |\n|---|---|\n{table}\n")


def _band_table(config: Mapping[str, Any], modality: str) -> str:
    d = config.get("data", {})
    bands = d.get(f"{modality}_bands") or []
    stats = (d.get("normalization") or {}).get(modality) or {}
    mean, std = stats.get("mean") or [None] * len(bands), stats.get("std") or [None] * len(bands)
    rows = "\n".join(f"| {i} | {b} | {_num(mu)} | {_num(sd)} |" for i, (b, mu, sd) in enumerate(zip(bands, mean, std)))
    return f"| channel | band | mean | std |\n|---|---|---|---|\n{rows}\n"


def _inputs(config: Mapping[str, Any]) -> str:
    d = config.get("data", {})
    units = d.get("units") or {}
    nodata = d.get("nodata") or {}
    size = d.get("image_size")
    out = ["## Inputs: bands, order and normalisation\n",
           "Two tensors, channels in exactly this order (the order of the pretraining shards):\n"]
    for m, name in (("s1", "Sentinel-1"), ("s2", "Sentinel-2")):
        out.append(f"**`{m}`: {name}**, (B, {len(d.get(f'{m}_bands') or [])}, H, W), "
                   f"{units.get(m, '?')}, no-data: {nodata.get(m, 'none')}\n\n{_band_table(config, m)}")
    out.append(
        "Normalisation, per band, as in pretraining: invalid pixels (non-finite, or equal to the no-data value) "
        "are set to the band mean, then `x_norm = (x - mean) / max(std, 1e-6)`. The statistics are the exact "
        "means and population standard deviations over every valid pixel of the pretraining shards. "
        "`FusMAEEncoder` applies this itself to raw values (`normalized=False`, the default); pass "
        "`normalized=True` for inputs already normalised this way.\n")
    out.append(f"Input size: pretrained at {size} x {size} px; any H, W divisible by the patch size works "
               "(the positional embedding is computed for the actual grid).\n")
    return "\n".join(out)


def _training_data(config: Mapping[str, Any]) -> str:
    shards = (config.get("data") or {}).get("shards") or {}
    t = config.get("training") or {}
    source = shards.get("source") or {}
    rows = [("shard set", f"`{shards.get('manifest', '?')}` (split `{shards.get('split', '?')}`)"),
            ("source", ", ".join(f"{k}: {v}" for k, v in source.items() if isinstance(v, (str, int, float))) or "?"),
            ("samples", shards.get("samples", "?")),
            ("shard set fingerprint", f"`{shards.get('fingerprint', '?')}` (sha256 of shard names, sizes, checksums)"),
            ("pretraining step", t.get("step", "?")),
            ("checkpoint", f"`{t.get('checkpoint', '?')}`" + (f" ({t['tag']})" if t.get("tag") else ""))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## The data it saw\n\n| | |\n|---|---|\n{table}\n"


def _loading(config: Mapping[str, Any]) -> str:
    d = config.get("data", {})
    depth, size = (config.get("model") or {}).get("depth"), (config.get("model") or {}).get("size")
    return f"""## How to load it

```python
from model import FusMAEEncoder          # the fusmae project: pip install -e <its repository>

enc = FusMAEEncoder.from_pretrained("path/to/this/folder")   # or a Hub id: "org/name"
out = enc(s1, s2)                         # raw: s1 in dB, s2 reflectance x 10000, bands as above
out.pooled                                # (B, D) pooled features
out = enc(s1, s2, return_maps=True)
out.maps                                  # {depth} maps (B, D, H/p, W/p), one per block, the last one normed
enc(s1_norm, s2_norm, normalized=True)    # inputs already normalised as above
```

The weights alone (`model.safetensors`, names as in `FusMAE.encoder_state_dict`) also load into the full
network: `FusMAE(FusMAEConfig(**config["model"])).load_encoder_state_dict(safetensors.torch.load_file(...))`.

**TerraTorch** (`pip install -e .[terratorch]`): the backbone `fusmae` (or `fusmae_{size}`)
with `backbone_pretrained: path/to/this/folder` in a task's `model_args`; it takes `{{"s1": ..., "s2": ...}}` raw
and returns the per-block maps. See `configs/terratorch/` of the project.

**Reading the pretraining shards without this project** (plain `webdataset`):

```python
import webdataset as wds
for s in wds.WebDataset("shards/{d.get('shards', {}).get('split', 'train')}-000000.tar", shardshuffle=False).decode():
    s1, s2, meta = s["s1.npy"], s["s2.npy"], s["json"]   # (2, H, W) dB, (C, H, W) reflectance x 10000
```
"""


def _evaluation(config: Mapping[str, Any]) -> str:
    results = config.get("evaluation") or []
    if not results:
        return ("## Evaluation\n\nNo evaluation results were attached to this export "
                "(`python -m launch.export ... --results results.json` adds those of `launch.eval`).\n")
    head = "| protocol | label fraction | test set | samples | " + " | ".join(n for _, n in METRICS) + " |"
    sep = "|" + "---|" * (4 + len(METRICS))
    rows = [f"| {r.get('protocol')} | {r.get('label_fraction')} | `{r.get('test_manifest', '?')}` | "
            f"{r.get('num_test_samples', '?')} | " + " | ".join(_num(r.get(k)) for k, _ in METRICS) + " |"
            for r in results]
    return ("## Evaluation\n\nBigEarthNet multi-label classification with `launch.eval` (19 classes; mAP over the "
            "classes present in the test split):\n\n" + "\n".join([head, sep, *rows]) + "\n")


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "?" if x is None else str(x)
