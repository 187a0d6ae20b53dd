"""Base images from URLs, served by a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvm.definition.load import load_machine
from qvm.errors import DefinitionError, HostError
from qvm.host.images import fetch_image
from qvm.layout.cache import cache_key, cached_image, default_cache_root

PAYLOAD = b"QFI\xfb" + bytes(range(256)) * 4000  # about 1 MB, qcow2 magic first


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """Serves tmp_path/www on 127.0.0.1; yields the base URL and the paths requested."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "disk.qcow2").write_bytes(PAYLOAD)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_download_once_verified_with_progress(tmp_path: Path, server) -> None:  # noqa: ANN001
    base, requests = server
    url = f"{base}/disk.qcow2"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    target = cached_image(url, "sha256", digest, tmp_path / "cache")
    seen: list[tuple[int, int | None]] = []
    assert fetch_image(url, "sha256", digest, target, lambda d, t: seen.append((d, t))) is True
    assert target.read_bytes() == PAYLOAD
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    # the second time the cache answers: no request
    assert fetch_image(url, "sha256", digest, target) is False
    assert requests == ["/disk.qcow2"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".lock"]


def test_sha512_works_too(tmp_path: Path, server) -> None:  # noqa: ANN001
    base, _ = server
    digest = hashlib.sha512(PAYLOAD).hexdigest()
    target = tmp_path / "cache" / "x"
    fetch_image(f"{base}/disk.qcow2", "sha512", digest, target)
    assert target.read_bytes() == PAYLOAD


def test_bad_checksum_deletes_the_download_and_says_expected_and_got(
    tmp_path: Path,
    server,  # noqa: ANN001
) -> None:
    base, _ = server
    url = f"{base}/disk.qcow2"
    wrong = "0" * 64
    target = cached_image(url, "sha256", wrong, tmp_path / "cache")
    with pytest.raises(HostError) as error:
        fetch_image(url, "sha256", wrong, target, where="vm1.toml: disk[0].base")
    got = hashlib.sha256(PAYLOAD).hexdigest()
    assert str(error.value) == (
        f"vm1.toml: disk[0].base: sha256 mismatch for {url}: expected {wrong}, got {got}; "
        "deleted the download (hint: check the URL and the checksum in the machine file)"
    )
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()


def test_http_error_is_one_line(tmp_path: Path, server) -> None:  # noqa: ANN001
    base, _ = server
    with pytest.raises(HostError, match=r"cannot download .*/missing.qcow2: HTTP 404"):
        fetch_image(f"{base}/missing.qcow2", "sha256", "0" * 64, tmp_path / "c" / "x")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["x.lock"]


def test_cache_path_is_keyed_by_url_and_checksum(tmp_path: Path) -> None:
    one = cached_image("https://h/a/debian.qcow2?x=1", "sha256", "AB" * 32, tmp_path)
    assert one.parent == tmp_path
    assert (
        one.name == f"{cache_key('https://h/a/debian.qcow2?x=1', 'sha256', 'ab' * 32)}-debian.qcow2"
    )
    assert cached_image("https://h/a/debian.qcow2", "sha256", "cd" * 32, tmp_path) != one
    assert default_cache_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/qvm/images")
    assert default_cache_root({"QVM_CACHE_DIR": "/q"}) == Path("/q/images")


def test_definition_url_base_needs_one_checksum(tmp_path: Path) -> None:
    path = tmp_path / "vm1.toml"
    path.write_text(
        '[[disk]]\nbase = "https://h/d.qcow2"\n'
        '[[disk]]\nbase = "https://h/e.qcow2"\nsha256 = "12"\n'
        '[[disk]]\nbase = "local.qcow2"\nsha256 = "' + "a" * 64 + '"\n'
        '[[disk]]\nfile = "https://h/f.raw"\n'
    )
    with pytest.raises(DefinitionError) as error:
        load_machine(path)
    assert str(error.value).splitlines() == [
        f'{path}: disk[0].base: a downloaded image needs a checksum, got "https://h/d.qcow2"'
        ' (hint: add sha256 = "..." (or sha512) from the image\'s publisher)',
        f'{path}: disk[1].sha256: must be 64 hexadecimal digits, got "12"',
        f'{path}: disk[2].sha256: only allowed with a base URL, got "{"a" * 64}" (hint: a'
        " local image is used as it is; remove the checksum)",
        f'{path}: disk[3].file: must be a local path, got "https://h/f.raw" (hint: a'
        " downloaded image goes in base = URL)",
    ]


def test_definition_url_base_lives_in_the_cache(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("QVM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "vm1.toml"
    path.write_text('[[disk]]\nbase = "https://h/d.qcow2"\nsha512 = "' + "F" * 128 + '"\n')
    disk = load_machine(path).disks[0]
    assert disk.url == "https://h/d.qcow2"
    assert disk.sha512 == "f" * 128 and disk.sha256 is None
    assert disk.base == cached_image("https://h/d.qcow2", "sha512", "f" * 128)
    assert disk.base is not None and disk.base.parent == tmp_path / "cache" / "images"
