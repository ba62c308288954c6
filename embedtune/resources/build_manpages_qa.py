"""Build the ``manpages_qa`` question/answer dataset from Debian manual pages.

Each record pairs a question written from the one-line description in a manual
page's NAME section ("Which system call do I use to change working directory?")
with the page's DESCRIPTION section as plain text, headed by the page's name
and section ("chdir(2)").  Pages whose question would name the page, or that
share their question with another page, answer nothing; their DESCRIPTION goes
to a separate BEIR-style corpus of distractors instead.

The pages come from pinned versions of Debian packages (``PACKAGES``), read
straight from their ``.deb`` files: nothing is installed and no formatter runs.
The builder has its own reader for the man(7) macros those pages use, so the
output depends only on the ``.deb`` contents and is byte-for-byte reproducible,
on any platform and Python >= 3.10.  It uses the standard library only.

Get the inputs (on Debian 12 "bookworm"; the architecture does not matter)::

    mkdir -p build/manpages_qa_debs && cd build/manpages_qa_debs
    apt-get download manpages=6.03-2 manpages-dev=6.03-2 coreutils=9.1-1 \\
        postgresql-client-15=15.18-0+deb12u1 libcurl4-doc=7.88.1-10+deb12u15 \\
        libssl-doc=3.0.20-1~deb12u2 openssl=3.0.20-1~deb12u2 git-man=1:2.39.5-0+deb12u3

(versions that have left the mirrors are on https://snapshot.debian.org), then
build the files, or rebuild them in memory and compare with the shipped ones::

    python -m embedtune.resources.build_manpages_qa --debs build/manpages_qa_debs
    python -m embedtune.resources.build_manpages_qa --debs build/manpages_qa_debs --check

``--check`` exits 0 when a rebuild has the same records as the shipped files
(and says whether the gzip bytes match too), 1 when it does not, and 3, at once
and reading nothing, when the pinned ``.deb`` files are absent (the message says
how to get them).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "manpages_qa.jsonl.gz"
DEFAULT_CORPUS_OUT = HERE / "manpages_qa_corpus.jsonl.gz"
DEFAULT_DEBS = Path("build") / "manpages_qa_debs"
SEED = 0
MAX_ANSWER_CHARS = 1500
MIN_BODY_CHARS = 60
MIN_DESCRIPTION_WORDS = 2
MAX_DESCRIPTION_WORDS = 20
EXIT_DIFFERENT = 1
EXIT_NO_INPUTS = 3


@dataclass(frozen=True)
class Package:
    """A pinned Debian package and how its manual pages are used."""

    name: str
    version: str
    source_package: str  # the Debian source package, for snapshot.debian.org
    sources: dict[str, str]  # manual section (directory digit) -> dataset ``source``
    # Licence (SPDX) of pages that state none themselves; None: such pages are left out.
    licence: str | None = None


PACKAGES = (
    Package("manpages", "6.03-2", "manpages",
            {"1": "commands", "2": "syscalls", "3": "library", "4": "files", "5": "files", "7": "overview",
             "8": "commands"}),
    Package("manpages-dev", "6.03-2", "manpages", {"2": "syscalls", "3": "library", "4": "files"}),
    Package("coreutils", "9.1-1", "coreutils", {"1": "commands", "8": "commands"}, "GPL-3.0-or-later"),
    Package("postgresql-client-15", "15.18-0+deb12u1", "postgresql-15", {"1": "commands", "7": "sql"},
            "PostgreSQL"),
    Package("libcurl4-doc", "7.88.1-10+deb12u15", "curl", {"3": "curl"}),
    Package("libssl-doc", "3.0.20-1~deb12u2", "openssl", {"3": "openssl"}, "Apache-2.0"),
    Package("openssl", "3.0.20-1~deb12u2", "openssl", {"1": "openssl", "5": "openssl", "7": "openssl"},
            "Apache-2.0"),
    Package("git-man", "1:2.39.5-0+deb12u3", "git", {"1": "git", "5": "git", "7": "git"}, "GPL-2.0-only"),
)

# Licences a page may carry to be used, as SPDX identifiers ("LicenseRef-" for those SPDX
# has no identifier for).  Every one of them allows redistributing modified text.
ALLOWED_LICENCES = frozenset({
    "Linux-man-pages-copyleft", "Linux-man-pages-copyleft-2-para", "GPL-1.0-or-later", "GPL-2.0-only",
    "GPL-2.0-or-later", "GPL-3.0-or-later", "BSD-2-Clause", "BSD-3-Clause", "BSD-4-Clause-UC", "MIT",
    "PostgreSQL", "curl", "Apache-2.0", "LicenseRef-public-domain", "LicenseRef-freely-redistributable",
})
# Older man-pages sources name their licence by a tag instead of an SPDX line.  Tags not
# listed here are left out: VERBATIM_ONE_PARA asks that the page's header be kept verbatim
# in every copy, MISC (regex(7)) that its notice stay unaltered, and BSD_ONELINE_CDROM names
# no licence text at all.
LICENCE_TAGS = {
    "VERBATIM_PROF": "Linux-man-pages-copyleft",  # the same text as the SPDX licence
    "VERBATIM_TWO_PARA": "Linux-man-pages-copyleft-2-para",
    "PUBLIC_DOMAIN": "LicenseRef-public-domain",
    "FREELY_REDISTRIBUTABLE": "LicenseRef-freely-redistributable",
}

_MAN_PATH = re.compile(r"^\./usr/share/(?:postgresql/\d+/)?man/man(\d)/([^/]+)\.gz$")
_SPDX = re.compile(r"SPDX-License-Identifier:\s*(\S+)")
_LICENCE_TAG = re.compile(r"%%%LICENSE_START\(([A-Z_0-9]+)\)")
_COPYRIGHT_LINE = re.compile(r"copyright\s*(?:\(c\)|\u00a9|\d)|\(c\)\s*\d|\u00a9", re.I)
_WS = re.compile(r"\s+")


class InputError(Exception):
    """The pinned inputs are missing or are not the pinned versions."""


# --- reading .deb files ---------------------------------------------------------------------


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb`` is one), by name."""
    if not data.startswith(b"!<arch>\n"):
        raise InputError("not an ar archive (a .deb file)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def _tar(members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    """Open ``control.tar.*`` or ``data.tar.*`` of a ``.deb`` (gzip, xz or bzip2)."""
    for name, blob in members.items():
        if name.startswith(stem + "."):
            if name.endswith(".zst"):
                raise InputError(f"{name} is zstd-compressed, which this builder does not read; use the "
                                 "Debian .deb (xz-compressed) named in PACKAGES")
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise InputError(f"no {stem} in the .deb")


def deb_control(members: dict[str, bytes]) -> dict[str, str]:
    """The fields of a ``.deb``'s control file (continuation lines are dropped)."""
    with _tar(members, "control.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "control")
        text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    fields = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


@dataclass
class Deb:
    """What the builder reads from one ``.deb``."""

    control: dict[str, str]
    pages: list[tuple[str, str, bytes]]  # (section digit, file name, gzip bytes), sorted
    copyright: str  # usr/share/doc/<package>/copyright, or "" (manpages-dev links to manpages')


def read_deb(path: Path) -> Deb:
    """Read a ``.deb``: its control fields, English manual pages and copyright file.

    Symbolic and hard links are skipped: a link is another name of a page read anyway.
    """
    members = ar_members(path.read_bytes())
    control = deb_control(members)
    pages = []
    copyright_text = ""
    copyright_path = f"./usr/share/doc/{control.get('Package', '')}/copyright"
    with _tar(members, "data.tar") as tar:
        for member in tar.getmembers():
            name = member.name if member.name.startswith("./") else "./" + member.name
            if not member.isfile():
                continue
            match = _MAN_PATH.match(name)
            if match:
                pages.append((match.group(1), match.group(2), tar.extractfile(member).read()))  # type: ignore[union-attr]
            elif name == copyright_path:
                copyright_text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    pages.sort(key=lambda p: (p[0], p[1]))
    return Deb(control, pages, copyright_text)


def find_debs(folder: Path, allow_other_versions: bool = False) -> dict[str, Path]:
    """The ``.deb`` file of each pinned package in ``folder``; InputError naming what is missing."""
    found: dict[str, Path] = {}
    problems = []
    for pkg in PACKAGES:
        candidates = sorted(folder.glob(f"{pkg.name}_*.deb")) if folder.is_dir() else []
        # apt-get download writes an epoch's colon as %3a; other tools drop the epoch.
        spellings = {pkg.version.replace(":", "%3a"), pkg.version.split(":")[-1]}
        exact = [p for p in candidates if any(p.name.startswith(f"{pkg.name}_{v}_") for v in spellings)]
        if exact:
            found[pkg.name] = exact[0]
        elif candidates and allow_other_versions:
            found[pkg.name] = candidates[-1]  # iter_pages warns
        else:
            had = f" (found {', '.join(p.name for p in candidates)})" if candidates else ""
            problems.append(f"{pkg.name}={pkg.version}{had}")
    if problems:
        raise InputError(f"missing in {folder}: {'; '.join(problems)}.\n{how_to_get()}")
    return found


def how_to_get() -> str:
    """How to download the pinned inputs."""
    pins = " ".join(f"{p.name}={p.version}" for p in PACKAGES)
    sources = dict.fromkeys((p.source_package, p.version) for p in PACKAGES)
    snap = ", ".join(f"https://snapshot.debian.org/package/{src}/{version}/" for src, version in sources)
    return (f"Get them on Debian 12 (bookworm) with:\n  apt-get download {pins}\n"
            f"or, once a version has left the mirrors, from {snap}")


# --- roff to text ---------------------------------------------------------------------------

# groff special characters (\(xx and \[xx]) the pages use, as text.
SPECIAL_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7",
    "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "==": "\u2261",
    "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "br": "|", "->": "\u2192", "<-": "\u2190",
    "de": "\u00b0", "mc": "\u00b5", "*m": "\u03bc", "*p": "\u03c0", "*a": "\u03b1", "*b": "\u03b2",
    "*l": "\u03bb", "*s": "\u03c3", "*W": "\u03a9", "ga": "`", "aa": "\u00b4", "ss": "\u00df",
    ":a": "\u00e4", ":o": "\u00f6", ":u": "\u00fc", ":A": "\u00c4", ":O": "\u00d6", ":U": "\u00dc",
    "'e": "\u00e9", "'a": "\u00e1", "`e": "\u00e8", "`a": "\u00e0", ",c": "\u00e7", "~n": "\u00f1",
    "ae": "\u00e6", "o/": "\u00f8", "ua": "\u2191", "da": "\u2193", "sc": "\u00a7", "ps": "\u00b6",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "lB": "[", "rB": "]", "lC": "{",
    "rC": "}", "la": "\u27e8", "ra": "\u27e9", "at": "@", "sh": "#", "Do": "$", "eu": "\u20ac",
    "ct": "\u00a2", "Po": "\u00a3", "Ye": "\u00a5", "12": "\u00bd", "14": "\u00bc", "34": "\u00be",
    "sq": "\u25a1", "ci": "\u25cb", "ru": "_", "ul": "_", "or": "|", "pl": "+", "eq": "=", "fm": "\u2032",
}
# Predefined strings (\*x, \*(xx, \*[xxx]) of the man macros and of Pod::Man's preamble.
DEFAULT_STRINGS = {"R": "\u00ae", "S": "", "Tm": "\u2122", "lq": '"', "rq": '"', "Aq": "'", "C`": '"',
                   "C'": '"', "L\"": '"', "R\"": '"', "--": "\u2014", "PI": "\u03c0", "HF": ""}
_ESCAPE = re.compile(
    r"\\(?:"
    r"(?P<font>f(?:\[[^\]]*\]|\(..|.))"
    r"|(?P<size>s(?:[-+]?\d|\([-+]?\d\d|\[[^\]]*\]|'[^']*'))"
    r"|(?P<string>\*(?:\[(?P<sl>[^\]]*)\]|\((?P<s2>..)|(?P<s1>.)))"
    r"|(?P<special>\((?P<c2>..)|\[(?P<cl>[^\]]*)\])"
    r"|(?P<num>N'(?P<code>\d+)')"
    r"|(?P<arg>[hvwoXlLDbxZ]'[^']*')"
    r"|(?P<reg>n(?:[-+]?\[[^\]]*\]|[-+]?\(..|[-+]?.))"
    r"|(?P<kz>[kz].)"
    r"|(?P<space>[ ~0])"
    r"|(?P<gone>[&|^%:/,)dupacr{}!?])"
    r"|(?P<other>.)"
    r")",
    re.S,
)


def special_char(name: str) -> str:
    """The text of a groff special character, e.g. ``em`` or ``u00E9``; '' if unknown."""
    if name in SPECIAL_CHARS:
        return SPECIAL_CHARS[name]
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    if re.fullmatch(r"char\d+", name):
        return chr(int(name[4:]))
    return ""


def unescape(text: str, strings: dict[str, str]) -> str:
    """Resolve roff escapes in a line of text: fonts and sizes go, characters become text."""

    def replace(m: re.Match[str]) -> str:
        if m.group("string"):
            name = m.group("sl") or m.group("s2") or m.group("s1")
            return unescape(strings.get(name, ""), {}) if name in strings else ""
        if m.group("special"):
            return special_char(m.group("c2") or m.group("cl"))
        if m.group("num"):
            return chr(int(m.group("code")))
        if m.group("space"):
            return " "
        if m.group("other"):
            ch = m.group("other")
            return {"e": "\\", "-": "-", ".": ".", "'": "'", "`": "`", "\\": "\\", "t": " "}.get(ch, ch)
        return ""

    return _ESCAPE.sub(replace, text)


def split_args(line: str) -> list[str]:
    """Split a request's arguments as roff does: by blanks, with "double quotes" grouping."""
    args: list[str] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            break
        if line[i] == '"':
            i += 1
            buf = []
            while i < n:
                if line[i] == '"':
                    if i + 1 < n and line[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(line[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and line[j] not in " \t":
                j += 2 if line[j] == "\\" else 1
            args.append(line[i:j])
            i = j
    return args


def strip_comments(text: str) -> list[str]:
    """The page's lines with comments removed and escaped newlines joined."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"(?<!\\)((?:\\\\)*)\\\n", r"\1", text)
    lines = []
    for line in text.split("\n"):
        if re.match(r"^[.'][ \t]*\\[\"#]", line):
            continue  # a comment line
        line = re.sub(r"(?<!\\)((?:\\\\)*)\\[\"#].*$", r"\1", line)
        lines.append(line)
    return lines


BREAKS = frozenset("PP P LP sp br HP Sp".split())
NOFILL = {"nf": True, "EX": True, "Vb": True, "DS": True, "CS": True, "fi": False, "EE": False, "Ve": False,
          "DE": False, "CE": False}
FONT_MACROS = frozenset("B I SM SB".split())
ALTERNATING = frozenset("BR BI IB IR RB RI".split())
_BULLET = re.compile(r"^(?:[\u2022*o\u00b7-]|\(?\d{1,2}[.)]?|\(?[a-z][.)])$")
_TERM_END = re.compile(r"[.:;!?]$")


def join_tag(tag: str, text: str) -> str:
    """A tagged paragraph as one line: ``• text``, ``1. text`` or ``tag: text``."""
    if tag in ("*", "o", "\u00b7", "-", "\u2022"):
        return f"\u2022 {text}"
    if _BULLET.match(tag) or tag.endswith(":"):
        return f"{tag} {text}"
    return f"{tag}: {text}"


def parse_condition(rest: str, strings: dict[str, str]) -> tuple[bool, str]:
    """Evaluate the condition of ``.if``/``.ie`` as nroff would; return it and the body."""
    rest = rest.lstrip()
    negate = rest.startswith("!")
    if negate:
        rest = rest[1:]
    if rest[:1] == "'":  # a string comparison: 'a'b'
        m = re.match(r"'([^']*)'([^']*)'(.*)$", rest, re.S)
        if not m:
            return False, ""
        value, body = unescape(m.group(1), strings) == unescape(m.group(2), strings), m.group(3)
    else:
        m = re.match(r"(\S*?)(\\\{.*|\s.*|)$", rest, re.S)
        token, body = (m.group(1), m.group(2)) if m else (rest, "")
        if token in ("n",):
            value = True
        elif token in ("t", "o", "e", "v"):
            value = False
        elif token in ("\\n(.g", "\\n[.g]"):
            value = True  # running under groff
        elif token.startswith("d") and len(token) > 1:
            value = token[1:] in strings
        else:
            value = token.isdigit() and int(token) > 0
    return value != negate, body


@dataclass
class RoffPage:
    """A manual page read from roff: its title and its sections as paragraphs of text."""

    title: list[str] = field(default_factory=list)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def section(self, name: str) -> list[str]:
        """The paragraphs of the first section called ``name`` (any case), or []."""
        for title, paras in self.sections:
            if title.upper() == name:
                return paras
        return []


class RoffReader:
    """Turn a page written with the man(7) macros (and groff/tbl basics) into paragraphs.

    The layout requests are dropped and the text is kept: filled paragraphs are collapsed to
    one line, tagged paragraphs (``.TP``, ``.IP``) become ``tag: text``, no-fill blocks keep
    their lines, and tables (tbl) become one line per row with `` | `` between cells.
    """

    def __init__(self) -> None:
        self.strings = dict(DEFAULT_STRINGS)
        self.page = RoffPage()
        self.words: list[str] = []
        self.lines: list[str] = []  # no-fill lines of the current block
        self.nofill = False
        self.tag: str | None = None
        self.want_tag = False  # the next text line is a .TP tag
        self.last_cond = True
        self.pending_heading: str | None = None  # ".SH" with the heading on the next line
        self.join_next = False  # the last text line ended in \c
        self.translate: dict[int, str] = {}  # .tr

    # -- paragraphs
    def current(self) -> list[str]:
        if not self.page.sections:
            self.page.sections.append(("", []))
        return self.page.sections[-1][1]

    def flush(self) -> None:
        text = _WS.sub(" ", " ".join(self.words)).strip()
        if self.nofill or self.lines:
            block = "\n".join(ln.rstrip() for ln in self.lines).strip("\n")
            if block.strip():
                self.current().append(block)
            self.lines = []
        if self.tag is not None:
            tag = _WS.sub(" ", self.tag).strip()
            if tag and text:
                text = join_tag(tag, text)
            elif tag:
                text = tag
            self.tag = None
        if text:
            self.current().append(re.sub(r"^\u2022(?=\S)", "\u2022 ", text))  # DocBook's bullets end in \c
        self.words = []
        self.join_next = False

    def add_text(self, text: str) -> None:
        text = text.translate(self.translate)
        if self.want_tag:
            self.want_tag = False
            self.tag = (self.tag + ", " if self.tag else "") + text
            return
        if self.nofill:
            if self.join_next and self.lines:
                self.lines[-1] += text
            else:
                self.lines.append(text.expandtabs(8))
        elif self.join_next and self.words:
            self.words[-1] += text
        else:
            self.words.append(text)
        self.join_next = False

    def text_line(self, raw: str) -> None:
        joins = raw.rstrip().endswith("\\c")
        text = unescape(raw.rstrip()[:-2] if joins else raw, self.strings)
        if self.pending_heading is not None:
            self.pending_heading = None
            self.start_section(text)
            return
        if not raw.strip() and not self.nofill:
            self.flush()
            return
        self.add_text(text)
        self.join_next = joins

    def start_section(self, heading: str, sub: bool = False) -> None:
        self.flush()
        heading = _WS.sub(" ", heading).strip()
        if sub:
            if heading:
                self.current().append(heading)
        else:
            self.page.sections.append((heading, []))
        self.nofill = False

    # -- requests
    def feed(self, lines: list[str], i: int) -> int:
        """Process ``lines[i]`` (and any lines it owns); return the index of the next line."""
        line = lines[i]
        if line[:1] not in (".", "'"):
            self.text_line(line)
            return i + 1
        m = re.match(r"[.'][ \t]*(\\\}|[^\s\\]+)?[ \t]*(.*)$", line, re.S)
        name, rest = (m.group(1) or "", m.group(2)) if m else ("", "")
        if name in ("if", "ie", "el"):
            return self.conditional(name, rest, lines, i)
        if name in ("de", "de1", "am", "ig"):
            return skip_until(lines, i + 1, lambda ln: ln.strip() in ("..", ".\\.."))
        if name in ("EQ", "PS"):
            end = {"EQ": ".EN", "PS": ".PE"}[name]
            return skip_until(lines, i + 1, lambda ln: ln.startswith(end))
        if name == "TS":
            return self.table(lines, i + 1)
        self.request(name, rest)
        return i + 1

    def request(self, name: str, rest: str) -> None:
        """Apply one request or macro call that owns no further lines."""
        args = split_args(rest)
        text_args = [unescape(a, self.strings) for a in args]
        if name in FONT_MACROS:
            if text_args:
                self.add_text(" ".join(text_args))
        elif name in ALTERNATING:
            self.add_text("".join(text_args))
        elif name in ("SH", "SS"):
            if text_args:
                self.start_section(" ".join(text_args), sub=name == "SS")
            elif name == "SH":
                self.pending_heading = ""
        elif name == "TH":
            self.page.title = text_args
        elif name in NOFILL:
            self.flush()
            self.nofill = NOFILL[name]
        elif name in BREAKS:
            if self.nofill:
                if name in ("sp", "Sp"):
                    self.lines.append("")
            elif not (name == "sp" and args[:1] == ["-1"]):
                self.flush()
        elif name in ("TP", "TQ"):
            if name == "TP":
                self.flush()
            self.want_tag = True
        elif name == "IP":
            self.flush()
            if text_args and text_args[0].strip():
                self.tag = text_args[0]
        elif name == "RS":
            self.indent()
        elif name == "RE":
            self.flush()
        elif name in ("UR", "MT"):
            self.strings[" link"] = text_args[0] if text_args else ""
        elif name in ("UE", "ME"):
            link = self.strings.pop(" link", "")
            self.add_text(f"<{link}>{''.join(text_args)}" if link else "".join(text_args))
        elif name == "MR" and len(text_args) >= 2:
            self.add_text(f"{text_args[0]}({text_args[1]}){''.join(text_args[2:])}")
        elif name == "tr":
            chars = unescape(rest.strip(), self.strings)
            self.translate.update({ord(a): b for a, b in zip(chars[::2], chars[1::2])})
        elif name in ("ds", "as") and args:
            parts = rest.split(None, 1)
            value = parts[1] if len(parts) > 1 else ""
            value = value[1:] if value.startswith('"') else value
            self.strings[args[0]] = (self.strings.get(args[0], "") if name == "as" else "") + value

    def indent(self) -> None:
        """``.RS``: a short paragraph with no closing punctuation right before it is a term
        (DocBook writes its lists so), and the indented text is its definition."""
        text = _WS.sub(" ", " ".join(self.words)).strip()
        if text and self.tag is None and not self.nofill and len(text) <= 100 and not _TERM_END.search(text):
            self.tag = text
            self.words = []
        else:
            self.flush()

    def conditional(self, name: str, rest: str, lines: list[str], i: int) -> int:
        """``.if``, ``.ie`` and ``.el``, including ``\\{ ... \\}`` blocks over several lines."""
        if name == "el":
            value, body = not self.last_cond, rest
        else:
            value, body = parse_condition(rest, self.strings)
            if name == "ie":
                self.last_cond = value
        body = body.lstrip()
        block = body.startswith("\\{")
        if block:
            body = body[2:].lstrip()
        if value:
            body = body.replace("\\}", "")
            if body.strip():
                self.feed([body], 0)
            return i + 1
        if not block or "\\}" in body:
            return i + 1
        depth = 1
        j = i + 1
        while j < len(lines) and depth:
            depth += lines[j].count("\\{") - lines[j].count("\\}")
            j += 1
        return j

    def table(self, lines: list[str], i: int) -> int:
        """Read a tbl table from ``lines[i]`` (after ``.TS``) as one paragraph, a line per row."""
        self.flush()
        tab = "\t"
        if i < len(lines) and lines[i].rstrip().endswith(";"):
            m = re.search(r"tab\s*\((.)\)", lines[i])
            tab = m.group(1) if m else tab
            i += 1
        i = skip_until(lines, i, lambda ln: ln.rstrip().endswith(".")) if i < len(lines) else i
        rows: list[str] = []
        while i < len(lines) and not lines[i].startswith(".TE"):
            line = lines[i]
            i += 1
            if line.startswith(".T&"):
                i = skip_until(lines, i, lambda ln: ln.rstrip().endswith("."))
            elif line[:1] in (".", "'") or line.strip() in ("_", "=", "\\_", ""):
                continue
            else:
                cells, i = self.table_row(line, lines, i, tab)
                row = " | ".join(c for c in cells if c and c not in ("_", "=", "\\^"))
                if row:
                    rows.append(row)
        if rows:
            self.current().append("\n".join(rows))
        return i + 1

    def table_row(self, line: str, lines: list[str], i: int, tab: str) -> tuple[list[str], int]:
        """The cells of a table row starting at ``line``, with ``T{ ... T}`` blocks read from
        ``lines[i:]``; returns them and the index after the row."""
        cells: list[str] = []
        parts = line.split(tab)
        while parts:
            part = parts.pop(0)
            if part.rstrip() != "T{":
                cells.append(_WS.sub(" ", unescape(part, self.strings)).strip())
                continue
            block = []
            while i < len(lines) and not lines[i].startswith("T}"):
                if lines[i][:1] not in (".", "'"):
                    block.append(unescape(lines[i], self.strings))
                i += 1
            cells.append(_WS.sub(" ", " ".join(block)).strip())
            rest = lines[i][2:] if i < len(lines) else ""
            i += 1
            parts = rest.split(tab)[1:] if rest.startswith(tab) else []
        return cells, i


def skip_until(lines: list[str], i: int, end: object) -> int:
    """The index after the first line from ``lines[i]`` on for which ``end(line)`` holds."""
    while i < len(lines):
        i += 1
        if end(lines[i - 1]):  # type: ignore[operator]
            return i
    return i


def read_roff(text: str) -> RoffPage:
    """Read a whole page."""
    reader = RoffReader()
    lines = strip_comments(text)
    i = 0
    while i < len(lines):
        i = reader.feed(lines, i)
    reader.flush()
    return reader.page


# --- pages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManPage:
    """One manual page of a pinned package, before it becomes a record."""

    package: Package
    section: str  # the directory digit: "3" for printf.3 and timespec.3type
    file: str  # the file name without ".gz", e.g. "printf.3", "timespec.3type", "ALTER_TABLE.7"
    text: str

    @property
    def id(self) -> str:
        stem, _, suffix = self.file.rpartition(".")
        return f"man{self.section}/{stem if suffix.startswith(self.section) else self.file}"

    @property
    def suffix(self) -> str:
        return self.file.rpartition(".")[2]

    @property
    def source(self) -> str:
        return self.package.sources[self.section]


def decode_page(blob: bytes) -> str:
    """A page's text: UTF-8, or Latin-1 for the odd older page."""
    raw = gzip.decompress(blob)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def header_comments(text: str) -> list[str]:
    """The comment lines before a page's ``.TH``, without comment marks and box drawing."""
    out = []
    for line in text.splitlines():
        if re.match(r"^[.'][ \t]*(TH|SH)\b", line):
            break
        m = re.match(r"^[.'][ \t]*\\\"(.*)$", line)
        if m:
            out.append(m.group(1).strip().lstrip("*").strip())
    if out and re.fullmatch(r"[egprtv]+", out[0]):
        out.pop(0)  # '\" t: the preprocessors the page needs
    return out


def classify_permissive(lines: list[str]) -> str | None:
    """The SPDX identifier of a ``PERMISSIVE_MISC`` licence text (MIT or BSD), or None."""
    text = " ".join(lines)
    if "Permission is hereby granted, free of charge" in text:
        return "MIT"
    if "Redistribution and use in source and binary forms" in text:
        clauses = len(re.findall(r"(?:^|\s)[1-4]\.\s", text))
        return {2: "BSD-2-Clause", 3: "BSD-3-Clause"}.get(clauses)
    return None


def page_licence(page: ManPage, deb: Deb) -> tuple[str | None, str]:
    """The page's licence (SPDX; None: not one this dataset uses) and its copyright notice.

    The licence is the page's own SPDX line or licence tag, else the package's.  The notice is
    the paragraphs of the page's header comment that hold a copyright line (or, with none, the
    header's first paragraph), else its COPYRIGHT and AUTHOR sections, else the ``Files: *``
    notice of the package's copyright file.
    """
    header = header_comments(page.text)
    licence: str | None = None
    marker = len(header)
    for n, line in enumerate(header):
        if m := _SPDX.search(line):
            licence, marker = m.group(1), n
            break
        if m := _LICENCE_TAG.search(line):
            end = next((k for k in range(n, len(header)) if "LICENSE_END" in header[k]), len(header))
            tag = m.group(1)
            licence = classify_permissive(header[n:end]) if tag == "PERMISSIVE_MISC" else LICENCE_TAGS.get(tag)
            marker = n
            break
    else:
        licence = page.package.licence
    # The paragraphs of the header that hold a copyright line: "Copyright (c) 2003 A. Brouwer and"
    # goes on with "Walter Harms (...)" on the next line.
    notice_lines: list[str] = []
    in_notice = False
    for ln in header[:marker]:
        in_notice = bool(ln) and (in_notice or bool(_COPYRIGHT_LINE.search(ln)))
        if in_notice:
            notice_lines.append(ln)
    if not notice_lines and marker < len(header):
        block = []
        for ln in header[:marker]:
            if not ln and block:
                break
            if ln and not ln.startswith("$"):
                block.append(ln)
        notice_lines = block
    notice = _WS.sub(" ", " ".join(notice_lines)).strip()
    if not notice:
        notice = section_notice(page) or package_notice(deb.copyright)
    return (licence if licence in ALLOWED_LICENCES else None), notice


def section_notice(page: ManPage) -> str:
    """The first sentence of the page's COPYRIGHT section and its AUTHOR section (GNU pages)."""
    roff = read_roff(page.text)
    parts = []
    if copyright_paras := roff.section("COPYRIGHT"):
        parts.append(re.split(r"(?<=\.)\s", copyright_paras[0], maxsplit=1)[0])
    if author := roff.section("AUTHOR") or roff.section("AUTHORS"):
        parts.append(" ".join(author))
    return _WS.sub(" ", " ".join(parts)).strip()


def package_notice(copyright_text: str) -> str:
    """The ``Copyright:`` field of the ``Files: *`` stanza of a Debian copyright file."""
    for stanza in re.split(r"\n\s*\n", copyright_text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.M):
            m = re.search(r"^Copyright:(.*(?:\n[ \t].*)*)", stanza, re.M)
            if m:
                return "; ".join(ln.strip() for ln in m.group(1).strip().splitlines() if ln.strip())
    return ""


def split_name(paragraphs: list[str]) -> tuple[list[str], str] | None:
    """The names and the one-line description of a NAME section, or None."""
    text = _WS.sub(" ", " ".join(paragraphs)).strip()
    m = re.search(r"\s[-\u2013\u2014]{1,2}\s", text)
    if not m:
        return None
    names = [n.strip() for n in text[:m.start()].split(",") if n.strip()]
    description = text[m.end():].strip().rstrip(".").strip()
    return (names, description) if names and description else None


def iter_pages(debs: dict[str, Path], allow_other_versions: bool = False) -> Iterator[tuple[ManPage, Deb]]:
    """Every page of the pinned packages in the sections they are used for, in a fixed order.

    The package name and version are those of the ``.deb``'s control file, whatever the file
    is called; another version is refused unless ``allow_other_versions``.
    """
    copyright_files: dict[str, str] = {}
    for pkg in PACKAGES:
        deb = read_deb(debs[pkg.name])
        name, version = deb.control.get("Package"), deb.control.get("Version")
        if name != pkg.name:
            raise InputError(f"{debs[pkg.name]} holds the package {name}, not {pkg.name}.\n{how_to_get()}")
        if version != pkg.version:
            if not allow_other_versions:
                raise InputError(f"{debs[pkg.name]} is {name} {version}, not the pinned {pkg.version}; the output "
                                 f"would differ from the shipped file (--allow-other-versions builds it anyway).\n"
                                 f"{how_to_get()}")
            print(f"warning: building from {name} {version}, not the pinned {pkg.version}", file=sys.stderr)
        # manpages-dev's copyright file is a link to that of manpages (the same source).
        deb.copyright = deb.copyright or copyright_files.get(pkg.source_package, "")
        copyright_files.setdefault(pkg.source_package, deb.copyright)
        for section, file_name, blob in deb.pages:
            if section in pkg.sources:
                yield ManPage(pkg, section, file_name, decode_page(blob)), deb


# --- questions ------------------------------------------------------------------------------

# Verbs that open a NAME description as an imperative ("open and possibly create a file").
# The list is closed: a description that opens with another word is read as a noun phrase.
_VERBS = """
abort accept access add adjust allocate allow append apply arm ask assign associate attach bind
block boot build calculate call cancel cause change check choose clean clear clone close collect
commit compare compile compute concatenate configure confine connect control convert copy
correct count create debug decide decode define delay delete destroy detach detect determine
disable disallow disarm discard disassociate display divide do dump duplicate emulate enable
encode encrypt end enforce enter erase estimate evaluate examine exchange execute exit expand
export extract factor fail fetch fill find finish flush fold follow force format free freeze
generate get give grant handle hint ignore import initialize initiate insert install interpret
introduce invoke issue iterate join keep kill list listen load locate lock log look make manage
manipulate map match merge modify monitor mount move multiply notify obtain omit open operate
output overwrite pack parse pass pause perform pick poll position predeclare prepare prevent
print process produce profile project provide purge push put query queue randomize read reassociate
rebuild reboot receive reclaim reconstruct record redirect refresh register reindex release
reload remap remove rename reopen replace report reposition request reserve reset resize resolve
restart restore resume retrieve return reverse rewind roll round run save scan schedule search
seek select send serialize set setup share shift show shrink shuffle shut shutdown sign skip
sleep sort spawn splice split start stop store strip submit suppress suspend swap switch
synchronize sync take tell terminate test touch transfer transform translate traverse truncate
tune unlink unload unlock unmap unmount unregister update upload use verify wait wake walk
watch wrap write yield zero
number stream have try hangup cluster garbage-collect checksum deallocate empty decrypt finalise
finalize protect obfuscate frobnicate derive enumerate indicate maintain override recover specify
uncompress validate tunnel encapsulate reapply download rewrite cleanup prune revert unpack annotate
browse stash reduce summarize ensure inspect integrate reflect reuse tweak
""".split()
VERBS = frozenset(_VERBS)
# A verb followed by these words is a noun ("list of signals").
_NOUN_NEXT = {"of"}
# "read callback for data uploads": these verbs name a callback, not an action, before it.
_CALLBACK_NOUNS = frozenset("read write seek debug progress".split())
# Words read as nouns ("process information", "stream buffering operations") unless a determiner
# follows or the source writes imperatives; with a set, only before the words in it.
_NOUN_READINGS = {"control": {"interface"}, "record": {"number"}, "hash": set(), "end": set(), "process": set(),
                  "stream": set(), "output": set(), "input": set(), "boot": set(), "number": set(),
                  "upload": set(), "share": set()}
# Sources whose NAME descriptions are imperatives ("output information on each ref").
_IMPERATIVE_SOURCES = frozenset({"commands", "git", "sql"})
_DETERMINERS = frozenset("a an the all any each every some one or".split())
_ADVERBS = frozenset("atomically automatically conditionally synchronously asynchronously virtually statelessly "
                     "instantly temporarily".split())
# Capitalised first words that stay capitalised in a question (proper names).
_PROPER = frozenset("Linux Internet Ethernet Bessel Euclidean Blowfish Montgomery Armenian Russian Ukrainian "
                    "Microsemi Native Lightweight Unix Unicode".split())
# Head words that make a noun phrase the name of a routine ("the sine function").
_ROUTINE_HEADS = frozenset("function functions routine routines macro macros operation operations call calls "
                           "interface interfaces wrapper wrappers".split())
_PREPOSITIONS = frozenset("of for in to on with from by that which used into at as about between".split())
_OBSOLETE = re.compile(r"\s*\((?:obsolete|deprecated|unimplemented)\)", re.I)


def base_verb(word: str) -> str | None:
    """The base form of a verb that may open a description, or None.

    Accepts the base form ("open"), the third person ("opens", "returns"), a gerund
    ("detecting") and slashed pairs ("set/get" becomes "set or get").
    """
    w = word.lower().rstrip(",")
    if "/" in w:
        parts = [base_verb(p) for p in w.split("/")]
        return " or ".join(parts) if all(parts) else None  # type: ignore[arg-type]
    if w in VERBS:
        return w
    for cut, add in (("ies", "y"), ("es", ""), ("s", "")):
        if w.endswith(cut) and w[: -len(cut)] + add in VERBS:
            return w[: -len(cut)] + add
    if w.endswith("ing"):
        stem = w[:-3]
        for cand in (stem, stem + "e", stem[:-1]):
            if cand in VERBS:
                return cand
    return None


def verb_phrase(description: str, source: str) -> str | None:
    """The description as an imperative verb phrase ("open and possibly create a file"), or None."""
    words = description.split()
    lead = []
    if words and words[0].lower() in _ADVERBS:
        lead, words = [words[0].lower()], words[1:]
    if words[:2] and words[0].lower() == "how" and words[1:2] == ["to"]:
        words = words[2:]
    if not words:
        return None
    verb = base_verb(words[0])
    if verb is None or (words[0].isupper() and len(words[0]) > 1):
        return None  # "STORE command", "DES encryption": names, not verbs
    nxt = words[1].lower() if len(words) > 1 else ""
    first = words[0].lower()
    if nxt in _NOUN_NEXT or (nxt.startswith("callback") and first in _CALLBACK_NOUNS):
        return None
    if first.endswith("ing") and first not in VERBS and len(words) < 3:
        return None  # "controlling terminal": an adjective, not an action
    head = []
    for word in words[1:]:
        if word.lower() in _PREPOSITIONS or word.lower() in _DETERMINERS:
            break
        head.append(word.lower())
    if len(head) > 2 and head[0] in ("and", "or") and base_verb(head[1]) and head[-1] in _ROUTINE_HEADS:
        return None  # "decode and encode functions for ...": routines, named by what they do
    if first in _NOUN_READINGS and source not in _IMPERATIVE_SOURCES and nxt not in _DETERMINERS:
        if not _NOUN_READINGS[first] or nxt in _NOUN_READINGS[first]:
            return None
    comma = "," if words[0].endswith(",") else ""  # "list, create, or delete branches"
    return " ".join(lead + [verb + comma] + words[1:])


def with_article(phrase: str) -> str:
    """``the <phrase>``, unless it already opens with an article."""
    return phrase if re.match(r"(?i)(a|an|the)\s", phrase) else f"the {phrase}"


def is_plural(phrase: str) -> bool:
    """Whether a noun phrase's head (its last word before a preposition or comma) is plural."""
    head = ""
    for word in phrase.split():
        if word.lower() in _PREPOSITIONS or word.startswith("("):
            break
        head = word.rstrip(",:;")
        if word.endswith(","):
            break
    return bool(re.search(r"[^su'i]s$", head)) or head.lower() in ("data", "criteria")


@dataclass(frozen=True)
class Kind:
    """How questions about one kind of page are asked."""

    verb: str  # template for verb phrases, with {vp}
    noun: str  # template for noun phrases, with {np} (the phrase with its article)
    routine: str = ""  # template for "the sine function"-like phrases, with {np}, {be} and {s}


GENERIC = Kind("How do I {vp}?", "What {be} {np}?")
KINDS = {
    "syscall": Kind("Which system call do I use to {vp}?", "Which system call provides {bare}?",
                    "Which system call{s} {be} {np}?"),
    "function": Kind("Which C library function do I use to {vp}?", "Which C library function provides {bare}?",
                     "Which C library function{s} {be} {np}?"),
    "type": Kind("Which C type do I use to {vp}?", "Which C type represents {bare}?"),
    "macro": Kind("Which C macro do I use to {vp}?", "Which C macro{s} {be} {np}?"),
    "openssl function": Kind("Which OpenSSL function do I use to {vp}?", "Which OpenSSL function provides {bare}?",
                             "Which OpenSSL function{s} {be} {np}?"),
    "git command": Kind("Which git command do I use to {vp}?", "Which git command is {np}?"),
    "openssl command": Kind("Which OpenSSL command do I use to {vp}?", "Which OpenSSL command is {np}?",
                            "Which OpenSSL command{s} {be} {np}?"),
    "command": Kind("Which command do I use to {vp}?", "Which command is {np}?"),
    "sql": Kind("Which SQL command do I use to {vp}?", "Which SQL command is {np}?"),
    "curl option": Kind("Which libcurl option do I use to {vp}?", "Which libcurl option sets {np}?"),
    "curl multi option": Kind("Which libcurl multi option do I use to {vp}?", "Which libcurl multi option sets {np}?"),
    "curl share option": Kind("Which libcurl share option do I use to {vp}?", "Which libcurl share option sets {np}?"),
    "curl info": Kind("How do I {vp} from libcurl?", "Which libcurl transfer information is {np}?"),
    "curl function": Kind("Which libcurl function do I use to {vp}?", "Which libcurl function provides {bare}?",
                          "Which libcurl function{s} {be} {np}?"),
}


def page_kind(page: ManPage) -> str:
    """The key of ``KINDS`` for a page, or "" for the generic questions."""
    stem = page.file.rpartition(".")[0]
    if page.source == "curl":
        for prefix, kind in (("CURLOPT_", "curl option"), ("CURLMOPT_", "curl multi option"),
                             ("CURLSHOPT_", "curl share option"), ("CURLINFO_", "curl info"),
                             ("curl_", "curl function")):
            if stem.startswith(prefix):
                return kind
        return ""
    if page.source == "git":
        return "git command" if page.section == "1" else ""
    if page.source == "openssl":
        return {"1": "openssl command", "3": "openssl function"}.get(page.section, "")
    if page.source == "library":
        if page.suffix == "3" and stem.isupper():
            return "macro"
        return "type" if page.suffix == "3type" else ("function" if page.suffix == "3" else "")
    return {"syscalls": "syscall", "commands": "command", "sql": "sql"}.get(page.source, "")


def clean_description(description: str) -> str | None:
    """The NAME description ready for a question template, or None if it makes no question."""
    text = _OBSOLETE.sub("", description).strip().rstrip(".")
    if ": " in text and len(text.split(": ", 1)[0].split()) >= 2:
        text = text.split(": ", 1)[0]  # "ceiling function: smallest integral value ..."
    words = text.split()
    if not MIN_DESCRIPTION_WORDS <= len(words) <= MAX_DESCRIPTION_WORDS:
        return None
    if any(ch in text for ch in "?;=<>{}") or text.endswith(("-", ",")):
        return None
    first, nxt = words[0], (words[1] if len(words) > 1 else "")
    if first in ("A", "An", "The") or (first.istitle() and first.rstrip(",").isalpha() and first not in _PROPER
                                       and len(first) > 1
                                       and (base_verb(first) or nxt[:1].islower())):
        words[0] = first.lower()  # "Functions to create ...", "Global libcurl initialization"
    return " ".join(words)


def make_question(description: str, page: ManPage) -> str | None:
    """A question whose answer is the page, from its NAME description; None if none fits."""
    text = clean_description(description)
    if text is None:
        return None
    kind = KINDS.get(page_kind(page), GENERIC)
    lower = text.lower()
    for lead, form in (("overview of ", "an overview"), ("introduction to ", "an introduction"),
                       ("description of ", "a description")):
        if lower.startswith(lead):
            return f"Where can I read {form} {lead.split()[-1]} {text[len(lead):]}?"
    if lower.endswith(" overview"):
        return f"Where can I read {with_article(text)}?"
    if vp := verb_phrase(text, page.source):
        return kind.verb.format(vp=vp)
    words = text.split()
    if len(words) > 1 and words[0].isupper() and base_verb(words[1]) and words[1].endswith("s"):
        return None  # "URL encodes the given string": a sentence, not a noun phrase
    if lower.startswith("how "):
        return f"Where is it explained {text}?"
    head_routine = any(w.lower().rstrip(",") in _ROUTINE_HEADS for w in words[-1:])
    plural = is_plural(text)
    if head_routine and kind.routine:
        return kind.routine.format(np=with_article(text), be="are" if plural else "is", s="s" if plural else "")
    return kind.noun.format(np=with_article(text), bare=text, be="are" if plural else "is", s="s" if plural else "")


def name_forms(name: str) -> set[str]:
    """Spellings of a page name that must not appear in its question (lower case, as words)."""
    base = re.sub(r"\(\d\w*\)$", "", name).strip().lower()
    spaced = re.sub(r"[_\-.]+", " ", base).strip()
    forms = {base, spaced}
    for form in list(forms):
        forms |= {form + "s", form + "es"}
    return {f for f in forms if f}


def leaks_name(question: str, page_name: str, other_names: list[str]) -> bool:
    """Whether a question names its page.

    The page's own name counts in any spelling ("uts_namespaces" as "UTS namespaces", plurals);
    its other NAME entries count when they are identifiers ("pthread_create", "ioctl_tty"),
    since plain words among them ("free" beside malloc) are ordinary English.  So does an
    identifier in the question that is part of a name ("TCP_NODELAY" of CURLOPT_TCP_NODELAY).
    """
    q = question.lower()
    q_spaced = re.sub(r"[_\-.]+", " ", q)
    names = [page_name] + [n for n in other_names if re.search(r"[_\d]", n)]
    for name in names:
        for form in name_forms(name):
            pattern = r"(?<![\w])" + re.escape(form) + r"(?![\w])"
            if re.search(pattern, q) or re.search(pattern, q_spaced):
                return True
    for token in re.findall(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+", question):
        if any(token.lower() in n.lower() for n in [page_name, *other_names]):
            return True
    return False


# --- records --------------------------------------------------------------------------------

_SENT_SPLIT = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# A DESCRIPTION that only points elsewhere ("See open(2).", "bcmp() is identical to memcmp(3);
# use it instead.").
_POINTER = re.compile(r"^(?:see\b|refer to\b|for (?:a description|further|more|details|information)\b)"
                      r"|\bidentical to\b.*\buse it instead\b|\b(?:is|are) (?:described|documented) in\b", re.I)


def truncate(paragraphs: list[str], limit: int) -> str:
    """Join paragraphs, cutting at a paragraph, then sentence, then word boundary."""
    out: list[str] = []
    used = 0
    for para in paragraphs:
        sep = 2 if out else 0
        if used + sep + len(para) <= limit:
            out.append(para)
            used += sep + len(para)
            continue
        budget = limit - used - sep
        kept = ""
        for sent in _SENT_SPLIT.split(para):
            cand = f"{kept} {sent}" if kept else sent
            if len(cand) > budget:
                break
            kept = cand
        if kept:
            out.append(kept)
        elif not out:
            out.append(para[: limit - 4].rsplit(" ", 1)[0] + " ...")
        break
    return "\n\n".join(out)


def is_pointer(body: str) -> bool:
    """Whether a DESCRIPTION only points to another page."""
    first = _SENT_SPLIT.split(body.strip(), maxsplit=1)[0]
    return bool(_POINTER.search(first)) and len(body) < 400


def page_title(page: ManPage) -> str:
    """The name an answer opens with: ``printf(3)``, ``ALTER TABLE(7)``, ``ls(1)``."""
    stem = page.file.rpartition(".")[0]
    if page.source == "sql":
        stem = stem.replace("_", " ")
    return f"{stem}({page.suffix})"


@dataclass
class Candidate:
    """A page usable as a document; ``question`` is None when it answers none."""

    id: str
    title: str
    body: str
    source: str
    licence: str
    notice: str
    question: str | None = None
    dropped: str = ""  # why the page answers no question

    def record(self) -> dict[str, str]:
        """The question/answer record."""
        return {"id": self.id, "question": self.question or "", "answer": f"{self.title}\n\n{self.body}",
                "source": self.source, "license": self.licence, "copyright": self.notice}

    def document(self) -> dict[str, str]:
        """The BEIR-style corpus record."""
        return {"_id": self.id, "title": self.title, "text": self.body, "source": self.source,
                "license": self.licence, "copyright": self.notice}


def page_candidate(page: ManPage, deb: Deb, stats: Counter[str]) -> Candidate | None:
    """A page as a document with, when one fits, its question; None (counted in ``stats`` by
    reason) for a page that is no document: a link, a licence not used, no usable text."""
    if re.match(r"\s*\.so\s", page.text):
        stats["link page (.so)"] += 1
        return None
    licence, notice = page_licence(page, deb)
    if licence is None:
        stats["licence not used"] += 1
        return None
    roff = read_roff(page.text)
    named = split_name(roff.section("NAME"))
    if named is None:
        stats["no NAME description"] += 1
        return None
    names, description = named
    paragraphs = [p for p in roff.section("DESCRIPTION") if p.strip()]
    body_all = "\n\n".join(paragraphs)
    if len(body_all) < MIN_BODY_CHARS or is_pointer(body_all):
        stats["stub or pointer DESCRIPTION"] += 1
        return None
    title = page_title(page)
    body = truncate(paragraphs, MAX_ANSWER_CHARS - len(title) - 2)
    cand = Candidate(page.id, title, body, page.source, licence, notice)
    question = make_question(description, page)
    if question is None:
        cand.dropped = "description makes no question"
    elif leaks_name(question, page.file.rpartition(".")[0], names):
        cand.dropped = "question names the page"
    else:
        cand.question = question
    return cand


def norm(text: str) -> str:
    """Normalise text for de-duplication."""
    return _WS.sub(" ", text).strip().lower()


def build(debs: dict[str, Path], allow_other_versions: bool = False
          ) -> tuple[list[dict[str, str]], list[dict[str, str]], Counter[str]]:
    """Build the shuffled records and the corpus of distractors (sorted by ``_id``); also
    return how many pages were left out, and why."""
    stats: Counter[str] = Counter()
    candidates = [c for page, deb in iter_pages(debs, allow_other_versions)
                  if (c := page_candidate(page, deb, stats)) is not None]
    candidates.sort(key=lambda c: c.id)
    if clash := [i for i, n in Counter(c.id for c in candidates).items() if n > 1]:
        raise RuntimeError(f"two pages have the id {clash[0]}")
    # A question that several pages answer has no single right answer: every copy is dropped.
    questions = Counter(norm(c.question) for c in candidates if c.question)
    for cand in candidates:
        if cand.question and questions[norm(cand.question)] > 1:
            cand.question, cand.dropped = None, "question asked by several pages"
    # A text that several pages share (one page under two names) is kept once, answers first.
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    documents: list[dict[str, str]] = []
    for cand in sorted(candidates, key=lambda c: c.question is None):
        key = norm(cand.body)
        if key in seen:
            stats["text of another page"] += 1
            continue
        seen.add(key)
        if cand.question:
            records.append(cand.record())
        else:
            stats[f"no question ({cand.dropped}): corpus"] += 1
            documents.append(cand.document())
    random.Random(SEED).shuffle(records)
    return records, documents, stats


def jsonl_gz(rows: list[dict[str, str]]) -> bytes:
    """Gzip JSONL bytes with a fixed header (no time stamp, no file name)."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return raw.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(built: list[tuple[Path, bytes]]) -> int:
    """Compare rebuilt files with those on disk: 0 when their JSON Lines are the same (the gzip
    bytes too, unless another zlib compresses them differently), else 1."""
    different, recompressed = [], []
    for path, new in built:
        old = path.read_bytes() if path.is_file() else b""
        if old != new:
            try:
                same_text = gzip.decompress(old) == gzip.decompress(new)
            except (OSError, EOFError):
                same_text = False
            (recompressed if same_text else different).append(str(path))
    if different:
        print(f"manpages_qa: the rebuild differs from {', '.join(different)}", file=sys.stderr)
        return EXIT_DIFFERENT
    if recompressed:
        print(f"manpages_qa: the rebuild has the same records as {', '.join(recompressed)}, but this "
              "Python's zlib compresses them to other bytes", file=sys.stderr)
    else:
        print("manpages_qa: the rebuild matches the shipped files byte for byte", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debs", type=Path, default=DEFAULT_DEBS,
                        help=f"folder with the pinned .deb files (default: {DEFAULT_DEBS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the question/answer file (.jsonl.gz)")
    parser.add_argument("--corpus-out", type=Path, default=DEFAULT_CORPUS_OUT,
                        help="the corpus of distractors (.jsonl.gz)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and compare with --out and --corpus-out instead of writing them")
    parser.add_argument("--allow-other-versions", action="store_true",
                        help="build from other versions of the packages (with a warning) instead of refusing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    start = time.monotonic()
    try:
        debs = find_debs(args.debs, args.allow_other_versions)
        records, documents, stats = build(debs, args.allow_other_versions)
    except InputError as exc:
        print(f"manpages_qa: {exc}", file=sys.stderr)
        return EXIT_NO_INPUTS
    data, corpus = jsonl_gz(records), jsonl_gz(documents)
    for reason, n in sorted(stats.items()):
        print(f"  {n:5d}  {reason}", file=sys.stderr)
    by_source = Counter(r["source"] for r in records)
    print(f"{len(records)} records ({', '.join(f'{s} {n}' for s, n in sorted(by_source.items()))}), "
          f"{len(documents)} corpus documents, in {time.monotonic() - start:.1f} s", file=sys.stderr)
    for path, blob in ((args.out, data), (args.corpus_out, corpus)):
        print(f"sha256 {sha256(blob)}  {path.name} ({len(blob):,} bytes; uncompressed: sha256 "
              f"{sha256(gzip.decompress(blob))}, {len(gzip.decompress(blob)):,} bytes)", file=sys.stderr)
    if args.check:
        return check([(args.out, data), (args.corpus_out, corpus)])
    for path, new in ((args.out, data), (args.corpus_out, corpus)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
