"""Run a function on P ranks of a torch.distributed group: P local processes, or this process under torchrun.

A rank function has the signature fn(rank, world_size, payload, report) -> result, where report(data) sends a
progress event to the launcher. It runs after init_process_group and before destroy_process_group.

Local launch never hangs and never needs a free port to be guessed:
- the launcher itself hosts the TCPStore on port 0 (the OS picks a free one; nothing can take it between
  choosing and binding), and the ranks connect to it as clients;
- each rank reports through its own pipe; the launcher watches the pipes and the processes' sentinels, so a rank
  that raises, is killed or exits early is seen within a poll interval;
- on the first failure it waits a moment for other ranks' reports (to name the rank that failed first, not the
  ones that lost their peer), then terminates every rank and raises RankFailure;
- a run with no event from some rank for stall_timeout_s seconds fails the same way, naming those ranks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

POLL_S = 0.1
GRACE_S = 1.0  # after a failure, how long to collect the other ranks' reports before choosing whom to blame
TERMINATE_S = 3.0  # SIGTERM, then SIGKILL after this long

RankFn = Callable[[int, int, Any, Callable[[Any], None]], Any]


class RankFailure(RuntimeError):
    """A rank raised, died or stalled; str() is one line naming it."""

    def __init__(self, rank: int | list[int], reason: str, details: str = ""):
        self.rank, self.reason, self.details = rank, reason, details  # details: the rank's traceback, if any
        who = f"rank {rank}" if isinstance(rank, int) else "ranks " + ", ".join(map(str, rank))
        super().__init__(f"{who} failed: {reason}")


@dataclass
class _Failure:
    rank: int
    reason: str
    when: float
    from_exception: bool  # False: the process died without a word (killed, os._exit): always a root cause
    details: str = ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"[:300]


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _start_method() -> str:
    # forkserver forks ranks from one process that imported torch once: 2 s to start 4 ranks instead of 11 s
    # with spawn on two cores, and unlike fork it never copies the launcher's threads.
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def _rank_main(fn: RankFn, rank: int, world_size: int, payload, conn, port: int, backend: str,
               threads: int, timeout_s: float) -> None:
    """Entry point of a local rank process."""
    import torch
    import torch.distributed as dist

    def report(data) -> None:
        conn.send(("event", rank, data))

    try:
        torch.set_num_threads(threads)
        loopback = _loopback_interface()
        if loopback and backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, payload, report)
        dist.destroy_process_group()
        conn.send(("result", rank, result))
    except BaseException as exc:  # report anything, then leave at once: peers blocked on us see the socket close
        try:
            conn.send(("error", rank, (_one_line(exc), time.time(), traceback.format_exc())))
        finally:
            os._exit(1)
    conn.close()


def run_local(fn: RankFn, world_size: int, payload=None, *, backend: str = "gloo", threads_per_rank: int | None = None,
              stall_timeout_s: float = 300.0, on_event: Callable[[int, Any], None] | None = None) -> list:
    """Start world_size processes running fn; return their results in rank order, or raise RankFailure."""
    import torch.distributed as dist

    ctx = mp.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        # "__main__" too: otherwise every rank re-imports the main script (for moepp-bench: every command, with
        # matplotlib), seconds of CPU per rank on a 2-core machine.
        ctx.set_forkserver_preload(["__main__", "torch", "torch.distributed", "moepp", fn.__module__])
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=stall_timeout_s))
    conns, procs = [], []
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, name=f"moepp-rank-{rank}", daemon=True,
                               args=(fn, rank, world_size, payload, send_end, store.port, backend, threads,
                                     stall_timeout_s))
            proc.start()
            send_end.close()
            conns.append(recv_end)
            procs.append(proc)
        return _supervise(procs, conns, stall_timeout_s, on_event)
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        del store


def _supervise(procs, conns, stall_timeout_s: float, on_event) -> list:
    P = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, _Failure] = {}
    last_heard = [time.monotonic()] * P
    open_conns = {c: r for r, c in enumerate(conns)}
    first_failure_at = None
    while len(results) < P:
        ready = wait(list(open_conns) + [p.sentinel for p in procs if p.exitcode is None], timeout=POLL_S)
        for conn in [c for c in ready if c in open_conns]:
            rank = open_conns[conn]
            try:
                while conn.poll():
                    kind, _, data = conn.recv()
                    last_heard[rank] = time.monotonic()
                    if kind == "event" and on_event is not None:
                        on_event(rank, data)
                    elif kind == "result":
                        results[rank] = data
                    elif kind == "error":
                        failures.setdefault(rank, _Failure(rank, data[0], data[1], True, data[2]))
            except (EOFError, OSError):
                del open_conns[conn]
        for rank, proc in enumerate(procs):
            if proc.exitcode is not None and rank not in results and rank not in failures:
                if conns[rank] in open_conns and conns[rank].poll():
                    continue  # its last words are still in the pipe; read them on the next pass
                code = proc.exitcode
                reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code} without a result"
                failures[rank] = _Failure(rank, reason, time.time(), False)
        now = time.monotonic()
        if failures:
            first_failure_at = first_failure_at or now
            if now - first_failure_at >= GRACE_S or len(failures) + len(results) == P:
                raise _blame(list(failures.values()))
        silent = [r for r in range(P) if r not in results and now - last_heard[r] > stall_timeout_s]
        if silent:
            raise RankFailure(silent[0] if len(silent) == 1 else silent,
                              f"no progress for {stall_timeout_s:.0f} s (stalled or deadlocked)")
    return [results[r] for r in range(P)]


def _blame(failures: list[_Failure]) -> RankFailure:
    """The root cause: a rank that died without a word, else the earliest exception."""
    silent = [f for f in failures if not f.from_exception]
    first = min(silent or failures, key=lambda f: (f.when, f.rank))
    return RankFailure(first.rank, first.reason, first.details)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + TERMINATE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


# torchrun ----------------------------------------------------------------------------------------------------
def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_as_rank(fn: RankFn, payload_fn: Callable[[], Any], *, backend: str, stall_timeout_s: float = 300.0,
                on_event: Callable[[int, Any], None] | None = None) -> tuple[int, int, list | None]:
    """Run fn as this process's rank of a torchrun job. payload_fn runs on rank 0 only and its result is broadcast.

    Returns (rank, world_size, results): results in rank order on rank 0, None elsewhere. Failures of other ranks
    are torchrun's to handle (it stops the job); the timeout bounds every collective.
    """
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=stall_timeout_s))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        box = [payload_fn() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)

        def report(data):
            if on_event is not None and rank == 0:
                on_event(rank, data)

        result = fn(rank, world_size, box[0], report)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        return rank, world_size, gathered
    finally:
        dist.destroy_process_group()
