"""Which config changes a resume allows: the ones that keep the data order and the model's meaning."""

from __future__ import annotations

from typing import Any

from embedtune.config import DEFAULT_MINING, IN_BATCH_LOSSES, Config, HardNegativesSection
from embedtune.secrets import scrub_config
from embedtune.training.state import CheckpointError

# Changing these makes the saved data position or weights mean something else: among them every
# setting that decides which records are training pairs (a record that turns bad, or good, when
# bad records are skipped moves every position after it).
RESUME_KEYS = (
    "model.base_model", "model.pooling", "model.normalize", "model.lora",
    "data.train_files", "data.format", "data.query_field", "data.positive_field", "data.negatives_field",
    "data.label_field", "data.prompt_field", "data.scores_field", "data.max_negatives", "data.shuffle",
    "data.shuffle_buffer", "data.group_by_length", "data.order", "data.block_records",
    "data.batch_by_source", "data.source_field", "data.source_weights", "data.eval_files",
    "data.eval_fraction", "data.drop_last", "data.max_record_bytes", "data.max_negatives_per_record",
    "train.batch_size", "train.gradient_accumulation_steps", "train.seed", "train.hard_negatives",
)


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _default(dotted: str) -> Any:
    """The default of a config key, e.g. ``data.group_by_length``."""
    section, key = dotted.split(".")
    model = Config.model_fields[section].annotation
    return model.model_fields[key].get_default(call_default_factory=True)  # type: ignore[union-attr]


def _mining_default(cfg: Config) -> Any:
    """train.hard_negatives as the config fills it in when not given (as stored in a checkpoint)."""
    if cfg.loss.name not in IN_BATCH_LOSSES:
        return None
    return HardNegativesSection(**DEFAULT_MINING).model_dump(mode="json")


def _absent(tree: dict[str, Any], dotted: str) -> bool:
    *sections, key = dotted.split(".")
    for part in sections:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return not isinstance(tree, dict) or key not in tree


def check_resume(saved: dict[str, Any], current: Config) -> list[str]:
    """Refuse changes that break an exact resume; return the harmless ones for the log.

    Both sides are compared as checkpoints store them, secrets scrubbed; a key the checkpoint
    does not have (it predates the key) counts as its default, which is how that run behaved.
    """
    saved, now = scrub_config(saved), scrub_config(current.to_dict())
    if _absent(saved, "train.hard_negatives") and _lookup(now, "train.hard_negatives") == _mining_default(current):
        # Runs before this key mined nothing; the default that mines now steps aside for them.
        current.train.hard_negatives = None
        now = scrub_config(current.to_dict())
    if _absent(saved, "model.layout_by_cost") and current.model.layout_by_cost:
        # Runs before this key laid batches out by the fixed rule (packed attention one call per
        # text on the CPU): they keep it, so their dropout masks, and so the run, continue exactly.
        current.model.layout_by_cost = False
        now = scrub_config(current.to_dict())
    breaking = []
    for key in RESUME_KEYS:
        if not _absent(saved, key):
            if _lookup(saved, key) != _lookup(now, key):
                breaking.append(f"{key}: {_lookup(saved, key)!r} -> {_lookup(now, key)!r}")
        elif _default(key) != _lookup(now, key):  # the run predates the key, so it ran as the default does
            breaking.append(f"{key}: {_default(key)!r} (the checkpoint predates this key) -> {_lookup(now, key)!r}")
    if breaking:
        raise CheckpointError("cannot resume: the config changed in ways that change the data order or the model:\n  "
                              + "\n  ".join(breaking)
                              + "\nRestore these values, or start a new run in another output_dir.")
    harmless = []
    for section, values in now.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not _absent(saved, f"{section}.{key}") and _lookup(saved, f"{section}.{key}") != value:
                    harmless.append(f"{section}.{key}: {_lookup(saved, f'{section}.{key}')!r} -> {value!r}")
    return harmless
