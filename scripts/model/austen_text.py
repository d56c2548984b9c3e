"""Reads Jane Austen's six novels from Debian's r-cran-janeaustenr package without R.

The package's data/Rdata.rdb is a sequence of objects, each [4-byte big-endian length][zlib stream];
each object is an R XDR-serialised character vector (STRSXP) whose elements are CHARSXP records
(flags int32 with low byte 9, int32 length, bytes; length -1 is NA). The objects are stored in
alphabetical order of their names (see Rdata.rdx).
"""
import os
import struct
import subprocess
import tempfile
import zlib

BOOKS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
         "sensesensibility"]
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def _parse_strsxp(buf):
    if buf[:2] != b"X\n":
        raise ValueError("not an XDR R serialisation")
    pos = 2
    version = struct.unpack(">i", buf[pos:pos + 4])[0]
    pos += 12  # version, writer R version, minimal reader version
    if version == 3:
        (enc_len,) = struct.unpack(">i", buf[pos:pos + 4])
        pos += 4 + enc_len
    (flags,) = struct.unpack(">i", buf[pos:pos + 4])
    pos += 4
    if flags & 0xFF != 16:
        raise ValueError("expected a character vector, got SEXP type %d" % (flags & 0xFF))
    (n,) = struct.unpack(">i", buf[pos:pos + 4])
    pos += 4
    out = []
    for _ in range(n):
        flags, length = struct.unpack(">ii", buf[pos:pos + 8])
        pos += 8
        if flags & 0xFF != 9:
            raise ValueError("expected CHARSXP at offset %d" % pos)
        if length < 0:
            out.append("")
            continue
        out.append(buf[pos:pos + length].decode("utf-8"))
        pos += length
    return out


def read_rdb(path):
    data = open(path, "rb").read()
    vectors, i = [], 0
    while i < len(data):
        (ulen,) = struct.unpack(">I", data[i:i + 4])
        d = zlib.decompressobj()
        raw = d.decompress(data[i + 4:])
        if len(raw) != ulen:
            raise ValueError("object %d: length %d, header says %d" % (len(vectors), len(raw), ulen))
        vectors.append(_parse_strsxp(raw))
        i = len(data) - len(d.unused_data)
    if len(vectors) != len(BOOKS):
        raise ValueError("expected %d books, found %d" % (len(BOOKS), len(vectors)))
    return dict(zip(BOOKS, vectors))


def fetch_package(workdir):
    """apt-get download + dpkg -x of r-cran-janeaustenr (does not install R). Returns the .rdb path."""
    rdb = os.path.join(workdir, "x", RDB)
    if os.path.exists(rdb):
        return rdb
    os.makedirs(workdir, exist_ok=True)
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    deb = [f for f in os.listdir(workdir) if f.startswith("r-cran-janeaustenr") and f.endswith(".deb")]
    subprocess.run(["dpkg", "-x", deb[0], "x"], cwd=workdir, check=True)
    return rdb


def paragraphs(lines):
    """Joins wrapped lines into paragraphs (blank lines separate paragraphs)."""
    paras, cur = [], []
    for line in lines:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


if __name__ == "__main__":
    books = read_rdb(fetch_package(os.path.join(tempfile.gettempdir(), "janeaustenr")))
    for name, lines in books.items():
        p = paragraphs(lines)
        print(name, len(lines), "lines", len(p), "paragraphs", sum(len(x.split()) for x in p), "words",
              "| first:", p[0][:50])
