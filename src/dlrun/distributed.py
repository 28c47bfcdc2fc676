"""Multi-process data-parallel training (DDP): ranks, the process group, one shared run folder.

Two ways in, one run folder either way:
- `dlrun trainer.devices=N ...`: the Hydra job composes the config and makes the run folder,
  then `spawn` starts N worker processes (ranks 0..N-1) on this machine and waits for them.
- `torchrun --nproc_per_node=N -m dlrun ...`: rank 0 runs Hydra as usual (config, run folder)
  and sends both to the other ranks with `Ranks.share`; those never compose a config or make a
  folder (cli.main hands them straight to `run.rank_main`).

Each rank trains a replica of the model on its slice of every global batch (`Ranks.shard`:
contiguous slices, so the global batch and the order of samples are the single-process run's;
losses are weighted so the averaged gradient is the global batch's). Only rank 0 evaluates and
writes (metrics, checkpoints, summary, progress display); the others get its results through
`Ranks.share`. Backend: gloo on the CPU, NCCL (plus gloo for CPU tensors) on CUDA.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn

import torch
import torch.distributed as dist

from dlrun.config.schema import cpu_share
from dlrun.errors import ConfigError, DlrunError, Interrupted, PeerLost, WorkerFailed
from dlrun.rundir import RunDir

log = logging.getLogger("dlrun")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run. The default, a single process, makes every
    method a no-op, so the training loop reads the same with or without DDP."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    rendezvous: str = "env://"  # torchrun's MASTER_ADDR/MASTER_PORT, or spawn's tcp:// address

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        if self.world == 1:
            return x, y
        n = len(y)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return x[lo:hi], y[lo:hi]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over the ranks (a new tensor; `t` is left as it is)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def max(self, value: int) -> int:
        """The largest of the ranks' values (a CPU collective: no device sync on CUDA)."""
        if self.world == 1:
            return value
        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def agree_on_stop(self, signum: int, step: int, every: int) -> int:
        """The signal to stop for before `step`: this process's own at once; under DDP the
        largest of the ranks', agreed every `every` steps (an all-reduce costs ~0.24 ms on gloo)."""
        if self.world == 1:
            return signum
        return self.max(signum) if step % every == 0 else 0

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Ranks()


def torchrun_env() -> Ranks | None:
    """The group torchrun (or another launcher that sets RANK/WORLD_SIZE) started this process in."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def slurm_env(env: Mapping[str, str] = os.environ) -> Ranks | None:
    """The group a multi-task Slurm job is (`launcher=slurm hydra.launcher.nodes=M hydra.launcher.tasks_per_node=K`:
    submitit runs the job in each of its M x K tasks): rank, world size and local rank from Slurm's task
    variables, the rendezvous on the job's first node (MASTER_ADDR/MASTER_PORT where set, else the first host
    of SLURM_JOB_NODELIST and a port derived from the job id, the same in every task). None outside such a job."""
    if int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return None
    host = env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"])
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                 f"tcp://{host}:{port}")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `node[03-05,9],gpu1` -> `node03` (what `scontrol show hostnames`
    prints first)."""
    found = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist)
    if found is None:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return found.group(1) + (found.group(2) or "")


def join(ranks: Ranks, timeout_min: float = 30.0) -> None:
    """Join the process group at `ranks.rendezvous`; on CUDA, bind the rank's GPU."""
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    timeout = timedelta(minutes=timeout_min)
    store, _, _ = next(dist.rendezvous(ranks.rendezvous, ranks.rank, ranks.world, timeout=timeout))
    # torchrun keeps one store for all restarts of the group (--max-restarts): keys of each attempt apart, so a
    # restarted rank never reads the address a rank of the failed attempt published
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"dlrun/attempt-{attempt}", store), rank=ranks.rank,
                            world_size=ranks.world, timeout=timeout)


def rank_device(device: torch.device, ranks: Ranks, threads: int) -> torch.device:
    """The rank's device: its own GPU (bound by `join`), or the CPU with its share of the cores
    (unless device.threads says how many)."""
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
        if local > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={local} processes on this machine, but it has "
                              f"{torch.cuda.device_count()} CUDA device(s); one GPU per process")
        return torch.device("cuda", torch.cuda.current_device())
    if threads == 0:
        torch.set_num_threads(cpu_share(int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))))
    return device


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the module: gradients averaged over the ranks in backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """In the process group for the block. The ranks leave it together (a barrier first, so no
    rank tears down while another still talks to it), at the end or when they all raise
    the same dlrun error (they stop at the same step). After any other error a rank leaves as
    it is: the others may be inside another collective, and the launcher ends them."""
    join(ranks)
    try:
        yield
    except DlrunError:
        _leave()
        raise
    except RuntimeError as err:  # gloo's words for a peer whose process is gone
        if (lost := re.search(r"Connection (reset|closed) by peer", str(err))) is None:
            raise
        raise PeerLost(f"gloo: {lost.group(0)}") from None
    _leave()


def _leave() -> None:
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Run `worker(ranks, *args)` in `world` new processes on this machine and wait for all of them.

    SIGTERM sent to this process is passed on to the workers (which stop together at the next
    step and checkpoint); SIGINT from a terminal reaches them directly, so here it is ignored.
    Raises `WorkerFailed` with the first failed rank's exit code.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    if multiprocessing.get_start_method(allow_none=True) == "loky":  # a joblib worker's children cannot start
        raise ConfigError(f"trainer.devices={world} cannot start its processes inside launcher=local_parallel's "
                          "workers; sweep DDP runs with the default launcher or launcher=submitit_local / slurm")
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    context = mp.start_processes(_entry, args=(worker, world, rendezvous, args), nprocs=world, join=False,
                                 start_method="spawn")

    def forward(signum: int, frame: Any) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    handlers = {signal.SIGTERM: forward, signal.SIGINT: signal.SIG_IGN}
    # Signal handlers can only be set from the main thread (not in a joblib launcher's worker thread).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, h) for s, h in handlers.items()} if in_main else {}
    try:
        while not context.join(grace_period=30):  # ranks stop together; give the others time to
            pass  # finish on their own before torch terminates them
    except mp.ProcessExitedException as err:
        raise WorkerFailed(err.error_index, err.exit_code) from None
    except mp.ProcessRaisedException as err:  # an unexpected error: keep the rank's traceback
        raise WorkerFailed(err.error_index, 1, str(err)) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def outcome(err: WorkerFailed, folder: RunDir, devices: int) -> dict[str, Any]:
    """What a failed rank means for a spawned run, from what rank 0 recorded: its summary when the run had
    completed, else the error to raise (an interrupt, rank 0's error, or the rank's traceback)."""
    summary = folder.read_summary() if folder.holds_run() else {}
    if summary.get("status") == "completed" and not err.traceback:  # the run ended; a rank then died
        log.warning("%s after the run had completed; its results are kept", err)  # in gloo's teardown
        return summary
    if summary.get("status") == "interrupted":  # after a checkpoint (128 + signal), or a second Ctrl-C
        raise (Interrupted(err.signum, summary.get("steps", 0)) if err.signum else KeyboardInterrupt) from None
    if err.traceback:  # not an error dlrun names: show where it happened, as one process would
        raise RuntimeError(f"rank {err.rank} of the {devices}-process run failed:{err.traceback}") from None
    raise DlrunError(f"the {devices}-process run failed: {summary.get('error') or err}") from None


def rank_logging(ranks: Ranks, path: Path) -> None:
    """Logging in a rank's own process (Hydra configured the launching process only): rank 0 logs
    as a Hydra job does, to the run's log with warnings also on the console; the others stay quiet."""
    root = logging.getLogger()
    if not ranks.is_main:
        root.addHandler(logging.NullHandler())
        return
    form = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    file, console = logging.FileHandler(path), logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    for handler in (file, console):
        handler.setFormatter(form)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _entry(index: int, worker: Callable[..., None], world: int, rendezvous: str, args: tuple) -> None:
    end_process(worker, Ranks(rank=index, world=world, local_rank=index, rendezvous=rendezvous), *args)


def end_process(fn: Callable[..., Any], *args: Any) -> NoReturn:
    """Run a rank's `fn(*args)`, then end its process with fn's exit code (0, or SystemExit's),
    skipping the interpreter's teardown: there torch can abort a rank that has already left its
    process group cleanly ("terminate called without an active exception", about one run in 30
    on this machine), which would turn a finished run into a failed one. Other exceptions
    propagate (torch.multiprocessing reports them with their traceback)."""
    try:
        fn(*args)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
