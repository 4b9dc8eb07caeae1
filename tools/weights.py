"""`make weights`: download the pretrained source net, resumably and checked, and prepare surgery.

This module owns the downloads of SPEC §7's pretrained weights: the FCN-32s PASCAL caffemodel (the
report's source) or VGG16 (VGG_ILSVRC_16_layers), from their official addresses, into weights/.

- Resumable: bytes go to <file>.part; a rerun asks the server for the rest (HTTP Range) and appends;
  a server that ignores Range makes it start over. The finished file is renamed into place.
- Checked: the size must equal the server's (Content-Length / Content-Range). Honest note: no size
  or checksum of these two files is written here, because none was known for certain when this was
  written; SOURCES has fields for them. After the first complete download the file's sha256 and
  size are recorded in <file>.sha256.json, and every later run verifies the file against that
  record (a changed or truncated file is reported, not reused). `--sha256 HEX` checks a checksum
  you trust from elsewhere.
- Surgery: it writes weights/conv1-3.prototxt, the prototxt with which Caffe loads conv1_1 ...
  conv3_2 of either caffemodel (tools/surgery.py), and, unless --no-surgery, the TS-FCN starting
  weights weights/ts-fcn-init-<source>.caffemodel (those six layers transplanted, the rest MSRA).
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request

from tqdm import tqdm

import atomic

SOURCES = {
    "fcn32s": {
        "url": "http://dl.caffe.berkeleyvision.org/fcn32s-heavy-pascal.caffemodel",
        "file": "fcn32s-heavy-pascal.caffemodel",
        "size": None,     # not known for certain: the server's Content-Length is checked
        "sha256": None,   # not known for certain: recorded after the first download
    },
    "vgg16": {
        "url": "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/VGG_ILSVRC_16_layers.caffemodel",
        "file": "VGG_ILSVRC_16_layers.caffemodel",
        "size": None,
        "sha256": None,
    },
}
DEFAULT_SOURCE = "fcn32s"
SOURCE_PROTOTXT = "conv1-3.prototxt"
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that failed or does not match its size/checksum; one clear line."""


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(dest):
    return dest + ".sha256.json"


def verify(dest, size=None, sha256=None):
    """Raise DownloadError unless dest matches the given size/sha256 and its own record."""
    record = {}
    if os.path.exists(_record_path(dest)):
        with open(_record_path(dest)) as f:
            record = json.load(f)
    size = size or record.get("size")
    sha256 = sha256 or record.get("sha256")
    actual = os.path.getsize(dest)
    if size is not None and actual != size:
        raise DownloadError("%s: %d bytes, expected %d" % (dest, actual, size))
    if sha256 is not None:
        digest = sha256sum(dest)
        if digest != sha256.lower():
            raise DownloadError("%s: sha256 %s, expected %s" % (dest, digest, sha256))
    return dest


def _total_size(response, offset):
    """The full file size from a 206's Content-Range or a 200's Content-Length (None if unsaid)."""
    if response.status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise DownloadError("%s: unexpected Content-Range %r"
                                % (response.url, response.headers.get("Content-Range")))
        return None if m.group(3) == "*" else int(m.group(3))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def download(url, dest, size=None, sha256=None, timeout=60, progress=True):
    """Download url to dest (resuming dest.part), check size (expected, else the server's) and
    sha256 (given, else recorded beside dest), and return dest. An existing dest is verified
    against its record, not fetched again."""
    if os.path.exists(dest):
        return verify(dest, size, sha256)
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": "bytes=%d-" % offset} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left to send; the .part may be complete
            raise DownloadError("%s: HTTP %d %s" % (url, e.code, e.reason))
        response, total = None, offset
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError("%s: %s" % (url, getattr(e, "reason", e)))
    if response is not None:
        with response:
            if response.status == 200 and offset:
                offset = 0        # the server ignored Range: start over
            total = _total_size(response, offset)
            mode = "ab" if offset else "wb"
            try:
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B",
                                                 unit_scale=True, disable=not progress,
                                                 desc=os.path.basename(dest)) as bar:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:   # e.g. IncompleteRead
                raise DownloadError("%s: interrupted after %d bytes (%s); run again to resume"
                                    % (url, os.path.getsize(part), e))
    got = os.path.getsize(part)
    want = size or total
    if want is not None and got != want:
        if got > want:
            os.remove(part)
        raise DownloadError("%s: got %d bytes, expected %d%s" % (
            url, got, want, "; run again to resume" if got < want else "; removed, run again"))
    digest = sha256sum(part)
    if sha256 is not None and digest != sha256.lower():
        os.remove(part)
        raise DownloadError("%s: sha256 %s, expected %s; removed" % (url, digest, sha256))
    os.replace(part, dest)
    atomic.write_json(_record_path(dest), {"url": url, "size": got, "sha256": digest})
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description="Download the pretrained FCN-32s PASCAL (default) or "
                                 "VGG16 caffemodel into weights/ (resumable, size/sha256 checked) "
                                 "and make the TS-FCN starting weights by surgery.")
    ap.add_argument("--source", choices=sorted(SOURCES), default=DEFAULT_SOURCE)
    ap.add_argument("--dir", default="weights", help="download folder (default weights/)")
    ap.add_argument("--url", help="another address for the same file (a mirror)")
    ap.add_argument("--sha256", help="expected sha256 of the caffemodel, if you know it")
    ap.add_argument("--no-surgery", action="store_true",
                    help="only download; do not write ts-fcn-init-<source>.caffemodel")
    args = ap.parse_args(argv)
    src = SOURCES[args.source]
    dest = os.path.join(args.dir, src["file"])
    try:
        download(args.url or src["url"], dest, size=src["size"], sha256=args.sha256 or src["sha256"])
    except DownloadError as e:
        print("weights: %s" % e, file=sys.stderr)
        return 1
    print("weights: %s (sha256 recorded in %s)" % (dest, _record_path(dest)))
    from tools import surgery   # needs Caffe; the download itself does not
    prototxt = surgery.write_source_prototxt(os.path.join(args.dir, SOURCE_PROTOTXT))
    print("weights: %s loads its conv1_1 ... conv3_2" % prototxt)
    if not args.no_surgery:
        out = os.path.join(args.dir, "ts-fcn-init-%s.caffemodel" % args.source)
        rc = surgery.main(["--weights", dest, "--source-prototxt", prototxt, "--out", out])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
