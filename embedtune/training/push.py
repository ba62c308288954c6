"""export.push_to_hub: the trained model to a Hugging Face Hub repository, retried, never fatal.

The local output is the source of truth. A push that keeps failing ends in one WARNING line that
says where the model is and how to push it by hand; training is never stopped by the network.
With ``every_save`` each checkpoint's model is written as a sentence-transformers folder and
pushed by one background thread, so the loop does not wait on the upload.

The token is huggingface_hub's own (HF_TOKEN, or the login cache of ``hf auth login``). It is
passed to the client and nowhere else, and taken out of every error text before it is shown:
the scrubbing of the logs only knows the environment's secrets, not the login cache's.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from accelerate import Accelerator
from huggingface_hub import HfApi, constants, get_token

from embedtune.config import Config, PushToHubSection
from embedtune.files import remove_path
from embedtune.model.folder import hub_offline, one_line
from embedtune.model.lora import name_the_base
from embedtune.secrets import REDACTED, scrub_text
from embedtune.training.export import RunFacts, write_model_folder

logger = logging.getLogger("embedtune")

MAIN = "main"
UPLOADS = "hub_upload"  # in output_dir: checkpoint models waiting for their push
BACKOFF_S = 2.0  # the wait before the first retry, doubled for each one after it
MAX_WAIT_S = 60.0
# Errors a retry cannot mend: the request itself, the token or its rights. Timeouts, conflicts,
# rate limits and the server's own errors are tried again.
RETRIED_4XX = (408, 409, 425, 429)


@dataclass
class PushResult:
    """What became of one push; ``error`` is one line without the token."""

    arrived: bool
    repo_id: str
    branch: str
    message: str
    attempts: int
    commit_url: str | None = None
    oid: str | None = None
    error: str | None = None
    seconds: float = 0.0


def push_problem(cfg: Config) -> str | None:
    """Why export.push_to_hub could not work, checked before any training (one line), or None."""
    hub = cfg.export.push_to_hub
    if hub is None:
        return None
    if hub_offline() or constants.is_offline_mode():
        return ("export.push_to_hub is set but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on, so nothing can reach "
                "the Hub: unset it for this run (a base model that is not a local folder is then looked up on the "
                "Hub), or set export.push_to_hub=null to keep the model local")
    try:
        token = get_token()
    except Exception as exc:  # an OIDC exchange that failed, an unreadable login cache
        return (f"export.push_to_hub: the Hugging Face token could not be read ({type(exc).__name__}): set HF_TOKEN "
                "or run `hf auth login`, or set export.push_to_hub=null to keep the model local")
    if not token:
        return ("export.push_to_hub needs a Hugging Face token with write access and none was found: set HF_TOKEN or "
                "run `hf auth login`, or set export.push_to_hub=null to keep the model local")
    lora = cfg.model.lora
    if hub.every_save and lora and lora.export == "merged":
        return ("export.push_to_hub.every_save with model.lora.export=merged would fold the adapters into the "
                "weights in the middle of training: set model.lora.export=adapter to push each checkpoint's "
                "adapters, or every_save=false to push the final model only")
    return None


def _reason(exc: Exception, token: str | None) -> str:
    """The error on one line, without the token (taken out before the line is cut, not a piece of it left)."""
    text = scrub_text(f"{type(exc).__name__}: {exc}")
    return one_line(text.replace(token, REDACTED) if token and len(token) >= 4 else text)


def _retried(exc: Exception) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in RETRIED_4XX)


def push_folder(folder: str, hub: PushToHubSection, branch: str, message: str, what: str,
                then: str = "") -> PushResult:
    """Push the sentence-transformers ``folder`` to ``branch`` of the repository (made private or
    not as configured when missing; the branch made from main when missing) as one commit, tried
    ``hub.retries`` more times with a doubling wait. Never raises: a push that did not arrive is
    logged as one WARNING line, ending with ``then`` (what the user can do). ``what`` names the
    model in the log ("the final model")."""
    started, token = time.perf_counter(), None
    error, attempts = "", 0
    for attempt in range(hub.retries + 1):
        attempts = attempt + 1
        try:
            token = get_token()
            api = HfApi(token=token)
            repo_id = api.create_repo(hub.repo_id, private=hub.private, exist_ok=True).repo_id
            if branch != MAIN:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch, commit_message=message)
            logger.info("pushed %s to %s (branch %s): %s", what, repo_id, branch, info.commit_url)
            return PushResult(True, repo_id, branch, message, attempts, info.commit_url, info.oid,
                              seconds=time.perf_counter() - started)
        except Exception as exc:  # the client's errors are many (HTTP, connection, a refused README)
            error = _reason(exc, token)
            if attempt == hub.retries or not _retried(exc):
                break
            wait = min(BACKOFF_S * 2 ** attempt, MAX_WAIT_S)
            logger.info("push of %s to %s failed (attempt %d of %d): %s; trying again in %.0f s", what,
                        hub.repo_id, attempts, hub.retries + 1, error, wait)
            time.sleep(wait)
    logger.warning("export.push_to_hub: %s did not reach %s (branch %s) after %d attempt(s): %s%s", what,
                   hub.repo_id, branch, attempts, error, then)
    return PushResult(False, hub.repo_id, branch, message, attempts, error=error,
                      seconds=time.perf_counter() - started)


def commit_message(facts: RunFacts, k: int, checkpoint: bool = False) -> str:
    """e.g. "embedtune: final model, step 46, nDCG@10 0.9448 (base model 0.8987)"."""
    if checkpoint:
        text = f"embedtune: checkpoint, step {facts.steps}"
    elif facts.final_step is not None and facts.final_step != facts.steps:
        text = f"embedtune: final model, the best checkpoint (step {facts.final_step} of {facts.steps})"
    else:
        text = f"embedtune: final model, step {facts.steps}"
    key = f"ndcg@{k}"
    after = (facts.eval_after or {}).get(key)
    before = (facts.eval_before or {}).get(key)
    if after is not None:
        text += f", nDCG@{k} {after:.4f}" + (f" (base model {before:.4f})" if before is not None else "")
    if facts.merge:
        text += f", merged with the base model ({facts.merge['share']:g} fine-tuned)"
    return text


class BackgroundPush:
    """One thread pushing checkpoint models, one at a time. A push that is waiting when a newer
    one comes is dropped (its folder removed): only the latest weights matter online."""

    def __init__(self, push: Callable[[str, str, str], PushResult]) -> None:
        self._push = push  # (folder, message, what) -> result
        self._lock = threading.Lock()
        self._waiting: tuple[str, str, str] | None = None
        self._thread: threading.Thread | None = None
        self.last: PushResult | None = None

    def submit(self, folder: str, message: str, what: str) -> None:
        with self._lock:
            if self._waiting is not None:
                logger.info("the push of %s is dropped: %s replaces it", self._waiting[2], what)
                remove_path(self._waiting[0])
            self._waiting = (folder, message, what)
            if self._thread is None:
                # A daemon: a run that ends with an error does not wait for the network.
                self._thread = threading.Thread(target=self._run, name="embedtune-hub-push", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._waiting is None:
                    self._thread = None  # under the lock: a submit from now on starts a new thread
                    return
                folder, message, what = self._waiting
                self._waiting = None
            try:
                self.last = self._push(folder, message, what)
            finally:
                remove_path(folder)

    def wait(self) -> None:
        """Until the push in flight, and the one waiting, are done."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return
            thread.join()


class HubPush:
    """export.push_to_hub for one process of a run: the main one writes and pushes; the others
    take part in the collective gathering of the weights for a checkpoint's model."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        assert cfg.export.push_to_hub is not None
        self.cfg, self.hub, self.accelerator = cfg, cfg.export.push_to_hub, accelerator
        self.uploads = os.path.join(cfg.output_dir, UPLOADS)
        self.background = BackgroundPush(self._push_checkpoint)
        if accelerator.is_main_process:  # the output lock is held: these are leftovers of a killed run
            remove_path(self.uploads)

    def _push_checkpoint(self, folder: str, message: str, what: str) -> PushResult:
        return push_folder(folder, self.hub, self.hub.checkpoint_branch, message, what,
                           "; training goes on, and the next save pushes again")

    def checkpoint(self, model: Any, tokenizer: Any, facts: RunFacts, duration: Callable[[], float]) -> None:
        """every_save: this step's model, written as a sentence-transformers folder (collective:
        sharded weights are gathered on the main process), then pushed in the background."""
        if not self.hub.every_save:
            return
        accelerator = self.accelerator
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return
        folder = os.path.join(self.uploads, f"step-{facts.steps:08d}")
        try:
            remove_path(folder)
            os.makedirs(self.uploads, exist_ok=True)
            unwrapped = accelerator.unwrap_model(model)
            if self.cfg.model.lora and unwrapped.folder is not None:  # adapters: their config names the base
                name_the_base(unwrapped.encoder, unwrapped.folder)
            # The card's usage example names the repository, where this copy is going.
            write_model_folder(folder, self.hub.repo_id, unwrapped, tokenizer, state, self.cfg, facts, duration,
                   accelerator.mixed_precision)
        except Exception as exc:  # a full disk, say: the checkpoint itself is saved, training goes on
            remove_path(folder)
            logger.warning("export.push_to_hub.every_save: the model of step %d could not be written for its push "
                           "(%s: %s); training goes on", facts.steps, type(exc).__name__, one_line(exc))
            return
        self.background.submit(folder, commit_message(facts, self.cfg.eval.k, checkpoint=True),
                               f"the model of step {facts.steps}")

    def finish(self, final_dir: str | None, facts: RunFacts | None) -> dict[str, Any] | None:
        """Wait for the checkpoint push in flight, then push ``final_dir`` (when the run completed);
        what arrived, for training_progress.json. Main process only."""
        if not self.accelerator.is_main_process:
            return None
        self.background.wait()
        remove_path(self.uploads)
        report: dict[str, Any] = {"repo_id": self.hub.repo_id, "private": self.hub.private}
        if self.background.last is not None:
            report["last_checkpoint"] = asdict(self.background.last)
        if final_dir is not None and facts is not None:
            branch = self.hub.revision or MAIN
            by_hand = (f". The model is complete in {final_dir}; push it yourself with: hf upload {self.hub.repo_id} "
                       f"{shlex.quote(final_dir)} --revision {branch}" + (" --private" if self.hub.private else ""))
            result = push_folder(final_dir, self.hub, branch, commit_message(facts, self.cfg.eval.k),
                                 "the final model", by_hand)
            report["final"] = asdict(result)
        return report
