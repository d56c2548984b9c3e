"""Reads the English manual pages and info manuals that Debian packages install, as plain paragraphs.

The second reference model (models/manuals) is trained on this text. Only files that the dpkg
database says a package owns, and only packages whose installed version is a Debian upload
(debian_packages: not google-cloud-cli, nodesource's nodejs and the like), are read:

  man pages   /usr/share/man/man*/ (English only: /usr/share/man/<lang>/ is skipped). Symbolic links
              and `.so` alias stubs are skipped. Each page is rendered by groff itself
              (`preconv | groff -mandoc -t -Tutf8 -rcR=1 -rHY=0 -dAD=l -rLL=2000n -P-cbou`: no
              hyphenation, ragged right, one long line per filled paragraph, no overstriking), and
              the header and footer lines are dropped.
  info        /usr/share/info/NAME.info.gz (+ its NAME.info-N.gz parts, in the order of its
              Indirect table): the node separators, `File: ... Node: ...` lines, tag tables, the
              install-dir entries, menus (the end of a node from `* Menu:` on), index entries and heading underlines are dropped, and
              so are the license appendices (GNU FDL / GPL nodes).

Text is NFKC-normalised, control characters are removed, table rules drawn with box-drawing
characters are dropped (clean()), and each blank-line-separated block becomes
one paragraph (lines stripped, whitespace runs collapsed to one space), as austen_text.paragraphs
does. A document is one man page or one info manual; documents with identical paragraph text are
kept once (the first in sorted path order). Everything is in sorted path order, so the same
installed packages give the same corpus.
"""
import concurrent.futures
import glob
import gzip
import hashlib
import os
import re
import subprocess
import sys
import unicodedata
import zlib

MAN_ROOT = "/usr/share/man"
INFO_ROOT = "/usr/share/info"
GROFF = ["groff", "-mandoc", "-t", "-Tutf8", "-rcR=1", "-rHY=0", "-dAD=l", "-rLL=2000n", "-P-cbou"]
DEBIAN_ORIGINS = ("deb.debian.org", "security.debian.org", "ftp.debian.org")
LICENSE_NODE = re.compile(r"(Free Documentation License|General Public License|Copying This Manual|"
                          r"^Copying$|^GPL$|^GFDL$)", re.I)


def owners():
    """{path: package} for the man and info files in the dpkg database."""
    own = {}
    for lst in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
        pkg = os.path.basename(lst)[:-len(".list")].split(":")[0]
        with open(lst, errors="replace") as f:
            for line in f:
                p = line.rstrip("\n")
                if p.startswith(MAN_ROOT + "/man") or p.startswith(INFO_ROOT + "/"):
                    own[p] = pkg
    return own


def installed_versions(pkgs):
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"] + sorted(pkgs),
                         capture_output=True, text=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def debian_packages(pkgs):
    """The packages of `pkgs` whose installed version is a Debian upload (apt-cache policy): one a
    Debian archive offers, or, when no archive offers it any more, one older than a version a Debian
    archive offers (superseded by a point release). An installed version that another archive
    offers, or that is newer than every Debian version (nodesource's nodejs), is not."""
    out = subprocess.run(["apt-cache", "policy"] + sorted(pkgs), capture_output=True, text=True,
                         env=dict(os.environ, LC_ALL="C")).stdout
    table, pkg = {}, None  # pkg -> [(version, installed, [origin lines])]
    for line in out.splitlines():
        if line and not line.startswith(" "):
            pkg = line.rstrip(":")
            table[pkg] = []
        elif re.match(r"^ (\*\*\*| {3}) \S", line):  # a version of the version table
            table[pkg].append((line[5:].split()[0], line.startswith(" *** "), []))
        elif re.match(r"^ {8}\d+ \S", line) and table.get(pkg):  # an origin of that version
            table[pkg][-1][2].append(line)
    ok = set()
    for pkg, versions in table.items():
        inst = [v for v in versions if v[1]]
        if not inst:
            continue
        debian = [v for v, _, origins in versions if any(o in l for l in origins for o in DEBIAN_ORIGINS)]
        if inst[0][0] in debian:
            ok.add(pkg)
        elif not [l for l in inst[0][2] if "/var/lib/dpkg/status" not in l] and any(
                subprocess.run(["dpkg", "--compare-versions", inst[0][0], "lt", d]).returncode == 0
                for d in debian):
            ok.add(pkg)
    return ok


BOX_ONLY = re.compile(r"^[\s\u2500-\u257f]*[\u2500-\u257f][\s\u2500-\u257f]*$")


def clean(s):
    """NFKC; no control characters; table rules (lines of box-drawing characters only) dropped and
    the other box-drawing characters written as ' ' (runs) or '|'."""
    s = unicodedata.normalize("NFKC", s)
    s = "".join(c for c in s if c in "\n\t " or not unicodedata.category(c).startswith("C"))
    lines = [l for l in s.split("\n") if not BOX_ONLY.match(l)]
    s = re.sub(r"[\u2500-\u257f]{2,}", " ", "\n".join(lines))
    return re.sub(r"[\u2500-\u257f]", "|", s)


def paragraphs(text):
    """Blank-line-separated blocks, each one line with single spaces."""
    paras, cur = [], []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def decode(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_maybe_gz(path):
    with open(path, "rb") as f:
        raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def render_man(path):
    """Plain text of one man page (None for an alias stub or a page groff renders empty)."""
    src = decode(read_maybe_gz(path))
    body = [l for l in src.split("\n") if l.strip() and not l.startswith(('.\\"', "'\\\"", '\\"'))]
    if not body or body[0].startswith(".so ") or (len(body) <= 2 and any(l.startswith(".so ") for l in body)):
        return None
    env = dict(os.environ, LC_ALL="C.UTF-8")
    pre = subprocess.run(["preconv", "-e", "UTF-8"], input=src.encode("utf-8"), capture_output=True,
                         env=env, cwd=MAN_ROOT)
    r = subprocess.run(GROFF, input=pre.stdout, capture_output=True, env=env, cwd=MAN_ROOT)
    lines = r.stdout.decode("utf-8", "replace").split("\n")
    nonblank = [i for i, l in enumerate(lines) if l.strip()]
    if len(nonblank) < 3:
        return None
    return "\n".join(lines[nonblank[0] + 1:nonblank[-1]])  # without the header and footer lines


def man_documents(own):
    docs = []
    for path in sorted(glob.glob(MAN_ROOT + "/man*/*")):
        if os.path.islink(path) or not os.path.isfile(path) or path not in own:
            continue
        docs.append(("man", path, own[path]))
    return docs


def info_documents(own):
    docs = []
    for path in sorted(glob.glob(INFO_ROOT + "/*.info.gz")) + sorted(glob.glob(INFO_ROOT + "/*.info")):
        if path in own and not os.path.islink(path):
            docs.append(("info", path, own[path]))
    return docs


def render_info(path):
    main = decode(read_maybe_gz(path))
    parts = [main]
    m = re.search(r"\x1f\nIndirect:\n(.*?)\x1f", main, re.S)
    if m:
        parts = []
        base = os.path.dirname(path)
        for line in m.group(1).strip().split("\n"):
            name = line.split(":")[0].strip()
            sub = os.path.join(base, name)
            sub = sub + ".gz" if os.path.exists(sub + ".gz") else sub
            parts.append(decode(read_maybe_gz(sub)))
    out = []
    for part in parts:
        for chunk in part.split("\x1f")[1:]:  # [0]: the preamble (install-dir entries)
            chunk = chunk.lstrip("\n")
            head, _, body = chunk.partition("\n")
            if not head.startswith("File:"):  # Indirect:, Tag Table:, Local Variables
                continue
            node = re.search(r"Node:\s*([^,]*)", head)
            if node and LICENSE_NODE.search(node.group(1).strip()):
                continue
            keep = []
            for line in body.split("\n"):
                if line.startswith("* Menu:"):
                    break  # texinfo puts a node's menu at its end
                if re.match(r"^\s*([*=\-.])\1{2,}\s*$", line):  # heading underline
                    continue
                if re.search(r"\(line\s+\d+\)\s*$", line):  # index entry
                    continue
                keep.append(line)
            out.append("\n".join(keep))
    return "\n\n".join(out)


def _render(doc):
    kind, path, pkg = doc
    try:
        text = render_man(path) if kind == "man" else render_info(path)
    except (OSError, ValueError, EOFError, zlib.error) as e:  # an unreadable file is left out
        print("skipping %s: %s" % (path, e), file=sys.stderr)
        return None
    if text is None:
        return None
    ps = paragraphs(clean(text))
    return ps if ps else None


def read_documents(threads=2):
    """[(kind, path, package, version, paragraphs)] in sorted path order: info manuals, then man pages."""
    own = owners()
    deb = debian_packages(set(own.values()))
    docs = [d for d in info_documents(own) + man_documents(own) if d[2] in deb]
    ver = installed_versions({d[2] for d in docs})
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        rendered = list(ex.map(_render, docs))
    out, seen = [], set()
    for (kind, path, pkg), ps in zip(docs, rendered):
        if not ps:
            continue
        h = hashlib.sha1("\n".join(ps).encode("utf-8")).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        out.append((kind, path, pkg, ver.get(pkg, "?"), ps))
    return out


if __name__ == "__main__":
    docs = read_documents()
    by_pkg = {}
    for kind, path, pkg, ver, ps in docs:
        by_pkg.setdefault(pkg, [0, 0])
        by_pkg[pkg][0] += 1
        by_pkg[pkg][1] += sum(len(p) for p in ps)
    print(len(docs), "documents,", len(by_pkg), "packages,", sum(v[1] for v in by_pkg.values()), "characters")
    for kind, path, pkg, ver, ps in docs:
        print("%s\t%s\t%s\t%d\t%s" % (kind, pkg, path, sum(len(p) for p in ps), ps[0][:60]))
