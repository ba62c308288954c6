"""The model card: ``README.md`` in the exported model folder, for people and for the Hugging Face Hub.

Its front matter is ``huggingface_hub``'s ``ModelCardData``, filled in as sentence-transformers fills
in its own cards, so the Hub files the model the same way: tags, base model, Hub datasets, and the
held-out metrics as ``model-index`` results. The text says what the model is and how to call it,
which data it was trained on (with a fingerprint that changes when any byte of that data does),
the held-out metrics before and after training, the settings and the full config, and where the
logs are.

Secrets never reach the card: nothing is read from the environment into it, config values under
secret-looking keys are replaced, and, as a last guard, credentials in URLs and the values of
secret-looking environment variables are blanked out of the finished text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from embedtune import __version__
from embedtune.data.fingerprint import data_fingerprint
from embedtune.files import human_bytes, read_json, write_atomic
from embedtune.model.folder import read_model_folder
from embedtune.retrieval import describe_change
from embedtune.secrets import scrub_config, scrub_text
from embedtune.training.card_metadata import FRONT_ORDER, card_metadata, dataset_size, hub_name, setting

CARD = "README.md"
FINAL_MODEL = "final_model"  # the exported model's folder in output_dir


# --- the card --------------------------------------------------------------------------------


@dataclass
class CheckpointOrigin:
    """Where a model exported from a checkpoint (``embedtune export``) comes from, for its card."""

    name: str  # step-NNNNNNNN
    step: int
    run_step: int | None = None  # the step the run had reached when it ended, if it did
    completed: bool | None = None  # whether that run finished (None: its training_progress.json is gone)
    score: float | None = None  # checkpoint.best_metric's held-out value at this step
    best: bool = False  # the best of the run's scored checkpoints
    scored: int = 0  # how many checkpoints the run scored


def folder_facts(model_dir: str) -> dict[str, Any]:
    """What the exported sentence-transformers folder itself says: pooling, normalize, size, prompts."""
    try:
        folder = read_model_folder(model_dir)
    except ValueError:  # a pooling it cannot name: the card falls back on the config
        return {"prompts": {}, "similarity": "cosine"}
    return {"pooling": folder.pooling, "normalize": folder.normalize if folder.pooling else None,
            "dim": folder.dim, "max_seq_length": folder.max_seq_length, "prompts": folder.prompts,
            "similarity": folder.similarity, "modules": list(folder.modules)}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _size(size: int | None) -> str:
    return "?" if size is None else human_bytes(size)


def _cell(value: Any) -> str:
    """A value for a markdown table: code-quoted, pipes escaped."""
    return f"`{str(value).replace('|', '/').replace('`', '')}`"


def eval_table(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    """Markdown before / after / change table; metrics in the order evaluated."""
    before, after = before or {}, after or {}
    names = list(after) + [name for name in before if name not in after]
    rows = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name in names:
        old, new = before.get(name), after.get(name)
        change = f"{new - old:+.4f}" if old is not None and new is not None else ""
        rows.append(f"| {name} | {'' if old is None else f'{old:.4f}'} | {'' if new is None else f'{new:.4f}'} "
                    f"| {change} |")
    return "\n".join(rows)


def _usage(model_dir: str, prompts: dict[str, str], remote_code: bool = False) -> str:
    trust = ", trust_remote_code=True" if remote_code else ""
    load = f"""```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer({json.dumps(model_dir)}{trust})  # or its Hub id once uploaded
queries = ["how do I read a file line by line?"]
documents = ["Iterate over the file object: for line in open(path): ..."]
"""
    if not any(prompts.values()):
        return load + "scores = model.similarity(model.encode(queries), model.encode(documents))  # queries x documents\n```"
    shown = ", ".join(f"{k} {json.dumps(v)}" for k, v in prompts.items())
    query = ', prompt_name="query"' if "query" in prompts else ""
    document = ', prompt_name="document"' if "document" in prompts else ""
    return (f"The model was trained with prompts ({shown}); pass them by name so they are applied the same "
            f"way:\n\n{load}query_embeddings = model.encode(queries{query})\n"
            f"document_embeddings = model.encode(documents{document})\n"
            "scores = model.similarity(query_embeddings, document_embeddings)  # queries x documents\n```")


def _data_section(config: dict[str, Any], fingerprint: dict[str, Any], num_examples: int | None) -> str:
    lines = ["| file | size | sha256 |", "|---|---:|---|"]
    for entry in fingerprint.get("files", []):
        sha = entry.get("sha256") or entry.get("note") or "not hashed"
        lines.append(f"| {_cell(entry.get('name'))} | {_size(entry.get('size'))} | `{sha}` |")
    combined = fingerprint.get("sha256")
    lines.append("")
    if fingerprint.get("note"):
        lines += [fingerprint["note"], ""]
    lines.append(f"Fingerprint of all training data (sha256 over the files' bytes, in order): `{combined}`"
                 if combined else "No combined fingerprint: a file could not be read to hash it.")
    eval_files = setting(config, "data.eval_files") or []
    if eval_files:
        held = f"Held-out records: {', '.join(_cell(f) for f in eval_files)}."
    else:
        fraction = setting(config, "data.eval_fraction")
        held = (f"Held-out records: a {fraction:g} share of the training records, chosen by a hash of the question "
                "text and never trained on." if fraction else "No records were held out.")
    if eval_files or setting(config, "data.eval_fraction"):
        held += f" At most {setting(config, 'data.max_eval_queries', 1000):,} distinct questions are evaluated."
    fields = (f"Fields: query `{setting(config, 'data.query_field', 'question')}`, "
              f"positive `{setting(config, 'data.positive_field', 'answer')}`")
    for key, what in (("negatives_field", "hard negatives"), ("label_field", "label"),
                      ("scores_field", "a teacher's scores")):
        if setting(config, f"data.{key}"):
            fields += f", {what} `{setting(config, f'data.{key}')}`"
    lines += ["", f"- {fields}.", f"- {held}"]
    if num_examples is not None:
        lines.append(f"- Training pairs seen (all epochs): {num_examples:,}.")
    return "\n".join(lines)


def _settings_table(config: dict[str, Any], steps: int | None, duration_s: float | None,
                    precision: str | None) -> str:
    loss = setting(config, "loss.name", "?")
    details = []
    if setting(config, "loss.name", "").startswith(("MultipleNegatives", "CachedMultipleNegatives")):
        details.append(f"scale {setting(config, 'loss.scale')}")
        if setting(config, "loss.symmetric"):
            details.append("symmetric")
    if setting(config, "loss.margin") is not None:
        details.append(f"margin {setting(config, 'loss.margin')}")
    if setting(config, "loss.matryoshka_dims"):
        details.append(f"Matryoshka dims {setting(config, 'loss.matryoshka_dims')}")
    if distill := setting(config, "loss.distill"):  # the ranking loss + weight x a distillation term
        loss = f"{loss} + {setting(config, 'loss.distill_weight', 1.0):g} x {distill}"
    if "DistillKLDivLoss" in (distill, setting(config, "loss.name")):
        details.append(f"temperature {setting(config, 'loss.temperature', 1.0):g}")
    accumulation = setting(config, "train.gradient_accumulation_steps", 1)
    max_steps = setting(config, "train.max_steps")
    precision = precision or setting(config, "train.mixed_precision")
    rows = [
        ("loss", f"{loss}" + (f" ({', '.join(details)})" if details else "")),
        ("batch size", f"{setting(config, 'train.batch_size')} pairs per step"
                       + (f" ({accumulation} accumulation steps)" if accumulation and accumulation > 1 else "")),
        ("learning rate", f"{setting(config, 'train.learning_rate')}, {setting(config, 'train.scheduler')} schedule, "
                          f"warmup ratio {setting(config, 'train.warmup_ratio')}, weight decay "
                          f"{setting(config, 'train.weight_decay')}"),
        ("epochs / steps", f"max_steps {max_steps}" if max_steps else f"{setting(config, 'train.epochs')} epoch(s)"),
        ("steps trained", "" if steps is None else f"{steps:,}"),
        ("max tokens", f"query {setting(config, 'data.query_max_length')}, "
                       f"document {setting(config, 'data.document_max_length')}"),
        ("mixed precision", precision or "as set by accelerate launch (none by default)"),
        ("gradient clipping", setting(config, "train.max_grad_norm") or "off"),
        ("seed", setting(config, "train.seed")),
        ("duration", "" if duration_s is None else _duration(duration_s)),
    ]
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "")]
    return "\n".join(lines)


def _logs_section(config: dict[str, Any], wandb_url: str | None) -> str:
    output_dir = setting(config, "output_dir")
    where = f" `{output_dir}`" if output_dir else ""
    local = (f"The run's output folder{where} holds `training_metrics.jsonl` (every logged step), "
             "`training_progress.json`, `config.yaml` and `logs/train.log`; `embedtune report "
             f"{output_dir or 'OUTPUT_DIR'}` draws plots from them.")
    if wandb_url:
        return f"W&B run: [{wandb_url}]({wandb_url})\n\n{local}"
    return (f"No W&B run online for this model. {local} An offline W&B run, if any, is in its `wandb/` "
            "folder (`wandb sync` uploads it).")


def _origin_line(origin: CheckpointOrigin, best_metric: str | None) -> str:
    """What the card says of a model exported from a checkpoint."""
    line = (f"- **From a checkpoint:** the weights of step {origin.step:,}, exported from `{origin.name}` with "
            "`embedtune export`")
    if origin.completed and origin.run_step is not None:
        line += f"; the run went on to step {origin.run_step:,} and finished" if origin.run_step > origin.step \
            else "; its last step (the run finished there)"
    elif origin.completed is False:
        line += "; the run had not finished at export"
    if best_metric and origin.score is not None:
        line += f"; held-out {best_metric} {origin.score:.4f} at this step"
        if origin.best:
            line += (f", the best of the {origin.scored} checkpoints the run scored (chosen on the held-out set whose "
                     "metrics are shown below, so they lean optimistic)")
    return line


def _merge_line(merge: dict[str, Any]) -> str:
    """What export.merge_with_base did, for the card's model facts."""
    line = (f"- **Merged with the base model:** {merge['share']:g} of the fine-tuned weights, "
            f"{1 - merge['share']:g} of the base model's")
    if merge.get("held_out"):
        figures = ", ".join(f"{float(s):g}: {v:.4f}" for s, v in merge["held_out"].items())
        line += f" (chosen on held-out {merge.get('metric', 'nDCG')}, by share: {figures}"
        if merge.get("general"):
            line += "; on the general set: " + ", ".join(f"{float(s):g}: {v:.4f}" for s, v in merge["general"].items())
        line += ")"
    return line


def _evaluation(config: dict[str, Any], before: dict[str, float] | None, after: dict[str, float] | None,
                change: dict[str, float] | None, origin: CheckpointOrigin | None = None) -> str:
    """The card's evaluation section: the before / after table and nDCG's paired change."""
    if not (after or before):
        return "No held-out evaluation was run."
    k = setting(config, "eval.k", 10)
    compared = "Before is the base model, after the fine-tuned one, on the same questions."
    if origin is not None:
        compared = (f"Before is the base model, after this checkpoint's weights as the run evaluated them at step "
                    f"{origin.step:,}, on the same questions." if after else "Before is the base model; the run "
                    f"logged no held-out evaluation at step {origin.step:,}, so there is no after.")
    text = ("Retrieval on the held-out questions: each one ranks the corpus of all held-out answers, and "
            f"a metric@k looks at the top k (eval.k = {k}). {compared}\n\n" + eval_table(before, after))
    if change:
        text += "\n\n" + describe_change(f"nDCG@{k}", change) + (
            ". The interval is a paired bootstrap over the held-out questions: where it excludes 0, the "
            "change is unlikely to be chance.")
    return text


def render_card(model_dir: str, *, base_model: str, config: dict[str, Any], fingerprint: dict[str, Any],
                eval_before: dict[str, float] | None, eval_after: dict[str, float] | None,
                wandb_url: str | None, num_examples: int | None, steps: int | None,
                duration_s: float | None, embedding_dim: int | None = None, precision: str | None = None,
                final_step: int | None = None, eval_change: dict[str, float] | None = None,
                merge: dict[str, Any] | None = None, train_pairs: int | None = None,
                origin: CheckpointOrigin | None = None) -> str:
    """The card's text (see ``write_model_card``)."""
    config = scrub_config(config)
    hub = hub_name(base_model)
    facts = folder_facts(model_dir)
    pooling = facts.get("pooling") or setting(config, "model.pooling") or "?"
    normalize = facts.get("normalize")
    if normalize is None:
        normalize = setting(config, "model.normalize")
    dim = embedding_dim or facts.get("dim")
    prompts = facts.get("prompts") or {k: v for k, v in (("query", setting(config, "data.query_prefix")),
                                                       ("document", setting(config, "data.document_prefix"))) if v}
    max_seq = facts.get("max_seq_length") or max(setting(config, "data.query_max_length") or 0,
                                                 setting(config, "data.document_max_length") or 0) or None
    title = setting(config, "tracking.run_name") or os.path.basename(
        os.path.normpath(setting(config, "output_dir") or model_dir)) or "embedtune model"
    if origin is not None:
        title += f" (step {origin.step:,})"
    base_shown = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{base_model}` (a local folder)"

    model_lines = [f"- **Base model:** {base_shown}", f"- **Pooling:** {pooling}",
                   f"- **Normalized embeddings:** {'yes (cosine similarity = dot product)' if normalize else 'no'}"
                   if normalize is not None else "- **Normalized embeddings:** the base model's setting"]
    if dim:
        model_lines.append(f"- **Embedding dimension:** {dim}")
    if max_seq:
        model_lines.append(f"- **Maximum sequence length:** {max_seq} tokens")
    model_lines.append(f"- **Similarity:** {facts.get('similarity', 'cosine')}")
    if facts.get("modules"):
        model_lines.append(f"- **Modules:** {' -> '.join(facts['modules'])}")
    remote_code = bool(setting(config, "model.trust_remote_code"))
    if remote_code:
        model_lines.append("- **Remote code:** the base model's own code runs when it loads "
                           "(trained with `model.trust_remote_code=true`; load it with `trust_remote_code=True`)")
    best_metric = setting(config, "checkpoint.best_metric")
    if best_metric and final_step is not None:
        model_lines.append(f"- **Checkpoint:** the best by held-out {best_metric}, step {final_step:,}"
                           + (f" of {steps:,}" if steps else "") + " (chosen on the held-out set whose metrics "
                           "are shown below, so they lean optimistic)")
    if origin is not None:
        model_lines.append(_origin_line(origin, best_metric))
    if merge:
        model_lines.append(_merge_line(merge))
    lora = setting(config, "model.lora")
    if isinstance(lora, dict):
        kept = ("kept apart: this folder holds only the adapters and names the base model, which loading reads "
                "again (needs `peft`)" if lora.get("export") == "adapter"
                else "folded into the weights (a plain model: loading needs no `peft`)")
        targets = ", ".join(lora.get("target_modules") or []) or "the architecture's usual layers"
        model_lines.append(f"- **LoRA:** r={lora.get('r')}, alpha={lora.get('alpha')} on {targets}; adapters {kept}")
    if any(prompts.values()):
        model_lines.append("- **Prompts:** " + ", ".join(f"{k} {json.dumps(v)}" for k, v in prompts.items()))

    evaluation = _evaluation(config, eval_before, eval_after, eval_change, origin)

    body = f"""# {title}

A sentence-embedding model fine-tuned from {base_shown} on question/answer pairs with
embedtune {__version__}, for finding the answer to a question (semantic search, retrieval for RAG).

## Model

{chr(10).join(model_lines)}

## Usage

{_usage(model_dir, prompts, remote_code)}

## Training data

{_data_section(config, fingerprint, num_examples)}

## Evaluation

{evaluation}

## Training settings

{_settings_table(config, steps, duration_s, precision)}

## Full config

```yaml
{yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip()}
```

## Logs

{_logs_section(config, wandb_url)}
"""
    front = card_metadata(config, title=title, base_model=hub, eval_before=eval_before, eval_after=eval_after,
                          size=train_pairs)
    return scrub_text(f"---\n{front.to_yaml(original_order=FRONT_ORDER)}\n---\n\n{body}")


def write_model_card(model_dir: str, *, base_model: str, config: dict[str, Any], fingerprint: dict[str, Any],
                     eval_before: dict[str, float] | None, eval_after: dict[str, float] | None,
                     wandb_url: str | None, num_examples: int | None, steps: int | None,
                     duration_s: float | None, embedding_dim: int | None = None,
                     precision: str | None = None, final_step: int | None = None,
                     eval_change: dict[str, float] | None = None, merge: dict[str, Any] | None = None,
                     train_pairs: int | None = None, origin: CheckpointOrigin | None = None) -> str:
    """Write ``model_dir/README.md`` and return its path.

    Call it after the model is saved: sentence-transformers writes its own generic README.md
    on save, and this one replaces it. ``config`` is ``Config.to_dict()``; values under
    secret-looking keys are replaced before anything is written. ``embedding_dim`` and
    ``precision`` (what the run really used, e.g. ``accelerator.mixed_precision``) default to
    what the model folder and the config say. ``train_pairs`` (pairs in one epoch) becomes the
    ``dataset_size`` tag; ``origin``: the model is a checkpoint's (``embedtune export``).
    """
    text = render_card(model_dir, base_model=base_model, config=config, fingerprint=fingerprint,
                       eval_before=eval_before, eval_after=eval_after, wandb_url=wandb_url,
                       num_examples=num_examples, steps=steps, duration_s=duration_s, embedding_dim=embedding_dim,
                       precision=precision, final_step=final_step, eval_change=eval_change,
                       merge=merge, train_pairs=train_pairs, origin=origin)
    path = os.path.join(model_dir, CARD)
    write_atomic(path, text)
    return path


def write_run_card(output_dir: str, model_dir: str | None = None) -> str:
    """The card of a finished run, from its own files (``config.yaml``, ``training_progress.json``).

    For runs exported before cards existed, or to write the card again; ``model_dir`` defaults
    to ``output_dir/final_model``. The training files must still be where the config says.
    """
    with open(os.path.join(output_dir, "config.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    progress = read_json(os.path.join(output_dir, "training_progress.json")) or {}
    wandb = progress.get("wandb") or {}
    return write_model_card(
        model_dir or progress.get("final_model") or os.path.join(output_dir, FINAL_MODEL),
        base_model=setting(config, "model.base_model", ""), config=config,
        fingerprint=data_fingerprint(setting(config, "data.train_files") or []),
        eval_before=progress.get("eval_before"), eval_after=progress.get("eval_after"),
        wandb_url=wandb.get("url"), num_examples=progress.get("examples_seen"), steps=progress.get("step"),
        duration_s=progress.get("duration_s"), final_step=progress.get("final_step")
        if setting(config, "checkpoint.best_metric") else None, eval_change=progress.get("eval_change"),
        merge=progress.get("merge"), train_pairs=progress_pairs(progress, config))


def progress_pairs(progress: dict[str, Any], config: dict[str, Any]) -> int | None:
    """Training pairs in one epoch, as a run's training_progress.json tells: its ``train_pairs``, or
    the pairs seen over the whole epochs of a finished run that trained by epochs."""
    if isinstance(progress.get("train_pairs"), int):
        return progress["train_pairs"]
    whole = progress.get("completed") and not progress.get("stopped_early") and not setting(config, "train.max_steps")
    return dataset_size(progress.get("examples_seen"), progress.get("epochs_completed")) if whole else None
