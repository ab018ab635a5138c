"""What a real node changes on the host outside its own directory, noted before it starts
and compared after it stops (importable as `tests.host_state`): kernel tunables, mounts,
network links, iptables rules, cgroups at the top of each hierarchy, and the paths the
kubelet, containerd and the CNI plugins write to whatever their configuration says.

The host has other users meanwhile (image builds, other tests' containerds), so mounts,
links and cgroups are compared where a node could make them, not everywhere."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# What kubelet 1.20 sets at start (setupKernelTunables) and what the bridge plugin sets
# for a gateway, with the neighbours that move with them.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)

# Written by kubelet 1.20 and libcni whatever their configuration says, and the defaults
# of what the real node's configuration moves (so a missed setting shows).
OUTSIDE_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/var/run/netns",
    "/etc/cni/net.d",
    "/opt/cni",
    "/opt/containerd",
    "/usr/libexec/kubernetes",
    "/etc/kubernetes",
)

# Every cluster's own directory starts so (tests/realnode.py).
CLUSTER_DIRS = "/run/wsn-"
NODE_MOUNTS = (CLUSTER_DIRS, *OUTSIDE_PATHS, "/run/netns", "/sys/fs/cgroup")
# The node's bridges (wsn*, wsc*) and the CNI plugin's pod ends.
NODE_LINKS = ("wsn", "wsc", "veth", "cni")
NODE_CGROUPS = ("warmstart-", "kubepods", "kubelet")

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def read_sysctls() -> dict[str, str]:
    """The values of SYSCTLS that this kernel has."""
    found = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        if path.exists():
            found[name] = path.read_text().strip()
    return found


def restore_sysctls(saved: Mapping[str, str]) -> None:
    """Write back each of `saved` that differs now."""
    for name, value in saved.items():
        path = Path("/proc/sys") / name
        if path.exists() and path.read_text().strip() != value:
            path.write_text(value)


def mount_points() -> list[tuple[str, str]]:
    """Every mount of this mount namespace as (mount point, file system type), as many
    times as it is mounted."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        separator = fields.index("-")
        mounts.append((_unescape(fields[4]), fields[separator + 1]))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def cgroup_hierarchies() -> list[Path]:
    """The mount points of the cgroup hierarchies (v1 and v2)."""
    return sorted({Path(p) for p, kind in mount_points() if kind in ("cgroup", "cgroup2")})


def _node_mount(point: str, kind: str) -> bool:
    return kind == "nsfs" or any(point.startswith(prefix) for prefix in NODE_MOUNTS)


def _links() -> list[str]:
    done = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    names = (line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines())
    return sorted(name for name in names if name.startswith(NODE_LINKS))


def _iptables() -> list[str]:
    rules = []
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool) is None:
            continue
        done = subprocess.run([tool], capture_output=True, text=True, check=False)
        rules += [
            f"{tool}: {_COUNTERS.sub('', line)}"
            for line in done.stdout.splitlines()
            if not line.startswith("#")
        ]
    return rules


def _listing(path: Path, prefixes: tuple[str, ...] = ("",)) -> tuple[str, ...] | None:
    if not path.is_dir():
        return None
    return tuple(sorted(c.name for c in path.iterdir() if c.name.startswith(prefixes)))


@dataclass(frozen=True)
class HostState:
    sysctls: dict[str, str]
    mounts: dict[tuple[str, str], int]
    links: list[str]
    iptables: list[str]
    cgroups: dict[str, tuple[str, ...] | None]
    paths: dict[str, tuple[str, ...] | None]

    def differences(self, after: HostState) -> list[str]:
        """What differs in `after`, one line each."""
        found = []
        for what in ("sysctls", "mounts", "cgroups", "paths"):
            old, new = getattr(self, what), getattr(after, what)
            for key in sorted(set(old) | set(new), key=str):
                if old.get(key) != new.get(key):
                    found.append(f"{what} {key}: {old.get(key)!r} -> {new.get(key)!r}")
        for what in ("links", "iptables"):
            old, new = (
                collections.Counter(getattr(self, what)),
                collections.Counter(getattr(after, what)),
            )
            found += [f"{what}: gone {item!r}" for item in sorted(old - new)]
            found += [f"{what}: new {item!r}" for item in sorted(new - old)]
        return found


def host_state() -> HostState:
    """The host as a real node could change it, now."""
    return HostState(
        sysctls=read_sysctls(),
        mounts=dict(collections.Counter(m for m in mount_points() if _node_mount(*m))),
        links=_links(),
        iptables=_iptables(),
        cgroups={str(h): _listing(h, NODE_CGROUPS) for h in cgroup_hierarchies()},
        paths={path: _listing(Path(path)) for path in OUTSIDE_PATHS},
    )
