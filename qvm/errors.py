"""Every error qvm raises on purpose.

    QvmError                 one line for the user; the CLI prints it and exits non-zero
     ├── DefinitionError     a machine file is unusable; carries every problem found
     ├── HostError           this host or this QEMU cannot do what was asked
     ├── UsageError          a value on the command line that qvm checks itself: exit 2
     ├── VmNameError         a name that cannot be a VM's (checked before any path is built)
     ├── UnsafeStateError    a state dir or run dir that is a link, foreign, or open to others
     ├── VmStateError        the VM is not in a state that allows the operation
     │    └── NotRunningError
     ├── RecordError         a record in a run dir (or a supervisor message) does not parse
     ├── WaitTimeout         `qvm wait`: the guest did not get there in time
     ├── LaunchError         QEMU or the supervisor died while starting
     ├── ControlError        a QMP operation failed or QEMU refused it
     │    └── QmpTimeoutError
     ├── HotplugError        a device could not be added or removed
     └── AgentError          the guest agent (qemu-ga): also its channel closing mid-command
          ├── AgentNotConfigured  the VM has no agent channel ([agent] enabled = false)
          ├── AgentNotAnswering   no reply in time: no agent in the guest (yet), or busy
          └── AgentCommandError   the agent's own error reply (a path or program not found)
               └── ProgramNotStarted  `qvm exec`: the program could not be started

Anything else escaping the core is a bug, and the CLI shows it as one.

The exit status of `qvm`, what a script can tell apart without reading stderr:

    EXIT_OK           0    done
    EXIT_FAILURE      1    a QvmError, or one of several VMs or devices failed
    EXIT_USAGE        2    what was asked cannot be meant: a command-line mistake (Click's
                           usage errors), a DefinitionError, a VmNameError
    EXIT_PENDING      3    a hotplug/unplug request stands, but the guest has not
                           completed it (yet)
    EXIT_TIMEOUT      4    `qvm wait`: not ready in time (``WaitTimeout``)
    EXIT_INTERRUPTED  130  Ctrl-C (128 + SIGINT, as shells report it)

Group commands (`up a b`, `down a b`) exit with the highest status of their VMs. Usage
errors are 2 everywhere: the parser's own and the values qvm checks itself (``UsageError``).

`qvm exec` exits with the program's status (0-255; 128 + N when signal N ended it), so its
own outcomes take the numbers `env`, `timeout` and `docker run` use, out of most programs'
way:

    EXIT_EXEC_TIMEOUT    124  the program outlived --timeout (it runs on; as timeout(1))
    EXIT_EXEC_FAILED     125  qvm failed: no such VM, not running, no agent, ...
    EXIT_CANNOT_RUN      126  the program was found but could not be run
    EXIT_NOT_FOUND       127  no such program in the guest

`qvm up --foreground` exits with how its VM ended: 0 for a guest power-off or a stop asked
for, EXIT_VM_CRASHED (10), EXIT_VM_PANICKED (11), EXIT_VM_KILLED (12), 1 when QEMU failed
to start.

`qvm run` exits the same way as `qvm exec`, and with EXIT_TERMINATED (143) or EXIT_INTERRUPTED (130)
when SIGTERM or SIGINT cancelled it (its VM destroyed all the same).

`qvm ssh` and `qvm qmp --shell` become ssh and qmp-shell: theirs is the status.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # the status Click gives its own usage errors
EXIT_PENDING = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
EXIT_EXEC_TIMEOUT = 124
EXIT_EXEC_FAILED = 125
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_VM_CRASHED = 10  # `qvm up --foreground`: QEMU crashed (a signal, an error, KVM's)
EXIT_VM_PANICKED = 11  # `qvm up --foreground`: the guest kernel panicked
EXIT_VM_KILLED = 12  # `qvm up --foreground`: SIGKILL ended QEMU (qvm kill, or a stop's last step)
EXIT_TERMINATED = 143  # `qvm run`: SIGTERM cancelled it (128 + SIGTERM, as shells report it)


class QvmError(Exception):
    """An error the user can act on. ``str(error)`` is the complete message; ``vm``,
    ``file``, ``key`` and ``hint`` name what it is about and what to do, where the raiser
    knows (the JSON form of an error carries them, ``schemas/error.json``).

    Given as fields, they make the one line ``<file or VM>: <key>: <problem> (hint: ...)``;
    a raiser that passes the whole text as ``problem`` (and no fields) keeps it as it is.
    """

    exit_code = EXIT_FAILURE

    def __init__(
        self,
        problem: str = "",
        *,
        vm: str | None = None,
        file: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.vm = vm
        self.file = file
        self.key = key or None
        self.hint = hint
        super().__init__(one_line(file or vm, key, problem, hint))


def one_line(subject: str | None, key: str | None, problem: str, hint: str | None) -> str:
    """``<subject>: <key>: <problem> (hint: <hint>)``, each part only where given."""
    text = f"{key}: {problem}" if key else problem
    if subject:
        text = f"{subject}: {text}"
    return text + (f" (hint: {hint})" if hint else "")


class Problem:
    """One thing wrong with a machine definition, in Lima's shape. A plain class rather
    than a ``qvm.base.record.Record``: this module imports nothing of qvm."""

    __slots__ = ("file", "key", "problem", "got", "hint")

    def __init__(
        self, file: str, key: str, problem: str, got: str | None = None, hint: str | None = None
    ) -> None:
        self.file, self.key, self.problem, self.got, self.hint = file, key, problem, got, hint

    def _values(self) -> tuple[str | None, ...]:
        return (self.file, self.key, self.problem, self.got, self.hint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Problem({})".format(", ".join(repr(value) for value in self._values()))

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}: " if self.key else f"{self.file}: "
        text = where + self.problem
        if self.got is not None:
            text += f", got {self.got}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class DefinitionError(QvmError):
    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))  # a line per problem
        if self.problems:  # the fields: the first problem's
            first = self.problems[0]
            self.file, self.key, self.hint = first.file, first.key or None, first.hint


class HostError(QvmError):
    pass


class UsageError(QvmError):
    """What the command line asks cannot be meant (``--memory 1X``, ``--for http``): exit
    status 2, as the parser's own usage errors."""

    exit_code = EXIT_USAGE


class VmNameError(QvmError):
    exit_code = EXIT_USAGE


class UnsafeStateError(QvmError):
    pass


class VmStateError(QvmError):
    pass


class NotRunningError(VmStateError):
    def __init__(self, name: str, hint: str | None = None) -> None:
        self.name = name
        super().__init__("not running", vm=name, hint=hint or f"start it with 'qvm up {name}'")


class RecordError(QvmError):
    """A record qvm wrote (``state.json``, ``launch.json``, ...) or a supervisor message
    that does not have the expected shape: corrupt, foreign, or from another qvm version."""

    def __init__(self, source: str, key: str, problem: str, hint: str | None = None) -> None:
        self.source = source
        super().__init__(problem, file=source, key=key, hint=hint)
        if "/" not in source:  # not a file's path: what a message was ("vm1: supervisor reply")
            self.file = None


class LaunchError(QvmError):
    pass


class WaitTimeout(QvmError):
    """``qvm wait``: the condition did not hold in time."""

    exit_code = EXIT_TIMEOUT


class ControlError(QvmError):
    """``qemu_class``/``qemu_desc``: QEMU's own error reply, when it sent one;
    ``qemu_exited``: the connection ended because QEMU did."""

    def __init__(
        self,
        message: str,
        qemu_class: str | None = None,
        qemu_desc: str | None = None,
        qemu_exited: bool = False,
        *,
        vm: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, vm=vm, hint=hint)
        self.qemu_class = qemu_class
        self.qemu_desc = qemu_desc
        self.qemu_exited = qemu_exited


class QmpTimeoutError(ControlError):
    pass


class HotplugError(QvmError):
    pass


class AgentError(QvmError):
    """Something about the guest agent; ``str()`` is the whole message."""


class AgentNotConfigured(AgentError):
    pass


class AgentNotAnswering(AgentError):
    pass


class AgentCommandError(AgentError):
    """``agent_class``/``agent_desc``: the agent's own error reply."""

    def __init__(
        self, message: str, agent_class: str, agent_desc: str, *, vm: str | None = None
    ) -> None:
        super().__init__(message, vm=vm)
        self.agent_class = agent_class
        self.agent_desc = agent_desc


class ProgramNotStarted(AgentCommandError):
    """`qvm exec`: the agent could not start the program: 127 when there is no such
    program, else 126, as shells say it."""

    def __init__(self, message: str, agent_class: str, agent_desc: str, not_found: bool) -> None:
        super().__init__(message, agent_class, agent_desc)
        self.exit_code = EXIT_NOT_FOUND if not_found else EXIT_CANNOT_RUN
