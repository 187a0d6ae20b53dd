"""Running a host tool (qemu-img, ssh-keygen) the one way: argv, no shell, a timeout,
and a missing tool or a failure as one line naming the tool and the package to install."""

from __future__ import annotations

from qvm.errors import HostError


def run_tool(
    argv: list[str], package: str, timeout: float, what: str | None = None, stdin: str = ""
) -> str:
    """Run ``argv`` with ``stdin`` as its input; return its stdout. ``what`` names the
    call in a failure message (default: the tool's name); a failure's message is its
    stderr, its lines joined."""
    import subprocess  # noqa: PLC0415 -- only the commands that run a tool pay (~8 ms)

    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except OSError as exc:
        raise HostError(
            f"{argv[0]}: cannot run it: {exc} (hint: apt-get install {package})"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{what or argv[0]}: no answer within {timeout:g} s") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise HostError(f"{what or argv[0]}: {'; '.join(lines) or 'failed'}")
    return done.stdout
