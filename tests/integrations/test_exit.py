"""A two-rank run with the tracker ends the way the plain run does: every process exits 0.

Two gloo processes (the environment torchrun would set, without torchrun's own process) run an
Accelerate loop with ``MFUTracker`` and leave through the interpreter's normal exit, where a gloo
group left alive can abort a process (``terminate called without an active exception``, SIGABRT).
Runs are repeated because such an abort is intermittent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multiprocess

RUNS = 6  # about 5 s each on an idle machine: the interpreter and Accelerate start twice per run

SCRIPT = textwrap.dedent(
    """
    import torch
    from accelerate import Accelerator
    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    tracker = MFUTracker(accelerator, model, peak_tflops=0.5, warmup_steps=1, log_interval=2)
    for step in range(6):
        ids = torch.randint(0, 64, (4, 16))
        accelerator.backward(model(ids).logsumexp(-1).mean())
        optimizer.step()
        optimizer.zero_grad()
    accelerator.end_training()
    print("finished", accelerator.process_index, flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_ranks(script: str) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        )
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_every_two_rank_run_with_the_tracker_exits_0():
    for run in range(RUNS):
        for rank, result in enumerate(two_ranks(SCRIPT)):
            assert result.returncode == 0, (
                f"run {run}, rank {rank}: exit {result.returncode}\n{result.stderr[-3000:]}"
            )
            assert "terminate called" not in result.stderr
            assert f"finished {rank}" in result.stdout
