"""download.py against a local HTTP server that serves a tiny fake her2st tree (no real data, no network)."""
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from genedml import download
from genedml.download import DownloadError, download_cohort, her2st_files, main


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.folder; honours "Range: bytes=N-" with 206 unless server.honour_range is False;
    cuts the body of the paths in server.truncate_once in half the first time they are asked for."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        file = srv.folder / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if self.headers.get("Range") and srv.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.truncate_once:
            srv.truncate_once.remove(self.path)
            body = body[: len(body) // 2]           # the connection closes after this: a dropped download
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.folder, srv.requests, srv.honour_range, srv.truncate_once = tmp_path / "upstream", [], True, set()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def put(srv, path, n, seed=0) -> bytes:
    """Write n random bytes at upstream data/<path>; return them."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    (srv.folder / "data" / path).parent.mkdir(parents=True, exist_ok=True)
    (srv.folder / "data" / path).write_bytes(data)
    return data


def ranges(srv, path):
    return [r for p, r in srv.requests if p == f"/data/{path}"]


FILES = [("ST-cnts/A1.tsv.gz", 3000), ("ST-spotfiles/A1_selection.tsv", 500), ("ST-imgs/A/A1/x.jpg", None)]


def test_full_download_lands_exact_bytes(server, tmp_path):
    want = {path: put(server, path, size or 7000, seed=i) for i, (path, size) in enumerate(FILES)}
    root = tmp_path / "her2st"
    paths = download_cohort("her2st", root, server.url, files=FILES, progress=False)
    assert paths == [root / p for p, _ in FILES]
    for path, data in want.items():
        assert (root / path).read_bytes() == data, path
    assert not list(root.rglob("*.part")), "no .part file may remain after a complete download"


def test_partial_file_is_resumed_with_range(server, tmp_path):
    path, size = FILES[0]
    data = put(server, path, size)
    root = tmp_path / "her2st"
    part = root / (path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1234])
    download_cohort("her2st", root, server.url, files=[(path, size)], progress=False)
    assert ranges(server, path) == ["bytes=1234-"]
    assert (root / path).read_bytes() == data     # right only if the 206 tail was appended to the .part
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    path, size = FILES[0]
    data = put(server, path, size)
    root = tmp_path / "her2st"
    (root / path).parent.mkdir(parents=True)
    (root / (path + ".part")).write_bytes(b"\0" * 1000)   # wrong bytes: appending would corrupt the file
    download_cohort("her2st", root, server.url, files=[(path, size)], progress=False)
    assert ranges(server, path) == ["bytes=1000-"]
    assert (root / path).read_bytes() == data


def test_dropped_connection_is_retried_and_resumed(server, tmp_path):
    path, size = FILES[0]
    data = put(server, path, size)
    server.truncate_once.add(f"/data/{path}")
    root = tmp_path / "her2st"
    download_cohort("her2st", root, server.url, files=[(path, size)], progress=False)
    assert ranges(server, path) == [None, f"bytes={size // 2}-"]
    assert (root / path).read_bytes() == data


def test_size_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    path, _ = FILES[0]
    put(server, path, 3000)
    root = tmp_path / "her2st"
    with pytest.raises(DownloadError, match=r"A1\.tsv\.gz.*3000.*2999"):
        download_cohort("her2st", root, server.url, files=[(path, 2999)], progress=False)
    assert not (root / path).exists() and not (root / (path + ".part")).exists()


def test_git_lfs_pointer_is_named(server, tmp_path):
    path = "ST-imgs/A/A1/x.jpg"
    (server.folder / "data" / path).parent.mkdir(parents=True)
    (server.folder / "data" / path).write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(DownloadError, match=r"x\.jpg.*Git LFS.*--base-url"):
        download_cohort("her2st", tmp_path / "her2st", server.url, files=[(path, None)], progress=False)
    assert not (tmp_path / "her2st" / path).exists()


def test_404_is_reported_after_trying_every_file(server, tmp_path):
    (good, good_size), (missing, missing_size) = FILES[1], FILES[0]
    data = put(server, good, good_size)
    root = tmp_path / "her2st"
    with pytest.raises(DownloadError, match=r"1 file\(s\) failed:\n.*A1\.tsv\.gz: HTTP 404"):
        download_cohort("her2st", root, server.url, files=[(missing, missing_size), (good, good_size)], progress=False)
    assert len(ranges(server, missing)) == 1, "a 404 is final: no retries"
    assert (root / good).read_bytes() == data and not (root / missing).exists()


def test_complete_files_are_skipped_and_wrong_sized_ones_refetched(server, tmp_path, capsys):
    (p1, s1), (p2, s2) = FILES[:2]
    put(server, p1, s1)
    data2 = put(server, p2, s2, seed=1)
    root = tmp_path / "her2st"
    (root / p1).parent.mkdir(parents=True)
    (root / p1).write_bytes(b"x" * s1)            # right size: counts as complete, never asked for
    (root / p2).parent.mkdir(parents=True)
    (root / p2).write_bytes(b"x" * (s2 - 1))      # wrong size: fetched again
    download_cohort("her2st", root, server.url, files=[(p1, s1), (p2, s2)], progress=False)
    assert ranges(server, p1) == [] and (root / p1).read_bytes() == b"x" * s1
    assert (root / p2).read_bytes() == data2
    assert "1 downloaded, 1 already present, 0 failed" in capsys.readouterr().out


def test_main_exit_codes(server, tmp_path, capsys):
    path, size = her2st_files(["A1"], ["spots"])[0]
    put(server, path, size)
    root = str(tmp_path / "her2st")
    args = ["her2st", "--root", root, "--base-url", server.url, "--only", "spots", "--quiet"]
    assert main(args + ["--sections", "A1"]) == 0
    assert main(args + ["--sections", "A1"]) == 0 and ranges(server, path) == [None]   # second run: nothing fetched
    assert main(args + ["--sections", "A1,B4"]) == 1
    assert "B4_selection.tsv: HTTP 404" in capsys.readouterr().err
    assert main(["cscc", "--root", root]) == 2 and "GSE144240" in capsys.readouterr().out
    assert main(["stnet"]) == 2 and "29ntw7sh4r" in capsys.readouterr().out
    assert main(["demo"]) == 0 and "generated" in capsys.readouterr().out
    for bad in (["her2st", "--sections", "Z9"], ["her2st", "--only", "labels"], ["visium"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2, bad


def test_file_table():
    files = her2st_files()
    assert len(files) == 3 * 36 and len({p for p, _ in files}) == 3 * 36
    assert ("ST-imgs/C/C2/5714_HE_BT_C2.jpg", 3990230) in files
    assert her2st_files(["B4"], ["images", "counts"]) == [("ST-cnts/B4.tsv.gz", 563881),
                                                          ("ST-imgs/B/B4/BT10737_D2_HE.jpg", 4076552)]
    with pytest.raises(ValueError, match="Z9"):
        her2st_files(["Z9"])


def test_file_table_matches_local_copy(her2st_root):
    """Every recorded size equals the real file's size where the local partial copy has that file."""
    checked = 0
    for path, size in her2st_files():
        if (her2st_root / path).is_file():
            assert size == (her2st_root / path).stat().st_size, path
            checked += 1
        else:
            assert path.startswith("ST-imgs/"), f"{path}: counts and spot files are all in the local copy"
    assert checked >= 72 + 5


@pytest.mark.parametrize("url", ["foo", "raw.githubusercontent.com/almaan/her2st", "http://[bad", "http://", "ftp://x/"])
def test_malformed_base_url_is_named_before_any_request(url, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"--base-url '{re.escape(url)}': not a URL"):
        download_cohort("her2st", tmp_path / "her2st", url, files=FILES, progress=False)
    assert main(["her2st", "--root", str(tmp_path / "her2st"), "--base-url", url, "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --base-url '{url}'")
    assert not (tmp_path / "her2st").exists(), "nothing is written for a URL that cannot be fetched"


def test_root_that_is_a_file_is_named(tmp_path, capsys):
    file = tmp_path / "her2st"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match=f"{file}: a file, not a folder"):
        download_cohort("her2st", file, "http://127.0.0.1:9/", files=FILES, progress=False)
    assert main(["her2st", "--root", str(file), "--quiet"]) == 2
    assert f"error: {file}: a file, not a folder" in capsys.readouterr().err
