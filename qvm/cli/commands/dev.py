"""The test-VM workflow: new, reset, rm, ssh, wait."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qvm.cli import resolve
from qvm.cli.output import abort, emit_json, say, say_kept, warn
from qvm.cli.parsing.declare import AS_JSON, MACHINE, Argument, Commands, Option
from qvm.errors import EXIT_USAGE
from qvm.layout.names import shown

if TYPE_CHECKING:
    from qvm.cli.progress import Spinner

commands = Commands()

# a login name as POSIX has it portable (and Samba's machine accounts' final $): never a
# path, an option or a host, which a mistaken command line would otherwise make of it
LOGIN_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?"


@commands.command("new")
def new(
    name: str = Argument(..., help="Name of the new machine (its file is NAME.toml)."),
    image: str | None = Option(
        None, "--image", help="Base image: a local qcow2/raw file or an http(s) URL."
    ),
    sha256: str | None = Option(None, "--sha256", help="SHA-256 of an --image URL."),
    sha512: str | None = Option(None, "--sha512", help="SHA-512 of an --image URL."),
    cpus: int | None = Option(None, "--cpus", help="vCPUs at boot (default 1)."),
    max_cpus: int | None = Option(None, "--max-cpus", help="vCPUs hotplug may reach."),
    memory: str | None = Option(None, "--memory", help='RAM, e.g. "2G" (default 1G).'),
    disk_size: str | None = Option(
        None, "--disk-size", help='Grow the VM\'s overlay to this size, e.g. "20G".'
    ),
    forward: list[str] | None = Option(
        None,
        "--forward",
        help="PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT, repeatable; host port 0 picks a free one. "
        "tcp:0:22 is added for ssh unless a forward to guest port 22 is given.",
    ),
    kernel: str | None = Option(None, "--kernel", help="Direct kernel boot: kernel."),
    initrd: str | None = Option(None, "--initrd", help="Direct kernel boot: initrd."),
    append: str | None = Option(None, "--append", help="Kernel command line."),
    user: str | None = Option(None, "--user", help='cloud-init user (default "qvm").'),
    ssh_key: list[str] | None = Option(
        None,
        "--ssh-key",
        help="Public key line or .pub file, repeatable (default: ~/.ssh/id_*.pub at up, "
        "else a key pair qvm makes for the VM).",
    ),
    package: list[str] | None = Option(
        None, "--package", help="Package cloud-init installs at first boot, repeatable."
    ),
    runcmd: list[str] | None = Option(
        None, "--runcmd", help="Shell command cloud-init runs at first boot, repeatable."
    ),
    user_data: str | None = Option(
        None, "--user-data", help="Your own cloud-config file, used as is."
    ),
    no_cloud_init: bool = Option(
        False, "--no-cloud-init", help="No [cloud_init] table (no seed, no ssh forward)."
    ),
    machine_type: str | None = Option(None, "--type", help='"q35" (default), "pc" or "microvm".'),
    clone_of: str | None = Option(
        None,
        "--from",
        metavar="VM@TAG",
        help="A clone of VM's snapshot TAG: its first up resumes from that memory image.",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Write NAME.toml for a test VM where `qvm up NAME` finds it from any folder; never
    overwrites. The folder: --machines DIR, else the first of $QVM_MACHINES, else
    ~/.config/qvm/machines.

    --image must be a disk image file that exists, or an http(s) URL with its checksum:
    checked before anything is written.

    JSON: schemas/new.json
    """
    if clone_of is not None:
        from qvm.cli.commands.snapshot import new_clone

        new_clone(name, clone_of, as_json)
        return
    from qvm.definition.new import NewOptions, new_document
    from qvm.ops.new import check_image, write_new

    options = NewOptions(
        name=name,
        image=image,
        sha256=sha256,
        sha512=sha512,
        cpus=cpus,
        max_cpus=max_cpus,
        memory=memory,
        disk_size=disk_size,
        forwards=tuple(forward or ()),
        kernel=kernel,
        initrd=initrd,
        append=append,
        user=user,
        ssh_keys=tuple(ssh_key or ()),
        packages=tuple(package or ()),
        runcmd=tuple(runcmd or ()),
        user_data=user_data,
        cloud_init=not no_cloud_init,
        machine_type=machine_type,
    )
    doc = new_document(options, Path.cwd())
    if image is not None:
        check_image(image, Path.cwd())
    path = resolve.new_machines_dir() / f"{name}.toml"
    write_new(doc, path, resolve.run_dir(name))
    start = f"qvm up {name}"
    login = None if no_cloud_init else f"qvm wait {name} --for ssh && qvm ssh {name}"
    if as_json:
        emit_json({"name": name, "file": str(path.resolve()), "start": start, "login": login})
        return
    say(f"{name}: wrote {path}")
    say(f"  start it:   {start}")
    if login:
        say(f"  log in:     {login}")


@commands.command("reset")
def reset(name: str = MACHINE, as_json: bool = AS_JSON) -> None:
    """Throw the VM's disk state away: overlays, cloud-init seed, known_hosts (VM stopped).

    JSON: schemas/reset.json
    """
    from qvm.ops.files import reset as reset_vm

    removed = reset_vm(resolve.run_dir_of(name))
    if as_json:
        emit_json({"name": name, "removed": [str(p) for p in removed.files]})
        return
    if not removed.files:
        say(f"{name}: nothing to reset")
        return
    say(f"{name}: reset; the next up starts from the base image(s) and runs cloud-init again")
    for path in removed.files:
        say(f"  removed {path}")


@commands.command("rm")
def rm(
    name: str = MACHINE,
    purge: bool = Option(
        False,
        "--purge",
        help="Also remove the machine file if qvm new wrote it and it is unchanged, and "
        "images qvm downloaded for it that no other VM uses.",
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Remove the VM's run dir (overlays, seed, logs, state). Never a base image.

    JSON: schemas/rm.json
    """
    from qvm.ops.files import remove

    run = resolve.run_dir_of(name)
    removed = remove(run, purge=purge)
    if as_json:
        kept = [{"file": str(path), "why": why} for path, why in removed.kept]
        emit_json({"name": name, "removed": [str(p) for p in removed.files], "kept": kept})
        return
    if not removed.files and not removed.kept:
        say(f"{name}: nothing to remove")
    for path in removed.files:
        say(f"{name}: removed {path}")
    say_kept(name, removed.kept)


@commands.command("ssh")
def ssh(
    name: str = MACHINE,
    command: list[str] | None = Argument(
        None,
        help="Command to run in the guest; every word from its first on is its own, "
        "options too (-- before it is optional); none: an interactive shell.",
        command_line=True,
    ),
    user: str | None = Option(None, "--user", "-l", help="Log in as this user."),
    print_only: bool = Option(
        False, "--print", help="Print the ssh command line instead of running it."
    ),
    as_json: bool = Option(
        False, "--json", help="Print the ssh command line as JSON (implies --print)."
    ),
) -> None:
    """ssh into the VM through its forwarded port; exits with the command's status.

    With no command, an interactive login. From the command's first word on, every word
    is the guest's, options too (`qvm ssh VM ls -l /etc`); qvm's options go before it.
    Each word reaches the guest as one argument, spaces and quotes intact
    (`qvm ssh VM sh -c 'exit 7'` exits 7); for a pipeline, give it to a shell:
    `qvm ssh VM sh -c 'dmesg | tail'`. A command runs with ssh's BatchMode: a key the
    guest refuses fails at once, with no password prompt.

    JSON: schemas/ssh.json
    """
    import shlex

    from qvm.errors import NotRunningError
    from qvm.ops.access import exec_ssh, ssh_argv, ssh_target
    from qvm.supervisor.client import supervisor_alive

    if user is not None and not re.fullmatch(LOGIN_NAME, user):
        abort(f"--user: must be a user name like 'qvm', got {shown(user)}", EXIT_USAGE)
    run = resolve.run_dir_of(name)
    if not supervisor_alive(run):
        raise NotRunningError(name)
    target = ssh_target(run)
    argv = ssh_argv(target, command or (), user=user)
    if as_json:
        login = user or target.user
        emit_json(
            {
                "name": run.name,
                "argv": argv,
                "host": target.host,
                "port": target.port,
                "user": login,
            }
        )
        return
    if print_only:
        say(shlex.join(argv))
        return
    exec_ssh(argv)


@commands.command("wait")
def wait(
    name: str = MACHINE,
    for_: str = Option(
        "ssh",
        "--for",
        help="ssh (a real login succeeds), qmp (QEMU answers), agent (the guest agent "
        "answers) or serial:REGEX (the serial log of this run matches).",
    ),
    timeout: float = Option(300.0, "--timeout", help="Seconds before giving up."),
    as_json: bool = AS_JSON,
) -> None:
    """Block until the VM is ready in the sense of --for (exit 4 on timeout).

    JSON: schemas/wait.json
    """
    timeout = resolve.timeout_seconds(timeout)
    from qvm.cli.progress import Spinner
    from qvm.ops.access import describe_condition, parse_condition, wait_ready

    run = resolve.run_dir_of(name)
    kind, pattern = parse_condition(for_)
    report = WaitReport(Spinner(f"{name}: waiting for {describe_condition(kind, pattern, run)}"))
    try:
        seconds = wait_ready(run, kind, pattern, timeout, tick=report.tick)
    finally:
        report.spinner.done()
    if as_json:
        emit_json({"name": name, "for": for_, "seconds": round(seconds, 3)})
    else:
        say(f"{name}: ready ({for_}) after {seconds:.1f} s")


PROGRESS_EVERY = 15.0  # seconds between `qvm wait`'s progress lines without a terminal
PROBLEM_SHOWN = 80  # characters of the last probe's problem on the spinner's line


class WaitReport:
    """What `qvm wait` says while it waits: on a terminal, a spinner that shows the last
    probe's problem (`Permission denied (publickey)`); elsewhere (a CI log) a line on
    stderr every ``PROGRESS_EVERY`` seconds, so a long wait is not silent."""

    def __init__(self, spinner: Spinner, every: float = PROGRESS_EVERY) -> None:
        self.spinner = spinner
        self.label = spinner.label
        self.every = every
        self.started = time.monotonic()
        self.next_line = self.started + every

    def tick(self, problem: str) -> None:
        problem = " ".join(problem.split())
        if len(problem) > PROBLEM_SHOWN:
            problem = problem[: PROBLEM_SHOWN - 3] + "..."
        last = f" (last: {problem})" if problem else ""
        if self.spinner.enabled:
            self.spinner.label = self.label + last
            self.spinner.tick()
            return
        now = time.monotonic()
        if now >= self.next_line:
            self.next_line = now + self.every
            warn(f"{self.label}: still waiting after {now - self.started:.0f} s{last}")
