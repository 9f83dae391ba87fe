"""A real two-node SLURM cluster on one machine for the tests (Debian's slurm-wlm 22.05: slurmctld, two slurmd, munge).

Each daemon lives in its own network namespace (``ctl``, ``node1``, ``node2``); the nodes also get their own UTS
namespace, so ``hostname`` says node1/node2 inside a job, as on a real cluster. The controller's namespace holds a
bridge; a veth pair joins each node to it; the addresses (10.77.0.0/24) exist only inside these namespaces, and
``ip netns exec`` mounts a per-namespace /etc/hosts that names them. Every namespace has its own ports, so the
standard SLURM ports are used. The filesystem (the repository, the cluster's state directory) is shared by all nodes,
with per-node spool, pid and log files through ``%n``. munged's socket is a file, so one munged serves every node.

Settings known to work on bookworm as root (issue 8): /run/munge before munged, proctrack/linuxproc, task/none,
select/cons_tres. Client commands (sbatch, scontrol, ...) run in the controller's namespace: :meth:`run`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SUBNET = "10.77.0"
CONTROLLER_ADDR = f"{SUBNET}.1"
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and apt-get (as root) is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True, timeout=600)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr[-500:]}")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise SlurmUnavailable(f"network namespaces unavailable: `ip {' '.join(args)}` failed: {r.stderr.strip()}")


class TwoNodeSlurm:
    def __init__(self, root: Path, cpus_per_node: int = 4):
        self.root = root
        self.cpus = cpus_per_node  # more than the machine's cores: jobs of 4 tasks fit on one node (config_overrides)
        self.conf = root / "slurm.conf"
        tag = f"pd{os.getpid()}"  # unique per test session: two sessions never share namespaces
        self.namespaces = {"ctl": f"{tag}-ctl", **{node: f"{tag}-{node}" for node in NODES}}
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ set-up
    def make_network(self) -> None:
        if os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "nsenter", "unshare")):
            raise SlurmUnavailable("network namespaces unavailable: needs root, iproute2's `ip`, `nsenter` and "
                                   "`unshare`")
        ctl = self.namespaces["ctl"]
        for ns in self.namespaces.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        _ip("-n", ctl, "addr", "add", f"{CONTROLLER_ADDR}/24", "dev", "br0")
        _ip("-n", ctl, "link", "set", "br0", "up")
        for node, addr in NODES.items():
            ns, port = self.namespaces[node], f"to-{node}"
            _ip("link", "add", port, "netns", ctl, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", ctl, "link", "set", port, "master", "br0")
            _ip("-n", ctl, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        hosts = "127.0.0.1 localhost\n" + f"{CONTROLLER_ADDR} ctl\n" + \
            "".join(f"{addr} {node}\n" for node, addr in NODES.items())
        for ns in self.namespaces.values():  # bind-mounted over /etc/hosts inside the namespace (in_namespace)
            Path("/etc/netns", ns).mkdir(parents=True, exist_ok=True)
            Path("/etc/netns", ns, "hosts").write_text(hosts)

    def write_config(self) -> None:
        for d in ("state", "log", "run", *(f"spool/{node}" for node in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        nodes = "".join(f"NodeName={node} NodeAddr={addr} NodeHostname={node} CPUs={self.cpus} State=UNKNOWN\n"
                        for node, addr in NODES.items())
        self.conf.write_text(f"""ClusterName=peftdist
SlurmctldHost=ctl({CONTROLLER_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=3600
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        r = subprocess.run(["munged", "--force"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")

    def in_namespace(self, where: str, argv: list[str]) -> list[str]:
        """``argv`` inside ``where``'s network namespace with its host name (UTS namespace) and /etc/hosts (a private
        mount namespace: ``ip netns exec`` would also remount /sys, hiding the cgroup tree slurmd reads)."""
        ns = self.namespaces[where]
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "sh", "-c",
                f"mount --bind /etc/netns/{ns}/hosts /etc/hosts && hostname {where} && exec {quoted}"]

    def start(self, timeout: float = 60) -> "TwoNodeSlurm":
        try:
            self.make_network()
            self.write_config()
            self.start_munge()
            self.procs.append(subprocess.Popen(self.in_namespace("ctl", ["slurmctld", "-D", "-f", str(self.conf)]),
                                               env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for node in NODES:
                self.procs.append(subprocess.Popen(
                    self.in_namespace(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]), env=self.env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.nodes_idle():
                    return self
                time.sleep(0.3)
            raise SlurmUnavailable(f"the two SLURM nodes did not become idle within {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def log_tail(self, chars: int = 800) -> str:
        logs = sorted((self.root / "log").glob("*.log")) if (self.root / "log").is_dir() else []
        return "\n".join(f"--- {f.name}\n{f.read_text()[-chars:]}" for f in logs)

    # ------------------------------------------------------------------ use
    def run(self, *cmd: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, scancel, sinfo) run in the controller's namespace."""
        r = subprocess.run(self.in_namespace("ctl", list(cmd)), env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def wait_for(self, job_id: str, states: tuple[str, ...] = FINISHED, timeout: float = 120,
                 poll: float = 0.25) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s (wanted {states})")

    def node_states(self) -> dict[str, str]:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        return dict(line.split() for line in r.stdout.splitlines() if line.strip()) if r.returncode == 0 else {}

    def nodes_idle(self) -> bool:
        states = self.node_states()
        return set(states) == set(NODES) and all(s in ("idle", "mixed") for s in states.values())

    def pids_on(self, node: str) -> list[int]:
        """Processes running on ``node`` (in its network namespace)."""
        r = subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        if self.procs:
            self.run("scancel", "--full", "--user=root", check=False, timeout=20)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        for name, ns in self.namespaces.items():
            if not Path("/run/netns", ns).exists():
                continue
            if name != "ctl":
                for pid in self.pids_on(name):  # job steps left behind by the stopped slurmd
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
