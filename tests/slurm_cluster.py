"""A real single-node Slurm for the tests: munged, slurmctld and slurmd started as root.

Everything lives under one temporary directory (config, munge key and socket, state, spool, logs,
pid files, four fake GPUs as gres); nothing under /etc is written, no service manager is used,
ports are picked free, and the daemons are stopped by the PIDs we started. If `sbatch`,
`slurmctld`, `munged`… are missing, Debian's `slurm-wlm` and `munge` are installed with apt-get
(root only).

    cluster = SlurmCluster(tmpdir); cluster.start()   # raises ClusterUnavailable(reason)
    cluster.env                                        # SLURM_CONF=… for sbatch/squeue/scontrol
    cluster.stop()

Also a script, for trying things by hand (`start` prints the SLURM_CONF to export):

    .venv/bin/python -m tests.slurm_cluster start /tmp/slurm-play
    .venv/bin/python -m tests.slurm_cluster stop /tmp/slurm-play
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

# advertised CPUs: more than a CI box has, so tests can ask for several tasks (config_overrides)
NODE_CPUS = 8
# fake GPUs: gres whose device files are character devices borrowed from /dev/null & co. Enough
# for Slurm to bind one GPU per task and set CUDA_VISIBLE_DEVICES (what the GPU template relies
# on); nothing opens them. Without mknod (unprivileged container) the node has no GPUs.
FAKE_GPUS = 4
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")


class ClusterUnavailable(Exception):
    """This machine cannot run the Slurm daemons (the message says why)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(log=print) -> None:
    """apt-get install slurm-wlm munge when anything is missing (root only)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing_binaries())} missing) and we are not root to apt-get it")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing_binaries())} missing) and there is no apt-get")
    log("installing slurm-wlm and munge with apt-get (once per machine)…")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                  "slurm-wlm", "munge"]):
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(cmd)} timed out after 600 s") from None
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise ClusterUnavailable(f"{' '.join(cmd)} failed ({p.returncode}): {' | '.join(tail)}")
    if missing_binaries():
        raise ClusterUnavailable(f"after apt-get, still missing: {', '.join(missing_binaries())}")


# slurmd wants gres "File=" to be character devices: borrow the numbers of harmless ones
# (null, zero, full, random, urandom…), distinct so Slurm sees distinct devices
_HARMLESS_MINORS = (3, 5, 7, 8, 9)


def make_fake_device(path: Path, i: int) -> None:
    if path.exists():
        return
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, _HARMLESS_MINORS[i % len(_HARMLESS_MINORS)]))


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: str | Path, cpus: int = NODE_CPUS, gpus: int = FAKE_GPUS):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.gpus = gpus
        self.no_gpu_reason = "" if gpus else "cluster started without GPUs"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"

    # ------------------------------------------------------------------ layout
    @property
    def env(self) -> dict[str, str]:
        """Environment for the Slurm client commands (and jobs: sbatch exports it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _dirs(self) -> dict[str, Path]:
        d = {k: self.root / k for k in ("etc", "munge", "state", "spool", "log", "run", "dev")}
        for p in d.values():
            p.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(d["munge"], 0o755)  # munged wants the socket's directory reachable by everyone
        return d

    def write_config(self) -> None:
        d = self._dirs()
        key = d["munge"] / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = d["munge"] / "munge.socket"
        ctld_port, d_port = _free_port(), _free_port()
        gres = ""
        if self.gpus:
            try:
                for i in range(self.gpus):
                    make_fake_device(d["dev"] / f"fakegpu{i}", i)
            except OSError as e:
                self.no_gpu_reason = f"cannot mknod fake GPU devices: {e}"
                self.gpus = 0
        if self.gpus:
            (d["etc"] / "gres.conf").write_text(
                f"AutoDetect=off\nNodeName={self.node} Name=gpu File={d['dev']}/fakegpu[0-{self.gpus - 1}]\n")
            gres = f" Gres=gpu:{self.gpus}"
        self.conf.write_text(f"""\
# single-node test cluster written by tests/slurm_cluster.py
ClusterName=twintest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d['state']}
SlurmdSpoolDir={d['spool']}
SlurmctldPidFile={d['run']}/slurmctld.pid
SlurmdPidFile={d['run']}/slurmd.pid
SlurmctldLogFile={d['log']}/slurmctld.log
SlurmdLogFile={d['log']}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=20
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory=4000{gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "SLURM_CONF": str(self.conf)}, start_new_session=True)
        out.close()

    def _check_alive(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise ClusterUnavailable(f"{name} exited with {p.returncode} at start: {self._log_tail(name)}")

    def _log_tail(self, name: str, n: int = 4) -> str:
        lines: list[str] = []
        for f in (self.root / "log" / f"{name}.stdout", self.root / "log" / f"{name}.log"):
            if f.exists():
                lines += f.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:]) or "(no log)"

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Install if needed, write the config, start the daemons, wait for an idle node; on any
        failure stop what was started and raise ClusterUnavailable(reason)."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("the Slurm daemons must run as root (tests are not running as root)")
        ensure_installed()
        self.write_config()
        d = self.root
        try:
            self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={d / 'munge' / 'munge.key'}", f"--pid-file={d / 'run' / 'munged.pid'}",
                                   f"--log-file={d / 'log' / 'munged.log'}", f"--seed-file={d / 'munge' / 'seed'}"])
            self._wait(lambda: self.munge_socket.exists(), 15, "the munged socket", "munged")
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self._run(["scontrol", "ping"]).stdout, timeout, "slurmctld to answer",
                       "slurmctld")
            self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self.node_idle, timeout, "the node to be idle in sinfo", "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, cond, timeout: float, what: str, daemon: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            self._check_alive(daemon)
            try:
                if cond():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}: {self._log_tail(daemon)}")

    def _run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    def node_idle(self) -> bool:
        p = self._run(["sinfo", "-h", "-N", "-o", "%T"])
        return p.returncode == 0 and p.stdout.strip().rstrip("*") == "idle"

    def stop(self) -> None:
        """Cancel our jobs, then SIGTERM each daemon we started (slurmd, slurmctld, munged) by its
        PID, SIGKILL after 15 s."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self._run(["scancel", "--user", pwd.getpwuid(os.getuid()).pw_name], timeout=20)
                t0 = time.time()
                while time.time() - t0 < 30 and self._run(["squeue", "-h", "-o", "%T"]).stdout.strip():
                    time.sleep(0.5)  # squeue lists pending, running and completing jobs
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, *args: str, cwd=None) -> int:
        p = subprocess.run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                           timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        p = self._run(["scontrol", "show", "job", str(job_id), "-o"])
        for tok in p.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def job_info(self, job_id: int) -> dict[str, str]:
        p = self._run(["scontrol", "show", "job", str(job_id), "-o"])
        out = {}
        for line in p.stdout.splitlines():
            for tok in line.split():
                k, _, v = tok.partition("=")
                out.setdefault(k, v)
        return out

    def wait_job(self, job_id: int, timeout: float = 180.0) -> str:
        """Wait until the job (all array tasks) has left the queue; return its final state(s)."""
        t0 = time.time()
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}
        while time.time() - t0 < timeout:
            p = self._run(["scontrol", "show", "job", str(job_id), "-o"])
            states = [tok.split("=", 1)[1] for line in p.stdout.splitlines() for tok in line.split()
                      if tok.startswith("JobState=")]
            if states and all(s in final for s in states):
                return ",".join(sorted(set(states)))
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {self._run(['squeue']).stdout}")


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop DIR", file=sys.stderr)
        return 2
    cmd, root = argv
    c = SlurmCluster(root)
    if cmd == "start":
        try:
            c.start()
        except ClusterUnavailable as e:
            print(f"cannot start Slurm: {e}", file=sys.stderr)
            return 1
        (Path(root) / "run" / "pids.json").write_text(json.dumps({k: p.pid for k, p in c.procs.items()}))
        print(f"export SLURM_CONF={c.conf}")
        return 0
    pids = json.loads((Path(root) / "run" / "pids.json").read_text())
    for name in ("slurmd", "slurmctld", "munged"):
        if name in pids:
            try:
                os.kill(pids[name], signal.SIGTERM)
            except ProcessLookupError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
