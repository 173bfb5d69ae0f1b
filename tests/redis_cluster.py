"""A local Redis Cluster for the tests: three primaries (redis-server in cluster mode) on free
loopback ports, each in its own process group and reaped, joined by ``redis-cli --cluster
create``. The pool's keyspace must keep every multi-key operation in one hash slot there."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import Proc, RedisServer, free_port, wait_until

PRIMARIES = 3


@dataclass
class RedisCluster:
    dir: Path
    nodes: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def addresses(self) -> str:
        """REDIS_CLUSTER_NODES for the services: every node (one would do)."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> RedisCluster:
        try:
            for i in range(PRIMARIES):
                self._node(i)
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, i: int) -> None:
        port, bus = free_port(), free_port()
        d = self.dir / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        # cluster-port: the bus on a port of its own (the default, port + 10000, may be taken).
        argv = [RedisServer.binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"), "--cluster-port", str(bus),
                "--cluster-node-timeout", "2000"]
        self.nodes.append(Proc(f"redis-{i}", argv, dict(os.environ), d / "redis.log").start())
        self.ports.append(port)
        wait_until(RedisServer(port, d).ping, 10, what=f"cluster node {port}")

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed (it comes with redis-server)"
        subprocess.run([cli, "--cluster", "create", *self.addresses.split(","),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        wait_until(self._ok, 30, interval=0.1, what="cluster_state:ok on every node")

    def _ok(self) -> bool:
        cli = shutil.which("redis-cli")
        assert cli
        for port in self.ports:
            out = subprocess.run([cli, "-p", str(port), "cluster", "info"], check=True,
                                 capture_output=True, text=True, timeout=5).stdout
            if "cluster_state:ok" not in out:
                return False
        return True

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
