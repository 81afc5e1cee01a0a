"""The multi-GPU table: logged MFU against an all-ranks truth, per parallel engine, and host syncs per step.

One torchrun command per engine (from ``benchmarks/``, ``PYTHONPATH=..:.``), on 8 GPUs of one host:

    torchrun --standalone --nproc_per_node 8 bench_scale_out.py --engine ddp --size mid
    torchrun --standalone --nproc_per_node 8 bench_scale_out.py --engine fsdp1 --size mid
    torchrun --standalone --nproc_per_node 8 bench_scale_out.py --engine fsdp2 --size mid
    torchrun --standalone --nproc_per_node 8 bench_scale_out.py --engine tp --size mid --tp 8
    torchrun --standalone --nproc_per_node 8 bench_scale_out.py --engine fsdp2_tp --size mid --tp 2

(``--engine all`` runs the five in turn in one launch), and the CPU smoke run (two gloo processes,
the tiny model, every engine; checks that each runs; its times, and so its MFU, mean nothing):

    torchrun --standalone --nproc_per_node 2 bench_scale_out.py --engine all --smoke

Each rank trains the same Llama-style model (bf16 autocast on GPUs) wrapped by the engine: DDP,
FSDP1 (each decoder layer a unit), FSDP2 (``fully_shard`` per layer and the root), tensor
parallelism (torchtitan's plan for a Llama layer: q/k/v and gate/up column-wise, o and down
row-wise) or FSDP2 over TP. Ranks of one TP group share a batch; each data-parallel group draws its
own. The meter (``MFUMeter``, as every integration uses it) measures ``--measured`` steps after
``--warmup``.

The truth: FlopCounterMode counts one training step of one data-parallel group's batch on an
unsharded eager copy of the model (on rank 0); every group's batch has the same shape and no
padding, so the global batch's FLOPs are that times the data-parallel size. Its MFU uses the wall
time of the measured steps between two barriers (each after a device synchronize). The FLOPs
ratio (logged FLOPs of the measured steps over the truth's) does not depend on timing; the MFU
ratio is it times the two clocks' ratio (on a CPU, with a few steps of milliseconds, noise). The
tokens ratio checks that a TP group's batch counts once. Host syncs are
counted under ``torch.cuda.set_sync_debug_mode("warn")`` around every measured step, keeping those
raised from mfu_callbacks' own files (none expected; the read at the end is not a step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from common import SIZES, batch_for, llama, truth_step_flops
from torch import nn

from mfu_callbacks import MFUMeter

ENGINES = ("ddp", "fsdp1", "fsdp2", "tp", "fsdp2_tp")
SMOKE_PEAK_TFLOPS = 1.0  # a CPU has no table entry; any number gives ratios that can be compared


def tensor_parallel_plan() -> dict[str, object]:
    """torchtitan's plan for a Llama decoder layer (module names of transformers' Llama)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    column, row = ColwiseParallel(), RowwiseParallel()
    return {
        "self_attn.q_proj": column,
        "self_attn.k_proj": column,
        "self_attn.v_proj": column,
        "self_attn.o_proj": row,
        "mlp.gate_proj": column,
        "mlp.up_proj": column,
        "mlp.down_proj": row,
    }


def wrap(model: nn.Module, engine: str, device: torch.device, world: int, tp: int) -> nn.Module:
    """``model`` under ``engine``, on ``device``."""
    from torch.distributed.device_mesh import init_device_mesh

    layer_type = type(model.model.layers[0])
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(
            model, device_id=device, auto_wrap_policy=ModuleWrapPolicy({layer_type}), use_orig_params=True
        )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if engine == "fsdp2":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp_shard", "tp"))
    for layer in model.model.layers:
        parallelize_module(layer, mesh["tp"], tensor_parallel_plan())
    if engine == "tp":
        return model
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp_shard"])
    return fully_shard(model, mesh=mesh["dp_shard"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=(*ENGINES, "all"), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument(
        "--tp", type=int, default=2, help="tensor-parallel degree of fsdp2_tp (tp takes every rank)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: the peak table's")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny model, a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.warmup, args.measured = "tiny", 2, 3
        args.peak_tflops = args.peak_tflops or SMOKE_PEAK_TFLOPS

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    for engine in ENGINES if args.engine == "all" else (args.engine,):
        row = measure(engine, args, device)
        if row is not None:
            print(_line(row))
            print("RESULT " + json.dumps(row), flush=True)
        dist.barrier()
    dist.destroy_process_group()
    if not cuda:
        os._exit(0)  # gloo's threads can abort the interpreter's exit ("terminate called") after the work


def measure(engine: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Train ``engine``'s wrapped model and measure it; rank 0 returns the row, the others None."""
    cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = {"tp": world, "fsdp2_tp": args.tp}.get(
        engine, 1
    )  # tensor parallelism alone: one data-parallel group
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the {world} ranks")
    dp_group = rank // tp  # the mesh is (data parallel, tp), rank-major

    torch.manual_seed(0)
    wrapped = wrap(llama(args.size).to(device), engine, device, world, tp)
    # Under TP the model mixes DTensor weights with plain ones (modules outside the plan): the
    # multi-tensor (foreach) kernels refuse such a mix, so those engines step one tensor at a time.
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, foreach=engine not in ("tp", "fsdp2_tp"))
    batch = batch_for(args.size, device, seed=dp_group)
    dtype = torch.bfloat16 if cuda else torch.float32
    meter = MFUMeter(wrapped, peak_tflops=args.peak_tflops, dtype="bf16" if cuda else "fp32", warmup_steps=1)

    def step(count_syncs: bool) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if count_syncs:
                torch.cuda.set_sync_debug_mode("warn")
            meter.start_step(batch)
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                loss = wrapped(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.end_step()
            if count_syncs:
                torch.cuda.set_sync_debug_mode(0)
        return sum("mfu_callbacks" in str(warning.filename) for warning in caught)

    def barrier() -> float:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter()

    for _ in range(args.warmup):
        step(False)
    meter.metrics()  # the warm-up steps read and left out
    start = barrier()
    syncs = sum(step(cuda) for _ in range(args.measured))
    wall = barrier() - start
    logged = meter.metrics()
    layout = meter.parallelism.as_config()
    peak = meter.peak.flops if meter.peak is not None else None
    if rank != 0:
        return None

    dp = world // tp
    truth_flops = truth_step_flops(llama(args.size).to(device), batch) * dp * args.measured
    truth_tokens = batch["input_ids"].numel() * dp * args.measured
    # What the meter logged, back to totals of the measured steps (per GPU per second x its seconds x
    # GPUs): their ratios to the truth do not depend on timing, unlike MFU's.
    seconds = logged.get("step_time", 0.0) * args.measured
    logged_flops = logged.get("tflops_per_gpu", 0.0) * 1e12 * seconds * world
    logged_tokens = logged.get("tokens_per_sec", 0.0) * seconds
    truth_mfu = truth_flops / (wall * world * peak) if peak else None
    return {
        "engine": engine,
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke)",
        "world_size": world,
        "parallelism": layout,
        "logged_mfu": logged.get("mfu"),
        "truth_mfu": truth_mfu,
        "mfu_ratio": logged["mfu"] / truth_mfu if truth_mfu and "mfu" in logged else None,
        "flops_ratio": logged_flops / truth_flops,
        "tokens_ratio": logged_tokens / truth_tokens,
        "logged_tflops_per_gpu": logged.get("tflops_per_gpu"),
        "step_time_max": logged.get("step_time_max"),
        "step_time_min": logged.get("step_time_min"),
        "host_syncs_per_step": syncs / args.measured if cuda else None,
    }


def _line(row: dict[str, Any]) -> str:
    layout = row["parallelism"]
    syncs = row["host_syncs_per_step"]
    return (
        f"{row['engine']:9} world {row['world_size']} dp {layout['data_parallel']} tp {layout['tensor_parallel']}  "
        f"MFU logged {_pct(row['logged_mfu'])} truth {_pct(row['truth_mfu'])} ratio {_fmt(row['mfu_ratio'])}  "
        f"FLOPs ratio {_fmt(row['flops_ratio'])}  tokens ratio {_fmt(row['tokens_ratio'])}  "
        f"host syncs/step {'n/a (CPU)' if syncs is None else _fmt(syncs)}"
    )


def _pct(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "n/a"


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


if __name__ == "__main__":
    main()
