"""tools/weights.py against a local HTTP server on 127.0.0.1: resume with Range, restart when Range is
ignored, size and sha256 checks, the recorded checksum. No network beyond the loopback."""
import hashlib
import http.server
import json
import os
import re
import threading

import pytest

from tools import weights

BODY = bytes(range(256)) * 4099   # ~1 MB, not a multiple of the chunk size


class _Handler(http.server.BaseHTTPRequestHandler):
    cut = None          # send only this many body bytes, then drop the connection (once)
    honour_range = True
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        cls = type(self)
        rng = self.headers.get("Range")
        cls.requests.append(rng)
        start = 0
        m = re.match(r"bytes=(\d+)-$", rng or "")
        if m and cls.honour_range:
            start = int(m.group(1))
            if start >= len(BODY):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(BODY) - 1, len(BODY)))
        else:
            self.send_response(200)
        body = BODY[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.cut is not None:
            body, cls.cut = body[:cls.cut], None
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.cut, _Handler.honour_range, _Handler.requests = None, True, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/model.caffemodel" % httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    dest = str(tmp_path / "w" / "model.caffemodel")
    _Handler.cut = 300000
    with pytest.raises(weights.DownloadError, match="run again to resume"):
        weights.download(server, dest, progress=False)
    assert os.path.getsize(dest + ".part") == 300000 and not os.path.exists(dest)
    assert weights.download(server, dest, progress=False) == dest
    assert _Handler.requests == [None, "bytes=300000-"]
    assert open(dest, "rb").read() == BODY and not os.path.exists(dest + ".part")
    record = json.load(open(dest + ".sha256.json"))
    assert record == {"url": server, "size": len(BODY), "sha256": hashlib.sha256(BODY).hexdigest()}
    # a rerun verifies against the record and fetches nothing
    assert weights.download(server, dest, progress=False) == dest and len(_Handler.requests) == 2
    with open(dest, "r+b") as f:          # a changed file is reported, not reused
        f.write(b"\1")   # BODY starts with a 0 byte
    with pytest.raises(weights.DownloadError, match="sha256"):
        weights.download(server, dest, progress=False)


def test_server_ignoring_range_starts_over(server, tmp_path):
    dest = str(tmp_path / "model.caffemodel")
    open(dest + ".part", "wb").write(b"x" * 1000)    # stale partial bytes
    _Handler.honour_range = False
    weights.download(server, dest, progress=False)
    assert open(dest, "rb").read() == BODY


def test_complete_part_and_416(server, tmp_path):
    dest = str(tmp_path / "model.caffemodel")
    open(dest + ".part", "wb").write(BODY)
    weights.download(server, dest, progress=False, sha256=hashlib.sha256(BODY).hexdigest())
    assert _Handler.requests == ["bytes=%d-" % len(BODY)] and open(dest, "rb").read() == BODY


def test_size_and_checksum_mismatch(server, tmp_path):
    dest = str(tmp_path / "model.caffemodel")
    with pytest.raises(weights.DownloadError, match="expected 12345"):
        weights.download(server, dest, size=12345, progress=False)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")  # too long: removed
    with pytest.raises(weights.DownloadError, match="sha256 .* expected 00"):
        weights.download(server, dest, sha256="00" * 32, progress=False)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_unreachable_host_is_one_clear_line(tmp_path):
    with pytest.raises(weights.DownloadError, match="127.0.0.1:9"):
        weights.download("http://127.0.0.1:9/x.caffemodel", str(tmp_path / "x"), progress=False,
                         timeout=5)


def test_sources_are_the_official_addresses():
    assert weights.SOURCES["fcn32s"]["url"] == \
        "http://dl.caffe.berkeleyvision.org/fcn32s-heavy-pascal.caffemodel"
    assert weights.SOURCES["vgg16"]["url"].startswith("http://www.robots.ox.ac.uk/~vgg/")
