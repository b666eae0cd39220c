"""The knobs ssi-pager cares about, each named, explained and checked against a root directory.

`inspect(root, options)` returns one `Finding` per knob: its status, current and desired value,
a message for the operator, and the `Change` list that `apply` would make. Nothing here writes.

Statuses: "ok" (nothing to do), "change" (apply will set it), "warn" (needs a person: hardware,
a group to create), "missing" (this kernel lacks the knob: reported, skipped), "info".
"""

from __future__ import annotations

import grp
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tuning import hugepages, sysfs

MIB = 1024 * 1024
SOCKET_BUFFER_MAX = 16 * MIB       # room for a 64 KiB-chunk pipeline at 10-25 Gbit/s x ~1 ms
BUSY_POLL_US = 50                  # µs a blocking read/poll spins before sleeping
MAX_MAP_COUNT = 262144             # QEMU memory slots + per-region mappings, as DB/VM hosts use
UFFD_DEVICE = "dev/userfaultfd"
UFFD_GROUP = "ssi-pager"
UDEV_RULE = "etc/udev/rules.d/60-ssi-pager-userfaultfd.rules"
LIMITS_FILE = "etc/security/limits.d/90-ssi-pager-memlock.conf"
THP_ENABLED = "sys/kernel/mm/transparent_hugepage/enabled"
THP_DEFRAG = "sys/kernel/mm/transparent_hugepage/defrag"
HALT_POLL = "sys/module/haltpoll/parameters/guest_halt_poll_ns"
CPUIDLE_DRIVER = "sys/devices/system/cpu/cpuidle/current_driver"
HALT_POLL_NS = 200000              # cpuidle-haltpoll's own default: 200 µs at most, adaptive

SLOW_LINK_WARNING = "{speed} network detected - consider upgrading to 10G for remote memory"
RDMA_TIP = ("no RDMA device found - an RDMA NIC (InfiniBand or RoCE) cuts page fetches from "
            "~25 µs (TCP) to a few µs; ssi-pager uses it automatically when present")


@dataclass
class Change:
    """One write `apply` makes: target kind and path below root, previous and new value."""

    knob: str
    kind: str            # "text" | "choice" | "file" | "device" (see tuning.sysfs)
    path: str            # relative to root
    previous: Any
    new: Any


@dataclass
class Finding:
    knob: str
    status: str
    current: str | None
    desired: str | None
    message: str
    changes: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = [asdict(c) for c in self.changes]
        return d


@dataclass
class Options:
    """Choices an operator may make on the command line."""

    uffd_group: str = UFFD_GROUP
    hugepages: int | None = None  # 2 MiB pages guests on hugetlb memory need (None: report)


# ---------------------------------------------------------------- sysctls

def at_least(n: int) -> Callable[[str], str | None]:
    def want(cur: str) -> str | None:
        return None if int(cur) >= n else str(n)
    return want


def exactly(v: str) -> Callable[[str], str | None]:
    def want(cur: str) -> str | None:
        return None if cur == v else v
    return want


def max_at_least(n: int) -> Callable[[str], str | None]:
    """For 'min default max' triples (tcp_rmem): raise only the max, keep min and default."""
    def want(cur: str) -> str | None:
        lo, default, hi = (int(x) for x in cur.split())
        return None if hi >= n else f"{lo} {default} {n}"
    return want


@dataclass
class Sysctl:
    name: str
    want: Callable[[str], str | None]
    persist: str                 # the value written to the sysctl.d file
    why: str

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_sysctl(root, self.name)
        if cur is None:
            return Finding(self.name, "missing", None, self.persist,
                           f"not in this kernel ({self.why}); nothing to do")
        desired = self.want(cur)
        if desired is None:
            return Finding(self.name, "ok", cur, cur, self.why)
        change = Change(self.name, "text", sysfs.sysctl_rel(self.name), cur, desired)
        return Finding(self.name, "change", cur, desired, self.why, [change])


SYSCTLS: list[Sysctl] = [
    Sysctl("net.core.rmem_max", at_least(SOCKET_BUFFER_MAX), str(SOCKET_BUFFER_MAX),
           "largest receive buffer a socket may ask for: page batches in flight"),
    Sysctl("net.core.wmem_max", at_least(SOCKET_BUFFER_MAX), str(SOCKET_BUFFER_MAX),
           "largest send buffer a socket may ask for"),
    Sysctl("net.ipv4.tcp_rmem", max_at_least(SOCKET_BUFFER_MAX), f"4096 131072 {SOCKET_BUFFER_MAX}",
           "TCP receive autotuning ceiling"),
    Sysctl("net.ipv4.tcp_wmem", max_at_least(SOCKET_BUFFER_MAX), f"4096 16384 {SOCKET_BUFFER_MAX}",
           "TCP send autotuning ceiling"),
    Sysctl("net.core.busy_poll", at_least(BUSY_POLL_US), str(BUSY_POLL_US),
           "µs poll/select spin on the NIC queue: lower fault latency for some CPU"),
    Sysctl("net.core.busy_read", at_least(BUSY_POLL_US), str(BUSY_POLL_US),
           "µs a blocking socket read spins: the pager's fault thread reads replies"),
    Sysctl("kernel.numa_balancing", exactly("0"), "0",
           "NUMA balancing unmaps guest pages to sample them: extra faults and latency spikes"),
    Sysctl("vm.max_map_count", at_least(MAX_MAP_COUNT), str(MAX_MAP_COUNT),
           "mappings per process: guest RAM slots and per-region mappings"),
]


# ---------------------------------------------------------------- userfaultfd access

def group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def udev_rule(group: str) -> str:
    return ("# ssi-pager: let members of the group open /dev/userfaultfd (least privilege:\n"
            "# no world access, vm.unprivileged_userfaultfd stays 0).\n"
            f'KERNEL=="userfaultfd", OWNER="root", GROUP="{group}", MODE="0660"\n')


def fmt_device(v: dict[str, int] | None) -> str | None:
    if v is None:
        return None
    try:
        gname = grp.getgrgid(v["gid"]).gr_name
    except KeyError:
        gname = str(v["gid"])
    return f"uid={v['uid']} group={gname} mode={v['mode']:04o}"


class UnprivilegedUffd:
    name = "vm.unprivileged_userfaultfd"

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_sysctl(root, self.name)
        has_dev = sysfs.read_device(root, UFFD_DEVICE) is not None
        if cur is None:
            return Finding(self.name, "missing", None, None,
                           "kernel predates the knob: only root (CAP_SYS_PTRACE) can use "
                           "userfaultfd; run the pager as root")
        if cur == "0":
            return Finding(self.name, "ok", cur, cur,
                           "userfaultfd(2) limited to privileged users; unprivileged pagers "
                           "use /dev/userfaultfd through its group" if has_dev else
                           "userfaultfd(2) limited to privileged users: run the pager as root")
        if not has_dev:
            return Finding(self.name, "warn", cur, "0",
                           "every user may create a userfaultfd (a known exploit aid); this "
                           "kernel has no /dev/userfaultfd (< 6.1), so 1 stays unless the "
                           "pager runs as root")
        return Finding(self.name, "change", cur, "0",
                       "every user may create a userfaultfd (a known exploit aid); "
                       "/dev/userfaultfd with a group grants it to the pager only",
                       [Change(self.name, "text", sysfs.sysctl_rel(self.name), cur, "0")])


class UffdDevice:
    name = "/dev/userfaultfd"

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_device(root, UFFD_DEVICE)
        if cur is None:
            return Finding(self.name, "missing", None, None,
                           "no /dev/userfaultfd (kernel < 6.1 or CONFIG_USERFAULTFD off): the "
                           "pager uses the userfaultfd(2) syscall, as root")
        gid = group_gid(options.uffd_group)
        world = cur["mode"] & 0o007
        if gid is None:
            msg = (f"group {options.uffd_group!r} does not exist: create it "
                   f"(`groupadd --system {options.uffd_group}`), add the users running QEMU and "
                   f"the pager, then `ssi-pager tune apply`")
            if not world:
                if cur["mode"] & 0o777 == 0o600 and cur["uid"] == 0:
                    return Finding(self.name, "info", fmt_device(cur), None,
                                   "root only (fine when the pager runs as root); " + msg)
                return Finding(self.name, "warn", fmt_device(cur), None, msg)
            want = {"uid": 0, "gid": cur["gid"], "mode": cur["mode"] & ~0o007}
            return Finding(self.name, "change", fmt_device(cur), fmt_device(want),
                           "world-accessible: removing other users' access; " + msg,
                           [Change(self.name, "device", UFFD_DEVICE, cur, want)])
        want = {"uid": 0, "gid": gid, "mode": 0o660}
        rule = udev_rule(options.uffd_group)
        changes: list[Change] = []
        if cur != want:
            changes.append(Change(self.name, "device", UFFD_DEVICE, cur, want))
        old_rule = sysfs.read_file(root, UDEV_RULE)
        if old_rule != rule:
            changes.append(Change(self.name, "file", UDEV_RULE, old_rule, rule))
        msg = (f"root:{options.uffd_group} 0660 now, and a udev rule ({UDEV_RULE}) at boot; "
               f"never 0666")
        return Finding(self.name, "change" if changes else "ok", fmt_device(cur),
                       fmt_device(want), msg, changes)


# ---------------------------------------------------------------- memory, THP

@dataclass
class Thp:
    name: str
    rel: str
    good: tuple[str, ...]
    recommended: str
    why: str

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_selected(root, self.rel)
        if cur is None:
            return Finding(self.name, "missing", None, self.recommended,
                           "no transparent hugepage support in this kernel")
        if cur in self.good:
            return Finding(self.name, "ok", cur, cur, self.why)
        return Finding(self.name, "change", cur, self.recommended, self.why,
                       [Change(self.name, "choice", self.rel, cur, self.recommended)])


THPS = [
    Thp("transparent_hugepage.enabled", THP_ENABLED, ("madvise", "never"), "madvise",
        "'always' lets khugepaged collapse and compact behind the pager's back; 'madvise' "
        "keeps huge pages where QEMU asks for them"),
    Thp("transparent_hugepage.defrag", THP_DEFRAG, ("madvise", "defer+madvise", "defer", "never"),
        "madvise", "'always' stalls faulting threads in direct compaction"),
]


def fmt_limit(v: int | None) -> str:
    return "unlimited" if v is None else f"{v // 1024} KiB"


class Memlock:
    name = "memlock"

    def inspect(self, root: str, options: Options) -> Finding:
        devices = sysfs.rdma_devices(root)
        limit = sysfs.memlock_limit(root)
        cur = None if limit is None else f"soft {fmt_limit(limit[0])}, hard {fmt_limit(limit[1])}"
        content = (f"# ssi-pager: RDMA registers guest memory with the NIC (pinned pages)\n"
                   f"@{options.uffd_group} soft memlock unlimited\n"
                   f"@{options.uffd_group} hard memlock unlimited\n")
        if not devices:
            return Finding(self.name, "info", cur, None,
                           "no RDMA device: locked-memory limit does not matter for TCP")
        if limit is not None and limit[0] is None:
            return Finding(self.name, "ok", cur, cur, "unlimited: RDMA can register memory")
        old = sysfs.read_file(root, LIMITS_FILE)
        changes = [] if old == content else [Change(self.name, "file", LIMITS_FILE, old, content)]
        return Finding(self.name, "change" if changes else "warn", cur, "unlimited",
                       f"RDMA pins registered memory: raise memlock ({LIMITS_FILE}; the systemd "
                       f"units set LimitMEMLOCK=infinity); takes effect at next login", changes)


class HugePages:
    """vm.nr_hugepages: the pool hugetlb guest RAM comes from (``tune --hugepages N``)."""

    name = "vm.nr_hugepages"

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_sysctl(root, self.name)
        if cur is None:
            return Finding(self.name, "missing", None, None,
                           "no hugetlb pool in this kernel: guests use 4 KiB pages")
        p = hugepages.pool(root)
        free = f", {p.free} free" if p is not None else ""
        want = options.hugepages
        if want is None:
            return Finding(self.name, "info", cur, None,
                           f"{cur} huge pages reserved{free}; guests on hugetlb memory need "
                           f"one per 2 MiB of RAM: `ssi-pager tune apply --hugepages N`")
        if int(cur) >= want:
            return Finding(self.name, "ok", cur, cur, f"at least {want} huge pages{free}")
        return Finding(self.name, "change", cur, str(want),
                       f"{want} huge pages for guests on hugetlb memory (the kernel may find "
                       f"fewer when memory is fragmented: check again after apply)",
                       [Change(self.name, "text", sysfs.sysctl_rel(self.name), cur,
                               str(want))])


# ---------------------------------------------------------------- a host that is a VM

class GuestHaltPoll:
    """A pager (or memory node) host that is itself a KVM guest: how long its idle vCPUs poll
    before they halt. A halted vCPU takes 60-100 µs to run again, and every fault wakes two
    threads (the pager's, then the guest's); cpuidle-haltpoll polls first, growing its window
    up to this bound while wake-ups keep coming within it, and shrinking it when they do not."""

    name = "haltpoll.guest_halt_poll_ns"

    def inspect(self, root: str, options: Options) -> Finding:
        cur = sysfs.read_text(root, HALT_POLL)
        if cur is None:
            return Finding(self.name, "missing", None, None,
                           "not a KVM guest with cpuidle-haltpoll (bare metal, or another "
                           "hypervisor): nothing to do")
        driver = sysfs.read_text(root, CPUIDLE_DRIVER)
        if driver != "haltpoll":
            return Finding(self.name, "info", cur, None,
                           f"cpuidle driver is {driver or 'unknown'}, not haltpoll: this "
                           f"value is not used (boot with cpuidle_haltpoll.force=1 to use it)")
        try:
            desired = at_least(HALT_POLL_NS)(cur)
        except ValueError:
            return Finding(self.name, "warn", cur, str(HALT_POLL_NS),
                           f"unreadable value {cur!r} in /{HALT_POLL}: expected nanoseconds")
        if desired is None:
            return Finding(self.name, "ok", cur, cur,
                           "idle vCPUs poll before they halt: wake-ups for faults are fast")
        return Finding(self.name, "change", cur, desired,
                       f"idle vCPUs poll at most {cur} ns before halting, and a halted vCPU "
                       f"takes 60-100 µs to wake for a fault; {desired} is the kernel's "
                       f"default (costs host CPU only while this VM idles; at boot: kernel "
                       f"parameter haltpoll.guest_halt_poll_ns={desired})",
                       [Change(self.name, "text", HALT_POLL, cur, desired)])


# ---------------------------------------------------------------- hardware (report only)

class Network:
    name = "network"

    def inspect(self, root: str, options: Options) -> Finding:
        links = sysfs.net_links(root)
        known = {k: v for k, v in links.items() if v is not None}
        cur = ", ".join(f"{k} {v} Mb/s" for k, v in known.items()) or None
        if not known:
            return Finding(self.name, "info", cur, None,
                           "no link speed reported (virtual NICs): measure with "
                           "`ssi-pager bench transport`")
        fastest = max(known.values())
        if fastest <= 1000:
            speed = "1 Gbps" if fastest == 1000 else f"{fastest} Mbps"
            return Finding(self.name, "warn", cur, ">= 10000 Mb/s",
                           SLOW_LINK_WARNING.format(speed=speed))
        return Finding(self.name, "ok", cur, cur, f"fastest link {fastest // 1000} Gbit/s")


class Rdma:
    name = "rdma"

    def inspect(self, root: str, options: Options) -> Finding:
        devices = sysfs.rdma_devices(root)
        if not devices:
            return Finding(self.name, "info", None, None, RDMA_TIP)
        return Finding(self.name, "ok", ", ".join(devices), None,
                       "RDMA device present: transport upgrades to RDMA when both ends have one "
                       "(python3-pyverbs installed)")


KNOBS: list[Any] = [UnprivilegedUffd(), UffdDevice(), *SYSCTLS, *THPS, HugePages(), Memlock(),
                    GuestHaltPoll(), Network(), Rdma()]


def inspect(root: str = "/", options: Options | None = None) -> list[Finding]:
    """One finding per knob; reads only."""
    options = options or Options()
    return [k.inspect(os.fspath(root), options) for k in KNOBS]


def sysctl_d(options: Options | None = None) -> str:
    """The sysctl.d file with every sysctl ssi-pager recommends (host independent)."""
    lines = ["# ssi-pager host tuning: generated by `ssi-pager tune --emit-sysctl-d`.",
             "# Install as /etc/sysctl.d/90-ssi-pager.conf, then `sysctl --system`.",
             "",
             "# userfaultfd(2) for privileged users only; the pager's group uses /dev/userfaultfd",
             "vm.unprivileged_userfaultfd = 0"]
    for s in SYSCTLS:
        lines += ["", f"# {s.why}", f"{s.name} = {s.persist}"]
    return "\n".join(lines) + "\n"
