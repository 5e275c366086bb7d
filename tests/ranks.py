"""Running test code on several gloo processes, as torchrun does, on the CPU (one thread each)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment without CUDA, one thread, the repository importable, plus `extra`."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def start_ranks(code: str, args: list[str], nproc: int = 2) -> list[subprocess.Popen]:
    """Start `python -c code *args` as `nproc` ranks (RANK, WORLD_SIZE, MASTER_* set)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=cpu_env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
            ),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(nproc)
    ]


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every rank; fail the test with a rank's output if it failed or timed out."""
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"rank {rank} timed out")
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"


def run_module(args: list[str], nproc: int = 1, timeout: float = 600) -> None:
    """`python -m *args`, or `torchrun --nproc_per_node=nproc -m *args`; fail if it fails."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={free_port()}", "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )  # fmt: skip
    done = subprocess.run(
        [*launcher, *args], env=cpu_env(), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
