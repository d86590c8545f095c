"""Downstream evaluation on BigEarthNet-MM: linear probing and fine-tuning from any pretrained encoder.

The modules, as the data flows::

    pretrained    eval.pretrained (ZeRO checkpoint of any stage, export, `none`) -> an encoder,
                  checked against the shards
    data          the three splits: manifests, one-pass loaders, training-split normalisation,
                  outputs gathered over ranks and sorted by key, the split caches
    subset        the label fraction: a seeded stratified subset chosen from the training labels
                  sorted by key (the same for any world size); only its samples' bytes are read
    linear_probe  frozen encoder, cached features, a linear head
    finetune      encoder + head under DDP, layer-wise lr decay, checkpoints and resume
    head, optim   the classification head and its loss; optimizers and schedules
    metrics       mAP macro / micro, F1, per-class AP (scikit-learn's definitions)
    run           `evaluate(cfg)`: one run, results.json and a table

Model selection is the epoch with the best validation macro mAP; its weights give the test
numbers. Images of every split are normalised with the *training split's* statistics.
"""

from launch.evaluation.data import MemoryCache
from launch.evaluation.run import evaluate, results_document

__all__ = ["MemoryCache", "evaluate", "results_document"]
