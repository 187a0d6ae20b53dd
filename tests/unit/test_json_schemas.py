"""One JSON contract (issue 12): every command that prints or changes state takes --json,
names its schema (schemas/*.json) in its --help, and prints what the schema says; an
error with --json is a JSON object on stdout with a non-zero exit; sizes are bytes and
endings one vocabulary. Here: everything that needs no VM, through the real CLI where it
can; tests/integration/test_json_contract.py checks the commands that need a running VM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from framework.harness import Qvm, short_tmpdir
from framework.jsonschema_lite import SCHEMAS, SchemaError, Validator, load, validate
from hypothesis import given
from hypothesis import strategies as st

from qvm.cli.commands.mem import in_bytes
from qvm.cli.output import error_fields, error_json, json_mode
from qvm.cli.parsing.declare import GROUPS, TOP_LEVEL
from qvm.cli.parsing.typer_app import module_commands
from qvm.errors import DefinitionError, NotRunningError, Problem, QvmError, RecordError
from qvm.ops.access import SshTarget, remote_command, ssh_argv
from qvm.ops.new import check_image
from qvm.ops.stop import how_it_ended
from qvm.store.state import ExitRecord
from qvm.supervisor import wire

# commands that print no state of their own: the guest's bytes (logs, console); `ssh` becomes
# ssh, and its --json prints the command line instead
NO_JSON = {("logs",), ("console",)}
GUEST = "build/test-guest"


def every_command() -> list[tuple[tuple[str, ...], Any]]:
    found = [
        ((word,), module_commands(module).functions[word]) for word, module in TOP_LEVEL.items()
    ]
    for group in GROUPS:
        found += [((group, word), f) for word, f in module_commands(group).functions.items()]
    return found


COMMANDS = every_command()


def schema_named(function: Any) -> str | None:
    match = re.search(r"^\s*JSON: schemas/(\S+\.json)\s*$", function.__doc__ or "", re.M)
    return match.group(1) if match else None


def takes_json(function: Any) -> bool:
    return any("--json" in p.decls for p in function.__defaults__ or ())


# --- the schemas and the commands that name them -------------------------------------------


@pytest.mark.parametrize("words,function", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_command_takes_json_and_names_an_existing_schema(
    words: tuple[str, ...], function: Any
) -> None:
    if words in NO_JSON:
        assert not takes_json(function)
        return
    assert takes_json(function), f"qvm {' '.join(words)} has no --json"
    name = schema_named(function)
    assert name is not None, f"qvm {' '.join(words)}: no 'JSON: schemas/...' line in its help"
    assert (SCHEMAS / name).is_file(), name


def test_every_schema_is_used_loads_and_resolves() -> None:
    named = {schema_named(f) for _, f in COMMANDS} - {None}
    files = {p.name for p in SCHEMAS.glob("*.json")}
    # common.json holds shared definitions; error.json is every command's error form
    assert files - named == {"common.json", "error.json"}
    validator = Validator(SCHEMAS)
    for name in sorted(files):
        document = load(name)
        assert document["$schema"].endswith("2020-12/schema")
        assert document.get("description"), name
        for ref in re.findall(r'"\$ref": "([^"]+)"', (SCHEMAS / name).read_text()):
            validator.resolve(ref, name)  # a KeyError or a missing file fails here


def test_help_names_the_schema(tmp_path: Path) -> None:
    qvm = Qvm(tmp_path)
    for words, schema in ((["status"], "status.json"), (["mem", "list"], "mem-list.json")):
        done = qvm(*words, "--help")
        assert f"JSON: schemas/{schema}" in done.stdout


def test_the_validator_fails_what_the_schemas_forbid() -> None:
    # a test that cannot fail is no test: the old shapes are refused
    with pytest.raises(SchemaError, match="ended_by"):
        validate([{"name": "vm1", "ended_by": "stop", "message": "x"}], "down.json")
    memory = {"name": "vm1", "boot": 1, "max": None, "plugged": 0, "total": 1, "devices": []}
    with pytest.raises(SchemaError, match="guest_mem_bytes"):
        validate({**memory, "guest_mem_kb": 4}, "mem-list.json")
    validate({**memory, "guest_mem_bytes": 4096}, "mem-list.json")
    with pytest.raises(SchemaError, match="guest_mem_kb: a size is in bytes"):
        validate({**memory, "guest_mem_bytes": 4096, "guest_mem_kb": 4}, "mem-list.json")
    with pytest.raises(SchemaError, match="no key 'exit_code'"):
        validate({"error": "x"}, "error.json")
    with pytest.raises(SchemaError, match="expected integer"):
        validate({"error": "x", "exit_code": "1"}, "error.json")
    with pytest.raises(ValueError, match="does not check"):
        Validator(SCHEMAS).problems(1, {"multipleOf": 2}, "x.json", "$")


# --- real output of the commands that need no VM ---------------------------------------------


@pytest.fixture
def cli() -> Iterator[Qvm]:
    root = short_tmpdir()
    qvm = Qvm(root)
    qvm.guest_machine("vm1", count=2, max=4)
    qvm.machine("broken", '[cpu]\ncount = "two"\n')
    yield qvm
    shutil.rmtree(root, ignore_errors=True)


def run_json(qvm: Qvm, *args: str, code: int = 0) -> Any:
    done = qvm(*args, "--json", check=False)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def test_status_and_list_of_a_stopped_vm(cli: Qvm) -> None:
    status = run_json(cli, "status", "vm1")
    validate(status, "status.json")
    assert status["state"] == "stopped"
    assert status["vcpus"] == {"present": 0, "max": 4, "boot": 2}
    assert status["memory"]["bytes"] == 256 * 1024**2
    listed = run_json(cli, "list")
    validate(listed, "list.json")
    assert {r["name"]: r["state"] for r in listed} == {"broken": "invalid", "vm1": "stopped"}


def test_cmdline_new_reset_rm(cli: Qvm, tmp_path: Path) -> None:
    cmdline = run_json(cli, "cmdline", "vm1")
    validate(cmdline, "cmdline.json")
    assert cmdline["argv"][0].endswith("qemu-system-x86_64") and "-smp" in cmdline["argv"]
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    new = run_json(cli, "new", "n1", "--image", str(image))
    validate(new, "new.json")
    assert Path(new["file"]).is_file() and new["start"] == "qvm up n1"
    reset = run_json(cli, "reset", "n1")
    validate(reset, "reset.json")
    removed = run_json(cli, "rm", "n1", "--purge")
    validate(removed, "rm.json")
    assert new["file"] in removed["removed"]


def test_systemd_and_a_run_that_never_made_its_vm(cli: Qvm, tmp_path: Path) -> None:
    unit = run_json(cli, "systemd", "vm1")
    validate(unit, "systemd.json")
    assert unit["exec_start"][-4:-2] == ["--foreground", str(cli.machines_dir / "vm1.toml")]
    result = tmp_path / "r.json"
    done = cli("run", "nope", "--json", "--result", str(result), "--", "true", check=False)
    assert done.returncode == 125, done.stderr
    validate(json.loads(done.stdout), "error.json")
    recorded = json.loads(result.read_text())
    validate(recorded, "run.json")
    assert (recorded["state"], recorded["status"], recorded["name"]) == ("failed", 125, "")


def test_errors_are_json_objects_with_a_nonzero_exit(cli: Qvm) -> None:
    missing = run_json(cli, "status", "nope", code=1)
    validate(missing, "error.json")
    assert missing["vm"] == "nope" and missing["error"].startswith("no VM named 'nope'")
    assert missing["hint"] == "qvm new nope --image FILE, or pass --machines DIR"
    down = run_json(cli, "down", "vm1", code=1)
    validate(down, "down.json")
    assert down == [
        {
            "name": "vm1",
            "error": "vm1: not running (hint: start it with 'qvm up vm1')",
            "exit_code": 1,
            "vm": "vm1",
            "hint": "start it with 'qvm up vm1'",
        }
    ]
    broken = run_json(cli, "up", "broken", code=2)  # its JSON's exit_code, as the process's
    validate(broken, "up.json")
    assert broken[0]["key"] == "cpu.count" and broken[0]["file"].endswith("broken.toml")
    assert broken[0]["exit_code"] == 2
    bad_timeout = run_json(cli, "down", "vm1", "--timeout", "nan", code=2)
    validate(bad_timeout, "error.json")
    usage = run_json(cli, "status", "vm1", "--xyzzy", code=2)
    assert usage == {"error": "No such option: --xyzzy", "exit_code": 2}
    # a definition error names every problem, and the first one's file and key
    invalid = run_json(cli, "cmdline", "broken", code=2)
    validate(invalid, "error.json")
    assert invalid["key"] == "cpu.count"
    # without --json: one line on stderr, nothing on stdout
    plain = cli("status", "nope", check=False)
    assert plain.stdout == "" and plain.stderr.startswith("qvm: no VM named 'nope'")


def test_new_checks_the_image_before_writing(cli: Qvm, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    for image, problem in (
        (tmp_path / "absent.qcow2", "no such file"),
        (text, "not a disk image"),
        (tmp_path, "not a regular file"),
    ):
        done = cli("new", "n2", "--image", str(image), check=False)
        assert done.returncode == 1
        assert done.stderr.startswith(f"qvm: --image {image}: {problem}"), done.stderr
        assert len(done.stderr.splitlines()) == 1
        assert not (cli.machines_dir / "n2.toml").exists()
        error = run_json(cli, "new", "n2", "--image", str(image), code=1)
        assert error["key"] == "--image" and error["file"] == str(image)


def test_check_image_knows_images_by_their_first_bytes(tmp_path: Path) -> None:
    mbr = bytearray(1024)
    mbr[510:512] = b"\x55\xaa"
    for name, data in (("a.qcow2", b"QFI\xfb" + bytes(100)), ("disk.raw", bytes(mbr))):
        (tmp_path / name).write_bytes(data)
        check_image(name, tmp_path)  # relative to the folder qvm new runs in
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(QvmError, match="is empty"):
        check_image("empty.img", tmp_path)
    check_image("https://example.org/x.qcow2", tmp_path)  # a URL: checked by its checksum


# --- one vocabulary, one unit ------------------------------------------------------------------


def exit_record(noted: str | None, signal: str | None, reason: str) -> ExitRecord:
    return ExitRecord(None, signal, reason, False, 1.0, 2.0, noted)


@pytest.mark.parametrize(
    "noted,signal,reason,expected",
    [
        ("stop", None, "the guest powered off", "acpi"),
        ("stop", None, "quit over QMP", "quit"),
        ("stop", "SIGKILL", "killed by SIGKILL (qvm stop)", "kill"),
        ("kill", "SIGKILL", "killed by SIGKILL (qvm kill)", "kill"),
        ("stop", "SIGABRT", "killed by SIGABRT (qvm stop)", None),
        (None, None, "the guest powered off", None),  # the guest did it, not qvm
        ("acpi", None, "the guest powered off", "acpi"),  # already in the vocabulary
    ],
)
def test_status_and_down_say_the_same_ending(
    noted: str | None, signal: str | None, reason: str, expected: str | None
) -> None:
    from qvm.store.fields import Fields

    record = exit_record(noted, signal, reason)
    written = record.to_json()
    assert written["ended_by"] == expected
    read = ExitRecord.read(Fields(json.loads(json.dumps(written)), "state.json"))
    assert read.ended_by == expected
    if noted is not None:  # what `down` prints for a record its request produced
        assert how_it_ended(read) == expected


def test_every_ending_the_supervisor_replies_is_in_the_schema() -> None:
    vocabulary = load("common.json")["$defs"]["ended_by"]["enum"]
    assert set(wire.ENDINGS) <= set(vocabulary)


def test_guest_memory_is_given_in_bytes() -> None:
    data = {"memory": {"guest_mem_kb": 4, "boot": 1}, "guest_mem_kb": None, "devices": [{}]}
    assert in_bytes(data) == {
        "memory": {"guest_mem_bytes": 4096, "boot": 1},
        "guest_mem_bytes": None,
        "devices": [{}],
    }


# --- the error object --------------------------------------------------------------------------


def test_error_json_names_what_the_error_knows() -> None:
    error = QvmError("no free vCPU slot", vm="vm1", hint="raise cpu.max")
    assert str(error) == "vm1: no free vCPU slot (hint: raise cpu.max)"
    assert error_fields(error, 1) == {
        "error": "vm1: no free vCPU slot (hint: raise cpu.max)",
        "exit_code": 1,
        "vm": "vm1",
        "hint": "raise cpu.max",
    }
    record = RecordError("/run/vm1/state.json", "qemu_pid", "must be a process id", "delete it")
    assert str(record) == "/run/vm1/state.json: qemu_pid: must be a process id (hint: delete it)"
    assert error_fields(record, 1, vm="vm1") == {
        "error": str(record),
        "exit_code": 1,
        "vm": "vm1",  # the VM the command was about
        "key": "qemu_pid",
        "file": "/run/vm1/state.json",
        "hint": "delete it",
    }
    reply = RecordError("vm1: supervisor reply", "", "not valid JSON")
    assert (str(reply), reply.file) == ("vm1: supervisor reply: not valid JSON", None)
    # the fields say it, never the text: a message that starts like a VM's name names none
    assert error_json("vm1: x", 1) == {"error": "vm1: x", "exit_code": 1}
    problems = DefinitionError(
        [
            Problem("/m/a.toml", "cpu.max", "too small", hint="raise it"),
            Problem("/m/a.toml", "", "x"),
        ]
    )
    assert (problems.file, problems.key, problems.hint) == ("/m/a.toml", "cpu.max", "raise it")
    data = error_fields(problems, 2)
    assert data["problems"] == ["/m/a.toml: cpu.max: too small (hint: raise it)", "/m/a.toml: x"]
    assert (data["file"], data["key"]) == ("/m/a.toml", "cpu.max")
    stopped = NotRunningError("vm2")
    assert (stopped.vm, stopped.hint) == ("vm2", "start it with 'qvm up vm2'")
    assert str(stopped) == "vm2: not running (hint: start it with 'qvm up vm2')"
    for value in (data, error_fields(error, 1), error_fields(record, 1)):
        validate(value, "error.json")


def test_an_error_naming_no_vm_is_about_the_one_vm_the_command_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qvm.cli import output, resolve

    monkeypatch.setattr(output, "json_mode", lambda argv=None: True)
    monkeypatch.setattr(output._Emitted, "json", False)
    monkeypatch.setattr(resolve, "settings", resolve.Settings(state_root=tmp_path))
    resolve.run_dir("vm1")
    output.report_error(QvmError("qemu-img not found", hint="install qemu-utils"), 1)
    assert json.loads(capsys.readouterr().out) == {
        "error": "qemu-img not found (hint: install qemu-utils)",
        "exit_code": 1,
        "vm": "vm1",
        "hint": "install qemu-utils",
    }
    resolve.run_dir("vm2")  # two VMs: the error is about neither in particular
    monkeypatch.setattr(output._Emitted, "json", False)
    output.report_error(QvmError("qemu-img not found"), 1)
    assert "vm" not in json.loads(capsys.readouterr().out)


def test_json_mode_is_an_option_of_qvm_not_of_the_guest_command() -> None:
    assert json_mode(["status", "vm1", "--json"])
    assert not json_mode(["ssh", "vm1", "--", "tool", "--json"])
    assert not json_mode(["status", "vm1"])


# --- qvm ssh keeps argument boundaries ------------------------------------------------------

TARGET = SshTarget("vm1", "qvm", "127.0.0.1", 2222, (), Path("/k"))


def test_ssh_quotes_each_word_for_the_remote_shell() -> None:
    argv = ssh_argv(TARGET, ["sh", "-c", "exit 7"])
    assert argv[-3:] == ["--", "qvm@127.0.0.1", "sh -c 'exit 7'"]
    assert ssh_argv(TARGET)[-2:] == ["--", "qvm@127.0.0.1"]  # no command: a login shell


def test_ssh_json_is_the_argv_it_would_run(cli: Qvm) -> None:
    """`qvm ssh VM --json` runs nothing: the argv as a list, the same as --print's words."""
    from qvm.base.jsonfile import write_json_atomic
    from qvm.layout.locks import try_lock
    from qvm.layout.rundir import run_dir_for

    run = run_dir_for(cli.state_dir, "vm1")
    run.path.mkdir(parents=True, mode=0o700)
    forward = {"nic": "net0", "proto": "tcp", "host_addr": "127.0.0.1", "guest_port": 22}
    launch = {"name": "vm1", "argv": ["qemu"], "ssh": {"user": "dev", "identities": ["/k/id"]}}
    write_json_atomic(run.launch_file, {**launch, "forwards": [{**forward, "host_port": 2345}]})
    held = try_lock(run.lock_file)  # as the VM's live supervisor holds it
    assert held is not None
    try:
        command = ["--", "sh", "-c", "exit 7"]
        data = json.loads(cli("ssh", "vm1", "--json", *command).stdout)
        validate(data, "ssh.json")
        assert data["argv"][-3:] == ["--", "dev@127.0.0.1", "sh -c 'exit 7'"]
        assert (data["host"], data["port"], data["user"]) == ("127.0.0.1", 2345, "dev")
        printed = cli("ssh", "vm1", "--print", *command).stdout
        assert shlex.split(printed) == data["argv"]
        as_root = json.loads(cli("ssh", "vm1", "--print", "--json", "-l", "root").stdout)
        assert as_root["user"] == "root" and as_root["argv"][-1] == "root@127.0.0.1"
        # the guest command's options are its own, and --user is a user name
        listed = json.loads(cli("ssh", "vm1", "--json", "ls", "-l", "/etc/hostname").stdout)
        assert listed["user"] == "dev" and listed["argv"][-1] == "ls -l /etc/hostname"
        wrong = cli("ssh", "vm1", "--print", "--user", "/etc/hostname", check=False)
        assert (wrong.returncode, wrong.stderr) == (
            2,
            "qvm: --user: must be a user name like 'qvm', got '/etc/hostname'\n",
        )
    finally:
        os.close(held)
    stopped = cli("ssh", "vm1", "--json", check=False)
    assert stopped.returncode != 0
    validate(json.loads(stopped.stdout), "error.json")


@given(
    st.lists(st.text(st.characters(exclude_characters="\0"), max_size=12), min_size=1, max_size=6)
)
def test_the_remote_shell_splits_the_line_back_into_the_same_words(words: list[str]) -> None:
    assert shlex.split(remote_command(words)) == words


@pytest.mark.parametrize(
    "words",
    [["a b", "it's", '"q"', "$HOME", "*", "", "x;y", "--", "\\n", "tab\there"]],
)
def test_a_real_shell_gets_the_words_intact(words: list[str]) -> None:
    # what sshd does with the line: `sh -c LINE`
    line = remote_command(["printf", "[%s]", *words])
    done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True)
    assert done.stdout == "".join(f"[{w}]" for w in words)
    status = subprocess.run(["sh", "-c", remote_command(["sh", "-c", "exit 7"])], check=False)
    assert status.returncode == 7
