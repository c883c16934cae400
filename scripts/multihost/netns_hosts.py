#!/usr/bin/env python3
"""Test hosts on this machine: network namespaces ``host1 .. hostN`` joined by a bridge, each
with its own sshd, so that ``horovodrun -H host1:1,host2:1`` starts workers over ssh on hosts
with separate network stacks, as on a cluster.

Layout (everything lives in namespaces this script creates; nothing is added to the machine's
own network namespace):

- namespace ``hvdngd-sw`` holds the bridge ``br0`` (no address);
- namespace ``hvdngd-host<i>`` has ``lo`` and ``eth0`` (``10.213.72.<i>/24``), one end of a veth
  pair whose other end is a port of ``br0``;
- ``/etc/netns/hvdngd-host<i>/hosts`` names every host (``host1`` ...) and
  ``/etc/netns/hvdngd-host<i>/ssh/`` holds the ssh client and server configuration: ``ip netns
  exec`` mounts them over ``/etc/hosts`` and ``/etc/ssh`` for the processes of that host only;
- a host name per host (``host<i>``, a UTS namespace of its own for the sshd and what it starts);
- one sshd per host (key-only root login with a key generated here, host key generated here),
  listening on the host's address only. Keys, configs, pid files and logs are kept in
  ``STATE_DIR``.

The file system, the process table and users are shared (the namespaces separate the network
and the host name only), so ``.venv`` and the repository have the same paths on every host.

Commands (root only; every one is idempotent):
    netns_hosts.py up [--hosts N]        create the hosts (removing leftovers first)
    netns_hosts.py down                  stop every process in the hosts and remove them
    netns_hosts.py status                what exists now
    netns_hosts.py run [--hosts N] -- CMD...
                                          up, run CMD on host1 (the launcher), then down, even
                                          when CMD fails or the script is interrupted; exit
                                          status of CMD
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

PREFIX = "hvdngd-"
SWITCH = PREFIX + "sw"
BRIDGE = "br0"
SUBNET = "10.213.72"
NETNS_ETC = Path("/etc/netns")
STATE_DIR = Path(os.environ.get("HVD_NGD_MULTIHOST_DIR", "/tmp/hvd_ngd_multihost"))
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
ENV_MARK = "HVD_NGD_MULTIHOST_HOSTS"  # set for CMD by ``run``: the host names, comma-separated


class HostsError(RuntimeError):
    """The hosts cannot be created on this machine (the message says why and what to do)."""


@dataclass(frozen=True)
class Host:
    """One test host: its name as the other hosts resolve it, its namespace and address."""

    index: int

    @property
    def name(self) -> str:
        return f"host{self.index}"

    @property
    def netns(self) -> str:
        return f"{PREFIX}host{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def port(self) -> str:
        """The bridge's end of this host's veth pair (in the switch namespace)."""
        return f"port{self.index}"


def hosts(n: int) -> List[Host]:
    return [Host(i) for i in range(1, n + 1)]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and proc.returncode != 0:
        raise HostsError(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}")
    return proc


def in_ns(netns: str, *args: str) -> List[str]:
    return ["ip", "netns", "exec", netns, *args]


def on_host(host: Host, *args: str) -> List[str]:
    """``args`` run on ``host``: in its network namespace, and in a UTS namespace of its own whose
    host name is ``host.name`` (as on a cluster node; Horovod on Ray, for one, groups workers by
    host name)."""
    return in_ns(host.netns, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *args)


def our_namespaces() -> List[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def preflight() -> None:
    """Fail early, naming the fix, where the hosts cannot be made."""
    if os.geteuid() != 0:
        raise HostsError("network namespaces need root: run as root (or with sudo)")
    missing = [tool for tool in ("ip", "ssh", "ssh-keygen", SSHD) if shutil.which(tool) is None]
    if missing:
        raise HostsError(f"missing {missing}: apt-get install iproute2 openssh-client openssh-server "
                         "(scripts/setup_env.sh installs them)")


# ----------------------------------------------------------------------------- down
def _pids_in(netns: str) -> List[int]:
    out = sh("ip", "netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _stop_processes(netns: str) -> None:
    """Stop every process living in ``netns`` (sshd, sessions, workers): they are all ours."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        pids = _pids_in(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _pids_in(netns):
            time.sleep(0.1)


def down() -> None:
    """Remove every host, its processes and its files (idempotent)."""
    names = our_namespaces()
    for netns in names:
        _stop_processes(netns)
    for netns in names:
        sh("ip", "netns", "delete", netns, check=False)  # takes its veths and the bridge along
    for path in NETNS_ETC.glob(PREFIX + "*") if NETNS_ETC.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
    if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()) and (STATE_DIR / "created_etc_netns").exists():
        NETNS_ETC.rmdir()
    if (STATE_DIR / "created_privsep").exists() and PRIVSEP_DIR.is_dir() and not any(PRIVSEP_DIR.iterdir()):
        PRIVSEP_DIR.rmdir()
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    left = our_namespaces()
    if left:
        raise HostsError(f"namespaces left after removal: {left}")


# ----------------------------------------------------------------------------- up
def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _keys() -> None:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("id_ed25519", "host_ed25519"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hvd_ngd test {name}", "-f", str(STATE_DIR / name))
    shutil.copy(STATE_DIR / "id_ed25519.pub", STATE_DIR / "authorized_keys")
    (STATE_DIR / "authorized_keys").chmod(0o600)


def _etc(host: Host, all_hosts: Sequence[Host]) -> None:
    """The host's /etc/hosts and /etc/ssh, as ``ip netns exec`` will mount them."""
    etc = NETNS_ETC / host.netns
    # Every host's name (its gethostname() too, see on_host) resolves to its address on eth0, as a
    # cluster node's does: Gloo advertises the address of gethostname(), so loopback there makes
    # the other hosts connect to 127.0.0.1, and an unresolvable name crashes Horovod.
    names = "".join(f"{h.address} {h.name}\n" for h in all_hosts)
    _write(etc / "hosts", "127.0.0.1 localhost\n::1 localhost\n" + names)
    _write(etc / "ssh" / "ssh_config", "\n".join([
        "Host *",
        f"  IdentityFile {STATE_DIR / 'id_ed25519'}",
        f"  UserKnownHostsFile {STATE_DIR / 'known_hosts'}",
        "  StrictHostKeyChecking no",
        "  BatchMode yes",
        "  LogLevel ERROR",
        "  ConnectTimeout 10",
        "",
    ]))
    _write(etc / "ssh" / "sshd_config", "\n".join([
        f"ListenAddress {host.address}",
        "Port 22",
        f"HostKey {STATE_DIR / 'host_ed25519'}",
        f"AuthorizedKeysFile {STATE_DIR / 'authorized_keys'}",
        f"PidFile {STATE_DIR / (host.name + '.sshd.pid')}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 64",
        "MaxSessions 64",
        "",
    ]))


def _network(all_hosts: Sequence[Host]) -> None:
    sh("ip", "netns", "add", SWITCH)
    sh("ip", "-n", SWITCH, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", SWITCH, "link", "set", BRIDGE, "up")
    for host in all_hosts:
        sh("ip", "netns", "add", host.netns)
        sh("ip", "-n", SWITCH, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        sh("ip", "-n", SWITCH, "link", "set", host.port, "master", BRIDGE, "up")
        sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", host.netns, "link", "set", "lo", "up")


def _sshd(host: Host) -> None:
    sh(*on_host(host, SSHD, "-f", "/etc/ssh/sshd_config", "-E", str(STATE_DIR / f"{host.name}.sshd.log")))


def _wait_for_ssh(all_hosts: Sequence[Host], timeout: float = 20.0) -> None:
    """Every host reaches every host by name over ssh, and lands in that host's namespace."""
    launcher = all_hosts[0]
    deadline = time.time() + timeout
    for target in all_hosts:
        while True:
            proc = sh(*on_host(launcher, "ssh", target.name, "hostname && ip -4 -o addr show eth0"), check=False)
            if proc.returncode == 0 and proc.stdout.split()[:1] == [target.name] and target.address + "/" in proc.stdout:
                break
            if time.time() > deadline:
                log = (STATE_DIR / f"{target.name}.sshd.log")
                raise HostsError(f"ssh {launcher.name} -> {target.name} does not work: {proc.stdout}\n"
                                 f"sshd log: {log.read_text() if log.exists() else '(none)'}")
            time.sleep(0.2)


def up(n: int = 2) -> List[Host]:
    """Create ``n`` hosts, removing any left from an earlier run first; returns them."""
    if n < 2:
        raise HostsError(f"--hosts must be at least 2, got {n}")
    if n > 250:
        raise HostsError(f"--hosts must be at most 250 (one /24), got {n}")
    preflight()
    down()
    all_hosts = hosts(n)
    try:
        _keys()
        if not NETNS_ETC.is_dir():
            NETNS_ETC.mkdir(parents=True)
            (STATE_DIR / "created_etc_netns").touch()
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
            (STATE_DIR / "created_privsep").touch()
        for host in all_hosts:
            _etc(host, all_hosts)
        _network(all_hosts)
        for host in all_hosts:
            _sshd(host)
        _wait_for_ssh(all_hosts)
    except BaseException:
        down()
        raise
    return all_hosts


@contextmanager
def running_hosts(n: int = 2) -> Iterator[List[Host]]:
    """The hosts exist inside the block and are removed after it, also on errors and SIGTERM."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # turn SIGTERM into an exception so that ``finally`` runs
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield up(n)
    finally:
        try:
            down()
        finally:
            signal.signal(signal.SIGTERM, previous)


def status() -> str:
    lines = [f"namespaces: {our_namespaces() or 'none'}"]
    for netns in our_namespaces():
        lines.append(f"  {netns}: pids {_pids_in(netns)}")
    lines.append(f"/etc/netns entries: {sorted(p.name for p in NETNS_ETC.glob(PREFIX + '*')) if NETNS_ETC.is_dir() else []}")
    lines.append(f"state dir {STATE_DIR}: {'present' if STATE_DIR.exists() else 'absent'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--hosts", type=int, default=2)
    sub.add_parser("down")
    sub.add_parser("status")
    p_run = sub.add_parser("run")
    p_run.add_argument("--hosts", type=int, default=2)
    p_run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            made = up(args.hosts)
            print(f"hosts up: {', '.join(f'{h.name}={h.address} (netns {h.netns})' for h in made)}")
        elif args.command == "down":
            if os.geteuid() != 0:
                raise HostsError("removing network namespaces needs root")
            down()
            print("hosts down")
        elif args.command == "status":
            print(status())
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run needs a command after --")
            with running_hosts(args.hosts) as made:
                env = dict(os.environ, **{ENV_MARK: ",".join(h.name for h in made)})
                print(f"[multihost] hosts {', '.join(h.name for h in made)} up; on {made[0].name}: {' '.join(cmd)}",
                      flush=True)
                rc = subprocess.call(on_host(made[0], *cmd), env=env)
            print(f"[multihost] hosts removed (command exit status {rc})", flush=True)
            return rc
    except HostsError as err:
        print(f"[multihost] ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
