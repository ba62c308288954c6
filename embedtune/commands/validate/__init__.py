"""``embedtune validate``: check a training setup end to end without training.

It takes the arguments of ``embedtune train`` and answers, in one table, what a run would only
find out minutes or hours in: whether the environment can run the config (``environment``),
whether the config and the loss fit the data (``settings``), what the data holds (``data``:
bad records by file and line, duplicates, empty texts, token lengths against the configured
limits), how many steps the run has and whether its checkpoints fit on the disk (``plan``).
Every training file is streamed once. Exit status 0: nothing blocks a run (warnings allowed);
1: something does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict

from embedtune.commands.validate.checks import FAIL, WARN, Check, blocking, format_table, summary
from embedtune.commands.validate.data import DEFAULT_SAMPLE, data_section
from embedtune.commands.validate.environment import environment_checks, model_check
from embedtune.commands.validate.plan import plan_section
from embedtune.commands.validate.settings import config_checks, loss_check
from embedtune.config import Config, ConfigError, make_parser, parse_args, resolve_config_path
from embedtune.logs import scrub_console, write_report
from embedtune.losses.base import requires_negatives
from embedtune.secrets import scrub_config

logger = logging.getLogger(__name__)


def run_checks(cfg: Config, sample_size: int = DEFAULT_SAMPLE, free_bytes: int | None = None,
               source: str = "command line") -> list[Check]:
    """Every check for a parsed config. ``free_bytes`` replaces the free space measured at
    output_dir (tests, or planning for another disk)."""
    started = time.perf_counter()
    checks = environment_checks(cfg)
    model_row, model = model_check(cfg)
    checks.append(model_row)
    logger.info("environment checked in %.1f s", time.perf_counter() - started)

    loss_row, needs = loss_check(cfg)
    checks += config_checks(cfg, source, loss_row)
    # The data is parsed as the trainer parses it for this loss: a triplet loss makes a record
    # without a hard negative a bad record.
    data_rows, stats = data_section(cfg, sample_size, requires_negatives(needs), model)
    checks += data_rows
    checks += plan_section(cfg, stats.epoch_pairs if stats is not None else None, model, free_bytes)
    return checks


def _own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split off validate's own flags; the rest goes to the trainer's parser unchanged."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--json")
    own.add_argument("--sample", type=int, default=DEFAULT_SAMPLE)
    return own.parse_known_args(argv)


def _parser(prog: str) -> argparse.ArgumentParser:
    """The trainer's parser with validate's flags added: --help lists both, and a usage error
    is reported the way `embedtune train` reports it."""
    parser = make_parser(prog)
    parser.description = ("Check a training setup without training: environment, config, data, steps and "
                          "disk. Takes the arguments of `embedtune train`.")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                        help=f"records whose token lengths are measured (default {DEFAULT_SAMPLE}; 0: none)")
    return parser


def main(argv: list[str] | None = None, prog: str = "embedtune validate") -> int:
    scrub_console()  # main is also called without the embedtune command (from Python, tests)
    argv = sys.argv[1:] if argv is None else list(argv)
    started = time.perf_counter()
    parser = _parser(prog)
    args = parser.parse_intermixed_args(argv)
    if args.sample < 0:
        parser.error("--sample must be 0 or more")
    _, train_argv = _own_flags(argv)

    cfg = None
    source = "command line"
    try:
        if args.config:
            source = str(resolve_config_path(args.config))
        cfg = parse_args(train_argv, prog=prog)
    except ConfigError as exc:
        # A config that does not parse is a row of its own; the environment is still checked.
        checks = environment_checks(None)
        checks.append(Check("config", "config", FAIL, str(exc)))
    else:
        checks = run_checks(cfg, args.sample, source=source)
    seconds = time.perf_counter() - started
    print(format_table(checks))
    print()
    print(summary(checks, seconds))
    code = 1 if blocking(checks) else 0
    if args.json:
        write_report(args.json, {
            "ok": code == 0, "exit_code": code, "seconds": round(seconds, 2),
            "blocking": sum(c.status == FAIL for c in checks), "warnings": sum(c.status == WARN for c in checks),
            "config": scrub_config(cfg.to_dict()) if cfg else None, "checks": [asdict(c) for c in checks]})
    return code

