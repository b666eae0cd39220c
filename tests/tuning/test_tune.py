"""tuning: check, plan, apply, revert on a copy of /proc/sys and /sys, and on the real one."""

from __future__ import annotations

import errno
import grp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuning import knobs, state, sysfs
from tuning.errors import StateError

ROOT_GROUP = grp.getgrgid(0).gr_name
COPIED = [sysfs.sysctl_rel(s.name) for s in knobs.SYSCTLS] + [
    sysfs.sysctl_rel("vm.unprivileged_userfaultfd"), knobs.THP_ENABLED, knobs.THP_DEFRAG,
    "proc/self/limits", sysfs.sysctl_rel("vm.nr_hugepages"), "proc/meminfo", knobs.HALT_POLL,
    knobs.CPUIDLE_DRIVER]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root holding a copy of this host's knobs, a 0600 userfaultfd node and a 1 Gbit NIC."""
    r = tmp_path / "root"
    for rel in COPIED:
        src = Path("/") / rel
        if src.exists():
            dst = r / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
    (r / "dev").mkdir()
    (r / "dev/userfaultfd").touch(mode=0o600)
    os.chmod(r / "dev/userfaultfd", 0o600)
    (r / "sys/class/net/eth0").mkdir(parents=True)
    (r / "sys/class/net/eth0/speed").write_text("1000\n")
    (r / "sys/class/net/lo").mkdir()
    return r


def options(group: str = ROOT_GROUP) -> knobs.Options:
    return knobs.Options(uffd_group=group)


def snapshot(root: Path | str) -> dict[str, object]:
    """Every knob's current value as read, plus the files apply may create."""
    snap: dict[str, object] = {f.knob: f.current for f in knobs.inspect(root, options())}
    snap["/dev/userfaultfd"] = sysfs.read_device(root, knobs.UFFD_DEVICE)
    for rel in (knobs.UDEV_RULE, knobs.LIMITS_FILE):
        snap[rel] = sysfs.read_file(root, rel)
    return snap


def by_knob(findings: list[knobs.Finding]) -> dict[str, knobs.Finding]:
    return {f.knob: f for f in findings}


def test_check_only_reads(root: Path) -> None:
    def tree() -> list[tuple[str, int, bytes]]:
        return sorted((str(p), p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
                      for p in root.rglob("*"))
    before = tree()
    findings = knobs.inspect(root, options())
    assert tree() == before
    assert {f.status for f in findings} <= {"ok", "change", "warn", "missing", "info"}


def test_apply_then_revert_restores_everything(root: Path, tmp_path: Path) -> None:
    (root / knobs.THP_ENABLED).write_text("[always] madvise never\n")
    sysctl = root / sysfs.sysctl_rel("net.core.busy_poll")
    sysctl.write_text("0\n")
    before = snapshot(root)
    plan = knobs.inspect(root, options())
    assert by_knob(plan)["net.core.busy_poll"].desired == "50"
    st = tmp_path / "state.json"
    done, errors = state.apply(root, plan, st)
    assert errors == []
    assert {c.knob for c in done} >= {"net.core.busy_poll", "transparent_hugepage.enabled",
                                      "/dev/userfaultfd"}
    assert sysctl.read_text().strip() == "50"
    assert sysfs.read_selected(root, knobs.THP_ENABLED) == "madvise"
    dev = sysfs.read_device(root, knobs.UFFD_DEVICE)
    assert dev == {"uid": 0, "gid": 0, "mode": 0o660}
    assert f'GROUP="{ROOT_GROUP}", MODE="0660"' in (root / knobs.UDEV_RULE).read_text()
    assert st.stat().st_mode & 0o777 == 0o600
    # a second check finds nothing left to change
    assert [f.knob for f in knobs.inspect(root, options()) if f.status == "change"] == []
    assert snapshot(root) != before

    restored, errors = state.revert(root, st)
    assert errors == [] and len(restored) == len(done)
    assert snapshot(root) == before
    assert not (root / knobs.UDEV_RULE).exists()
    assert not st.exists()


def test_second_apply_keeps_the_original_previous_values(root: Path, tmp_path: Path) -> None:
    sysctl = root / sysfs.sysctl_rel("vm.max_map_count")
    sysctl.write_text("1000\n")
    st = tmp_path / "state.json"
    state.apply(root, knobs.inspect(root, options()), st)
    sysctl.write_text("2000\n")          # someone lowered it again
    state.apply(root, knobs.inspect(root, options()), st)
    assert sysctl.read_text().strip() == str(knobs.MAX_MAP_COUNT)
    state.revert(root, st)
    assert sysctl.read_text().strip() == "1000"


def test_missing_knobs_are_reported_not_fatal(root: Path, tmp_path: Path) -> None:
    (root / sysfs.sysctl_rel("net.core.busy_poll")).unlink()
    (root / knobs.THP_ENABLED).unlink()
    (root / "dev/userfaultfd").unlink()
    found = by_knob(knobs.inspect(root, options()))
    assert found["net.core.busy_poll"].status == "missing"
    assert found["transparent_hugepage.enabled"].status == "missing"
    assert found["/dev/userfaultfd"].status == "missing"
    done, errors = state.apply(root, list(found.values()), tmp_path / "s.json")
    assert errors == []
    assert "net.core.busy_poll" not in {c.knob for c in done}


def test_guest_halt_polling_set_only_where_the_haltpoll_driver_uses_it(root: Path,
                                                                      tmp_path: Path) -> None:
    """A KVM guest whose cpuidle-haltpoll polls 0 ns gets the kernel's default back (and the
    0 again on revert); another idle driver, a garbled value or no such module: left alone,
    each said."""
    knob = "haltpoll.guest_halt_poll_ns"
    poll, driver = root / knobs.HALT_POLL, root / knobs.CPUIDLE_DRIVER
    poll.parent.mkdir(parents=True, exist_ok=True)
    driver.parent.mkdir(parents=True, exist_ok=True)
    poll.write_text("0\n")
    driver.write_text("haltpoll\n")
    f = by_knob(knobs.inspect(root, options()))[knob]
    assert (f.status, f.current, f.desired) == ("change", "0", str(knobs.HALT_POLL_NS))
    assert "60-100 µs" in f.message and "haltpoll.guest_halt_poll_ns=" in f.message
    st = tmp_path / "state.json"
    done, errors = state.apply(root, [f], st)
    assert errors == [] and [c.knob for c in done] == [knob]
    assert poll.read_text().strip() == str(knobs.HALT_POLL_NS)
    assert by_knob(knobs.inspect(root, options()))[knob].status == "ok"
    state.revert(root, st)
    assert poll.read_text().strip() == "0"

    driver.write_text("acpi_idle\n")
    f = by_knob(knobs.inspect(root, options()))[knob]
    assert f.status == "info" and f.changes == [] and "acpi_idle" in f.message
    driver.write_text("haltpoll\n")
    poll.write_text("lots\n")
    f = by_knob(knobs.inspect(root, options()))[knob]
    assert f.status == "warn" and f.changes == [] and "'lots'" in f.message
    poll.unlink()
    f = by_knob(knobs.inspect(root, options()))[knob]
    assert f.status == "missing" and f.changes == []


def test_tcp_buffers_raise_only_the_max(root: Path) -> None:
    (root / sysfs.sysctl_rel("net.ipv4.tcp_rmem")).write_text("4096\t87380\t6291456\n")
    f = by_knob(knobs.inspect(root, options()))["net.ipv4.tcp_rmem"]
    assert f.status == "change"
    assert f.desired == f"4096 87380 {knobs.SOCKET_BUFFER_MAX}"


def test_world_accessible_device_is_narrowed_without_a_group(root: Path) -> None:
    os.chmod(root / "dev/userfaultfd", 0o666)
    f = by_knob(knobs.inspect(root, options("ssipg-no-such-group")))["/dev/userfaultfd"]
    assert f.status == "change"
    assert "groupadd --system ssipg-no-such-group" in f.message
    assert f.changes[0].new["mode"] == 0o660
    os.chmod(root / "dev/userfaultfd", 0o600)
    f = by_knob(knobs.inspect(root, options("ssipg-no-such-group")))["/dev/userfaultfd"]
    assert f.status == "info" and f.changes == []


def test_unprivileged_userfaultfd_prefers_the_device(root: Path) -> None:
    (root / sysfs.sysctl_rel("vm.unprivileged_userfaultfd")).write_text("1\n")
    f = by_knob(knobs.inspect(root, options()))["vm.unprivileged_userfaultfd"]
    assert (f.status, f.desired) == ("change", "0")
    (root / "dev/userfaultfd").unlink()
    f = by_knob(knobs.inspect(root, options()))["vm.unprivileged_userfaultfd"]
    assert f.status == "warn" and f.changes == []


def test_nic_speed_and_rdma_warnings(root: Path) -> None:
    found = by_knob(knobs.inspect(root, options()))
    assert found["network"].status == "warn"
    assert found["network"].message.startswith("1 Gbps network detected - consider upgrading")
    assert found["rdma"].message == knobs.RDMA_TIP
    (root / "sys/class/net/eth0/speed").write_text("100\n")
    found = by_knob(knobs.inspect(root, options()))
    assert found["network"].message.startswith("100 Mbps network detected - consider upgrading")
    assert found["memlock"].status == "info"
    (root / "sys/class/net/eth0/speed").write_text("25000\n")
    (root / "sys/class/infiniband/mlx5_0").mkdir(parents=True)
    (root / "proc/self/limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max locked memory         8388608              8388608              bytes\n")
    found = by_knob(knobs.inspect(root, options()))
    assert found["network"].status == "ok"
    assert (found["rdma"].status, found["rdma"].current) == ("ok", "mlx5_0")
    assert found["memlock"].status == "change"
    assert found["memlock"].changes[0].path == knobs.LIMITS_FILE


def test_revert_without_or_with_a_bad_state_file_says_what_to_do(root: Path, tmp_path: Path) \
        -> None:
    with pytest.raises(StateError, match="nothing was applied"):
        state.revert(root, tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StateError, match="fix or remove it"):
        state.revert(root, bad)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pager.cli", "tune", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_check_plan_apply_revert_json(root: Path, tmp_path: Path) -> None:
    (root / sysfs.sysctl_rel("net.core.busy_read")).write_text("0\n")
    r = cli("check", "--json", "--root", str(root), "--uffd-group", ROOT_GROUP)
    assert r.returncode == 0, r.stderr
    checked = {f["knob"]: f for f in json.loads(r.stdout)["findings"]}
    assert checked["net.core.busy_read"]["status"] == "change"
    r = cli("plan", "--root", str(root))
    assert "- 0\n+ 50" in r.stdout
    r = cli("apply", "--json", "--root", str(root))
    assert r.returncode == 0, r.stderr
    st = Path(json.loads(r.stdout)["state"])
    assert st == root / state.STATE_REL and st.exists()
    assert (root / sysfs.sysctl_rel("net.core.busy_read")).read_text().strip() == "50"
    r = cli("revert", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert (root / sysfs.sysctl_rel("net.core.busy_read")).read_text().strip() == "0"
    r = cli("revert", "--root", str(root))
    assert r.returncode == 1 and "nothing was applied" in r.stderr


def test_emitted_sysctl_d_names_real_knobs(tmp_path: Path) -> None:
    out = tmp_path / "90-ssi-pager.conf"
    r = cli("--emit-sysctl-d", str(out))
    assert r.returncode == 0, r.stderr
    settings = [line.split("=")[0].strip() for line in out.read_text().splitlines()
                if line and not line.startswith("#")]
    assert "net.core.busy_poll" in settings and "vm.unprivileged_userfaultfd" in settings
    for name in settings:
        assert Path("/", sysfs.sysctl_rel(name)).exists() or name.startswith("net.core.busy")


def writable_proc_sys() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/max_map_count", os.W_OK)


@pytest.mark.skipif(not writable_proc_sys(), reason="needs root and a writable /proc/sys")
def test_apply_and_revert_on_the_real_proc_sys(tmp_path: Path) -> None:
    """Writes the real kernel knobs for a moment, then checks every one is back."""
    before = snapshot("/")
    plan = knobs.inspect("/", options("ssipg-no-such-group"))
    planned = [c for f in plan for c in f.changes]
    st = tmp_path / "state.json"
    try:
        done, errors = state.apply("/", plan, st)
        assert errors == []
        assert len(done) == len(planned)
        if planned:
            assert snapshot("/") != before
    finally:
        if st.exists():
            state.revert("/", st)
    assert snapshot("/") == before
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_knob_that_cannot_be_written_is_reported_and_the_rest_applied(root: Path,
                                                                        tmp_path: Path) -> None:
    busy = root / sysfs.sysctl_rel("net.core.busy_read")
    busy.write_text("0\n")
    poll = root / sysfs.sysctl_rel("net.core.busy_poll")
    poll.write_text("0\n")
    plan = knobs.inspect(root, options())
    busy.unlink()
    busy.mkdir()                       # writing it now fails (EISDIR), like a read-only knob
    st = tmp_path / "state.json"
    _done, errors = state.apply(root, plan, st)
    assert len(errors) == 1 and errors[0].startswith("net.core.busy_read:")
    assert "Is a directory" in errors[0]
    assert poll.read_text().strip() == "50"
    busy.rmdir()
    busy.write_text("0\n")
    _restored, errors = state.revert(root, st)
    assert errors == []
    assert poll.read_text().strip() == "0"


def test_unwritable_state_file_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="pass --state FILE") as err:
        state.apply(root, knobs.inspect(root, options()), blocker / "state.json")
    assert err.value.errno == errno.EEXIST  # the kernel's reason (a file where a dir goes), kept
    assert str(blocker / "state.json") in str(err.value)


def test_hugepages_checked_set_and_reverted(root: Path, tmp_path: Path) -> None:
    nr = root / sysfs.sysctl_rel("vm.nr_hugepages")
    nr.write_text("2\n")
    found = by_knob(knobs.inspect(root, options()))["vm.nr_hugepages"]
    assert found.status == "info" and found.current == "2" and not found.changes
    assert "--hugepages" in found.message  # says how to ask for a pool
    want = knobs.Options(uffd_group=ROOT_GROUP, hugepages=512)  # 1 GiB of guest RAM
    found = by_knob(knobs.inspect(root, want))["vm.nr_hugepages"]
    assert found.status == "change" and found.desired == "512"
    st = tmp_path / "state.json"
    done, errors = state.apply(root, [found], st)
    assert errors == [] and [c.knob for c in done] == ["vm.nr_hugepages"]
    assert nr.read_text().strip() == "512"
    assert by_knob(knobs.inspect(root, want))["vm.nr_hugepages"].status == "ok"
    state.revert(root, st)
    assert nr.read_text().strip() == "2"
    # the command line refuses a negative count
    r = subprocess.run([sys.executable, "-m", "pager.cli", "tune", "check", "--root", str(root),
                        "--hugepages", "-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--hugepages -1 is negative" in r.stderr


def test_reserved_pool_is_given_back(tmp_path: Path) -> None:
    """On the real kernel: free pages while the block runs, the pool lowered again after."""
    from tuning import hugepages
    from tuning.errors import HugePagesError

    before = hugepages.pool()
    if before is None or os.getuid() != 0:
        pytest.skip("needs root and a hugetlb pool")
    try:
        with hugepages.reserved(before.free + 2) as p:
            assert p.free >= before.free + 2
            inside = p.total
    except HugePagesError as exc:
        pytest.skip(str(exc))
    after = hugepages.pool()
    assert after is not None and after.total <= inside - 2


def test_a_pool_lowered_under_pages_in_use_is_not_left_raised() -> None:
    """On the real kernel: a block ends while its pages are still mapped (a client's memory
    outliving the test that made it: the kernel keeps them as surplus); a block that starts
    meanwhile promotes them to persistent. Once both ended and the pages are unmapped, the
    pool is back where it was (the old arithmetic left those pages reserved for good)."""
    import mmap

    from tuning import hugepages
    from tuning.errors import HugePagesError

    before = hugepages.pool()
    if before is None or os.getuid() != 0 or before.page_size != 2 << 20:
        pytest.skip("needs root and a 2 MiB hugetlb pool")
    held = 3
    fd, mem = -1, None
    try:
        with hugepages.reserved(before.free + 4):
            fd = os.memfd_create("held", os.MFD_HUGETLB | os.MFD_CLOEXEC)
            os.ftruncate(fd, held * before.page_size)
            mem = mmap.mmap(fd, held * before.page_size, flags=mmap.MAP_SHARED)
            for i in range(held):
                mem[i * before.page_size] = 1
        lowered = hugepages.pool()
        assert lowered is not None and lowered.surplus >= held  # still mapped: surplus
        with hugepages.reserved(lowered.free + 4) as p:
            assert p.free >= lowered.free + 4
            mem.close()
            mem = None
            os.close(fd)
            fd = -1
    except HugePagesError as exc:
        pytest.skip(str(exc))
    finally:
        if mem is not None:
            mem.close()
        if fd >= 0:
            os.close(fd)
    after = hugepages.pool()
    assert after is not None
    assert (after.total, after.surplus) == (before.total, before.surplus), (before, after)
