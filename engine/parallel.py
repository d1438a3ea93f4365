"""MPI: the communicator, a load-balancing chunk queue, and abort-on-failure.

Chunks are handed out by a dispatcher thread on rank 0 (rank 0 also computes): a rank asks for
work when it finishes a chunk, so fast and slow ranks stay busy. Which rank computes a chunk never
changes its numbers: results depend on the chunk, not on the rank.

Without mpi4py, or outside mpiexec, a one-rank communicator is used.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterator

TAG_REQ = 11
TAG_WORK = 12


class SerialComm:
    rank = 0
    size = 1

    def bcast(self, obj, root=0):
        return obj

    def gather(self, obj, root=0):
        return [obj]

    def allreduce(self, obj, op=None):
        return obj

    def barrier(self):
        pass

    def Abort(self, code=1):
        os._exit(code)


def world():
    """COMM_WORLD when running under an MPI launcher with mpi4py present; else a serial comm."""
    launched = any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))
    if not launched:
        return SerialComm()
    try:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"  # the dispatcher thread on rank 0 calls MPI
        from mpi4py import MPI
    except ImportError:
        return SerialComm()
    return MPI.COMM_WORLD


def cuda_aware_mpi() -> bool:
    """Whether the MPI library under mpi4py accepts device (CUDA) buffers: TWIN_CUDA_AWARE_MPI=1/0
    decides if set, else the library's own answer (MPIX_Query_cuda_support, MPICH >= 4 and Open MPI
    >= 4; a library without it counts as not CUDA-aware)."""
    env = os.environ.get("TWIN_CUDA_AWARE_MPI", "").strip()
    if env in ("0", "1"):
        return env == "1"
    try:
        import ctypes

        from mpi4py import MPI

        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support  # found through mpi4py's libmpi
    except (ImportError, OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def lor(comm, flag: bool) -> bool:
    if isinstance(comm, SerialComm):
        return bool(flag)
    from mpi4py import MPI

    return bool(comm.allreduce(bool(flag), op=MPI.LOR))


def abort(comm, msg: str, code: int = 1) -> None:
    """Log and take the whole job down: a job never hangs on a dead rank."""
    sys.stderr.write(f"twin: rank {comm.rank}: {msg}\n")
    sys.stderr.flush()
    comm.Abort(code)


class ChunkQueue:
    """Iterate over the chunk ids this rank should compute.

    `for cid in queue:` yields chunk ids; call `queue.done(cid, n)` after a chunk is journaled
    (reported to rank 0 with the next request, for progress). `queue.leave()` stops asking.
    """

    def __init__(self, comm, todo: list[int], on_done: Callable[[int, int, int], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.comm = comm
        self.todo = list(todo)
        self.on_done = on_done  # called on rank 0: (rank, chunk, n_patients)
        self.should_stop = should_stop
        self._last: tuple[int, int] | None = None
        self._leaving = False
        self._thread: threading.Thread | None = None
        if comm.size > 1:
            self._c = comm.Dup()
            if comm.rank == 0:
                self._thread = threading.Thread(target=self._serve, name="twin-dispatcher", daemon=True)
                self._thread.start()

    # ---------------------------------------------------------------- rank 0 dispatcher
    def _serve(self) -> None:
        try:
            from mpi4py import MPI

            pending = list(self.todo)
            closed = 0
            st = MPI.Status()
            while closed < self.comm.size:
                req = self._c.irecv(source=MPI.ANY_SOURCE, tag=TAG_REQ)
                while True:  # poll politely: a blocking receive would spin a core rank 0 computes on
                    ok, msg = req.test(status=st)
                    if ok:
                        break
                    time.sleep(0.002)
                src = st.Get_source()
                last, leaving = msg
                if last is not None and self.on_done:
                    self.on_done(src, *last)
                if leaving or self.should_stop() or not pending:
                    self._c.send(-1, dest=src, tag=TAG_WORK)
                    closed += 1
                else:
                    self._c.send(pending.pop(0), dest=src, tag=TAG_WORK)
        except BaseException:  # noqa: BLE001 - a dead dispatcher would hang every rank
            abort(self.comm, "chunk dispatcher failed:\n" + traceback.format_exc())

    # ---------------------------------------------------------------- every rank
    def done(self, chunk_id: int, n: int) -> None:
        self._last = (chunk_id, n)
        if self.comm.size == 1 and self.on_done:
            self.on_done(0, chunk_id, n)
            self._last = None

    def leave(self) -> None:
        self._leaving = True

    def __iter__(self) -> Iterator[int]:
        if self.comm.size == 1:
            for c in self.todo:
                if self._leaving or self.should_stop():
                    return
                yield c
            return
        while True:
            self._c.send((self._last, self._leaving or self.should_stop()), dest=0, tag=TAG_REQ)
            self._last = None
            cid = self._c.recv(source=0, tag=TAG_WORK)
            if cid < 0:
                return
            yield cid

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
