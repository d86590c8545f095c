"""The pretraining run: the `Trainer` loop, its schedule, checkpoints, metrics, pictures and the encoder export."""
