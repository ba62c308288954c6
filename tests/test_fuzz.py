"""Fuzzed input: the readers and the config loader answer junk with their documented policy.

A data file gives Pairs, Rejects naming its file and line, or a DataError naming the file; a
config gives a Config or a ConfigError with a short message. Never any other exception.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import untokenized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtune.config import Config, ConfigError, DataConfig, parse_args
from embedtune.data.records import DataError, Pair, Reject, read_pairs
from embedtune.data.split import eval_pairs, preflight
from embedtune.data.stream import PairBatches

LIMIT = 600  # data.max_record_bytes in these tests: huge lines stay cheap to write
# Examples per test (Parquet and CSV, slower to write, get fewer); raise it for a longer hunt.
EXAMPLES = int(os.environ.get("EMBEDTUNE_FUZZ_EXAMPLES", "200"))
# Each example writes into a folder of its own under tmp_path, so sharing the fixture is intended.
CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=CHECKS)
FEW = settings(max_examples=max(1, EXAMPLES * 3 // 10), deadline=None, suppress_health_check=CHECKS)

# --- strategies for JSONL lines ---------------------------------------------------------------

TEXT = st.text(min_size=1, max_size=40).filter(lambda t: t.strip())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
KEYS = st.sampled_from(["question", "answer", "negatives", "label", "source", "q", ""])


@st.composite
def good_record(draw: Any) -> tuple[bytes, tuple[str, str]]:
    query, positive = draw(TEXT), draw(TEXT)
    record: dict[str, Any] = {"question": query, "answer": positive}
    if draw(st.booleans()):
        record["negatives"] = draw(st.lists(TEXT, max_size=3) | TEXT)
    if draw(st.booleans()):
        record["source"] = draw(JSON_VALUES)
    line = json.dumps(record, ensure_ascii=draw(st.booleans())).encode()
    return line, (query, positive)


def lines_of(strategy: Any, expect: str) -> Any:
    return strategy.map(lambda line: (line, expect, None))


# Each line comes with what it must give: a pair (with its texts), a reject, or either ("any").
LINE = st.one_of(
    good_record().filter(lambda r: len(r[0]) <= LIMIT).map(lambda r: (r[0], "pair", r[1])),
    good_record().map(lambda r: (r[0] + b"\r", "pair", r[1])).filter(lambda r: len(r[0]) <= LIMIT),  # CRLF
    lines_of(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), "any"),
    lines_of(JSON_VALUES.map(lambda v: json.dumps(v).encode()), "any"),
    lines_of(st.dictionaries(KEYS, JSON_VALUES, max_size=4).map(lambda v: json.dumps(v).encode()), "any"),
    # invalid UTF-8, a NUL byte, a bare carriage return inside a record
    good_record().map(lambda r: (r[0][:5] + b"\xff\xc3" + r[0][5:], "reject", None)),
    good_record().map(lambda r: (r[0][:1] + b"\x00" + r[0][1:], "reject", None)),
    good_record().map(lambda r: (r[0][:1] + b"\r" + r[0][1:], "any", None)),
    # longer than the limit: a long record, junk without a newline
    st.integers(LIMIT + 1, 4 * LIMIT).map(lambda n: (b'{"question": "q", "answer": "' + b"a" * n + b'"}', "reject", None)),
    st.integers(LIMIT + 1, 3 * LIMIT).map(lambda n: (bytes(range(1, 10)) * (n // 9 + 1), "reject", None)),
    lines_of(st.sampled_from([b"", b" ", b"\t \t", b"\r"]), "blank"),
)


def write(folder: Path, name: str, content: bytes) -> str:
    path = Path(tempfile.mkdtemp(dir=folder)) / name
    path.write_bytes(content)
    return str(path)


def blank(line: bytes, number: int) -> bool:
    if len(line) > LIMIT:
        return False
    content = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
    return set(content) <= set(b" \t\r")


def check_item(item: Any, path: str) -> None:
    if isinstance(item, Reject):
        assert item.file == path and item.line >= 1 and item.reason.strip()
        assert path in item.message() and f"line {item.line}" in item.message()
        json.dumps({"record": item.raw})  # rejected.jsonl can hold it
    else:
        assert isinstance(item, Pair), item
        assert item.id.startswith(path + ":")
        for text in (item.query, item.positive, *item.negatives):
            assert isinstance(text, str) and text.strip()
            text.encode("utf-8")  # hashing and tokenizing need real text


def read_checked(path: str) -> str | None:
    """Read ``path`` as training data, skipping bad records, and check every item; the message
    of the DataError when the file is refused as a whole, else None."""
    cfg = DataConfig(train_files=[path], on_bad_record="skip", max_record_bytes=LIMIT)
    try:
        items = list(read_pairs([path], cfg))
    except DataError as exc:
        return str(exc)
    for item in items:
        check_item(item, path)
    return None


# --- JSONL ---------------------------------------------------------------------------------------


@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=12), trailing=st.booleans(), bom=st.booleans())
def test_jsonl_lines_give_pairs_or_rejects_named_by_file_and_line(tmp_path: Path, lines, trailing: bool,
                                                                 bom: bool) -> None:
    raw = [line for line, _, _ in lines]
    if bom:
        raw[0] = b"\xef\xbb\xbf" + raw[0]
    content = b"\n".join(raw) + (b"\n" if trailing else b"")
    path = write(tmp_path, "fuzz.jsonl", content)
    cfg = DataConfig(train_files=[path], on_bad_record="skip", negatives_field="negatives", max_record_bytes=LIMIT,
                     eval_fraction=0)
    if not content:
        with pytest.raises(DataError, match="the file is empty"):
            preflight(cfg)
        return
    items = list(read_pairs([path], cfg))
    by_line = {}
    for item in items:
        check_item(item, path)
        line = item.line if isinstance(item, Reject) else int(item.id.rsplit(":", 1)[1])
        assert line not in by_line, f"line {line} read twice"
        by_line[line] = item
    for number, (line, (_, expect, texts)) in enumerate(zip(raw, lines), start=1):
        if blank(line, number):
            assert number not in by_line, f"blank line {number} gave {by_line[number]}"
            continue
        item = by_line.get(number)
        assert item is not None, f"line {number} ({line[:60]!r}) gave nothing"
        if expect == "pair":
            assert isinstance(item, Pair) and (item.query, item.positive) == texts, item
        elif expect == "reject":
            assert isinstance(item, Reject), item
    assert len(by_line) == sum(not blank(line, n) for n, line in enumerate(raw, start=1))

    # The same file under the error policy stops with the first bad line named, or passes.
    strict = cfg.model_copy(update={"on_bad_record": "error"})
    first_bad = next((i for i in items if isinstance(i, Reject)), None)
    try:
        assert preflight(strict) == [] and first_bad is None
    except DataError as exc:
        if first_bad is not None:
            assert f"{path}, line {first_bad.line}:" in str(exc)
        else:
            assert f"{path}: no records found" in str(exc)
    # Held-out and batched reads of the same stream hold up too.
    eval_pairs(cfg.model_copy(update={"eval_fraction": 0.5}))
    dataset = PairBatches(cfg, 3, 1, seed=0, collate=untokenized)
    assert sum(len(pairs) for pairs, _ in dataset.global_batches()) == sum(isinstance(i, Pair) for i in items)


@pytest.mark.parametrize("line, expected", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"question": "q", "answer": "a", "score": ' + b"7" * 5000 + b"}", "not valid JSON for a record (Exceeds"),
    (b'{"question": "q", "answer": "a", "score": 1e999}', "'score' must be a finite number"),
    (b'{"question": "half \\ud83d of a pair", "answer": "a", "score": 1}', "a text holds \\ud83d"),
    (b'{"question": "q", "answer": "a", "score": 1}\r{"question": "q2"}', "bare carriage return"),
    (b"\x1c\x1d", "not valid JSON"),
    ('{"question": "caf\u00e9 \u2028 \ufffd", "answer": "a", "score": 1}'.encode(), None),
])
def test_hostile_lines_are_bad_records_at_the_default_limits(tmp_path: Path, line: bytes, expected: str | None) -> None:
    """Lines that once escaped as tracebacks (RecursionError, ValueError, UnicodeEncodeError while
    hashing), and text that is fine as it is (U+2028, a real U+FFFD)."""
    path = write(tmp_path, "hostile.jsonl", b'{"question": "ok", "answer": "fine", "score": 1}\n' + line + b"\n")
    cfg = DataConfig(train_files=[path], on_bad_record="skip", label_field="score", eval_fraction=0.5)
    first, second = read_pairs([path], cfg)
    assert isinstance(first, Pair)
    if expected is None:
        assert isinstance(second, Pair) and second.query == "caf\u00e9 \u2028 \ufffd"
    else:
        assert isinstance(second, Reject) and second.line == 2 and expected in second.reason, second
    eval_pairs(cfg)  # hashing the held-out split reads every text


@FEW
@given(content=st.binary(min_size=1, max_size=400), name=st.sampled_from(["junk.jsonl.gz", "junk.jsonl.bz2",
                                                                       "junk.jsonl.xz", "junk.jsonl"]))
def test_random_bytes_in_any_jsonl_file_are_named(tmp_path: Path, content: bytes, name: str) -> None:
    path = write(tmp_path, name, content)
    error = read_checked(path)
    assert error is None or (error.startswith(path) and "\n" not in error.strip())


# --- Parquet and CSV -------------------------------------------------------------------------


@st.composite
def column(draw: Any, rows: int) -> tuple[Any, list[Any]]:
    import pyarrow as pa

    kind = draw(st.sampled_from(["string", "int", "float", "list", "struct", "binary", "null"]))
    values: dict[str, tuple[Any, Any]] = {
        "string": (pa.string(), st.text(max_size=30)),
        "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
        "float": (pa.float64(), st.floats()),
        "list": (pa.list_(pa.string()), st.lists(st.text(max_size=10), max_size=3)),
        "struct": (pa.struct([("a", pa.string())]), st.fixed_dictionaries({"a": st.text(max_size=10)})),
        "binary": (pa.binary(), st.binary(max_size=20)),
        "null": (pa.null(), st.none()),
    }
    kind_type, strategy = values[kind]
    return kind_type, draw(st.lists(st.none() | strategy, min_size=rows, max_size=rows))


@st.composite
def parquet_table(draw: Any) -> Any:
    import pyarrow as pa

    rows = draw(st.integers(1, 6))
    names = draw(st.lists(st.sampled_from(["question", "answer", "negatives", "label", "source", "other"]),
                          min_size=1, max_size=5, unique=True))
    columns = {name: draw(column(rows)) for name in names}
    return pa.table({name: pa.array(values, type=kind) for name, (kind, values) in columns.items()})


@FEW
@given(table=parquet_table())
def test_parquet_of_any_column_types_gives_pairs_or_rejects(tmp_path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    path = write(tmp_path, "rows.parquet", b"")
    pq.write_table(table, path)
    cfg = DataConfig(train_files=[path], on_bad_record="skip", negatives_field="negatives", label_field=None,
                     max_record_bytes=LIMIT)
    items = list(read_pairs([path], cfg))
    assert len(items) == table.num_rows
    for number, (item, row) in enumerate(zip(items, table.to_pylist()), start=1):
        check_item(item, path)
        good = all(isinstance(row.get(k), str) and row[k].strip() for k in ("question", "answer"))
        assert isinstance(item, Pair) or not good or row.get("negatives") not in (None, []), (row, item)
        if isinstance(item, Reject):
            assert item.line == number


CELL = st.text(max_size=25) | st.sampled_from(['"', '""', ",", "\n", "\r\n", " ", "\x00"])


@FEW
@given(header=st.lists(st.sampled_from(["question", "answer", "source", "x", ""]), min_size=1, max_size=4),
       rows=st.lists(st.lists(CELL, max_size=5), max_size=6))
def test_csv_of_any_cells_gives_pairs_or_rejects(tmp_path: Path, header: list[str], rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    path = write(tmp_path, "rows.csv", text.getvalue().encode())
    error = read_checked(path)  # refused whole, e.g. for a row with more cells than the header
    assert error is None or error.startswith(f"{path}: cannot be read as csv")


@FEW
@given(content=st.binary(min_size=1, max_size=300), name=st.sampled_from(["junk.parquet", "junk.csv"]))
def test_random_bytes_as_parquet_or_csv_are_named(tmp_path: Path, content: bytes, name: str) -> None:
    path = write(tmp_path, name, content)
    error = read_checked(path)
    assert error is None or error.startswith(f"{path}: cannot be read as ")


# --- the config ------------------------------------------------------------------------------

SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}
DOTTED = [f"{s}.{k}" for s, sub in SECTIONS.items() if hasattr(sub, "model_fields") for k in sub.model_fields]
CONFIG_KEYS = st.sampled_from([*SECTIONS, *DOTTED, "input_jsonl", "num_epochs", "max_seq_length", "loss_function",
                               "resume_from_checkpoint", "lerning_rate", "", "data.", ".x", "a..b"])
ODD = (JSON_VALUES | st.integers(-(10**30), 10**30) | st.text(max_size=300)
       | st.sampled_from(["latest", "../x", "/etc/passwd", "step-00000001", "x.jsonl", "2e-5", "no", "~", "null",
                          "[1, [2, [3]]]", "{a: 1}", ".inf", ".nan", "!!python/object/apply:os.system ['true']"]))


def tree_from(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {"data": {"train_files": ["x.jsonl"]}}
    for key, value in pairs:
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    return tree


# A Python traceback's first line. Matched as a line of its own: the fuzzed values are echoed in
# the messages, and Hypothesis also draws strings from this module's constants, once "Traceback".
TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.M)


def check_config_error(exc: ConfigError, source: str | None = None) -> None:
    text = str(exc)
    assert text.strip() and len(text) < 4000 and not TRACEBACK.search(text)
    if source:
        assert source in text


@FUZZ
@given(pairs=st.lists(st.tuples(CONFIG_KEYS, ODD), max_size=6), suffix=st.sampled_from([".yaml", ".json"]))
def test_config_files_of_odd_keys_and_types_load_or_explain(tmp_path: Path, pairs, suffix: str) -> None:
    tree = tree_from(pairs)
    text = json.dumps(tree) if suffix == ".json" else yaml.safe_dump(tree)
    path = write(tmp_path, f"run{suffix}", text.encode())
    try:
        assert isinstance(parse_args(["--config", path]), Config)
    except ConfigError as exc:
        check_config_error(exc)


@FUZZ
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       suffix=st.sampled_from([".yaml", ".json", ".yml"]))
def test_config_files_of_junk_are_refused_naming_the_file(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = write(tmp_path, f"junk{suffix}", content)
    try:
        parse_args(["--config", path])  # junk that parses (e.g. a bare mapping) may still be a config
    except ConfigError as exc:
        check_config_error(exc)


@FUZZ
@given(overrides=st.lists(st.tuples(CONFIG_KEYS, ODD.map(str)), max_size=5))
def test_overrides_of_any_value_load_or_explain(overrides: list[tuple[str, str]]) -> None:
    items = [f"{key}={value}" for key, value in overrides]
    try:
        assert isinstance(parse_args(["--input_jsonl", "x.jsonl", *items]), Config)
    except ConfigError as exc:
        check_config_error(exc)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + "train: {epochs: *i}\n"


@pytest.mark.parametrize("content, expected", [
    ("train:\n  epochs: " + "9" * 5000 + "\n", "not valid YAML"),
    ("a: " + "[" * 20000 + "\n", "nested too deeply"),
    (ALIAS_BOMB, "more than 100,000 values"),
    ("a: &a [*a]\n", "more than 100,000 values"),
    ("data: {train_files: [x]}\ntracking: {run_name: '" + "n" * 200_000 + "'}\ntrain: {epochs: '" + "e" * 200_000
     + "'}\n", "train.epochs"),
    ("data: {train_files: [x]}\ntrain: {learning_rate: .inf}\n", "train.learning_rate"),
    ("data: {train_files: [x]}\ntrain: {seed: -1}\n", "train.seed"),
    ("data: {train_files: [x]}\ntrain: {seed: " + str(2**64) + "}\n", "train.seed"),
    ("data: {train_files: [x], num_workers: 100000}\n", "data.num_workers"),
    ("data: {train_files: [x], max_negatives: 2000}\n", "data.max_negatives_per_record"),
    (b"data: {train_files: [\xff\xfe]}", "not UTF-8 text (byte 22)"),
])
def test_huge_and_hostile_configs_get_a_short_error(tmp_path: Path, content: str | bytes, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    check_config_error(err.value, str(path))
    assert expected in str(err.value)


def test_a_folder_or_an_endless_file_as_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        parse_args(["--config", str(tmp_path)])
    with pytest.raises(ConfigError, match="too large for a config"):
        parse_args(["--config", "/dev/zero"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", "bad\0name.yaml"])
