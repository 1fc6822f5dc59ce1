"""`ray up` for real on one machine: three hosts made of Linux namespaces, real OpenSSH.

    laptop 10.231.0.100 ── br0 ──┬── head   10.231.0.1  (sshd on :22)
                                 └── worker 10.231.0.2  (sshd on :22)

Each host is a network namespace (its own interfaces, routes and ports) plus a PID namespace
(its own process list, so `ray stop` on a host sees only that host's Ray) plus a mount
namespace where the host has its own /root and /tmp: its own ~/.ray/auth_token, Ray session
dir and SSH state, as a separate box would. The repo, the venv and the Python the venv was
built from stay visible at their usual paths (also when they live under /root or /tmp), like a
box image with Python preinstalled. The laptop runs `ray up` with a config derived from
ray_cluster.yaml, changing only the IPs, the SSH user and the key.

Nothing leaves the namespaces: the only addresses are 10.231.0.0/24 inside them, the laptop
namespace (the hosts' gateway) forwards nothing, and no address is added outside them. Each
host's PID 1 is a small reaper; killing it ends every process of that host, so cleanup ends
only what the harness started.

Run as root:  python tests/cluster/harness.py run [--faults N] [--keep]
(--faults N: the fault plan run clean, then N times each fault scenario of faults.py.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ray_cluster.yaml"
SUBNET = "10.231.0"
HEAD_IP, WORKER_IP, LAPTOP_IP = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.100"
USER = "root"
# Plans on several boxes need run storage every node sees (docs/cluster.md): stages write files
# that later stages, possibly on another node, read. Real boxes mount an NFS export there; the
# harness bind-mounts one directory at ~/introspect-runs (`introspect submit`'s default
# --runs-dir) on both boxes. Everything else in the boxes' homes stays private.
SHARED = "introspect-runs"
PREFIX = "icl"  # namespace names: icl-<run id>-<host>
DASHBOARD = "http://127.0.0.1:8265"
APT_PACKAGES = ["openssh-server", "openssh-client", "rsync", "iproute2", "util-linux", "curl"]
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]

# PID 1 of each host: runs the host's main program and reaps orphans (Ray daemons are
# re-parented to PID 1 when their launching shell exits). argv[1] is the run's workdir, only
# so that cleanup can tell this process is ours.
REAPER = """
import os, subprocess, sys
main = subprocess.Popen(sys.argv[2:])
while True:
    pid, status = os.wait()
    if pid == main.pid:
        sys.exit(1)
"""


def derive_config(base: dict, head_ip: str, worker_ips: list[str], user: str, key: str) -> dict:
    """ray_cluster.yaml with only the IPs, SSH user and key replaced (what a user edits)."""
    config = copy.deepcopy(base)
    config["provider"]["head_ip"] = head_ip
    config["provider"]["worker_ips"] = list(worker_ips)
    config["auth"]["ssh_user"] = user
    config["auth"]["ssh_private_key"] = key
    return config


def sh(cmd: list[str], timeout: float = 60, check: bool = True, **kw):
    """Run a command, capture text output; on failure raise with its output in the message."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def ensure_tools() -> None:
    """Install OpenSSH, rsync, iproute2 and curl from Debian packages when any is missing."""
    if os.geteuid() != 0:
        raise RuntimeError("the cluster harness needs root (namespaces, sshd, mounts)")
    needed = ["/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "ip", "unshare", "nsenter", "curl"]
    if all(shutil.which(t) or Path(t).exists() for t in needed):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sh(["apt-get", "update", "-q"], timeout=600, env=env)
    sh(["apt-get", "install", "-y", "-q", *APT_PACKAGES], timeout=900, env=env)


TMP = Path("/tmp")


def kept_paths(venv: Path, home: Path) -> list[Path]:
    """Host paths that must stay visible inside a host whose home and /tmp are replaced.

    The venv's interpreter may come from the home (pyenv in ~/.pyenv); the repo and its venv
    may be in the home or in /tmp (a fresh clone in /tmp/...). A path inside another kept one
    comes with it.
    """
    base = sh([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"])
    paths = {Path(base.stdout.strip()).resolve(), venv.resolve(), REPO}
    paths = {p for p in paths if p.is_relative_to(home) or p.is_relative_to(TMP)}
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


@dataclass
class Host:
    """One namespace host: its name, address, directory and PID-namespace init."""

    name: str
    ip: str
    dir: Path
    ns: str
    proc: subprocess.Popen | None = None
    unshare_pid: int = 0
    init_pid: int = 0
    namespaces: tuple[str, ...] = ()  # e.g. ("pid:[4026532301]", "net:[4026532233]")


class Harness:
    """Builds the namespace hosts, drives `ray up`/jobs/`ray down` and cleans up after itself."""

    def __init__(self, venv: Path | None = None, workdir: Path | None = None):
        self.venv = Path(venv or sys.prefix)
        self.run_id = f"{os.getpid()}"
        self.work = Path(workdir or tempfile.mkdtemp(prefix=f"{PREFIX}-{self.run_id}-",
                                                      dir="/var/tmp"))
        # Not under /tmp: each host mounts its own /tmp over the real one.
        self.home = Path(pwd.getpwnam(USER).pw_dir)
        self.key = self.work / "id_ed25519"
        self.hosts = {
            name: Host(name, ip, self.work / name, f"{PREFIX}-{self.run_id}-{name}")
            for name, ip in (("laptop", LAPTOP_IP), ("head", HEAD_IP), ("worker", WORKER_IP))
        }
        self.tunnel_proc: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    @property
    def plans_dir(self) -> Path:
        """The fault scenarios' plans (tests/cluster/faults.py): inside the repo, which
        `introspect submit` uploads; removed with everything else."""
        return REPO / "tests" / "plans" / f".cluster-{self.run_id}"

    # ---- hosts -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the network, the three hosts and their sshd; generate the throwaway key."""
        ensure_tools()
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cluster-harness",
            "-f", str(self.key)])
        keep = kept_paths(self.venv, self.home)
        for host in self.hosts.values():
            self._make_dirs(host, keep)
            sh(["ip", "netns", "add", host.ns])
            sh(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        self._wire()
        for host in self.hosts.values():
            self._boot(host, keep)
        self._save_state()

    def _save_state(self) -> None:
        # Lets `harness.py clean WORKDIR` undo a run whose process died.
        state = {"run_id": self.run_id, "hosts": {
            h.name: {"ns": h.ns, "unshare_pid": h.proc.pid, "init_pid": h.init_pid,
                     "namespaces": h.namespaces}
            for h in self.hosts.values()}}
        (self.work / "state.json").write_text(json.dumps(state))

    @classmethod
    def from_state(cls, workdir: Path) -> Harness:
        """The harness of an earlier run, rebuilt from WORKDIR/state.json (for `clean`)."""
        state = json.loads((workdir / "state.json").read_text())
        h = cls(workdir=workdir)
        h.run_id = state["run_id"]
        for name, s in state["hosts"].items():
            host = h.hosts[name]
            host.ns, host.init_pid, host.unshare_pid = s["ns"], s["init_pid"], s["unshare_pid"]
            host.namespaces = tuple(s["namespaces"])
        return h

    def _make_dirs(self, host: Host, keep: list[Path]) -> None:
        home = host.dir / "home"
        (home / ".ssh").mkdir(parents=True)
        (host.dir / "tmp").mkdir()
        home.chmod(0o700)
        (host.dir / "tmp").chmod(0o1777)
        for p in keep:
            self._mount_point(host, p).mkdir(parents=True, exist_ok=True)
        if host.name == "laptop":
            return
        (home / SHARED).mkdir()
        (self.work / SHARED).mkdir(exist_ok=True)
        shutil.copy(f"{self.key}.pub", home / ".ssh" / "authorized_keys")
        # The box image: a ready venv, and no internet (so no hub look-ups).
        (home / ".bashrc").write_text(
            f"export INTROSPECT_VENV={self.venv}\nexport HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1\n"
            "export INTROSPECT_CPU_BF16=0\n"
        )
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.dir / "host_key")])
        (host.dir / "sshd_config").write_text(
            f"Port 22\nListenAddress {host.ip}\nHostKey {host.dir / 'host_key'}\n"
            f"PidFile {host.dir / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nMaxStartups 100\nMaxSessions 100\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
        )

    def _mount_point(self, host: Host, path: Path) -> Path:
        """Where a kept path is bind-mounted in the directories that become the host's home
        or /tmp (so it shows at its usual path inside the host)."""
        if path.is_relative_to(self.home):
            return host.dir / "home" / path.relative_to(self.home)
        return host.dir / "tmp" / path.relative_to(TMP)

    def _wire(self) -> None:
        """A bridge in the laptop namespace; one veth to each box; default route via laptop."""
        lap = self.hosts["laptop"].ns
        sh(["ip", "-n", lap, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", lap, "addr", "add", f"{LAPTOP_IP}/24", "dev", "br0"])
        sh(["ip", "-n", lap, "link", "set", "br0", "up"])
        # The laptop is the boxes' gateway and routes nowhere: nothing leaves the namespaces.
        sh(["ip", "netns", "exec", lap, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
        for name in ("head", "worker"):
            box = self.hosts[name]
            sh(["ip", "-n", lap, "link", "add", f"v{name}", "type", "veth",
                "peer", "name", "eth0", "netns", box.ns])
            sh(["ip", "-n", lap, "link", "set", f"v{name}", "master", "br0", "up"])
            sh(["ip", "-n", box.ns, "addr", "add", f"{box.ip}/24", "dev", "eth0"])
            sh(["ip", "-n", box.ns, "link", "set", "eth0", "up"])
            # Ray finds a node's own IP from the route to the internet, as on a real box.
            sh(["ip", "-n", box.ns, "route", "add", "default", "via", LAPTOP_IP])

    def _boot(self, host: Host, keep: list[Path]) -> None:
        home = host.dir / "home"
        mounts = [f"mount --bind {p} {self._mount_point(host, p)}" for p in keep]
        if host.name != "laptop":  # the boxes' shared run storage (an NFS export on real boxes)
            mounts.append(f"mount --bind {self.work / SHARED} {home / SHARED}")
        mounts += [f"mount --rbind {home} {self.home}", f"mount --rbind {host.dir / 'tmp'} {TMP}"]
        main = "sleep infinity"
        if host.name != "laptop":
            main = f"/usr/sbin/sshd -D -e -f {host.dir / 'sshd_config'}"
        reaper = f"exec {sys.executable} -c '{REAPER}' {self.work} {main}"
        script = " && ".join([*mounts, reaper])
        log = open(host.dir / "init.log", "w")  # noqa: SIM115 - lives as long as the host
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, "unshare", "--pid", "--mount", "--fork",
             "--kill-child", "--mount-proc", "--propagation", "private", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        host.unshare_pid = host.proc.pid
        host.init_pid = self._child_of(host.proc.pid)
        host.namespaces = tuple(os.readlink(f"/proc/{host.init_pid}/ns/{kind}")
                                for kind in ("pid", "net"))
        if host.name != "laptop":
            self._wait_port(host)

    @staticmethod
    def _child_of(pid: int, timeout: float = 10) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise RuntimeError(f"unshare {pid} started no init process")

    def _wait_port(self, host: Host, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.on("laptop", ["ssh", *SSH_OPTS, "-i", str(self.key),
                                   f"{USER}@{host.ip}", "true"], check=False)
            if r.returncode == 0:
                return
            time.sleep(0.3)
        log = (host.dir / "init.log").read_text()
        raise RuntimeError(f"sshd on {host.name} ({host.ip}) not reachable\n{log}")

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for commands on a host (none of the caller's Ray settings)."""
        path = f"{self.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return {"PATH": path, "HOME": str(self.home), "USER": USER, "LANG": "C.UTF-8",
                "RAY_USAGE_STATS_ENABLED": "0", **extra}

    def nsenter(self, host: str) -> list[str]:
        """The command prefix that runs a program inside `host` (net, mount and PID ns)."""
        return ["nsenter", "-t", str(self.hosts[host].init_pid), "-n", "-m", "-p", f"--wd={REPO}"]

    def on(self, host: str, cmd: list[str], timeout: float = 60, check: bool = True,
           **env: str) -> subprocess.CompletedProcess:
        """Run `cmd` inside `host` with a clean environment."""
        return sh(self.nsenter(host) + cmd, timeout=timeout, check=check, env=self.env(**env))

    def ssh(self, host: str, command: str, timeout: float = 60, check: bool = True):
        """Run a command on a box over SSH from the laptop, in the shell Ray's own commands get.

        Ray's command runner sources ~/.bashrc explicitly; so does this (a login shell alone
        reads only ~/.profile).
        """
        ip = self.hosts[host].ip
        shell = f"bash --login -c {shlex.quote('source ~/.bashrc; ' + command)}"
        return self.on("laptop", ["ssh", *SSH_OPTS, "-i", str(self.key), f"{USER}@{ip}", shell],
                       timeout, check)

    # ---- ray up / jobs / ray down ------------------------------------------------------

    def write_config(self) -> Path:
        """The derived cluster config: ray_cluster.yaml with our IPs, user and key."""
        base = yaml.safe_load(CONFIG.read_text())
        config = derive_config(base, HEAD_IP, [WORKER_IP], USER, str(self.key))
        path = self.work / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def make_token(self) -> str:
        """The laptop's cluster token, made the way docs/cluster.md tells users to."""
        self.on("laptop", ["ray", "get-auth-token", "--generate"])
        self.on("laptop", ["chmod", "600", f"{self.home}/.ray/auth_token"])
        return (self.hosts["laptop"].dir / "home" / ".ray" / "auth_token").read_text().strip()

    def ray_up(self, timeout: float = 600, attempts: int = 2) -> subprocess.CompletedProcess:
        """`ray up -y` from the laptop, in the repo root like a user.

        A second attempt when the first fails, as a user would re-run it: `ray start` gives a
        node 30 s (hard-coded in Ray) to register, which a 2-core machine under heavy load from
        other work can miss. The attempts made are recorded in `timings`.
        """
        config = self.write_config()
        t = time.time()
        for attempt in range(1, attempts + 1):
            r = self.on("laptop", ["ray", "up", "-y", "--no-config-cache", str(config)], timeout,
                        check=attempt == attempts)
            if r.returncode == 0:
                break
            print(f"ray up attempt {attempt} failed: {r.stdout[-300:]}", file=sys.stderr)
        self.timings["ray_up_s"] = round(time.time() - t, 1)
        self.timings["ray_up_attempts"] = attempt
        return r

    def ray_down(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray down -y` from the laptop."""
        return self.on("laptop", ["ray", "down", "-y", str(self.work / "cluster.yaml")], timeout)

    def rsync_down(self, remote: str, local: Path) -> subprocess.CompletedProcess:
        """`ray rsync-down` a file from the head (how a user fetches a report)."""
        cmd = ["ray", "rsync-down", str(self.work / "cluster.yaml"), remote, str(local)]
        return self.on("laptop", cmd, timeout=120)

    def api(self, path: str) -> dict | list | None:
        """GET `path` of the dashboard's HTTP API through the tunnel, with the token; None on an
        error. curl, not Ray's CLI: the tests poll all the time, and each `ray` command starts a
        Python that imports Ray (~2 s of CPU). On 2 cores that also run both boxes, that polling
        took a core, enough to starve a restarting worker's dashboard agent past the raylet's
        fixed wait for it (the raylet then aborts: "Timed out waiting for file
        .../metrics_agent_port_...") until the fault scenarios timed out."""
        fetch = 'curl -sf -m 20 -H "Authorization: Bearer $(cat ~/.ray/auth_token)" "$0"'
        r = self.on("laptop", ["sh", "-c", fetch, DASHBOARD + path], timeout=30, check=False)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else None
        except json.JSONDecodeError:
            return None

    def alive(self) -> list[dict]:
        """The alive Ray nodes (Ray's state API); [] on an error."""
        got = self.api("/api/v0/nodes?limit=1000&detail=false")
        if not got:
            return []
        return [n for n in got["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def alive_nodes(self) -> list[str]:
        """IPs of the alive Ray nodes."""
        return sorted(n["node_ip"] for n in self.alive())

    def wait_nodes(self, n: int, timeout: float = 300) -> float:
        """Seconds until `n` nodes are alive; raises after `timeout`."""
        t = time.time()
        while time.time() - t < timeout:
            if len(self.alive_nodes()) == n:
                return round(time.time() - t, 1)
            time.sleep(3)
        raise RuntimeError(f"expected {n} alive nodes, got {self.alive_nodes()}")

    @contextmanager
    def tunnel(self):
        """`ssh -N -L 8265:localhost:8265 root@HEAD`, as docs/cluster.md shows, on the laptop."""
        cmd = self.nsenter("laptop") + ["ssh", "-N", *SSH_OPTS, "-o", "ExitOnForwardFailure=yes",
                                        "-i", str(self.key), "-L", "8265:localhost:8265",
                                        f"{USER}@{HEAD_IP}"]
        self.tunnel_proc = subprocess.Popen(cmd, env=self.env(), stderr=subprocess.PIPE,
                                            start_new_session=True)
        try:
            deadline = time.time() + 20
            probe = "import urllib.request as u; u.urlopen('http://127.0.0.1:8265', timeout=2)"
            while self.on("laptop", ["python", "-c", probe], check=False).returncode != 0:
                if self.tunnel_proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"tunnel failed: {self.tunnel_proc.stderr.read()}")
                time.sleep(0.5)
            yield DASHBOARD
        finally:
            self.tunnel_proc.kill()
            self.tunnel_proc.wait()

    def submit(self, entrypoint: list[str], token: bool = True, timeout: float = 600,
               wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit` through the tunnel; `token=False` sends no token at all."""
        mode = "token" if token else "disabled"
        cmd = ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO)]
        cmd += [] if wait else ["--no-wait"]
        return self.on("laptop", cmd + ["--", *entrypoint], timeout, check=False,
                       RAY_AUTH_MODE=mode)

    def submit_plan(self, plan: str, timeout: float = 900,
                    wait: bool = True) -> subprocess.CompletedProcess:
        """`introspect submit PLAN` through the tunnel, with the token, as docs/cluster.md says.

        The plan runs on the head under ~/introspect-runs/<plan name>/ (submit's default), which
        is `self.work / SHARED / <plan name>` from outside the hosts.
        """
        cmd = ["introspect", "submit", plan, "--address", DASHBOARD]
        cmd += [] if wait else ["--no-wait"]
        return self.on("laptop", cmd, timeout, check=False, RAY_AUTH_MODE="token")

    def job(self, sub: str, job_id: str, token: bool = True, timeout: float = 600):
        """`ray job status|logs|stop JOB_ID` through the tunnel."""
        cmd = ["ray", "job", sub, "--address", DASHBOARD, job_id]
        return self.on("laptop", cmd, timeout, check=False,
                       RAY_AUTH_MODE="token" if token else "disabled")

    def job_id(self, submitted: subprocess.CompletedProcess) -> str:
        """The submission id printed by `ray job submit`."""
        m = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr)
        if not m:
            raise RuntimeError(f"no job id in:\n{submitted.stdout}\n{submitted.stderr}")
        return m.group(0)

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        """Poll the job API until the job ends; return its final status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = (self.api(f"/api/jobs/{job_id}") or {}).get("status")
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        raise RuntimeError(f"job {job_id} still running after {timeout}s")

    def probe(self, *args: str, timeout: float = 120) -> dict:
        """tests/cluster/state_probe.py on the laptop (Ray's state API through the tunnel, with
        the token); its last output line, parsed."""
        cmd = ["python", "tests/cluster/state_probe.py", *args]
        r = self.on("laptop", cmd, timeout, check=False, RAY_AUTH_MODE="token")
        if r.returncode != 0:
            raise RuntimeError(f"state_probe {' '.join(args)} -> {r.returncode}\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def plan_dir(self, name: str) -> Path:
        """A plan's run directory on the boxes' shared storage, seen from outside the hosts."""
        return self.work / SHARED / name

    def plan_status(self, name: str, since: float) -> dict | None:
        """The plan runner's status.json ({unit: done | skipped | failed: ... | blocked ...}),
        if a run that started after `since` wrote it."""
        path = self.plan_dir(name) / "status.json"
        if not path.exists() or path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())

    def train_decisions(self, host: str = "head") -> list[str]:
        """Ray Train's failure-policy decisions (retry or raise, and the error) from the
        controller logs of every Ray session on a host, oldest first."""
        logs = self.hosts[host].dir / "tmp" / "ray"  # the host's /tmp
        files = sorted(logs.glob("session_2*/logs/train/ray-train-app-controller-*.log"),
                       key=lambda f: f.stat().st_mtime)
        text = "\n".join(f.read_text(errors="replace") for f in files)
        return [text[m.start():m.start() + 800] for m in re.finditer(r"\[FailurePolicy\]", text)]

    def listening(self, host: str) -> list[str]:
        """`local address:port` of every listening TCP socket on a host."""
        r = self.on(host, ["ss", "-Hltn"])
        return [line.split()[3] for line in r.stdout.splitlines() if line.strip()]

    # ---- cleanup -----------------------------------------------------------------------

    def cleanup(self) -> None:
        """End every host (its PID 1 and so all its processes), delete namespaces and files."""
        if self.tunnel_proc and self.tunnel_proc.poll() is None:
            self.tunnel_proc.kill()
        for host in self.hosts.values():
            # Killing PID 1 of a PID namespace kills every process in it; unshare follows.
            for pid in (host.init_pid, host.unshare_pid):
                if pid and self._ours(pid):
                    os.kill(pid, signal.SIGKILL)
            if host.proc:
                host.proc.wait(timeout=30)
        for host in self.hosts.values():
            # An orphaned init is re-parented and reaped by the system: wait for that.
            deadline = time.time() + 30
            while any(self._ours(p, zombie=True) for p in (host.init_pid, host.unshare_pid) if p):
                if time.time() > deadline:
                    break  # leftovers() will name it
                time.sleep(0.1)
        for host in self.hosts.values():
            deadline = time.time() + 30
            while self._ns_pids(host.ns) and time.time() < deadline:
                time.sleep(0.2)
            sh(["ip", "netns", "del", host.ns], check=False)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.plans_dir, ignore_errors=True)

    def _ours(self, pid: int, zombie: bool = False) -> bool:
        """Whether `pid` is still one of this run's host processes (or, with `zombie`, its
        unreaped remains: a zombie's command line is empty). A reused pid has someone else's.
        """
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return (zombie and not cmdline) or str(self.work).encode() in cmdline

    @staticmethod
    def _ns_pids(ns: str) -> list[str]:
        r = sh(["ip", "netns", "pids", ns], check=False)
        return r.stdout.split() if r.returncode == 0 else []

    def leftovers(self) -> list[str]:
        """Whatever of ours is still there: namespaces, processes, files. Empty when clean."""
        left = [f"netns {ns}" for ns in sh(["ip", "netns", "list"]).stdout.split()
                if ns.startswith(f"{PREFIX}-{self.run_id}-")]
        for host in self.hosts.values():
            for pid in (host.init_pid, host.unshare_pid):
                if pid and self._ours(pid, zombie=True):
                    left.append(f"process {pid} ({host.name} init)")
        # Any process still in one of our hosts' PID or network namespaces (Ray, sshd, ssh...).
        ours = {ns for host in self.hosts.values() for ns in host.namespaces}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                spaces = {os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("pid", "net")}
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if spaces & ours or str(self.work).encode() in cmdline and int(pid) != os.getpid():
                left.append(f"process {pid}: {cmdline.decode(errors='replace')[:120]}")
        if self.work.exists():
            left.append(f"directory {self.work} (keys, homes)")
        if self.plans_dir.exists():
            left.append(f"directory {self.plans_dir} (the fault plans)")
        return left


SMOKE_JOB = ["python", "tests/cluster/cluster_job.py"]
# The plan the cluster test submits with `introspect submit`. plans/quickstart.yaml takes ~15
# min on 2 free cores, too long next to everything else here, so the default is its reduced
# variant on tiny-random (every kind of stage the quickstart has but sweep and concepts).
PLAN = os.environ.get("INTROSPECT_CLUSTER_PLAN", "tests/plans/tiny.yaml")


def report(output: str) -> dict:
    """The JSON line the smoke job prints after CLUSTER_JOB_REPORT."""
    for line in output.splitlines():
        if line.startswith("CLUSTER_JOB_REPORT "):
            return json.loads(line.removeprefix("CLUSTER_JOB_REPORT "))
    raise RuntimeError(f"no CLUSTER_JOB_REPORT line in job output:\n{output[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "clean"])
    parser.add_argument("workdir", nargs="?", type=Path, help="for clean: the run's directory")
    parser.add_argument("--faults", type=int, default=0, metavar="N",
                        help="run each fault scenario (faults.py) N times")
    parser.add_argument("--keep", action="store_true", help="leave the hosts up (debugging)")
    args = parser.parse_args()
    if args.action == "clean":
        h = Harness.from_state(args.workdir)
        h.cleanup()
        print("left over:", h.leftovers())
        return
    t0 = time.time()
    h = Harness()
    print("workdir:", h.work, flush=True)
    try:
        h.start()
        h.make_token()
        print(h.ray_up().stdout[-3000:], flush=True)
        h.timings["both_nodes_s"] = h.wait_nodes(2)
        with h.tunnel():
            r = h.submit(SMOKE_JOB)
            print(r.stdout[-3000:], r.stderr[-2000:], flush=True)
            refused = h.submit(SMOKE_JOB, token=False)
            print("without token rc:", refused.returncode)
            print(refused.stdout[-500:], refused.stderr[-500:])
            if args.faults:
                import faults  # beside this file

                print("clean:", json.dumps(faults.clean_run(h)), flush=True)
                for scenario in faults.SCENARIOS:
                    for i in range(args.faults):
                        print(f"{scenario} {i}:", json.dumps(faults.run(h, scenario, i)),
                              flush=True)
        if not args.keep:
            h.ray_down()
    finally:
        if not args.keep:
            h.cleanup()
            print("left over:", h.leftovers())
        h.timings["total_s"] = round(time.time() - t0, 1)
        print(json.dumps(h.timings))


if __name__ == "__main__":
    main()
