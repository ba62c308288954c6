"""Hugging Face Hub datasets as training or held-out data.

An entry of ``data.train_files`` or ``data.eval_files`` may name a Hub dataset instead of files:

    hub:OWNER/NAME[@REVISION][?config=CONFIG&split=SPLIT&columns=COLUMN:FIELD,...]

(in YAML also as a mapping: ``{hub: OWNER/NAME, config, split, revision, columns: {COLUMN: FIELD}}``).
``datasets`` decides which files make the config's split, from the repository's README as on the
Hub, and embedtune then reads those files like any others: the same seeded order, exact resume,
sharding over processes and workers, held-out split by hash and bad-record reports, which name the
dataset, split, file and row. A repository already in the local Hugging Face cache is read from it
(so ``HF_HUB_OFFLINE=1`` works once it was downloaded); otherwise its files are streamed from
``hf://`` URLs. ``columns`` renames a dataset's columns to the fields the run reads
(``data.query_field``, ``positive_field``, ``negatives_field``...), per dataset.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

PREFIX = "hub:"
FORMATS = ("json", "parquet", "csv")  # the builders whose files embedtune reads itself
_NAME = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_KEYS = {"hub", "config", "split", "revision", "columns"}


class HubDatasetError(ValueError):
    """A Hub dataset entry that cannot be read; the message names the entry and the fix."""


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: tuple[tuple[str, str], ...] = field(default=())  # (dataset column, the field it becomes)

    def entry(self) -> str:
        """The canonical ``hub:`` string (what config.yaml and checkpoints hold)."""
        query = {k: v for k, v in (("config", self.config), ("split", self.split)) if v is not None}
        if self.columns:
            query["columns"] = ",".join(f"{a}:{b}" for a, b in self.columns)
        text = PREFIX + self.name + (f"@{self.revision}" if self.revision else "")
        return text + "?" + urlencode(query, safe=":,/", quote_via=quote)

    def shown(self) -> str:
        """How reports name it: ``acme/faq (config pairs, split train)``."""
        parts = ([f"config {self.config}"] if self.config else []) + [f"split {self.split}"]
        return f"{self.name} ({', '.join(parts)})"

    def rename(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.columns:
            return row
        mapping = dict(self.columns)
        return {mapping.get(key, key): value for key, value in row.items()}


def is_hub_entry(entry: Any) -> bool:
    return isinstance(entry, dict) or (isinstance(entry, str) and entry.startswith(PREFIX))


def parse(entry: str | dict[str, Any], where: str = "") -> HubDataset:
    """A ``hub:`` string or a mapping, checked; errors name ``where`` (a key) and what to write."""
    at = f"{where}: " if where else ""
    if isinstance(entry, dict):
        if unknown := sorted(set(entry) - _KEYS, key=str):
            raise HubDatasetError(f"{at}a Hub dataset entry takes {', '.join(sorted(_KEYS))}, not "
                                  f"{', '.join(map(str, unknown))}")
        name, config, split = entry.get("hub"), entry.get("config"), entry.get("split", "train")
        revision, columns = entry.get("revision"), entry.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in columns.items()):
            raise HubDatasetError(f"{at}columns of the Hub dataset {name!r} must map a dataset column to the "
                                  "field it becomes, e.g. {query: question}")
        pairs = tuple(columns.items())
    else:
        body = entry[len(PREFIX):]
        body, _, query = body.partition("?")
        name, _, revision = body.partition("@")
        try:
            options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        except ValueError:
            raise HubDatasetError(f"{at}{entry!r}: the options after '?' must be key=value pairs joined by "
                                  "&, e.g. ?config=pairs&split=train") from None
        if unknown := sorted(set(options) - _KEYS):
            raise HubDatasetError(f"{at}{entry!r}: unknown option {', '.join(unknown)}; the options are "
                                  "config, split, revision and columns")
        config, split = options.get("config"), options.get("split", "train")
        revision = revision or options.get("revision")
        pairs = []
        for item in filter(None, options.get("columns", "").split(",")):
            column, sep, target = item.partition(":")
            if not (sep and column and target):
                raise HubDatasetError(f"{at}{entry!r}: columns are COLUMN:FIELD pairs joined by commas, e.g. "
                                      "columns=query:question,answer:answer")
            pairs.append((column, target))
        pairs = tuple(pairs)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise HubDatasetError(f"{at}{name!r} is not a Hub dataset name; write OWNER/NAME, e.g. "
                              "hub:sentence-transformers/natural-questions")
    for key, value in (("config", config), ("split", split), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or not value or any(c in value for c in "?&#\n")):
            raise HubDatasetError(f"{at}the {key} of the Hub dataset {name} must be a plain name, got {value!r}")
    return HubDataset(name, config, split, revision or None, pairs)


def normalized(entry: Any, where: str = "") -> Any:
    """A YAML mapping or ``hub:`` string as its canonical string; anything else unchanged."""
    return parse(entry, where).entry() if is_hub_entry(entry) else entry


def resolve(entry: str) -> list[str]:
    """The files of the entry's split: local paths in the Hugging Face cache, or ``hf://`` URLs
    (HubDatasetError, naming the entry, when there are none to read)."""
    return list(_resolved(parse(entry), _cache_dir()))


@functools.lru_cache(maxsize=64)
def _resolved(spec: HubDataset, cache: str) -> tuple[str, ...]:
    """Resolved once per process and cache folder (every reader and worker resolves the same entries)."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    where = f"{PREFIX}{spec.name}"
    try:  # already downloaded (or laid out) in the cache: read it there, online or not
        root = snapshot_download(spec.name, repo_type="dataset", revision=spec.revision, local_files_only=True)
    except Exception:
        root = None
    if root is None and _offline():
        raise HubDatasetError(
            f"{where}: the dataset{_at(spec)} is not in the local Hugging Face cache "
            f"({cache}) and HF_HUB_OFFLINE is set; download it once with `hf download {spec.name} "
            "--repo-type dataset`, or unset HF_HUB_OFFLINE")
    try:
        builder = datasets.load_dataset_builder(root or spec.name, spec.config, revision=None if root else spec.revision)
    except ValueError as exc:  # e.g. an unknown config: datasets lists the ones there are
        raise HubDatasetError(f"{where}: {' '.join(str(exc).split())[:400]} (datasets, reading the dataset's "
                              "README); check config=") from None
    except (FileNotFoundError, HfHubHTTPError, ConnectionError) as exc:
        raise HubDatasetError(f"{where}: no such dataset{_at(spec)} on the Hub, or it is private and no token "
                              f"allows it ({type(exc).__name__}); check the name, or log in with `hf auth login`") from None
    if builder.name not in FORMATS:
        raise HubDatasetError(f"{where}: its files are {builder.name}, and embedtune reads JSON lines, Parquet and "
                              "CSV; convert the dataset or point data.train_files at such files")
    files = (builder.config.data_files or {}).get(spec.split)
    if not files:
        splits = ", ".join(sorted(builder.config.data_files or {})) or "none"
        raise HubDatasetError(f"{where}: no split {spec.split!r}{' in config ' + spec.config if spec.config else ''} "
                              f"(splits: {splits}); set split= to one of them")
    return tuple(str(f) for f in files)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _at(spec: HubDataset) -> str:
    return f" at revision {spec.revision}" if spec.revision else ""


def _repo_of(path: str) -> tuple[str, str] | None:
    """(repo id, path inside it) of a file of a Hub dataset: a cache path or an ``hf://`` URL."""
    if path.startswith("hf://datasets/"):
        rest = path[len("hf://datasets/"):]
        owner, _, rest = rest.partition("/")
        name, _, inner = rest.partition("/")
        return f"{owner}/{name.split('@')[0]}", inner
    match = re.search(r"datasets--([^/\\]+)/snapshots/[^/\\]+/(.+)$", path.replace(os.sep, "/"))
    if match:
        return match.group(1).replace("--", "/"), match.group(2)
    return None


@dataclass(frozen=True)
class HubFile:
    dataset: HubDataset
    inner: str  # the file's path inside the repository

    def shown(self) -> str:
        return f"{self.dataset.shown()}, {self.inner}"


@functools.lru_cache(maxsize=4096)
def _lookup(path: str, entries: tuple[str, ...]) -> HubFile | None:
    found = _repo_of(path)
    if found is None:
        return None
    repo, inner = found
    specs = [spec for spec in map(parse, entries) if spec.name == repo]
    if len(specs) > 1:  # one repository named twice (two configs or splits): the one whose files these are
        specs = [spec for spec in specs if path in _resolved(spec, _cache_dir())] or specs
    return HubFile(specs[0], inner) if specs else None


def hub_file(path: str, cfg: Any) -> HubFile | None:
    """The Hub dataset ``path`` belongs to, by the run's entries (``cfg``: a DataConfig), or None."""
    entries = tuple(e for e in (*cfg.train_files, *cfg.eval_files) if is_hub_entry(e))
    return _lookup(path, entries) if entries else None


def dataset_names(entries: list[Any]) -> list[str]:
    """The Hub datasets named by ``hub:`` entries among ``entries`` (data files), once each, in order."""
    return list(dict.fromkeys(parse(e).name for e in entries if is_hub_entry(e)))
