"""qvm's start-up against another commit of qvm, measured in one run, taken in turn.

    scripts/bench_against REV [ROUNDS [NEW_REV]]

A temporary git worktree of REV (and of NEW_REV, else this checkout) runs with this
checkout's venv and test guest, so only qvm's own code differs. Each round runs each
command once with each tree, in alternating order, and the medians are printed: `qvm up
--no-wait` (to QEMU spawned), `qvm status`, `qvm list`, `qvm --help`, `qvm cpu --help`,
and the supervisor's RSS after `up` and one `status`. Both trees must be able to boot
machines/demo.toml.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def entry_code(tree: Path) -> str:
    """How a tree's CLI is started: where its `run` lives moved with the layered tree."""
    if (tree / "qvm" / "cli" / "app.py").exists():
        return "from qvm.cli.app import run; run()"
    return "from qvm.cli import run; run()"


def qvm(tree: Path, state: Path, *args: str) -> float:
    env = dict(os.environ, QVM_STATE_DIR=str(state), PYTHONPATH=str(tree))
    env["QVM_MACHINES"] = str(tree / "machines")
    started = time.perf_counter()
    subprocess.run(
        [PYTHON, "-c", entry_code(tree), *args],
        env=env,
        cwd=tempfile.gettempdir(),  # not a checkout: `-c` puts the cwd first on sys.path
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return time.perf_counter() - started


def supervisor_rss_mib(tree: Path, state: Path) -> float:
    qvm(tree, state, "up", "demo")
    try:
        time.sleep(1.0)
        qvm(tree, state, "status", "demo")
        pid = json.loads((state / "demo" / "state.json").read_text())["supervisor_pid"]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
    finally:
        qvm(tree, state, "kill", "demo")


def worktree(rev: str, where: Path) -> Path:
    """A checkout of ``rev`` that boots this checkout's test guest, byte-compiled."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "--detach", str(where), rev],
                   check=True, capture_output=True)  # fmt: skip
    (where / "build").mkdir(exist_ok=True)
    (where / "build" / "test-guest").symlink_to(REPO / "build" / "test-guest")
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(where / "qvm")], check=True)
    return where


def main(rev: str, rounds: int, new_rev: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="qvm-bench-against-"))
    made: list[Path] = []
    try:
        made.append(worktree(rev, work / "old"))
        if new_rev is not None:
            made.append(worktree(new_rev, work / "new"))
        trees = {rev: made[0], new_rev or "this checkout": made[1] if new_rev else REPO}
        commands = {
            "up --no-wait": ("up", "demo", "--no-wait"),
            "status (stopped VM)": ("status", "demo"),
            "list": ("list",),
            "--help": ("--help",),
            "cpu --help": ("cpu", "--help"),
        }
        times: dict[tuple[str, str], list[float]] = {}
        rss: dict[str, list[float]] = {label: [] for label in trees}
        for round_ in range(rounds):
            order = list(trees.items()) if round_ % 2 else list(trees.items())[::-1]
            for label, tree in order:
                state = work / f"state-{round_}-{label.replace(' ', '-')}"
                for what, args in commands.items():
                    times.setdefault((what, label), []).append(qvm(tree, state, *args))
                    if args[0] == "up":
                        qvm(tree, state, "kill", "demo")
                if round_ < 3:
                    rss[label].append(supervisor_rss_mib(tree, work / f"rss-{round_}-{label[:4]}"))
        print(f"medians of {rounds} rounds, taken in turn ({' | '.join(trees)}):")
        for what in commands:
            a, b = (statistics.median(times[(what, label)]) * 1000 for label in trees)
            low_a, low_b = (min(times[(what, label)]) * 1000 for label in trees)
            print(
                f"  {what:22} {a:6.1f} ms | {b:6.1f} ms  ({b - a:+.1f} ms;"
                f" fastest {low_a:.1f} | {low_b:.1f} ms)"
            )
        a, b = (statistics.median(rss[label]) for label in trees)
        print(f"  {'supervisor RSS':22} {a:6.2f} MiB | {b:6.2f} MiB  ({b - a:+.2f} MiB)")
    finally:
        for tree in made:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]) if len(sys.argv) > 2 else 15,
        sys.argv[3] if len(sys.argv) > 3 else None,
    )
