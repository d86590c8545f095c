"""Entry points run by `deepspeed`, `torchrun`, `ray submit`, and the shared config schema."""
