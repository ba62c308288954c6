"""The packaged manual-page Q&A set: it reads as training data, is the documented file, and keeps
its promises (no question names its page, unique ids, every source well filled); its builder
explains how to get its inputs instead of failing when they are absent, and reads roff as
documented."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

from embedtune.config import DataConfig
from embedtune.data.records import Pair, read_pairs, resolve_files
from embedtune.resources import build_manpages_qa as builder
from embedtune.retrieval import RetrievalSet

PACKAGED = "embedtune:resources/manpages_qa.jsonl.gz"
RESOURCES = ROOT / "embedtune" / "resources"
QA_FILE = RESOURCES / "manpages_qa.jsonl.gz"
CORPUS_FILE = RESOURCES / "manpages_qa_corpus.jsonl.gz"
README = RESOURCES / "README.md"
# What the README documents.
RECORDS = 2315
QA_SHA256 = "11ea6b187f4f06aca248f0820149d72a9d5716dac40e507f4d88c75f917be1cc"
CORPUS_DOCUMENTS = 484
CORPUS_SHA256 = "7832ec67b83654f6aaac0bcb3ac73017c20336da117fc8e7783dc27323dda1b8"
PER_SOURCE = {"openssl": 608, "library": 517, "curl": 414, "syscalls": 232, "git": 174, "sql": 152,
              "commands": 123, "overview": 55, "files": 40}
MAX_ANSWER_CHARS = 1500


def rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return rows(QA_FILE)


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return rows(CORPUS_FILE)


def test_the_packaged_file_reads_as_training_pairs_with_their_sources() -> None:
    cfg = DataConfig(train_files=[PACKAGED])
    pairs = list(read_pairs(resolve_files(cfg.train_files), cfg))
    assert len(pairs) == RECORDS and all(isinstance(p, Pair) for p in pairs), [p for p in pairs if not isinstance(p, Pair)][:3]
    assert Counter(p.source for p in pairs) == PER_SOURCE
    assert all(p.query.endswith("?") and p.positive for p in pairs)


def test_the_files_are_the_documented_ones(records: list[dict], documents: list[dict]) -> None:
    readme = README.read_text(encoding="utf-8")
    for path, digest in ((QA_FILE, QA_SHA256), (CORPUS_FILE, CORPUS_SHA256)):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path.name} changed; rebuild and update README.md"
        assert digest in readme
    assert len(records) == RECORDS and len(documents) == CORPUS_DOCUMENTS
    assert f"**{RECORDS:,} records**" in readme
    for source, n in PER_SOURCE.items():
        assert re.search(rf"\| `{source}` \|[^\n]*\| {n} \|", readme), f"README's count for {source}"


def test_ids_are_unique_stable_page_names(records: list[dict], documents: list[dict]) -> None:
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"man[1-8]/[\w.+-]+", i) for i in ids), [i for i in ids if not re.fullmatch(r"man[1-8]/[\w.+-]+", i)][:5]
    assert {"man3/printf", "man2/chdir", "man7/ALTER_TABLE", "man1/git-rebase", "man3/CURLOPT_VERBOSE"} <= set(ids)
    doc_ids = [d["_id"] for d in documents]
    assert len(set(doc_ids)) == len(doc_ids) and not set(doc_ids) & set(ids)


def name_in(question: str, name: str) -> bool:
    """Whether ``name`` (any case; ``_ - .`` as spaces; plural) is a whole word of ``question``."""
    q = re.sub(r"[_\-.]+", " ", question.lower())
    spaced = re.sub(r"[_\-.]+", " ", name.lower()).strip()
    return re.search(rf"(?<!\w){re.escape(spaced)}(e?s)?(?!\w)", q) is not None


def test_no_question_names_its_page(records: list[dict]) -> None:
    assert name_in("Which call is Open?", "open") and name_in("an overview of UTS namespaces", "uts_namespaces")
    assert not name_in("Which system call do I use to reopen a file?", "open")
    leaks = [(r["id"], r["question"]) for r in records if name_in(r["question"], r["id"].split("/", 1)[1])]
    assert not leaks, leaks[:5]


def test_answers_open_with_their_page_and_are_trimmed(records: list[dict]) -> None:
    for r in records:
        page, section = r["id"].split("/", 1)[1], r["id"][3]
        title, _, body = r["answer"].partition("\n\n")
        assert re.fullmatch(rf"{re.escape(page.replace('_', ' ') if r['source'] == 'sql' else page)}\({section}\w*\)",
                            title), (r["id"], title)
        assert 60 <= len(body) and len(r["answer"]) <= MAX_ANSWER_CHARS, r["id"]
    assert len({r["question"].lower() for r in records}) == len(records)  # no question twice
    assert len({r["answer"].partition("\n\n")[2] for r in records}) == len(records)  # no answer text twice


def test_every_source_is_well_filled_and_every_record_names_its_licence(records: list[dict]) -> None:
    counts = Counter(r["source"] for r in records)
    assert min(counts.values()) >= 40 and sum(counts[s] >= 100 for s in counts) == 7
    readme = README.read_text(encoding="utf-8")
    licences = Counter(r["license"] for r in records)
    assert all(f"| `{name}` | {n} |" in readme for name, n in licences.items()), licences
    assert all(r["license"] in builder.ALLOWED_LICENCES and r["copyright"].strip() for r in records)


def test_the_corpus_extends_the_answers_into_a_beir_evaluation(records: list[dict], documents: list[dict],
                                                               tmp_path: Path) -> None:
    """The README's recipe: queries from the questions, corpus = answers + distractors."""
    answers = {r["answer"].partition("\n\n")[2] for r in records}
    assert all(d["text"] and d["title"] and d["text"] not in answers for d in documents)
    with open(tmp_path / "q.jsonl", "w") as q, open(tmp_path / "c.jsonl", "w") as c, open(tmp_path / "r.tsv", "w") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for rec in records:
            q.write(json.dumps({"_id": rec["id"], "text": rec["question"], "source": rec["source"]}) + "\n")
            c.write(json.dumps({"_id": rec["id"], "text": rec["answer"]}) + "\n")
            r.write(f"{rec['id']}\t{rec['id']}\t1\n")
        for doc in documents:
            c.write(json.dumps({k: doc[k] for k in ("_id", "title", "text")}) + "\n")
    beir = RetrievalSet.from_files(str(tmp_path / "q.jsonl"), str(tmp_path / "c.jsonl"), str(tmp_path / "r.tsv"))
    assert len(beir) == RECORDS and len(beir.corpus) == RECORDS + CORPUS_DOCUMENTS


def test_the_builder_says_how_to_get_its_inputs_when_they_are_absent(tmp_path: Path) -> None:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "embedtune.resources.build_manpages_qa", "--check",
                           "--debs", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == builder.EXIT_NO_INPUTS, done.stderr
    assert time.monotonic() - start < 30
    assert "apt-get download manpages=6.03-2 manpages-dev=6.03-2" in done.stderr
    assert "snapshot.debian.org" in done.stderr
    assert QA_FILE.read_bytes() and hashlib.sha256(QA_FILE.read_bytes()).hexdigest() == QA_SHA256  # untouched


def fake_deb(path: Path, package: str, version: str, pages: dict[str, str]) -> Path:
    """A minimal .deb (ar archive of control.tar.xz and data.tar.xz) with gzipped manual pages."""

    def tar_xz(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    control = tar_xz({"./control": f"Package: {package}\nVersion: {version}\n".encode()})
    data = tar_xz({f"./usr/share/man/{p}.gz": gzip.compress(t.encode(), mtime=0) for p, t in pages.items()})
    out = bytearray(b"!<arch>\n")
    for name, blob in (("debian-binary", b"2.0\n"), ("control.tar.xz", control), ("data.tar.xz", data)):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob
        out += b"\n" if len(blob) % 2 else b""
    path.write_bytes(bytes(out))
    return path


PAGE = r""".\" Copyright (C) 2024 A. Writer
.\"
.\" SPDX-License-Identifier: Linux-man-pages-copyleft
.TH frob 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
frob, frobat \- change the frobnication state of a file
.SH DESCRIPTION
The
.BR frob ()
system call changes the state of the file named by
.IR path \(em
see
.BR frobnicate (7).
.TP
.B FROB_ON
Turn it on.
.SS Notes on tables
.TS
tab(:);
l l.
Name:Value
T{
a long
cell
T}:2
.TE
.ie n \{\
shown in nroff
.\}
.el \{\
shown in troff
.\}
.SH SEE ALSO
.BR open (2)
"""


def test_the_builder_turns_a_page_into_a_record_and_refuses_other_versions(tmp_path: Path) -> None:
    pinned = builder.PACKAGES[0]
    deb = fake_deb(tmp_path / f"{pinned.name}_{pinned.version}_all.deb", pinned.name, pinned.version,
                   {"man2/frob.2": PAGE, "man2/frobat.2": ".so man2/frob.2\n"})
    page, d = next(builder.iter_pages({pinned.name: deb}))  # the first package's first page
    cand = builder.page_candidate(page, d, Counter())
    assert cand is not None
    assert cand.record() == {
        "id": "man2/frob",
        "question": "Which system call do I use to change the frobnication state of a file?",
        "answer": "frob(2)\n\nThe frob() system call changes the state of the file named by path\u2014 see frobnicate(7).\n\n"
                  "FROB_ON: Turn it on.\n\nNotes on tables\n\nName | Value\na long cell | 2\n\nshown in nroff",
        "source": "syscalls", "license": "Linux-man-pages-copyleft", "copyright": "Copyright (C) 2024 A. Writer"}
    other = fake_deb(tmp_path / "other.deb", pinned.name, "9.99-1", {"man2/frob.2": PAGE})
    with pytest.raises(builder.InputError, match="not the pinned 6.03-2"):
        next(builder.iter_pages({pinned.name: other}))


def test_questions_never_name_their_page_in_the_builder() -> None:
    assert builder.leaks_name("Which system call do I use to read from a file descriptor?", "read", ["read"])
    assert builder.leaks_name("Where can I read an overview of Linux UTS namespaces?", "uts_namespaces", [])
    assert builder.leaks_name("Which libcurl option sets the TCP_NODELAY option?", "CURLOPT_TCP_NODELAY", [])
    assert not builder.leaks_name("Which C library function do I use to allocate and free dynamic memory?",
                                  "malloc", ["malloc", "free", "calloc"])


@pytest.mark.slow
def test_a_rebuild_from_the_pinned_packages_matches_the_shipped_files() -> None:
    """Needs the .deb files (see README.md); set EMBEDTUNE_MANPAGES_DEBS to their folder."""
    folder = Path(os.environ.get("EMBEDTUNE_MANPAGES_DEBS", ROOT / builder.DEFAULT_DEBS))
    try:
        builder.find_debs(folder)
    except builder.InputError as exc:
        pytest.skip(str(exc))
    assert builder.main(["--check", "--debs", str(folder)]) == 0


def test_the_check_compares_records_whatever_zlib_made_of_them(tmp_path: Path) -> None:
    lines = b'{"id": "man2/frob"}\n'
    built = gzip.compress(lines, mtime=0)
    (tmp_path / "same.gz").write_bytes(built)
    (tmp_path / "recompressed.gz").write_bytes(gzip.compress(lines, compresslevel=1, mtime=0))
    assert (tmp_path / "recompressed.gz").read_bytes() != built
    (tmp_path / "other.gz").write_bytes(gzip.compress(b'{"id": "man2/other"}\n', mtime=0))
    assert builder.check([(tmp_path / "same.gz", built), (tmp_path / "recompressed.gz", built)]) == 0
    assert builder.check([(tmp_path / "other.gz", built)]) == builder.EXIT_DIFFERENT
    assert builder.check([(tmp_path / "missing.gz", built)]) == builder.EXIT_DIFFERENT
