"""The guest's side of a share: the command lines its agent runs to mount one, unmount
one, and say which processes hold one (``guest-exec``, ``/bin/sh`` with the paths as
arguments, never spliced into the script). Pure, like the rest of ``cmdline``: the
supervisor (boot shares) and ``qvm.control.share`` (live ones) run them, and a cloud
image's seed at every boot.

The scripts need only a POSIX shell, ``mkdir``, ``mount``, ``umount``, ``grep`` and
``readlink``: busybox's and a distribution's alike.
"""

from __future__ import annotations

# mount $2 (the tag) at $1 with type $3 and options $4, unless something is mounted there
_MOUNT = (
    'mkdir -p -- "$1" && { grep -qs " $1 " /proc/mounts || mount -t "$3" -o "$4" -- "$2" "$1"; }'
)
# unmount $1 if mounted (a share already gone is fine)
_UNMOUNT = 'grep -qs " $1 " /proc/mounts || exit 0; umount -- "$1"'
# "PID COMMAND" of each process whose working folder or an open file is under $1
_HOLDERS = (
    'for p in /proc/[0-9]*; do for f in "$p"/cwd "$p"/root "$p"/fd/*; do '
    'case $(readlink "$f" 2>/dev/null) in "$1"|"$1"/*) '
    'echo "${p#/proc/} $(cat "$p"/comm 2>/dev/null)"; break ;; esac; done; done'
)
NINE_P_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"


def _type_and_options(via: str, readonly: bool, extra: str = "") -> tuple[str, str]:
    """A read-only share is mounted read-only in the guest too, so that a write fails at
    once and plainly (the host refuses it anyway)."""
    fstype, options = ("9p", NINE_P_OPTIONS) if via == "9p" else ("virtiofs", "defaults")
    return fstype, options + extra + (",ro" if readonly else "")


def mount_argv(tag: str, guest: str, via: str, readonly: bool) -> list[str]:
    """Mount share ``tag`` at ``guest`` (``via``: "virtiofs" or "9p")."""
    fstype, options = _type_and_options(via, readonly)
    return ["/bin/sh", "-c", _MOUNT, "qvm-share", guest, tag, fstype, options]


# what mount says when the guest kernel does not know the file system type (ENODEV)
_UNKNOWN_TYPE = "No such device"
_NO_KERNEL_SUPPORT = {
    "9p": "(hint: the guest kernel has no 9p, as Debian's cloud kernels: boot one that has, "
    'or use via = "virtiofs")',
    "virtiofs": '(hint: the guest kernel has no virtiofs: boot one that has, or use via = "9p")',
}


def mount_failure(via: str, said: str) -> str:
    """What a failed mount of a share said, with its likely cause when the guest kernel
    does not know the share's file system."""
    if _UNKNOWN_TYPE not in said:
        return said
    return f"{said} {_NO_KERNEL_SUPPORT[via]}"


def unmount_argv(guest: str) -> list[str]:
    return ["/bin/sh", "-c", _UNMOUNT, "qvm-share", guest]


def holders_argv(guest: str) -> list[str]:
    return ["/bin/sh", "-c", _HOLDERS, "qvm-share", guest]


def boot_mount_argv(tag: str, guest: str, via: str, readonly: bool) -> list[str]:
    """A cloud image's seed mounts share ``tag`` with this at every boot (cloud-init's
    ``bootcmd``): cloud-init's own ``mounts`` drops a line whose device is a tag (22.4
    keeps only block devices and ``host:path``). Mounted already, by the agent racing it,
    is success."""
    fstype, options = _type_and_options(via, readonly)
    script = _MOUNT + ' || grep -qs " $1 " /proc/mounts'
    return ["/bin/sh", "-c", script, "qvm-share", guest, tag, fstype, options]
