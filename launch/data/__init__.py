"""Shards to device batches: where each sample goes (plan), reading shards (reader), the rank's loaders
(loader), and the per-batch augmentation (augment)."""
