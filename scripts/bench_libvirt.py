"""qvm against libvirt on this host, measured in one run: issue 21's targets.

    scripts/bench --against-libvirt       (sets up first; installs libvirt when missing)
    bench_libvirt.py [COUNT...]           1 and 16 VMs by default

For each count, libvirt first and then qvm, each with a fleet of its own test guests
(build/test-guest: TCG, q35, 128 MiB, 1 vCPU of 4, the guest agent's channel, the serial
console to a file), booted until every guest printed QVM-GUEST-READY and left to go idle:

- queries, medians of RUNS rounds, each running every command once, in turn, with the
  Python floor (`python -I -S -c pass`, the venv's and /usr/bin/python3): `virsh dominfo`,
  `virsh vcpucount`, `virsh list --all` against `qvm status`, `qvm cpu list`, `qvm list`;
- stop all, to every QEMU exited: a loop of `virsh shutdown NAME --mode acpi` (what a
  user's script does; the mode is the power button, as `qvm down`'s, not the agent) against
  `qvm down --all`; the test guest powers off on the ACPI button;
- memory: the PSS (/proc/PID/smaps_rollup) of libvirt's daemons, in all, against qvm's
  supervisors, per VM and in all.

libvirt runs as `qemu:///session`: its daemon starts itself on the first `virsh` and
serves the user it runs as, from $XDG_RUNTIME_DIR, $XDG_CONFIG_HOME and $XDG_CACHE_HOME,
here all under a temporary dir, so nothing of the host's libvirt is read or touched. As
root the session URI means the system daemon, so as root the virsh commands (and with
them the daemon and its QEMUs) run as `nobody`. Whatever happens, the domains are
destroyed, the daemons and any QEMU left are killed by pid, and the dir is removed.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape

from bench_scale import (
    APPEND,
    READY_TIMEOUT,
    REPO,
    RUNS,
    VENV_PYTHON,
    Fleet,
    exited,
    floor_once,
    in_turn,
    pss_kib,
    timed_command,
    wait_exited,
    wait_serial,
)

PACKAGES = ("libvirt-clients", "libvirt-daemon", "libvirt-daemon-driver-qemu")
URI = "qemu:///session"
GUEST_DIR = (REPO / "build" / "test-guest").resolve()
SYSTEM_PYTHON = "/usr/bin/python3"
# the figures of the same commands on another machine, for reference (issue 21)
TARGETS = {
    ("status", 1): 1.0,
    ("cpu list", 1): 1.0,
    ("list", 1): 1.0,
    ("list", 16): 1.3,
    ("stop all", 16): 1.0,
}
OWN_GROWTH_TARGET = 1.5  # `qvm list` at 16 VMs against its own 1-VM figure
PSS_TARGET_MIB = 6.0  # supervisor PSS per VM at 16 VMs (the "6 MB")
# what qvm's command is measured against
VIRSH_OF = {
    "status": ("dominfo", "NAME"),
    "cpu list": ("vcpucount", "NAME"),
    "list": ("list", "--all"),
}


def domain_xml(name: str, guest: Path, serial_log: Path, memory_mib: int = 128) -> str:
    """A libvirt domain as near to bench_scale's qvm test guest as libvirt writes one:
    TCG on q35, `-cpu max`, 1 vCPU of 4, the guest agent's virtio channel, the serial
    console into a file, no disk, no USB or balloon (qvm adds neither)."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu current='1'>4</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(guest / "vmlinuz"))}</kernel>
    <initrd>{escape(str(guest / "initrd.img"))}</initrd>
    <cmdline>{escape(APPEND)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{escape(str(serial_log))}'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def missing_packages() -> list[str]:
    listed = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {line.split()[0] for line in listed.splitlines() if line.split()[1:2] == ["ii"]}
    return [package for package in PACKAGES if package not in installed]


def install() -> None:
    """apt-get the packages missing, quietly; nothing when all are there."""
    missing = missing_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise SystemExit(f"libvirt is missing: run `sudo {' '.join(command)}`, then again")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(missing)}", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


class Libvirt:
    """A private qemu:///session: its own runtime, config and cache dirs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        as_root = os.geteuid() == 0
        user = pwd.getpwnam("nobody") if as_root else pwd.getpwuid(os.geteuid())
        self.user = user.pw_name
        # subprocess's user/group switch in the child: no setpriv exec in the timings
        self.switch: dict[str, object] = (
            {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if as_root else {}
        )
        # short names: libvirt's agent socket lands 60 characters below the config dir,
        # and a unix socket's path has 107 at most
        for folder in ("run", "c", "k", "home", "xml", "serial"):
            (root / folder).mkdir(parents=True, mode=0o700)
        for path in (root, *root.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(root / "home"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_CONFIG_HOME": str(root / "c"),
            "XDG_CACHE_HOME": str(root / "k"),
        }
        self.names: list[str] = []

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["virsh", "-c", URI, *args],
            env=self.env,
            cwd=self.root / "home",
            check=False,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            **self.switch,  # type: ignore[arg-type]
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done

    def timed(self, *args: str) -> float:
        return timed_command(self.virsh, *args)

    def serial_log(self, name: str) -> Path:
        return self.root / "serial" / f"{name}.log"

    def boot(self, count: int) -> None:
        """Define the domains up to ``count`` (persistent, as qvm's machine files are),
        start them one after the other and wait for every guest's ready line."""
        for index in range(len(self.names), count):
            name = f"lv{index:02d}"
            xml = self.root / "xml" / f"{name}.xml"
            xml.write_text(domain_xml(name, GUEST_DIR, self.serial_log(name)))
            self.virsh("define", str(xml))
            self.names.append(name)
        for name in self.names:
            self.serial_log(name).unlink(missing_ok=True)
            self.virsh("start", name)
        wait_serial(self.names, self.serial_log)
        time.sleep(3)  # past the guests' boot, as bench_scale's fleet

    def pidfiles(self, folder: str = "") -> dict[str, int]:
        """Pid by name, from the .pid files of run/libvirt/FOLDER: the daemons' (libvirtd
        or virtqemud, virtlogd) at the top, each domain's QEMU under qemu/run."""
        pids = {}
        for pidfile in (self.root / "run" / "libvirt" / folder).glob("*.pid"):
            try:
                pids[pidfile.stem] = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def ours(self, pid: int) -> bool:
        """The pid is a live process of this session (its command line or environment
        names this dir), not another that took a stale pid file's number."""
        try:
            facts = Path(f"/proc/{pid}/cmdline").read_bytes()
            facts += Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return not exited(pid) and str(self.root).encode() in facts

    def qemu_pids(self) -> list[int]:
        pids = self.pidfiles("qemu/run")
        return [pids[name] for name in self.names if name in pids]

    def daemons(self) -> dict[str, int]:
        return {name: pid for name, pid in self.pidfiles().items() if self.ours(pid)}

    def stop_all(self) -> float:
        """Seconds from the first `virsh shutdown` of the loop to every QEMU exited."""
        pids = self.qemu_pids()
        started = time.monotonic()
        for name in self.names:
            self.virsh("shutdown", name, "--mode", "acpi")
        wait_exited(pids)
        return time.monotonic() - started

    def close(self) -> None:
        """Destroy what runs, stop the daemons, kill by pid whatever is left."""
        qemus = [pid for pid in self.pidfiles("qemu/run").values() if self.ours(pid)]
        for name in self.names:
            self.virsh("destroy", name, check=False)
        for pid in [*self.daemons().values(), *qemus]:
            stop_pid(pid)


def stop_pid(pid: int) -> None:
    """SIGTERM, a few seconds, then SIGKILL; a pid already gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not exited(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not exited(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def daemon_description(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


Figures = dict[tuple[str, str, int], float]  # (tool, what, VMs) -> ms, MiB or count


# taken in each side's rounds: the host's speed while that side was measured
FLOORS: dict[str, Callable[[], float]] = {
    "floor, venv": lambda: floor_once(VENV_PYTHON),
    f"floor, {SYSTEM_PYTHON}": lambda: floor_once(SYSTEM_PYTHON),
}


def measure_libvirt(libvirt: Libvirt, count: int, figures: Figures) -> None:
    libvirt.boot(count)
    name = libvirt.names[0]
    commands: dict[str, Callable[[], float]] = {
        what: (lambda args=args: libvirt.timed(*(name if a == "NAME" else a for a in args)))
        for what, args in VIRSH_OF.items()
    }
    for command in commands.values():
        command()  # one unmeasured run each: the daemon's first answer is not the figure
    medians = in_turn({**commands, **FLOORS})
    for what, ms in medians.items():
        figures["libvirt", what, count] = ms
    daemons = libvirt.daemons()
    figures["libvirt", "PSS", count] = sum(pss_kib(pid) or 0 for pid in daemons.values()) / 1024
    for daemon, pid in daemons.items():
        figures["libvirt", f"PSS {daemon}", count] = (pss_kib(pid) or 0) / 1024
    figures["libvirt", "QEMU RSS", count] = qemu_rss_mib(libvirt.qemu_pids())
    figures["libvirt", "stop all", count] = libvirt.stop_all() * 1000


def measure_qvm(fleet: Fleet, count: int, figures: Figures) -> None:
    fleet.kill_all()
    fleet.boot(count)
    name = fleet.names[0]
    commands: dict[str, Callable[[], float]] = {
        "status": lambda: fleet.timed("status", name),
        "cpu list": lambda: fleet.timed("cpu", "list", name),
        "list": lambda: fleet.timed("list"),
    }
    for command in commands.values():
        command()
    medians = in_turn({**commands, **FLOORS})
    for what, ms in medians.items():
        figures["qvm", what, count] = ms
    supervisors = [fleet.status(n).get("supervisor_pid") for n in fleet.names]
    pss = [pss_kib(pid) or 0 for pid in supervisors if isinstance(pid, int)]
    figures["qvm", "PSS", count] = sum(pss) / 1024
    figures["qvm", "QEMU RSS", count] = qemu_rss_mib(fleet.qemu_pids())
    figures["qvm", "stop all", count] = fleet.stop_all() * 1000


def qemu_rss_mib(pids: list[int]) -> float:
    sizes = [size for size in (pss_kib(pid, "Rss") for pid in pids) if size is not None]
    return statistics.mean(sizes) / 1024 if sizes else float("nan")


def verdict(value: float, limit: float | None, unit: str = "x") -> str:
    """The target's verdict: ``value`` (a ratio, or a size when ``unit`` is one) against
    ``limit``; empty when there is no target."""
    if limit is None:
        return ""
    target = f"<= x{limit:.1f}" if unit == "x" else f"<= {limit:g} {unit}"
    if value != value:
        return f"{target}: not measured"
    return f"{target}: **{'met' if value <= limit else 'not met'}**"


def cell(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    if unit == "s":
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} {unit}"


def per_vm(total: float | None, count: int) -> float | None:
    return None if total is None else total / count


class RatioTable:
    """The markdown table of qvm against libvirt, a row at a time: qvm's figure,
    libvirt's, qvm / libvirt and the target's verdict."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self.lines = [
            "| what | VMs | qvm | libvirt | qvm / libvirt | target |",
            "|---|---|---|---|---|---|",
        ]

    def both(self, what: str, count: int) -> tuple[float | None, float | None]:
        return self.figures.get(("qvm", what, count)), self.figures.get(("libvirt", what, count))

    def row(
        self,
        label: str,
        count: int,
        figures: tuple[float | None, float | None],
        unit: str,
        target: str = "",
    ) -> None:
        ours, theirs = figures
        ratio = f"x{ours / theirs:.2f}" if ours is not None and theirs else "-"
        self.lines.append(
            f"| {label} | {count} | {cell(ours, unit)} | {cell(theirs, unit)} | {ratio} "
            f"| {target} |"
        )

    def compared(self, label: str, count: int, what: str, unit: str, limit: float | None) -> None:
        ours, theirs = self.both(what, count)
        ratio = ours / theirs if ours is not None and theirs else float("nan")
        self.row(label, count, (ours, theirs), unit, verdict(ratio, limit))


def ratio_table(figures: Figures, counts: list[int]) -> str:
    """Queries at each count, qvm's own growth of `list`, stop all, memory and the
    floors taken in each side's rounds."""
    table = RatioTable(figures)
    for count in counts:
        for what, virsh in VIRSH_OF.items():
            label = f"`qvm {what}` / `virsh {' '.join(virsh).replace('NAME', 'VM')}`"
            table.compared(label, count, what, "ms", TARGETS.get((what, count)))
    first, last = min(counts), max(counts)
    own = figures.get(("qvm", "list", last)), figures.get(("qvm", "list", first))
    if last != first and None not in own:
        growth = own[0] / own[1] if own[0] is not None and own[1] else float("nan")
        table.row(
            f"`qvm list` at {last} VMs / at {first} (qvm against itself)",
            last,
            own,
            "ms",
            verdict(growth, OWN_GROWTH_TARGET),
        )
    stop = "stop all, to every QEMU exited: `qvm down --all` / `virsh shutdown --mode acpi` loop"
    for count in counts:
        table.compared(stop, count, "stop all", "s", TARGETS.get(("stop all", count)))
    for count in counts:
        table.row("PSS in all: qvm's supervisors / libvirt's daemons", count,
                  table.both("PSS", count), "MiB")  # fmt: skip
        ours, theirs = (per_vm(total, count) for total in table.both("PSS", count))
        target = verdict(ours if ours is not None else float("nan"), PSS_TARGET_MIB, "MiB")
        table.row("PSS per VM", count, (ours, theirs), "MiB", target if count >= 16 else "")
        table.row("QEMU RSS per VM", count, table.both("QEMU RSS", count), "MiB")
    for what in FLOORS:
        for count in counts:
            python = what.removeprefix("floor, ")
            label = f"`python -I -S -c pass` ({python}), in each side's rounds"
            table.row(label, count, table.both(what, count), "ms")
    return "\n".join(table.lines)


def commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip() or "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 16])
    counts = parser.parse_args().counts
    install()
    version = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=True)
    figures: Figures = {}
    daemons: dict[str, str] = {}
    root = Path(tempfile.mkdtemp(prefix="qlv-", dir="/tmp"))
    os.chmod(root, 0o711)  # the session's user (nobody, under root) goes through it
    libvirt = Libvirt(root / "l")
    fleet = Fleet(root / "q", REPO)
    try:
        for count in counts:
            measure_libvirt(libvirt, count, figures)
            daemons.update({name: daemon_description(pid) for name, pid in
                            libvirt.daemons().items()})  # fmt: skip
            measure_qvm(fleet, count, figures)
    finally:
        try:
            libvirt.close()
        finally:
            fleet.kill_all()
            shutil.rmtree(root, ignore_errors=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"qvm against libvirt {version.stdout.strip()} ({URI} as {libvirt.user}; daemons: "
          + "; ".join(f"`{line}`" for line in daemons.values())
          + f"), {stamp}, commit {commit()}, {os.cpu_count()} cores; medians of {RUNS} "
          f"rounds, each command once per round in turn; boots waited {READY_TIMEOUT:g} s "
          "at most")  # fmt: skip
    print()
    print(ratio_table(figures, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
