"""A model card's front matter: ``huggingface_hub``'s ``ModelCardData``, filled in as
sentence-transformers fills in its own cards, so the Hub files the model the same way: tags, base
model, Hub datasets, language and licence, and the held-out metrics as ``model-index`` results."""

from __future__ import annotations

import math
import os
import re
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from embedtune.data import hub
from embedtune.model.folder import EMBEDDED_MODELS

# A Hub repository id: owner/name, letters, digits and - _ . only.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# The front matter as sentence-transformers writes its own (sentence_transformers/base/model_card.py):
# its tags for a dense model, its order of keys, and the names its InformationRetrievalEvaluator
# gives results in model-index.
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", "embedtune"]
FRONT_ORDER = ["language", "license", "library_name", "tags", "datasets", "metrics", "pipeline_tag", "base_model"]
TASK_TYPE, TASK_NAME = "information-retrieval", "Information Retrieval"
HELD_OUT = "held-out"  # the model-index dataset of the held-out questions; a source's is held-out-SOURCE
SIMILARITY = "cosine"  # evaluation ranks by cosine similarity, whatever the model's own function
BASE = "base_model_"  # the base model's figures have types of their own: nothing reads them as this model's
# A Hub dataset's file given by URL among the training files: hf://datasets/[OWNER/]NAME[@REV]/...
HF_URL = re.compile(r"^hf://datasets/((?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)")


def setting(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``config``'s value at a dotted key (``loss.name``), or ``default`` where there is none."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def hub_name(base_model: str) -> str | None:
    """The Hub id of the base model, or None for a local folder (which means nothing on the Hub)."""
    if base_model in EMBEDDED_MODELS:
        return "sentence-transformers/all-MiniLM-L6-v2"  # served from a package, but this Hub model
    if os.path.exists(base_model) or not HUB_ID.match(base_model) or ".." in base_model or "--" in base_model:
        return None
    return base_model


def dataset_size(examples_seen: int | None, epochs: int | None) -> int | None:
    """Training pairs in one epoch (sentence-transformers' ``dataset_size``: the training set's
    size), from a count over ``epochs`` whole epochs; None when there is no such count."""
    return examples_seen // epochs if examples_seen and epochs and epochs > 0 else None


def hub_datasets(files: list[str]) -> list[str]:
    """The Hub datasets among the training files (``hub:`` entries and ``hf://datasets/`` URLs), once
    each, in order."""
    urls = [m.group(1) for entry in files if isinstance(entry, str) and (m := HF_URL.match(entry))]
    return list(dict.fromkeys([*hub.dataset_names(files), *urls]))


def eval_results(before: dict[str, float] | None, after: dict[str, float] | None) -> list[EvalResult]:
    """The held-out figures as model-index results, named as sentence-transformers names those of its
    retrieval evaluator (task information-retrieval, metric cosine_ndcg@10, "Cosine Ndcg@10"). A
    source's figures (``source/metric``) make a dataset of their own; the base model's have types
    of their own (base_model_cosine_ndcg@10)."""
    results = []
    for prefix, metrics in (("", after), (BASE, before)):
        for key, value in (metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            source, _, name = key.rpartition("/")
            dataset = f"{HELD_OUT}-{source}" if source else HELD_OUT
            metric = f"{prefix}{SIMILARITY}_{name}"
            results.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset,
                dataset_name=dataset.replace("_", " ").replace("-", " "), metric_type=metric,
                metric_name=metric.replace("_", " ").title(), metric_value=float(value)))
    return results


def card_metadata(config: dict[str, Any], *, title: str, base_model: str | None, eval_before: dict[str, float] | None,
                  eval_after: dict[str, float] | None, size: int | None) -> ModelCardData:
    """The front matter. ``export.language`` and ``export.license`` are read when the config has them."""
    loss = setting(config, "loss.name")
    tags = (TAGS + ([f"dataset_size:{size}"] if size else [])
            + (["loss:MatryoshkaLoss"] if setting(config, "loss.matryoshka_dims") else [])
            + ([f"loss:{loss}"] if loss else [])
            + ([f"loss:{distill}"] if (distill := setting(config, "loss.distill")) else []))
    results = eval_results(eval_before, eval_after)
    metrics = [r.metric_type for r in results if r.dataset_type == HELD_OUT and not r.metric_type.startswith(BASE)]
    return ModelCardData(
        language=setting(config, "export.language") or None, license=setting(config, "export.license") or None,
        library_name="sentence-transformers", tags=tags,
        datasets=hub_datasets(setting(config, "data.train_files") or []) or None, metrics=metrics or None,
        pipeline_tag="sentence-similarity", base_model=base_model, eval_results=results or None,
        model_name=title if results else None)
