"""A teacher for distillation: a model that scores (question, document) pairs.

Either a sentence-transformers ``CrossEncoder`` (a reranker with one output: the score is what
``predict`` returns, with the model's own activation, or its raw logit when asked), or an embedding model (the score is the
model's similarity of the question's embedding, with its query prompt, and the document's, with
its document prompt: ``encode_query`` / ``encode_document``). ``embedtune score`` writes these
scores beside a record's hard negatives; ``embedtune mine --teacher`` scores the negatives it
mines and can drop those the teacher ranks too close to the answer.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedtune.data.records import DataError
from embedtune.files import read_json_object
from embedtune.mining import MineError
from embedtune.model.folder import ModelLoadError, hub_offline, hub_snapshot, one_line, resolve_model_path

logger = logging.getLogger(__name__)

KINDS = ("auto", "cross-encoder", "embedding")
# sentence-transformers' model_type (config_sentence_transformers.json) -> the teacher's kind.
MODEL_TYPES = {"CrossEncoder": "cross-encoder", "SentenceTransformer": "embedding"}


def teacher_folder(name: str) -> str:
    """The local folder of ``name``: a folder as is, a Hub name as its snapshot in the cache."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"--teacher {name}: {path} holds no model (no config.json); give the folder a "
                                 "CrossEncoder or an embedding model was saved to, or a Hub name")
        return path
    why = hub_snapshot(name)[1]
    offline = " (HF_HUB_OFFLINE is set, so only local folders and cached models load)" if hub_offline() else ""
    raise ModelLoadError(f"--teacher {name}: not a model folder here, and not loadable from the Hugging Face "
                         f"Hub{offline} ({why})")


def teacher_kind(path: str) -> str:
    """What sentence-transformers would load ``path`` as: the ``model_type`` the folder was saved
    with (sentence-transformers 6 saves a CrossEncoder with modules.json too, so only the type
    tells them apart); a folder without modules.json is a plain transformers model, a reranker
    when its architecture classifies sequences; modules.json without a type is an embedding model
    of an older sentence-transformers."""
    model_type = read_json_object(os.path.join(path, "config_sentence_transformers.json")).get("model_type")
    if model_type is not None:
        if model_type not in MODEL_TYPES:
            raise ModelLoadError(f"--teacher {path}: a sentence-transformers {model_type}; a teacher is a "
                                 "CrossEncoder or an embedding model (SentenceTransformer)")
        return MODEL_TYPES[model_type]
    if os.path.isfile(os.path.join(path, "modules.json")):
        return "embedding"
    architectures = read_json_object(os.path.join(path, "config.json")).get("architectures") or []
    classifies = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    return "cross-encoder" if classifies else "embedding"


@dataclass
class Teacher:
    """A loaded teacher and how it scores; ``score`` takes texts and gives floats."""

    name: str
    kind: str  # cross-encoder or embedding
    model: Any  # sentence_transformers.CrossEncoder or SentenceTransformer
    batch_size: int = 32
    logits: bool = False  # a cross-encoder's raw logit, without its activation (a sigmoid for one label)

    @classmethod
    def load(cls, name: str, kind: str = "auto", batch_size: int = 32, max_length: int | None = None,
             trust_remote_code: bool = False, logits: bool = False) -> Teacher:
        """Load ``name`` (a folder or a Hub name) on the GPU when there is one. ``logits``: a
        cross-encoder scores with its raw logit (the usual margins for MarginMSE: a sigmoid squeezes
        the margins between pairs it is sure of towards 0)."""
        if kind not in KINDS:
            raise ModelLoadError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
        path = teacher_folder(name)
        found = teacher_kind(path)
        if kind == "auto":
            kind = found
        elif kind != found:
            logger.warning("--teacher %s looks like a %s teacher; loading it as --kind %s says", name, found, kind)
        if logits and kind != "cross-encoder":
            raise ModelLoadError(f"--teacher {name}: an embedding model's scores are similarities, not logits; "
                                 "logits are a cross-encoder teacher's (leave out the logits option)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if kind == "cross-encoder":
                from sentence_transformers import CrossEncoder

                model: Any = CrossEncoder(path, device=device, max_length=max_length,
                                          trust_remote_code=trust_remote_code, local_files_only=True)
                if model.num_labels != 1:
                    raise ModelLoadError(f"--teacher {name}: a cross-encoder with {model.num_labels} labels; a "
                                         "teacher gives one score per pair (a reranker with num_labels=1)")
            else:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code,
                                            local_files_only=True)
                if max_length:
                    model.max_seq_length = max_length
        except ModelLoadError:
            raise
        except Exception as exc:  # transformers' and sentence-transformers' own errors, said on one line
            raise ModelLoadError(f"--teacher {name}: cannot be loaded as a {kind}: {type(exc).__name__}: "
                                 f"{one_line(exc)}") from exc
        model.eval()
        logger.info("teacher %s: %s on %s", name, kind, device)
        return cls(name, kind, model, batch_size, logits)

    def score(self, queries: Sequence[str], documents: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each question, the teacher's score of each of its documents, in the order given."""
        pairs = [(q, d) for q, docs in zip(queries, documents, strict=True) for d in docs]
        if not pairs:
            return [[] for _ in queries]
        flat = self._cross(pairs) if self.kind == "cross-encoder" else self._embedding(pairs)
        if not all(math.isfinite(s) for s in flat):
            at = next(i for i, s in enumerate(flat) if not math.isfinite(s))
            raise MineError(f"--teacher {self.name} scored a pair {flat[at]} (question {pairs[at][0]!r:.80}); "
                            "a teacher's scores must be finite numbers")
        out, start = [], 0
        for docs in documents:
            out.append(flat[start:start + len(docs)])
            start += len(docs)
        return out

    def _cross(self, pairs: list[tuple[str, str]]) -> list[float]:
        raw = {"activation_fn": torch.nn.Identity()} if self.logits else {}
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True, **raw)
        return [_stored(s) for s in scores.reshape(len(pairs)).tolist()]

    def _embedding(self, pairs: list[tuple[str, str]]) -> list[float]:
        # Each distinct text once: a document is often the negative of many questions.
        queries = list(dict.fromkeys(q for q, _ in pairs))
        documents = list(dict.fromkeys(d for _, d in pairs))
        q_row = {text: i for i, text in enumerate(queries)}
        d_row = {text: i for i, text in enumerate(documents)}
        common: dict[str, Any] = {"batch_size": self.batch_size, "show_progress_bar": False,
                                  "convert_to_tensor": True}
        with torch.inference_mode():
            q_emb = self.model.encode_query(queries, **common).float()
            d_emb = self.model.encode_document(documents, **common).float()
            left = q_emb[torch.as_tensor([q_row[q] for q, _ in pairs], device=q_emb.device)]
            right = d_emb[torch.as_tensor([d_row[d] for _, d in pairs], device=d_emb.device)]
            scores = self.model.similarity_pairwise(left, right)
        return [_stored(s) for s in scores.float().cpu().tolist()]


def _stored(value: float) -> float:
    """A float32 score as the shortest decimal that reads back as the same float32: the file
    then holds 0.49699703, not 0.49699702858924866."""
    return float(str(np.float32(value)))


# --- what a run reports ----------------------------------------------------------------------


@dataclass
class TeacherStats:
    """The teacher's scores over a run, for the summary."""

    positives: int = 0
    negatives: int = 0
    positive_sum: float = 0.0
    negative_sum: float = 0.0
    inverted: int = 0  # records with a negative scored at or above their positive: likely false negatives

    def add(self, scores: Sequence[float]) -> None:
        """One record's scores: the positive's, then its negatives'."""
        self.positives += 1
        self.positive_sum += scores[0]
        self.negatives += len(scores) - 1
        self.negative_sum += sum(scores[1:])
        self.inverted += any(s >= scores[0] for s in scores[1:])

    def line(self) -> str:
        negative = f"{self.negative_sum / self.negatives:.4f}" if self.negatives else "-"
        return (f"mean teacher score: {self.positive_sum / max(self.positives, 1):.4f} for the positives, "
                f"{negative} for the {self.negatives} negatives")


def scores_clash(record: dict[str, Any], field_name: str, where: str) -> DataError | None:
    """A record whose ``field_name`` holds something other than a list of scores: writing the
    scores there would lose it. ``where``: the record's ``file:line``."""
    if field_name not in record or isinstance(record[field_name], list) or record[field_name] is None:
        return None
    path, _, line = where.rpartition(":")
    return DataError(f"bad record: {path}, line {line}: '{field_name}' is a field of this record already and not "
                     f"a list of scores (it is {record[field_name]!r:.60}); write the scores to another field")


# --- mining with a teacher -------------------------------------------------------------------


@dataclass
class Vetted:
    """Each question's negatives once the teacher has seen them."""

    chosen: list[list[int]]  # corpus rows, best first by the embedding model
    scores: list[list[float]]  # the teacher's: the positive's, then each chosen row's
    dropped: list[int]  # candidates the teacher dropped on the way to each question's negatives


def vet_negatives(teacher: Teacher, queries: Sequence[str], positives: Sequence[str],
                  candidates: Callable[[list[int], int], list[list[int]]],
                  texts: Callable[[list[int]], dict[int, str]], num_negatives: int, max_ratio: float | None,
                  deepest: int) -> Vetted:
    """The first ``num_negatives`` candidates of each question (in the embedding model's order)
    that the teacher scores at most ``max_ratio`` x the positive's score, with their scores.

    ``candidates(questions, n)`` gives those questions' first ``n`` candidates (the mining rules
    and margin applied); a question left short by the teacher asks for a deeper pool, up to
    ``deepest``, and only candidates it has not scored yet go to the teacher. This is
    NV-Retriever's positive-aware mining ("TopK-PercPos") with the teacher as the judge.
    """
    count = len(queries)
    positive = [s[0] for s in teacher.score(queries, [[p] for p in positives])]
    seen: list[dict[int, float]] = [{} for _ in range(count)]
    vetted = Vetted([[] for _ in range(count)], [], [0] * count)
    todo = list(range(count))
    pool = num_negatives if max_ratio is None else 2 * num_negatives  # room for a few drops at once
    while todo:
        pool = min(pool, max(deepest, num_negatives))
        ranked = candidates(todo, pool)
        new = [[row for row in rows if row not in seen[q]] for q, rows in zip(todo, ranked)]
        text = texts([row for rows in new for row in rows])
        scored = teacher.score([queries[q] for q in todo], [[text[row] for row in rows] for rows in new])
        short = []
        for q, rows, fresh, scores in zip(todo, ranked, new, scored):
            seen[q].update(zip(fresh, scores))
            limit = math.inf if max_ratio is None else max_ratio * positive[q]
            kept, dropped = [], 0
            for row in rows:
                if seen[q][row] > limit:
                    dropped += 1
                    continue
                kept.append(row)
                if len(kept) == num_negatives:
                    break
            vetted.chosen[q], vetted.dropped[q] = kept, dropped
            if len(kept) < num_negatives and len(rows) == pool and pool < deepest:
                short.append(q)
        todo, pool = short, pool * 4
    vetted.scores = [[positive[q]] + [seen[q][row] for row in vetted.chosen[q]] for q in range(count)]
    return vetted
