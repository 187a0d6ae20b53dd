"""The test-VM workflow on a real Debian 12 userspace (scripts/build-test-image):
qvm new -> up -> wait --for ssh -> ssh, port forwards at run time, overlay safety,
reset, rm --purge; and a Debian VM on a private network with a test guest, given its
address, the members' names and a share by cloud-init from the seed. Boots under TCG
take about a minute each; one Debian VM at a time.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from pathlib import Path

import pytest
from framework.guest import READY
from framework.harness import REPO, Qvm, build_test_image
from framework.wait import wait_until

pytestmark = pytest.mark.integration

IMAGE_DIR = REPO / "build" / "test-image"
BOOT_TIMEOUT = "420"  # seconds for `qvm wait --for ssh`: a TCG boot on a busy 2-core host


@pytest.fixture(scope="session")
def test_image() -> dict[str, object]:
    """Build (or take from the cache) the Debian image, as scripts/setup does."""
    build_test_image()
    return json.loads((IMAGE_DIR / "image.json").read_text())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def new_vm(qvm: Qvm, name: str, *extra: str) -> None:
    qvm(
        "--machines",
        str(qvm.machines_dir),
        "new",
        name,
        "--image",
        str(IMAGE_DIR / "disk.qcow2"),
        "--kernel",
        str(IMAGE_DIR / "vmlinuz"),
        "--initrd",
        str(IMAGE_DIR / "initrd.img"),
        "--append",
        "root=/dev/vda rw console=ttyS0",
        *extra,
    )


@pytest.mark.timeout(1500)
def test_new_up_ssh_forwards_overlay_reset_rm(
    qvm: Qvm, test_image: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no ~/.ssh/id_*.pub: qvm makes the VM's own key pair
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = IMAGE_DIR / "disk.qcow2"
    base_sum = sha256(base)

    new_vm(qvm, "deb", "--forward", "tcp:0:8080", "--disk-size", "3G")
    toml = qvm.machines_dir / "deb.toml"
    assert "[cloud_init]" in toml.read_text()

    up = qvm("up", "deb")
    assert "forward     tcp:127.0.0.1:" in up.stdout
    forwards = qvm.status("deb")["forwards"]
    assert [(f["nic"], f["proto"], f["guest_port"]) for f in forwards] == [
        ("net0", "tcp", 22),
        ("net0", "tcp", 8080),
    ]
    assert all(f["host_port"] > 0 and f["host_addr"] == "127.0.0.1" for f in forwards)
    run = qvm.run_dir("deb")
    assert (run / "id_ed25519").exists() and (run / "seed.iso").exists()

    # an image another running VM reads cannot be taken for writing: said before QEMU starts
    qvm.machine("writer", f'[[disk]]\nfile = "{base}"\n')
    refused = qvm("up", "writer", check=False)
    assert refused.returncode == 1
    assert f"writer.toml: disk[0].file: {base} is in use by VM deb (hint: qvm down deb)" in (
        refused.stderr
    )

    waited = qvm("wait", "deb", "--for", "ssh", "--timeout", BOOT_TIMEOUT, timeout=600)
    assert waited.stdout.startswith("deb: ready (ssh) after ")
    uname = qvm("ssh", "deb", "--", "uname", "-r")
    assert uname.stdout.strip() == test_image["kernel_version"]
    # cloud-init made the user from the seed, with sudo
    assert qvm("ssh", "deb", "--", "sudo", "-n", "id", "-un").stdout.strip() == "root"
    # each word arrives as one argument: spaces, quotes and the command's status intact
    assert qvm("ssh", "deb", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    words = ["a b", "it's", '"q"', "$HOME", "*", ""]
    printed = qvm("ssh", "deb", "--", "printf", "[%s]", *words).stdout
    assert printed == "".join(f"[{w}]" for w in words)
    # no command: a login shell, which here reads its commands from stdin
    login = qvm("ssh", "deb", input="echo login-$((6*7))\nexit 3\n", check=False)
    assert login.returncode == 3 and "login-42" in login.stdout

    # a forward added at run time works, shows in status, and goes away again
    added = json.loads(qvm("port", "add", "deb", "tcp:0:22", "--json").stdout)
    assert added["host_port"] not in (0, forwards[0]["host_port"])
    assert added in qvm.status("deb")["forwards"]
    argv = shlex.split(qvm("ssh", "deb", "--print", "--", "true").stdout)
    argv[argv.index("-p") + 1] = str(added["host_port"])
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    qvm("port", "del", "deb", str(added["host_port"]))
    assert added not in qvm.status("deb")["forwards"]
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 255

    # write inside the guest; the base image is never written
    qvm("ssh", "deb", "--", "sh", "-c", "echo hello | sudo tee /var/tmp/qvm-marker && sync")
    down = qvm("down", "deb")
    assert "deb: stopped: the guest powered off after the ACPI power button" in down.stdout
    assert sha256(base) == base_sum

    # reset throws the overlay away: the file is gone after the next boot
    reset = qvm("reset", "deb")
    assert f"removed {run}/disk0.qcow2" in reset.stdout
    qvm("up", "deb")
    qvm("wait", "deb", "--for", "ssh", "--timeout", BOOT_TIMEOUT, timeout=600)
    gone = qvm("ssh", "deb", "--", "test", "-e", "/var/tmp/qvm-marker", check=False)
    assert gone.returncode == 1
    # the overlay was grown to --disk-size
    size = qvm("ssh", "deb", "--", "cat", "/sys/block/vda/size").stdout.strip()
    assert int(size) * 512 == 3 * 1024**3
    qvm("down", "deb", "--force")
    assert sha256(base) == base_sum

    removed = qvm("rm", "deb", "--purge")
    assert f"deb: removed {toml}" in removed.stdout
    assert not toml.exists() and not run.exists()
    assert base.exists() and sha256(base) == base_sum


@pytest.mark.timeout(900)
def test_a_cloud_image_on_a_network_is_set_up_by_cloud_init(
    qvm: Qvm, test_image: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Debian boot: its address from the seed's network-config (the file cloud-init
    wrote says it), the test guest's name in its /etc/hosts from the seed's bootcmd, and
    the share mounted by it; pings by name both ways; the agent's path on Debian too."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "from-host.txt").write_text("written by the host\n")
    qvm.guest_machine("tg", max=1, memory="128M", extra='\n[[nic]]\nnetwork = "lab"\n')
    new_vm(qvm, "deb", "--memory", "512M")
    toml = qvm.machines_dir / "deb.toml"
    toml.write_text(
        toml.read_text()
        + f'\n[[nic]]\nnetwork = "lab"\n\n[[share]]\nhost = "{data}"\nguest = "/mnt/data"\n'
    )
    # the test guest first: deb's seed then names it (a later member reaches deb's
    # /etc/hosts through the agent only)
    qvm("up", "tg")
    qvm("up", "deb")
    tg_address = qvm.status("tg")["networks"][0]["address"]
    deb_nic = qvm.status("deb")["networks"][0]
    deb_address = deb_nic["address"]
    assert deb_nic["nic"] == "net1"
    seed = json.loads((qvm.run_dir("deb") / "network-config").read_text())
    assert seed["ethernets"]["net1"]["addresses"] == [deb_address]

    qvm("wait", "deb", "--for", "ssh", "--timeout", BOOT_TIMEOUT, timeout=600)

    def in_deb(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return qvm("exec", "deb", "--timeout", "60", "--", *argv, check=check, timeout=90)

    # cloud-init (every module, the bootcmd too) ran without an error
    assert in_deb("cloud-init", "status", "--wait").stdout.split()[-2:] == ["status:", "done"]
    # the address is the one cloud-init rendered from network-config (ifupdown's file),
    # on the NIC it named net1, the user-mode NIC on DHCP as before
    rendered = in_deb("cat", "/etc/network/interfaces.d/50-cloud-init").stdout
    assert "iface net0 inet dhcp" in rendered
    assert f"iface net1 inet static\n    address {deb_address}\n" in rendered
    assert f" {deb_address} " in in_deb("ip", "-4", "-o", "addr", "show", "dev", "net1").stdout
    # the share, mounted by the seed's bootcmd (or the agent, whichever came first)
    assert in_deb("cat", "/mnt/data/from-host.txt").stdout == "written by the host\n"

    # by name, both ways (the test guest's /etc/hosts got deb from its agent)
    wait_until(
        lambda: all(n["guest_configured"] for n in qvm.status("tg")["networks"]),
        60,
        "tg's network set up",
    )
    pinged = in_deb("ping", "-c", "1", "-W", "5", "tg", check=False)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    assert f"PING tg ({tg_address.split('/')[0]})" in pinged.stdout
    ping = ["ping", "-c", "1", "-W", "5", "deb"]
    assert qvm("exec", "tg", "--", *ping, check=False).returncode == 0
    # the agent's path works on Debian too (it found the address already there)
    wait_until(
        lambda: all(n["guest_configured"] for n in qvm.status("deb")["networks"]),
        60,
        "deb's network set up by its agent",
    )

    # without the agent's help: the members' lines and the share come back from the
    # seed's bootcmd alone, as at every boot
    in_deb("umount", "/mnt/data")
    in_deb("sed", "-i", "/^# qvm networks: begin/,/^# qvm networks: end/d", "/etc/hosts")
    assert "tg" not in in_deb("cat", "/etc/hosts").stdout
    in_deb("cloud-init", "single", "--name", "bootcmd", "--frequency", "always")
    hosts = in_deb("cat", "/etc/hosts").stdout
    assert f"{tg_address.split('/')[0]} tg\n" in hosts
    assert f"{deb_address.split('/')[0]} deb\n" in hosts
    assert in_deb("cat", "/mnt/data/from-host.txt").stdout == "written by the host\n"
    qvm("down", "deb", "tg", "--force")


def test_wait_timeout_names_what_it_waited_for(qvm: Qvm) -> None:
    qvm.guest_machine("vm1")
    qvm("up", "vm1")
    done = qvm("wait", "vm1", "--for", "serial:NEVER-PRINTED", "--timeout", "1", check=False)
    assert done.returncode == 4
    assert done.stderr.startswith(
        f"qvm: vm1: timed out after 1 s waiting for /NEVER-PRINTED/ in {qvm.run_dir('vm1')}"
        "/serial.log"
    )
    assert qvm("wait", "vm1", "--for", f"serial:^{READY}").returncode == 0
    assert qvm("wait", "vm1", "--for", "qmp").stdout.startswith("vm1: ready (qmp) after")
    # no forward to guest port 22: said at once (exit 1), not after the whole timeout (4)
    no_ssh = qvm("wait", "vm1", "--for", "ssh", "--timeout", "30", check=False)
    assert no_ssh.returncode == 1
    assert no_ssh.stderr.startswith("qvm: vm1: no port forward to guest port 22 (hint: add")
