"""Adam's moment estimates across a resize: read from a ZeRO checkpoint of any world size, put into an engine
of another.

A ZeRO-2 or ZeRO-3 checkpoint holds, per old rank, the optimizer state of that rank's flat fp32 partition(s):
torch AdamW's `exp_avg` and `exp_avg_sq` are flat tensors laid out exactly like the fp32 weights of the same
partition (`single_partition_of_fp32_groups` under ZeRO-2, `fp32_flat_groups` under ZeRO-3). So DeepSpeed's
own zero_to_fp32 reconstruction, handed the moments in place of the weights, gives each parameter's whole
moment (ZeRO-3 lazily, one parameter when it is read). That reconstruction and the checkpoint's key names are
DeepSpeed 0.19.8's (pinned in constraints.txt); `ds_to_universal`, the public route, fails on torch AdamW's
state layout.

Into the new engine, one parameter at a time (rank 0 reads it, every rank receives it by broadcast): ZeRO-2
through the parameter's link to its fp32 fragment (`safe_set_full_optimizer_state`, after the optimizer's
states exist: torch creates them lazily at the first step, so they are made here), ZeRO-3 by copying this
rank's slice into its fp32 partition (DeepSpeed's own setter reads past the end of an unevenly split
parameter on the last rank). Adam's step count comes along, so the bias correction continues where it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


def read_moments(ds_dir: Path) -> tuple[dict[str, dict[str, Any]], float]:
    """Rank 0: {key: {parameter name: whole moment (a tensor, or ZeRO-3's lazy GatheredTensor)}} of the
    trainable parameters in checkpoint folder `ds_dir`, and Adam's step count."""
    import torch
    from deepspeed.utils import zero_to_fp32

    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(ds_dir)))
    files = zero_to_fp32.get_optim_files(str(ds_dir))
    saved = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"] for f in files]
    stage = int(saved[0]["zero_stage"])
    inner = [s["base_optimizer_state" if stage <= 2 else "optimizer_state_dict"] for s in saved]
    step = float(_step(inner[0]))
    trainable = {name for shapes in model_states[0].param_shapes for name in shapes}
    moments: dict[str, dict[str, Any]] = {}
    for key in MOMENTS:
        # Per old rank, the moment of each flat group, in the groups' order (one flat tensor per group).
        flat = [[opt["state"][group["params"][0]][key] for group in opt["param_groups"]] for opt in inner]
        if stage <= 2:
            whole = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                len(files), flat, model_states, True, saved[0].get("param_alignment_paddings")
            )
        else:
            whole = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(len(files), flat, model_states, True)
        moments[key] = {name: value for name, value in whole.items() if name in trainable}
    return moments, step


def _step(optimizer_state: dict[str, Any]) -> Any:
    first = optimizer_state["param_groups"][0]["params"][0]
    value = optimizer_state["state"][first]["step"]
    return value.item() if hasattr(value, "item") else value


def load_moments(
    engine: Any, moments: dict[str, dict[str, Any]], names: list[str], step: float, *, rank: int, world: int
) -> None:
    """Every rank: the whole moments of trainable parameters `names` (rank 0's `moments`; empty elsewhere) into
    this engine's optimizer partitions, and the step count into every partition's state. A collective."""
    import torch
    import torch.distributed as dist

    optimizer = engine.optimizer
    _create_states(optimizer, step)
    params = dict(engine.module.named_parameters())
    device = engine.device
    for key in MOMENTS:
        values = moments.get(key, {})
        for name in names:
            param = params[name]
            shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
            if rank == 0:
                value = values.pop(name).contiguous().to(device=device, dtype=torch.float32)
            else:
                value = torch.empty(shape, dtype=torch.float32, device=device)
            if world > 1:
                dist.broadcast(value, src=0)
            _set(optimizer, param, value, key)
    sums = _sums_of_squares(optimizer, device)
    if world > 1:
        dist.all_reduce(sums)
    log.info(
        "Adam's moments restored for %d parameters (step %d; sum of squares over all partitions: %s)",
        len(names),
        int(step),
        ", ".join(f"{key} {float(v):.9e}" for key, v in zip(MOMENTS, sums.tolist(), strict=True)),
    )


def _sums_of_squares(optimizer: Any, device: Any) -> Any:
    """This rank's sum of squares of each moment over its partitions (a checksum of what landed: padding is
    zero, so over all ranks it is the checkpoint's)."""
    import torch

    inner = optimizer.optimizer
    sums = torch.zeros(len(MOMENTS), dtype=torch.float64, device=device)
    for p in _partitions(optimizer):
        for i, key in enumerate(MOMENTS):
            sums[i] += inner.state[p][key].double().pow(2).sum()
    return sums


def _partitions(optimizer: Any) -> list[Any]:
    """The optimizer's fp32 partitions: ZeRO-3's `fp32_partitioned_groups_flat` or ZeRO-1/2's
    `single_partition_of_fp32_groups` (ZeRO-3 puts them in the torch optimizer's param_groups only for the
    length of a step)."""
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", None) or optimizer.single_partition_of_fp32_groups)


def _create_states(optimizer: Any, step: float) -> None:
    """Every fp32 partition's Adam state present (zeros where torch has not made it yet), at `step`."""
    import torch

    inner = optimizer.optimizer
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for p in _partitions(optimizer):
        state = inner.state[p]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        old = state.get("step")
        if torch.is_tensor(old):
            state["step"] = torch.full_like(old, step)
        elif isinstance(old, int):
            state["step"] = int(step)
        else:  # torch's own default: a float32 scalar, on the device for fused or capturable AdamW
            state["step"] = torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")
    if hasattr(optimizer, "_hp_optimizer_states_linked"):  # ZeRO-1/2: link parameters to the states just made
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _set(optimizer: Any, param: Any, value: Any, key: str) -> None:
    """This rank's part of `param`'s whole moment `value` into its optimizer partition."""
    if not hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value, key)
        return
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True, optim_state_key=key)
    flat = value.reshape(-1)
    start = part.numel() * optimizer._get_param_partition_rank(param)
    n = max(0, min(part.numel(), flat.numel() - start))
    part[:n].copy_(flat[start : start + n])
    part[n:].zero_()  # the padding of the last rank's partition
