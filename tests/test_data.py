"""Streaming reads: bad input is named, order is fixed by (data, seed, epoch), held-out stays out."""

from __future__ import annotations

import bz2
import configparser
import functools
import gzip
import http.server
import io
import json
import lzma
import math
import random
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, make_pairs, untokenized, write_jsonl
from pydantic import ValidationError

from embedtune.commands.train import main
from embedtune.config import DataConfig
from embedtune.data.records import DataError, Pair, Reject, is_held_out, read_pairs, token_estimate
from embedtune.data.split import eval_pairs, plan_data, preflight
from embedtune.data.stream import PairBatches, make_loader, ordered_pairs

no_tokenize = untokenized


def batch_ids(cfg: DataConfig, workers: int, epoch: int = 0, batch_size: int = 8, accumulation: int = 1) -> list[list[str]]:
    dataset = PairBatches(cfg, batch_size, accumulation, seed=3, collate=no_tokenize)
    dataset.set_epoch(epoch)
    return [batch.ids for batch in make_loader(dataset, workers, pin_memory=False)]


def ids_of(path: Path, cfg: DataConfig) -> set[str]:
    return {f"{path}:{i + 1}" for i in range(len(path.read_text().splitlines()))}


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", "", "the file is empty"),
    ("notjson.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q2", answer: a}\n', "line 2: not valid JSON"),
    ("nofield.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q2", "reply": "a"}\n',
     "line 2: no 'answer' field"),
    ("emptytext.jsonl", '{"question": "  ", "answer": "a"}\n', "line 1: 'question' must be a non-empty string"),
    ("array.jsonl", '["q", "a"]\n', "line 1: expected a JSON object"),
    ("latin1.jsonl", b'{"question": "caf\xe9", "answer": "a"}\n', "line 1: not valid UTF-8"),
])
def test_bad_input_stops_before_training_naming_file_line_and_fix(tmp_path: Path, name: str, content, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train_files=[str(path)]))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        preflight(DataConfig(train_files=[str(tmp_path / "nowhere.jsonl")]))


# --- files that are not what their name says -------------------------------------------------


def jsonl_bytes(n: int = 5) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in make_pairs(n)).encode()


def parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), out)
    return out.getvalue()


def zipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("pairs.jsonl", data)
    return out.getvalue()


ZSTD_FRAME = b"\x28\xb5\x2f\xfd" + b"\x00" * 12  # zstd's magic number: what the file says it is


@pytest.mark.parametrize("name, content, expected, renamed", [
    ("pairs.jsonl", lambda: gzip.compress(jsonl_bytes()),
     "is gzip-compressed, but its name does not end in .gz; rename it to pairs.jsonl.gz", "pairs.jsonl.gz"),
    ("pairs.jsonl", lambda: bz2.compress(jsonl_bytes()),
     "is bzip2-compressed, but its name does not end in .bz2; rename it to pairs.jsonl.bz2", "pairs.jsonl.bz2"),
    ("pairs.jsonl", lambda: lzma.compress(jsonl_bytes()),
     "is xz-compressed, but its name does not end in .xz; rename it to pairs.jsonl.xz", "pairs.jsonl.xz"),
    ("pairs.csv", lambda: gzip.compress(b"question,answer\n" + b"".join(b"q%d,a%d\n" % (i, i) for i in range(5))),
     "is gzip-compressed, but its name does not end in .gz; rename it to pairs.csv.gz", "pairs.csv.gz"),
    ("pairs.jsonl", lambda: ZSTD_FRAME,
     "is zstd-compressed, but its name does not end in .zst; rename it to pairs.jsonl.zst", None),
    ("pairs.jsonl.gz", lambda: ZSTD_FRAME, "is zstd-compressed, but its name ends in .gz; rename it to pairs.jsonl.zst",
     None),
    ("pairs.parquet", lambda: gzip.compress(parquet_bytes()), "is gzip-compressed; decompress it", None),
    ("pairs.jsonl", lambda: zipped(jsonl_bytes()), "is a zip archive, not a data file; unzip it", None),
])
def test_a_compressed_file_named_otherwise_is_named_by_what_it_is(tmp_path: Path, name: str,
                                                                  content: Callable[[], bytes], expected: str,
                                                                  renamed: str | None) -> None:
    """Not "not valid UTF-8" on every line: the file is compressed, and the message says how to name
    it; named so, it reads."""
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train_files=[str(path)]))
    message = str(err.value)
    assert message.startswith(f"{path}: the file ") and expected in message, message
    assert "UTF-8" not in message and "\n" not in message
    if renamed:
        path.rename(tmp_path / renamed)
        cfg = DataConfig(train_files=[str(tmp_path / renamed)], shuffle=False, eval_fraction=0)
        assert preflight(cfg) == [] and len(list(ordered_pairs(cfg, 0, 0))) == 5


def test_a_directory_given_as_a_data_file_is_named_with_a_glob_that_reads_it(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", make_pairs(4))
    write_jsonl(folder / "b.jsonl", make_pairs(3, seed=1))
    (folder / "notes.txt").write_text("not data\n")
    nested = tmp_path / "nested"
    (nested / "2024").mkdir(parents=True)
    write_jsonl(nested / "2024" / "c.jsonl", make_pairs(2))

    def refused(pattern: str) -> str:
        with pytest.raises(DataError) as err:
            preflight(DataConfig(train_files=[pattern]))
        assert "file not found" not in str(err.value) and "\n" not in str(err.value)
        return str(err.value)

    def read(pattern: str) -> int:
        return len(list(ordered_pairs(DataConfig(train_files=[pattern], shuffle=False, eval_fraction=0), 0, 0)))

    assert refused(str(folder)) == (f"{folder}: a directory, not a data file; give the files in it, e.g. the glob "
                                    f"{folder}/*.jsonl, or list them")
    assert read(f"{folder}/*.jsonl") == 7
    assert f"e.g. the glob {nested}/**/*.jsonl," in refused(str(nested))  # its files are in subfolders
    assert read(f"{nested}/**/*.jsonl") == 2
    # A glob that takes in a directory names it.
    assert refused(f"{folder}*") == (f"{folder}*: the pattern matches the directory {folder}, which is no data file; "
                                     f"make it match files only, e.g. {folder}/*.jsonl")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """The same pairs as JSONL, gzipped JSONL, Parquet and CSV, served over http from this machine."""
    import datasets

    records = [{"question": r["question"], "answer": r["answer"]} for r in make_pairs(6)]
    root = tmp_path / "site"
    root.mkdir()
    write_jsonl(root / "p.jsonl", records)
    (root / "p.jsonl.gz").write_bytes(gzip.compress((root / "p.jsonl").read_bytes()))
    datasets.Dataset.from_list(records).to_parquet(str(root / "p.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(root / "p.csv"), index=False)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", [(r["question"], r["answer"]) for r in records]
    finally:
        server.shutdown()


def test_data_over_http_needs_aiohttp_and_the_message_names_the_extra(served, monkeypatch: pytest.MonkeyPatch) -> None:
    site, _ = served
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as on a machine without it
    for url in (f"{site}/p.jsonl", f"{site}/p.parquet", f"{site.replace('http:', 'https:')}/p.csv"):
        with pytest.raises(DataError) as err:
            preflight(DataConfig(train_files=[url]))
        protocol = url.split(":")[0]
        assert str(err.value) == (f"{url}: reading data from {protocol}:// URLs needs the aiohttp package, which is "
                                  "not installed; pip install 'embedtune[http]' (or pip install aiohttp)")
    # The extra the message names exists, and installs what fsspec reads http with.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "fsspec[http]" in setup["options.extras_require"]["http"].split()


def test_data_over_http_reads_like_local_files_with_aiohttp(served) -> None:
    pytest.importorskip("aiohttp")
    site, expected = served
    for name in ("p.jsonl", "p.jsonl.gz", "p.parquet", "p.csv"):
        cfg = DataConfig(train_files=[f"{site}/{name}"], shuffle=False, eval_fraction=0)
        assert [(p.query, p.positive) for p in ordered_pairs(cfg, 0, 0)] == expected, name


@pytest.mark.parametrize("case", ["gzip", "directory", "http"])
def test_a_run_given_such_data_stops_with_one_line(train_args: list[str], qa_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                   case: str) -> None:
    args = list(train_args)
    where = args.index("--input_jsonl") + 1
    if case == "gzip":
        args[where] = str(tmp_path / "pairs.jsonl")
        Path(args[where]).write_bytes(gzip.compress(qa_file.read_bytes()))
        expected = f"{args[where]}: the file is gzip-compressed, but its name does not end in .gz"
    elif case == "directory":
        args[where] = str(qa_file.parent)
        expected = f"{qa_file.parent}: a directory, not a data file; give the files in it, e.g. the glob"
    else:
        args[where] = "https://example.com/pairs.jsonl"
        monkeypatch.setitem(sys.modules, "aiohttp", None)
        expected = "https://example.com/pairs.jsonl: reading data from https:// URLs needs the aiohttp package"
    assert main(args + ["tracking.report_to=none"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), err[-2000:]
    assert "Traceback" not in err and "not valid UTF-8" not in err and "file not found" not in err
    assert not (Path(args[args.index("--output_dir") + 1]) / "final_model").exists()


# --- records ----------------------------------------------------------------------------------


def test_a_repeated_key_of_a_field_the_run_reads_is_a_bad_record(tmp_path: Path) -> None:
    """JSON keeps the last of a repeated key: the first value would be lost without a word."""
    path = write_jsonl(tmp_path / "repeated.jsonl", [
        '{"question": "q1", "answer": "a1"}',
        '{"question": "q2", "answer": "the first answer", "answer": "the second answer"}',
        '{"question": "q3", "answer": "a3", "negatives": ["n1"], "negatives": ["n2"]}',
        '{"question": "q4", "answer": "a4", "answe\\u0072": "spelled with an escape"}',
        '{"question": "q5", "answer": "a5", "id": 1, "id": 2, "meta": {"answer": 1, "answer": 2}}',
        '{"question": "q6", "source": "docs", "answer": "a6", "source": "forum"}',
    ])
    cfg = DataConfig(train_files=[str(path)], negatives_field="negatives", on_bad_record="skip")
    items = list(read_pairs([str(path)], cfg))
    rejects = {i.line: i for i in items if isinstance(i, Reject)}
    assert sorted(rejects) == [2, 3, 4, 6]
    for line, key in ((2, "answer"), (3, "negatives"), (4, "answer"), (6, "source")):
        assert rejects[line].reason == (f"the key '{key}' appears more than once in the record, and only one value "
                                        f"can be used; keep one '{key}'")
        assert rejects[line].raw == path.read_text().splitlines()[line - 1]  # kept whole for rejected.jsonl
    # Keys the run does not read may repeat (at the top, or inside another field).
    assert [i.id for i in items if isinstance(i, Pair)] == [f"{path}:1", f"{path}:5"]
    unread = cfg.model_copy(update={"source_field": None})
    assert isinstance(list(read_pairs([str(path)], unread))[5], Pair)
    with pytest.raises(DataError, match=f"{path}, line 2: the key 'answer' appears more than once"):
        preflight(cfg.model_copy(update={"on_bad_record": "error"}))


def test_a_run_skips_a_record_with_a_repeated_key_and_keeps_it_in_rejected(train_args: list[str],
                                                                           qa_file: Path) -> None:
    lines = qa_file.read_text().splitlines()
    lines[4] = '{"question": "which answer?", "answer": "this one", "answer": "or this one"}'
    qa_file.write_text("\n".join(lines) + "\n")
    out = Path(train_args[train_args.index("--output_dir") + 1])
    assert main(train_args + ["tracking.report_to=none", "data.on_bad_record=skip", "train.max_steps=null",
                              "--epochs", "1"]) == 0
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["record"]) for r in rejected] == [(str(qa_file), 5, lines[4])]
    assert "the key 'answer' appears more than once" in rejected[0]["reason"]


@pytest.mark.parametrize("group", [None, 2])
def test_skip_policy_keeps_going_and_reports_every_bad_record(tmp_path: Path, group: int | None) -> None:
    records = make_pairs(20)
    lines = [json.dumps(r) for r in records]
    lines[3] = "{broken"
    lines[11] = json.dumps({"question": "only a question"})
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(train_files=[str(path)], on_bad_record="skip", eval_fraction=0, group_by_length=group)
    assert [r.line for r in preflight(cfg)] == [4, 12]
    dataset = PairBatches(cfg, 6, 1, seed=0, collate=no_tokenize)
    batches = list(make_loader(dataset, 0, pin_memory=False))
    assert sorted(r.line for b in batches for r in b.rejects) == [4, 12]
    assert sum(len(b.ids) for b in batches) == 18


@pytest.mark.parametrize("accumulation", [1, 2])
def test_order_is_the_same_with_any_number_of_workers_and_covers_the_epoch_once(qa_file: Path, accumulation: int) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], shuffle_buffer=16, eval_fraction=0.2)
    reference = batch_ids(cfg, workers=0, accumulation=accumulation)
    assert batch_ids(cfg, workers=2, accumulation=accumulation) == reference
    flat = [i for b in reference for i in b]
    assert len(flat) == len(set(flat))
    expected = {f"{qa_file}:{n + 1}" for n, r in enumerate(make_pairs(120))}
    held = {p.id for p in eval_pairs(cfg)}
    assert set(flat) == expected - held


def test_epochs_reshuffle_and_seed_fixes_the_order(qa_file: Path) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], shuffle_buffer=32, eval_fraction=0)
    first, second = batch_ids(cfg, 0, epoch=0), batch_ids(cfg, 0, epoch=1)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    assert batch_ids(cfg, 0, epoch=0) == first
    unshuffled = DataConfig(train_files=[str(qa_file)], shuffle=False, eval_fraction=0)
    assert sum(batch_ids(unshuffled, 0), []) == [f"{qa_file}:{n}" for n in range(1, 121)]


def test_held_out_pairs_never_reach_training(qa_file: Path) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], eval_fraction=0.25)
    held = eval_pairs(cfg)
    assert 15 <= len(held) <= 45 and all(is_held_out(p, 0.25) for p in held)
    trained = {p.query for p in ordered_pairs(cfg, seed=0, epoch=0)}
    assert trained.isdisjoint({p.query for p in held})


@pytest.mark.parametrize("group", [None, 2])
def test_last_partial_batch_is_kept_or_dropped(tmp_path: Path, group: int | None) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", make_pairs(21))
    kept = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0, group_by_length=group), 0, batch_size=8)
    assert [len(b) for b in kept] == [8, 8, 5]
    dropped = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0, drop_last=True, group_by_length=group),
                        0, batch_size=8)
    assert [len(b) for b in dropped] == [8, 8]
    assert set(sum(dropped, [])) < set(sum(kept, []))


def varied_pairs(n: int) -> list[dict]:
    """Answers from a few words to a few hundred characters long."""
    rng = random.Random(7)
    return [{**r, "answer": r["answer"] + " and then, more of it" * rng.randint(0, 20)} for r in make_pairs(n)]


def test_length_grouping_recuts_each_window_by_length_in_a_fixed_order(tmp_path: Path) -> None:
    records = varied_pairs(150)
    path = write_jsonl(tmp_path / "p.jsonl", records)
    answers = {f"{path}:{i + 1}": r["answer"] for i, r in enumerate(records)}
    plain_cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0)
    cfg = plain_cfg.model_copy(update={"group_by_length": 4})
    plain, grouped = batch_ids(plain_cfg, 0), batch_ids(cfg, 0)
    assert grouped != plain
    # The same batch sizes (the partial one last), and each window of 4 batches holds the pairs
    # of the stream's 4: grouping never moves a pair far from where the shuffle put it.
    assert [len(b) for b in grouped] == [len(b) for b in plain] == [8] * 18 + [6]
    for start in range(0, len(plain), 4):
        assert sorted(sum(grouped[start:start + 4], [])) == sorted(sum(plain[start:start + 4], []))
    # Within a window the batches' answer lengths do not overlap: each batch is one stretch of
    # the sorted lengths.
    for start in range(0, 16, 4):
        spans = sorted((min(lengths), max(lengths)) for lengths in
                       ([token_estimate(answers[i]) for i in batch] for batch in grouped[start:start + 4]))
        assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:]))
    # Fixed by (data, seed, epoch): workers do not change it, another epoch does.
    assert batch_ids(cfg, workers=2) == grouped
    other = batch_ids(cfg, 0, epoch=1)
    assert other != grouped and sorted(sum(other, [])) == sorted(sum(grouped, []))


def test_length_grouping_resumes_from_any_batch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", varied_pairs(100))
    cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0, group_by_length=3)
    full = batch_ids(cfg, 0)
    for done in (3, 4, 11):  # at a window's start and inside windows
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize)
        dataset.set_position(0, done)
        assert [b.ids for b in make_loader(dataset, 2, pin_memory=False)] == full[done:]


def test_length_grouping_cuts_padding_on_real_data(tokenizer_dir: Path) -> None:
    """On the packaged Q&A set, documents padded per batch: a third of the tokens computed are
    real in shuffled batches, four fifths when batches are grouped by length."""
    from transformers import AutoTokenizer

    from embedtune.data.collate import PairCollator

    collate = PairCollator(AutoTokenizer.from_pretrained(tokenizer_dir), 64, 256)

    def efficiency(group: int | None) -> float:
        cfg = DataConfig(train_files=["embedtune:resources/python_docs_qa.jsonl.gz"], group_by_length=group)
        lengths = [b.document.lengths for b in make_loader(PairBatches(cfg, 64, 1, 0, collate), 0, False)]
        return sum(int(n.sum()) for n in lengths) / sum(len(n) * int(n.max()) for n in lengths)

    plain, grouped = efficiency(None), efficiency(16)
    assert plain < 0.4 and grouped > 0.75


def test_parquet_csv_and_file_urls_give_the_same_pairs(tmp_path: Path) -> None:
    import datasets

    records = [{"question": r["question"], "answer": r["answer"]} for r in make_pairs(12)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "p.csv"), index=False)

    def pairs(path: str) -> list[tuple[str, str]]:
        cfg = DataConfig(train_files=[path], shuffle=False, eval_fraction=0)
        return [(p.query, p.positive) for p in ordered_pairs(cfg, 0, 0)]

    expected = [(r["question"], r["answer"]) for r in records]
    assert pairs(str(tmp_path / "p.parquet")) == expected
    assert pairs(str(tmp_path / "p.csv")) == expected
    assert pairs(jsonl.resolve().as_uri()) == expected


def test_hard_negatives_list_or_single_string_capped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [
        {"question": "q1", "answer": "a1", "neg": ["n1", "n2", "n3"]},
        {"question": "q2", "answer": "a2", "neg": "n4"},
        {"question": "q3", "answer": "a3"}])
    cfg = DataConfig(train_files=[str(path)], negatives_field="neg", max_negatives=2, shuffle=False, eval_fraction=0)
    assert [p.negatives for p in ordered_pairs(cfg, 0, 0)] == [("n1", "n2"), ("n4",), ()]


def test_an_eval_file_is_used_as_is_and_nothing_is_carved_from_training(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_pairs(30))
    held = write_jsonl(tmp_path / "eval.jsonl", make_pairs(7, seed=5))
    cfg = DataConfig(train_files=[str(train)], eval_files=[str(held)], eval_fraction=0.5)
    assert [p.query for p in eval_pairs(cfg)] == [r["question"] for r in make_pairs(7, seed=5)]
    assert len(list(ordered_pairs(cfg, 0, 0))) == 30


# --- batches by source ----------------------------------------------------------------------------


def sourced_pairs(sizes: dict[str, int]) -> list[dict]:
    records = make_pairs(sum(sizes.values()))
    sources = [name for name, n in sizes.items() for _ in range(n)]
    random.Random(5).shuffle(sources)
    return [{**r, "source": s} for r, s in zip(records, sources)]


def test_batches_by_source_hold_one_source_each_and_cover_the_epoch_once(tmp_path: Path) -> None:
    records = sourced_pairs({"manuals": 61, "faq": 30, "forum": 5})  # forum: fewer pairs than a batch
    path = write_jsonl(tmp_path / "p.jsonl", records)
    source_of = {f"{path}:{i + 1}": r["source"] for i, r in enumerate(records)}
    cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0, batch_by_source=True)
    batches = batch_ids(cfg, 0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(source_of) and len(flat) == len(set(flat))
    # As many batches as without grouping (the schedule's count holds), the partial one last.
    assert len(batches) == math.ceil(96 / 8) and all(len(b) == 8 for b in batches[:-1])
    kinds = [{source_of[i] for i in b} for b in batches]
    single = [k for k in kinds if len(k) == 1]
    # 61 // 8 + 30 // 8 batches of one source; the 5 + 6 + 5 left over train in the mixed ones.
    assert len(single) == 7 + 3 and sum(len(k) > 1 for k in kinds) == 2
    assert all(len(k) == 1 for k in kinds[:-2])  # the mixed ones come last
    assert len([k for k in single if k == {"manuals"}]) == 7
    # Fixed by (data, seed, epoch): workers do not change it, and it differs from the plain order.
    assert batch_ids(cfg, workers=2) == batches
    plain = batch_ids(cfg.model_copy(update={"batch_by_source": False}), 0)
    assert plain != batches


def test_batches_by_source_resume_from_any_batch_and_split_across_processes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", sourced_pairs({"a": 40, "b": 27, "c": 13}))
    cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0, batch_by_source=True)
    full = batch_ids(cfg, 0)
    for done in (1, 4, len(full) - 1):
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize)
        dataset.set_position(0, done)
        assert [b.ids for b in make_loader(dataset, 2, pin_memory=False)] == full[done:]
    slices = []
    for rank in range(3):
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize, num_processes=3, rank=rank)
        slices.append([b.ids for b in make_loader(dataset, 0, pin_memory=False)])
    for step, batch in enumerate(full):
        assert sum((slices[r][step] for r in range(3)), []) == batch


def test_batches_by_source_need_a_source_field_and_not_length_grouping() -> None:
    with pytest.raises(ValidationError, match="data.batch_by_source needs data.source_field"):
        DataConfig(train_files=["x.jsonl"], batch_by_source=True, source_field=None)
    with pytest.raises(ValidationError, match="keep one"):
        DataConfig(train_files=["x.jsonl"], batch_by_source=True, group_by_length=4)


def test_a_run_trains_on_batches_by_source_for_the_epochs_steps(tiny_model: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", sourced_pairs({"manuals": 50, "faq": 30}))
    out = tmp_path / "out"
    assert main(["--input_jsonl", str(path), "--base_model", str(tiny_model), "--output_dir", str(out),
                 "--batch_size", "8", "--epochs", "1", "data.batch_by_source=true", "data.eval_fraction=0",
                 "data.num_workers=0", "tracking.report_to=none", "tracking.log_batch_ids=true",
                 "data.query_max_length=24", "data.document_max_length=32"]) == 0
    rows = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # 80 pairs, batch 8: the planned 10 steps
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] and progress["step"] == 10


def test_source_weights_repeat_or_thin_each_source_exactly_and_change_the_thinned_share_each_epoch(
        tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", sourced_pairs({"manuals": 40, "faq": 10, "forum": 6}))
    source_of = {f"{path}:{i + 1}": r["source"] for i, r in enumerate(sourced_pairs({"manuals": 40, "faq": 10,
                                                                                       "forum": 6}))}
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0, shuffle_buffer=1000,
                     source_weights={"manuals": 0.25, "forum": 2.5})
    planned = plan_data(cfg, count=True)
    assert planned.sources == {"manuals": 40, "faq": 10, "forum": 6}
    assert planned.train_pairs == 10 + 10 + 15  # a quarter of 40, 10 as they are, 2.5 x 6
    kept: list[set[str]] = []
    for epoch in range(3):
        ids = [i for b in batch_ids(cfg, 0, epoch) for i in b]
        assert len(ids) == planned.train_pairs  # the step count known before step 1 is the one trained
        count = {s: sum(source_of[i] == s for i in ids) for s in ("manuals", "faq", "forum")}
        assert count == {"manuals": 10, "faq": 10, "forum": 15}
        forum = [i for i in ids if source_of[i] == "forum"]
        assert sorted(set(forum)) == sorted(i for i, s in source_of.items() if s == "forum")  # each twice or thrice
        assert all(forum.count(i) in (2, 3) for i in set(forum))
        kept.append({i for i in ids if source_of[i] == "manuals"})
        # Workers do not change it.
        assert [i for b in batch_ids(cfg, 2, epoch) for i in b] == ids
    assert len(kept[0] | kept[1] | kept[2]) > 10  # another quarter of the source each epoch


def test_source_weights_with_batches_by_source_resume_and_split_across_processes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", sourced_pairs({"a": 30, "b": 12, "c": 3}))
    cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0, batch_by_source=True,
                     source_weights={"c": 3.0, "a": 0.5})
    full = batch_ids(cfg, 0, epoch=1)
    assert sum(map(len, full)) == 15 + 12 + 9
    for done in (1, len(full) - 1):
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize)
        dataset.set_position(1, done)
        assert [b.ids for b in make_loader(dataset, 2, pin_memory=False)] == full[done:]
    slices = []
    for rank in range(2):
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize, num_processes=2, rank=rank,
                              sizes=plan_data(cfg, count=True).sources)
        dataset.set_epoch(1)
        slices.append([b.ids for b in make_loader(dataset, 0, pin_memory=False)])
    for step, batch in enumerate(full):
        assert slices[0][step] + slices[1][step] == batch


def test_source_weights_are_checked_against_the_sources_the_data_has(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="source_weights needs data.source_field"):
        DataConfig(train_files=["x.jsonl"], source_weights={"a": 2}, source_field=None)
    with pytest.raises(ValidationError, match="the weight of 'a' is -1"):
        DataConfig(train_files=["x.jsonl"], source_weights={"a": -1})
    path = write_jsonl(tmp_path / "p.jsonl", sourced_pairs({"manuals": 40, "faq": 5}))
    args = ["--input_jsonl", str(path), "--base_model", str(tiny_model), "--batch_size", "8",
            "data.eval_fraction=0", "data.num_workers=0", "tracking.report_to=none", "data.query_max_length=24",
            "data.document_max_length=32"]
    # A weight for a source no record has: one line naming it and the sources there are, before step 1.
    out = tmp_path / "typo"
    assert main([*args, "--output_dir", str(out), "data.source_weights={manual: 2}"]) == 1
    log = (out / "logs" / "train.log").read_text()
    assert "data.source_weights names the source 'manual', which no training record has" in log
    assert "sources: faq (5), manuals (40)" in log and not (out / "final_model").exists()
    # A source smaller than a batch under batch_by_source: named, and its pairs still train.
    out = tmp_path / "small"
    assert main([*args, "--output_dir", str(out), "data.batch_by_source=true", "tracking.log_batch_ids=true"]) == 0
    log = (out / "logs" / "train.log").read_text()
    assert "source 'faq' has 5 training pair(s) per epoch, fewer than a batch of 8" in log
    trained = [i for line in (out / "batches.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]]
    assert len(trained) == 45
