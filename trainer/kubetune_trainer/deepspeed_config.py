"""The DeepSpeed config for a training spec: a pure function, so it is unit-tested without DeepSpeed.

Choices and why:
- The optimizer is DeepSpeed's "AdamW". On CPU it must be torch's AdamW (`torch_adam`): DeepSpeed's
  FusedAdam and CPUAdam are C++/CUDA extensions compiled at first use, which takes minutes and needs a
  compiler. On GPU it is torch's fused CUDA AdamW (`torch_adam` + `fused`): as fast as DeepSpeed's FusedAdam
  and nothing to compile (FusedAdam's JIT build needs nvcc, which CUDA wheels of torch do not bring). With
  optimizer offload DeepSpeed's CPUAdam runs the step on the host (compiled once with the host's C++ compiler).
- Precision: bf16 on GPUs, fp32 on CPUs unless the spec says otherwise. fp16 adds dynamic loss scaling.
- On CPU (gloo) no communication overlaps computation in DeepSpeed, so `overlap_comm` is GPU-only, and so is
  `contiguous_gradients` for ZeRO-1/2 (only copies on CPU; measured, see benchmarks/README.md).
- CPU offload only means something when training on GPUs; on a CPU-only run everything already lives in host
  memory, so it is left out (and said so in the log by the caller) rather than paying for a second copy.
- The learning-rate schedule is not in this config: the train loop builds it (warmup + cosine/linear/constant
  from transformers) and hands it to `deepspeed.initialize`, so DeepSpeed steps it and checkpoints it.
"""

from __future__ import annotations

from typing import Any, Literal

from kubetune.api import TrainingSpec

Precision = Literal["bf16", "fp16", "fp32"]

# Large enough that DeepSpeed never prints its own per-step lines; the trainer logs progress itself.
_QUIET_STEPS = 10**9


def resolve_precision(precision: str, use_gpu: bool) -> Precision:
    """auto -> bf16 on GPUs and fp32 on CPUs; half precision on a CPU is refused (DeepSpeed's CPU path is fp32)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"training.precision {precision} needs GPUs; use fp32 or auto on CPU")
    return precision  # type: ignore[return-value]  # the API enum leaves only bf16/fp16/fp32 here


def offload_applies(training: TrainingSpec, use_gpu: bool) -> bool:
    """Whether training.deepspeed.offload takes effect (only with GPUs; see the module docstring)."""
    return training.deepspeed.offload == "cpu" and use_gpu


def deepspeed_config(training: TrainingSpec, *, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for `training` on `world_size` workers."""
    precision = resolve_precision(training.precision, use_gpu)
    stage = training.deepspeed.zero_stage
    offload = offload_applies(training, use_gpu)

    optimizer_params: dict[str, Any] = {
        "lr": training.learning_rate,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": training.weight_decay,
    }
    if not use_gpu:
        optimizer_params["torch_adam"] = True
    elif not offload:
        optimizer_params.update({"torch_adam": True, "fused": True})

    zero: dict[str, Any] = {
        "stage": stage,
        # DeepSpeed's CPU accelerator has no streams: its collectives block, nothing overlaps the backward pass.
        "overlap_comm": use_gpu,
        # The contiguous buffer keeps GPU memory from fragmenting. On CPU, ZeRO-1/2 gain nothing from it but
        # copying each gradient into it during the backward pass: without it the bare DeepSpeed loop of
        # benchmarks/train_throughput.py (ZeRO-2, 2 gloo ranks) ran 7% faster, same losses. ZeRO-3 unmeasured.
        "contiguous_gradients": use_gpu or stage == 3,
        "reduce_bucket_size": 5e7,
    }
    if stage == 3:
        # Export gathers the sharded weights itself; this keeps save_16bit_model usable for tools too.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.per_device_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.per_device_batch_size * training.gradient_accumulation_steps * world_size,
        # DeepSpeed treats 0 as "no clipping", which is what max_grad_norm 0 means in the spec.
        "gradient_clipping": training.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    return config
