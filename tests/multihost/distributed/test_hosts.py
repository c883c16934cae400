"""The job really spans hosts: one rank per test host, each in its own network namespace with its
own host name, at the address that name resolves to, talking over that network (not loopback).

Run with the equivalence tests of ``tests/torch/distributed`` by the ``multihost`` and
``multihost-mpi`` phases (``horovodrun -H host1:1,host2:1``, Gloo and MPI controllers).
"""

from __future__ import annotations

import os
import socket

import horovod.torch as hvd
import psutil
import pytest

HOSTS = [h for h in os.environ.get("HVD_NGD_MULTIHOST_HOSTS", "").split(",") if h]

pytestmark = pytest.mark.skipif(
    not HOSTS, reason="needs the test hosts: run through scripts/multihost/netns_hosts.py run -- horovodrun ..."
)


def ipv4_addresses() -> dict:
    return {nic: sorted(a.address for a in addrs if a.family == socket.AF_INET)
            for nic, addrs in psutil.net_if_addrs().items()}


def test_one_rank_per_host() -> None:
    assert hvd.size() == len(HOSTS) and hvd.local_size() == 1 and hvd.cross_size() == len(HOSTS)
    assert hvd.local_rank() == 0 and hvd.cross_rank() == hvd.rank()
    me = {
        "host": os.environ.get("HOROVOD_HOSTNAME") or os.environ.get("OMPI_MCA_orte_ess_node_name") or "",
        "netns": os.stat("/proc/self/ns/net").st_ino,
        "hostname": socket.gethostname(),
        "addresses": ipv4_addresses(),
        "resolved": {h: socket.gethostbyname(h) for h in HOSTS},
    }
    everyone = hvd.allgather_object(me)
    assert len({e["netns"] for e in everyone}) == len(HOSTS), "ranks share a network namespace"
    for rank, entry in enumerate(everyone):
        own = {a for nic, addrs in entry["addresses"].items() if nic != "lo" for a in addrs}
        # the rank runs on the host that its name resolves to, and on no other
        assert {h for h, address in entry["resolved"].items() if address in own} == {HOSTS[rank]}, entry
        assert entry["hostname"] == HOSTS[rank], entry
        if entry["host"]:
            assert entry["host"] == HOSTS[rank], entry


def test_controller_uses_the_host_network() -> None:
    """Gloo is told the common interface of the hosts (eth0), which exists on every host."""
    if hvd.gloo_enabled():
        assert os.environ.get("HOROVOD_GLOO_IFACE") == "eth0"
    else:
        assert hvd.mpi_enabled()
    assert "eth0" in psutil.net_if_addrs()
