"""launch/train.py with a memory probe: what each rank holds of the model states under ZeRO.

Run by bench/bench_zero_memory.py as ``deepspeed --num_gpus N bench/_zero_probe.py --out DIR
--config ... key=value ...``. It trains like launch/train.py; on the last step, after the
backward and before the optimizer step (when gradients, parameters, fp32 master weights
and Adam moments are all alive), every rank walks its engine and optimizer and counts the
bytes of every tensor storage it holds, each storage once, by role:

- params: the module's parameters as the forward uses them (ZeRO-3: this rank's partition);
- grads: the parameters' ``.grad`` and the gradient buffers the ZeRO optimizer keeps;
- master: the fp32 copies of the weights the torch optimizer updates (if distinct from params);
- optim: the torch optimizer's state (Adam's exp_avg, exp_avg_sq, step);
- other: any other tensor the engine or optimizer holds (communication buffers, ...).

It also records the process's peak resident memory (ru_maxrss) and, on a GPU,
torch.cuda.max_memory_allocated; each rank writes ``DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROLES = ("params", "grads", "master", "optim", "other")


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of the memory behind ``t``: views of one buffer share it."""
    s = t.untyped_storage()
    return (s.data_ptr() or id(s), s.nbytes())


def _tensors(obj: Any, path: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts, with its path.
    Modules are not entered (their parameters are counted from the model); neither are objects
    from outside torch and DeepSpeed (process groups, loggers, the config)."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if isinstance(obj, torch.nn.Parameter) and getattr(obj, "ds_tensor", None) is not None:
            yield path + ".ds_tensor", obj.ds_tensor
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            if isinstance(k, torch.Tensor):  # torch optimizers key their state by parameter
                yield from _tensors(k, f"{path}[param]", seen, depth + 1)
            yield from _tensors(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", seen, depth + 1)
    elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch") and hasattr(obj, "__dict__"):
        for k, v in list(vars(obj).items()):
            yield from _tensors(v, f"{path}.{k}", seen, depth + 1)


def _inner_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside DeepSpeed's wrappers (the ones whose state is Adam's)."""
    found, todo, seen = [], [opt], set()
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.optim.Optimizer) and type(o).__module__.startswith("torch.optim"):
            found.append(o)
        todo.extend(getattr(o, name, None) for name in ("optimizer", "base_optimizer", "optim"))
    return found


def model_state_bytes(engine, optimizer) -> dict[str, Any]:
    """Bytes this rank holds, by role; each storage counted once, in the order of ROLES."""
    counted: dict[tuple[int, int], str] = {}
    detail: dict[str, dict[str, int]] = {r: {} for r in ROLES}

    def count(role: str, where: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        key = _storage(t)
        if key[1] == 0 or key in counted:
            return
        counted[key] = role
        detail[role][where] = detail[role].get(where, 0) + key[1]

    module = engine.module
    for name, p in module.named_parameters():
        ds = getattr(p, "ds_tensor", None)
        count("params", "module parameters" + (" (ZeRO-3 partition)" if ds is not None else ""),
              ds if ds is not None else p)
        if ds is not None and p.numel() > 0:  # gathered and not yet released
            count("params", "module parameters (gathered)", p)
    inner = _inner_optimizers(optimizer)
    for opt in inner:
        for state in opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    count("optim", f"torch optimizer state {k}", v)
        # The weights it updates: its param groups, and the keys of its state (ZeRO-3 swaps the
        # groups' tensors in and out around the step; the state keeps the fp32 partitions).
        for group in opt.param_groups:
            for p in group["params"]:
                count("master", "torch optimizer params", p)
        for p in opt.state:
            if isinstance(p, torch.Tensor):
                count("master", "torch optimizer params", p)
    for name, p in module.named_parameters():
        if p.grad is not None:
            count("grads", "module parameters .grad", p.grad)
    for opt in inner:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    count("grads", "torch optimizer params .grad", p.grad)
    seen: set[int] = set()
    # The engine is a Module (not entered by _tensors): walk its own attributes, not its submodules.
    engine_attrs = {k: v for k, v in vars(engine).items() if k not in ("_modules", "_parameters", "_buffers")}
    for root, obj in (("optimizer", optimizer), ("engine", engine_attrs)):
        for path, t in _tensors(obj, root, seen):
            count("grads" if "grad" in path.lower() else "other", path.split("[")[0], t)
    totals = {r: sum(detail[r].values()) for r in ROLES}
    totals["total"] = sum(totals.values())
    return {"bytes": totals, "detail": detail}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder for rank<r>.json")
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from launch.config import load_config
    from launch.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    stop = cfg.train.max_steps if cfg.train.stop_at_step is None else min(cfg.train.stop_at_step, cfg.train.max_steps)
    report: dict[str, Any] = {}
    engine_step = trainer.engine.step

    def probed_step(*a, **kw):
        if trainer.step + 1 == stop and "after_backward" not in report:  # the last step's optimizer step
            report["after_backward"] = model_state_bytes(trainer.engine, trainer.optimizer)
        return engine_step(*a, **kw)

    trainer.engine.step = probed_step  # an instance attribute: the engine's own step is left as it is

    # ZeRO-1/2 allocate their gradient reduction buckets at the start of each backward and free
    # them at its end: transient, so the probe above misses them; measure them as they are made.
    setup_buckets = getattr(trainer.optimizer, "setup_buckets", None)
    if setup_buckets is not None:
        def probed_setup_buckets(*a, **kw):
            out = setup_buckets(*a, **kw)
            found = {_storage(t) for _, t in _tensors(getattr(trainer.optimizer, "ipg_buckets", {}), "", set())}
            report["reduce_buckets_bytes"] = max(report.get("reduce_buckets_bytes", 0), sum(n for _, n in found))
            return out

        trainer.optimizer.setup_buckets = probed_setup_buckets
    trainer.train()
    report["after_step"] = model_state_bytes(trainer.engine, trainer.optimizer)
    if "reduce_buckets_bytes" not in report:  # ZeRO-3 keeps its buckets: they are among the optimizer's tensors
        report["reduce_buckets_bytes"] = report["after_backward"]["detail"]["other"].get("optimizer.ipg_buckets", 0)
    report.update(
        rank=trainer.rank,
        world_size=trainer.world_size,
        zero_stage=cfg.deepspeed.zero_stage,
        optimizer=type(trainer.optimizer).__name__,
        inner_optimizers=[type(o).__name__ for o in _inner_optimizers(trainer.optimizer)],
        numel=sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters()),
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        rss_bytes=int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"),
    )
    if torch.cuda.is_available():
        report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{trainer.rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
