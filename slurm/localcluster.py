"""A real Slurm cluster of N nodes on this machine, for tests and for trying the batch scripts.

    python -m slurm.localcluster up --root /tmp/k2slurm [--nodes 2]   # prints `export SLURM_CONF=...`
    python -m slurm.localcluster down --root /tmp/k2slurm

It runs munged with its own key and socket, slurmctld, and one `slurmd -N nK`
per node on loopback ports, all as the current user, with state, spool and logs
under `root`. Nodes reach each other through NodeAddr=127.0.0.1, so jobs find
the first node's address with `scontrol show node` like on a real cluster. The
requeue hold (cred_expire) and scheduling interval are shortened so that a
requeued job starts again within seconds. Needs Debian's `slurm-wlm` and
`munge` (or the same binaries on PATH).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: str, nodes: int = 2, cpus_per_node: int | None = None):
        self.root = os.path.abspath(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.sock")

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, scontrol, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": self.conf}

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> LocalCluster:
        if missing_binaries():
            raise RuntimeError(f"Slurm/munge binaries not found: {missing_binaries()} "
                               "(Debian: apt-get install slurm-wlm munge)")
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        # munged insists that every directory above its socket is world-executable.
        for path in (self.root, os.path.join(self.root, "munge")):
            os.chmod(path, 0o755)
        key = os.path.join(self.root, "munge", "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(key, 0o600)
        self._run([_which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/log/munged.log",
                   f"--seed-file={self.root}/munge/munged.seed"])
        self._write_conf()
        self._run([_which("slurmctld"), "-f", self.conf])
        for node in self.nodes:
            self._run([_which("slurmd"), "-f", self.conf, "-N", node])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=self.env, capture_output=True, text=True)
            idle = sum(int(n) for state, n in (line.split() for line in out.stdout.splitlines()) if state == "idle")
            if idle == len(self.nodes):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s; logs in {self.root}/log\n{out.stdout}{out.stderr}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True)
        pids = [os.path.join(self.root, f"slurmd-{n}.pid") for n in self.nodes]
        pids += [os.path.join(self.root, "slurmctld.pid"), os.path.join(self.root, "munge", "munged.pid")]
        for path in pids:
            try:
                with open(path) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}; "
                               f"logs in {self.root}/log")

    def _write_conf(self) -> None:
        r = self.root
        user = pwd.getpwuid(os.getuid()).pw_name
        host = socket.gethostname()
        base = _free_port()
        lines = [
            "ClusterName=k2local",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={base}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job is held (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",
            "KillWait=10",
            "InactiveLimit=0",
        ]
        for i, node in enumerate(self.nodes):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()}"
                         f" CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    # -- jobs ----------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        fields = {}
        for line in out.stdout.splitlines():
            for item in line.split():
                if "=" in item:
                    k, v = item.split("=", 1)
                    fields.setdefault(k, v)
        return fields

    def wait(self, job_id: str, timeout: float = 300.0, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                  "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not done after {timeout}s: {self.job(job_id)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--root", default="/tmp/k2slurm")
    p.add_argument("--nodes", type=int, default=2)
    args = p.parse_args(argv)
    cluster = LocalCluster(args.root, args.nodes)
    if args.action == "up":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
