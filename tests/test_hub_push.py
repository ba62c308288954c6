"""export.push_to_hub against huggingface_hub's real client, its HTTP pointed at a fake Hub.

The fake Hub runs in the test on 127.0.0.1 and speaks just the endpoints an upload uses: create
a repository, create a branch, validate the card's metadata, preupload (which files go through
LFS), the LFS batch API with the basic transfer, the PUT of an object, and the commit. It keeps
every branch's files and every commit, so the tests can compare what arrived with the local
folder byte for byte. huggingface_hub would send large files through Xet when hf_xet is
installed; the tests turn that off (HF_HUB_DISABLE_XET), except for one that takes the Xet
client's pipeline with small files only, which it commits inline without Xet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from embedtune.commands.train import main
from embedtune.config import PushToHubSection
from embedtune.training import push as hub_module
from embedtune.training.push import BackgroundPush, PushResult, push_folder

TOKEN = "hf_fakeHubTokenForTests7c1e9a0b2f3c5d"
ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<ref>[^/?]+)")
AGENTS = "/api/agent-harnesses"
BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")


class FakeHub:
    """A Hub that keeps repositories in memory: {repo: {"visibility", "branches": {name: {path: bytes}}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.objects: dict[str, bytes] = {}  # LFS objects by sha256
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.unknown: list[str] = []
        self.lfs = True  # preupload sends .safetensors through LFS, as the Hub does; False: everything inline
        self.fail_commits = 0  # the next n commits fail (-1: all of them)
        self.fail_status = 500
        self.echo_token = False  # a failure's message repeats the Authorization header it got
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo: str, branch: str) -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def do_PUT(self) -> None:
                fake.handle(self, "PUT")

            def do_GET(self) -> None:
                fake.handle(self, "GET")

        return Handler

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        body = read_body(request)
        path = request.path.split("?")[0]
        auth = request.headers.get("Authorization")
        with self.lock:
            self.requests.append((method, path, auth))
            if method == "PUT" and path.startswith("/lfs-upload/"):
                status, reply = self.store(path.rsplit("/", 1)[1], body)
            elif method == "GET" and path == AGENTS:  # the client's own user-agent lookup, without the token
                status, reply = 200, {"standardEnvVars": [], "harnesses": {}}
            elif auth != f"Bearer {TOKEN}":
                status, reply = 401, {"error": "Invalid credentials in Authorization header"}
            else:
                status, reply = self.route(method, path, body, auth)
        data = json.dumps(reply).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def route(self, method: str, path: str, body: bytes, auth: str) -> tuple[int, Any]:
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and (match := BATCH.match(path)):
            return self.batch(json.loads(body))
        if method == "POST" and (match := ROUTE.match(path)):
            repo, op, ref = match["repo"], match["op"], match["ref"]
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if op == "branch":
                return self.create_branch(repo, ref, json.loads(body or b"{}"))
            if op == "preupload":
                return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                        "uploadMode": "lfs" if self.lfs and f["path"].endswith(".safetensors")
                                        else "regular"} for f in json.loads(body)["files"]]}
            if self.fail_commits:
                self.fail_commits -= 1 if self.fail_commits > 0 else 0
                self.commits.append({"repo": repo, "branch": ref, "failed": True})
                return self.fail_status, {"error": "the commit failed" + (f" for {auth}" if self.echo_token else "")}
            return self.commit(repo, ref, body)
        self.unknown.append(f"{method} {path}")
        return 404, {"error": f"not a fake Hub endpoint: {path}"}

    def create_repo(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo = f"{payload['organization'] or 'tester'}/{payload['name']}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
        self.repos[repo] = {"visibility": payload.get("visibility"),
                            "branches": {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}}
        return 200, {"url": f"{self.url}/{repo}"}

    def create_branch(self, repo: str, branch: str, payload: dict[str, Any]) -> tuple[int, Any]:
        branches = self.repos[repo]["branches"]
        if branch in branches:
            return 409, {"error": "Reference already exists"}
        branches[branch] = dict(branches[payload.get("startingPoint") or "main"])
        return 200, {}

    def batch(self, payload: dict[str, Any]) -> tuple[int, Any]:
        assert payload["operation"] == "upload" and "basic" in payload["transfers"]
        objects = [{"oid": o["oid"], "size": o["size"]} if o["oid"] in self.objects else
                   {"oid": o["oid"], "size": o["size"],
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                   for o in payload["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def store(self, oid: str, body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "the object's bytes do not match its sha256"}
        self.objects[oid] = body
        return 200, {}

    def commit(self, repo: str, branch: str, body: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = dict(self.repos[repo]["branches"].get(branch, {}))
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.objects:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.objects[value["oid"]]
        self.repos[repo]["branches"][branch] = files
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "branch": branch, "message": lines[0]["value"]["summary"], "oid": oid,
                             "lfs": [line["value"]["path"] for line in lines[1:] if line["key"] == "lfsFile"]})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while size := int(request.rfile.readline().split(b";")[0], 16):
            parts.append(request.rfile.read(size))
            request.rfile.readline()
        request.rfile.readline()
        return b"".join(parts)
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """The fake Hub, and huggingface_hub pointed at it: online, no Xet, the test's token, no wait between tries."""
    hub = FakeHub()
    # huggingface_hub reads these from the environment once, at import: set where it reads them now.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # Not this machine's login, nor its Hugging Face home.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agent_harnesses.json"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf_home" / "xet"))  # hf_xet's logs, read when it starts
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_module, "BACKOFF_S", 0.01)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def out_dir(args: list[str]) -> Path:
    return Path(args[args.index("--output_dir") + 1])


def quick(train_args: list[str], *extra: str) -> list[str]:
    return [*train_args, "tracking.report_to=none", *extra]


def test_the_final_model_arrives_whole_in_a_private_repository_with_an_informative_message(
        fake_hub: FakeHub, train_args: list[str]) -> None:
    assert main(quick(train_args, "export.push_to_hub.repo_id=tester/tiny-embedder")) == 0
    out = out_dir(train_args)
    local = local_files(out / "final_model")
    assert {"config.json", "model.safetensors", "modules.json", "README.md"} <= local.keys()

    repo = fake_hub.repos["tester/tiny-embedder"]
    assert repo["visibility"] == "private"  # the default
    remote = fake_hub.files("tester/tiny-embedder", "main")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local  # every file, every byte
    [commit] = fake_hub.commits
    assert commit["lfs"] == ["model.safetensors"]  # the weights through LFS, the small files inline

    progress = json.loads((out / "training_progress.json").read_text())
    after, before = progress["eval_after"]["ndcg@10"], progress["eval_before"]["ndcg@10"]
    assert commit["message"] == f"embedtune: final model, step 4, nDCG@10 {after:.4f} (base model {before:.4f})"
    final = progress["hub"]["final"]
    assert final["arrived"] is True and final["attempts"] == 1 and final["branch"] == "main"
    assert final["commit_url"] == f"{fake_hub.url}/tester/tiny-embedder/commit/{commit['oid']}"
    # The token went to the Hub's API only: not to the storage the weights are PUT to.
    for method, path, auth in fake_hub.requests:
        if path != AGENTS:
            assert auth == (None if method == "PUT" else f"Bearer {TOKEN}"), (method, path)
    assert not fake_hub.unknown


def test_every_save_pushes_each_checkpoint_to_its_branch_and_the_final_model_to_revision(
        fake_hub: FakeHub, train_args: list[str]) -> None:
    args = quick(train_args, "checkpoint.every_n_steps=2", "export.push_to_hub.repo_id=tester/tiny",
                 "export.push_to_hub.every_save=true", "export.push_to_hub.revision=release",
                 "export.push_to_hub.private=false")
    assert main(args) == 0
    out = out_dir(train_args)
    assert fake_hub.repos["tester/tiny"]["visibility"] == "public"
    assert [(c["branch"], c["message"].split(",")[:2]) for c in fake_hub.commits] == [
        ("last-checkpoint", ["embedtune: checkpoint", " step 2"]),
        ("last-checkpoint", ["embedtune: checkpoint", " step 4"]),
        ("release", ["embedtune: final model", " step 4"])]  # after the checkpoint push it waited for
    local = local_files(out / "final_model")
    assert {k: v for k, v in fake_hub.files("tester/tiny", "release").items() if k != ".gitattributes"} == local
    # The checkpoint of step 4 holds the final weights: the same files, but for the card, whose
    # usage example names the repository it was pushed to.
    branch = fake_hub.files("tester/tiny", "last-checkpoint")
    assert {k: v for k, v in branch.items() if k not in (".gitattributes", "README.md")} == {
        k: v for k, v in local.items() if k != "README.md"}
    assert 'SentenceTransformer("tester/tiny")' in branch["README.md"].decode()
    assert fake_hub.files("tester/tiny", "main").keys() == {".gitattributes"}
    assert not (out / "hub_upload").exists()  # the checkpoint models' folders are gone once pushed
    hub = json.loads((out / "training_progress.json").read_text())["hub"]
    assert hub["last_checkpoint"]["arrived"] and hub["last_checkpoint"]["branch"] == "last-checkpoint"


def test_a_push_that_fails_twice_arrives_on_the_third_try(fake_hub: FakeHub, tiny_model: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    fake_hub.fail_commits = 2
    hub = PushToHubSection(repo_id="tester/retried", retries=4)
    with caplog.at_level("INFO", logger="embedtune"):
        result = push_folder(str(tiny_model), hub, "main", "embedtune: a test", "the test model")
    assert result.arrived and result.attempts == 3
    assert [c.get("failed", False) for c in fake_hub.commits] == [True, True, False]
    remote = fake_hub.files("tester/retried", "main")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local_files(tiny_model)
    assert len([r for r in caplog.records if "trying again" in r.message]) == 2
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_refused_token_is_not_tried_again(fake_hub: FakeHub, tiny_model: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    fake_hub.fail_commits, fake_hub.fail_status = -1, 403
    result = push_folder(str(tiny_model), PushToHubSection(repo_id="tester/refused"), "main", "m", "the test model")
    assert not result.arrived and result.attempts == 1 and "403" in (result.error or "")
    assert [r.levelname for r in caplog.records if "did not reach" in r.message] == ["WARNING"]


def test_without_xet_disabled_small_files_go_through_the_xet_client_pipeline_inline(
        fake_hub: FakeHub, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client's default path when hf_xet is installed; with every file "regular", no Xet storage is needed.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    fake_hub.lfs = False
    # A name without an owner: the repository goes to the token's user, as the Hub names it.
    result = push_folder(str(tiny_model), PushToHubSection(repo_id="inline"), "main", "m", "the test model")
    assert result.arrived and result.repo_id == "tester/inline"
    remote = fake_hub.files("tester/inline", "main")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local_files(tiny_model)


def test_a_hub_that_always_fails_leaves_the_local_model_and_one_warning(
        fake_hub: FakeHub, train_args: list[str]) -> None:
    fake_hub.fail_commits = -1
    args = quick(train_args, "export.push_to_hub.repo_id=tester/down", "export.push_to_hub.retries=2")
    assert main(args) == 0  # training finished
    out = out_dir(train_args)
    assert (out / "final_model" / "model.safetensors").is_file()
    assert len([c for c in fake_hub.commits if c.get("failed")]) == 3 and fake_hub.commits[-1]["failed"]
    warnings = [line for line in (out / "logs" / "train.log").read_text().splitlines() if " WARNING " in line]
    [warning] = [line for line in warnings if "push_to_hub" in line]
    assert "the final model did not reach tester/down (branch main) after 3 attempt(s)" in warning
    assert f"hf upload tester/down {out / 'final_model'} --revision main --private" in warning
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] is True and progress["hub"]["final"]["arrived"] is False


def test_with_lora_adapters_every_save_pushes_each_checkpoint_s_adapters(
        fake_hub: FakeHub, train_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import version

    from transformers.integrations import peft as transformers_peft

    # transformers asks for a newer peft than is published before it reads an adapter folder, though
    # its loader works with the installed one (as in test_lora): the gate is set to the installed peft.
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", version("peft"))
    args = quick(train_args, "model.lora.r=4", "model.lora.alpha=8", "model.lora.export=adapter",
                 "checkpoint.every_n_steps=2", "export.push_to_hub.repo_id=tester/adapters",
                 "export.push_to_hub.every_save=true")
    assert main(args) == 0
    local = local_files(out_dir(train_args) / "final_model")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= local.keys()
    assert {k: v for k, v in fake_hub.files("tester/adapters", "main").items() if k != ".gitattributes"} == local
    branch = fake_hub.files("tester/adapters", "last-checkpoint")
    assert {k: v for k, v in branch.items() if k not in (".gitattributes", "README.md")} == {
        k: v for k, v in local.items() if k != "README.md"}  # step 4's adapters are the final ones


@pytest.mark.parametrize("setting", ["no token", "offline", "lora merged"])
def test_a_push_that_cannot_work_is_one_clear_line_before_training(
        fake_hub: FakeHub, train_args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        setting: str) -> None:
    if setting == "no token":
        monkeypatch.delenv("HF_TOKEN")
        expected = "error: export.push_to_hub needs a Hugging Face token with write access and none was found: " \
                   "set HF_TOKEN or run `hf auth login`"
    elif setting == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = "error: export.push_to_hub is set but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on"
    else:
        train_args = [*train_args, "model.lora.r=4", "export.push_to_hub.every_save=true"]
        expected = "error: export.push_to_hub.every_save with model.lora.export=merged would fold the adapters"
    monkeypatch.setattr(logging.getLogger("embedtune"), "handlers", [])  # as in a new process: no run logged yet
    started = time.perf_counter()
    assert main(quick(train_args, "export.push_to_hub.repo_id=tester/never")) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (out_dir(train_args) / "final_model").exists() and not (out_dir(train_args) / "checkpoints").exists()
    assert not fake_hub.requests and time.perf_counter() - started < 10


def test_the_token_from_the_login_cache_never_reaches_the_run_s_files_logs_or_wandb(
        fake_hub: FakeHub, train_args: list[str], capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    # From `hf auth login`'s file, not the environment: the logs' scrubbing of environment secrets
    # cannot catch it. The Hub's first error message even repeats it.
    monkeypatch.delenv("HF_TOKEN")
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    fake_hub.fail_commits, fake_hub.echo_token = 1, True
    args = [*train_args, "checkpoint.every_n_steps=2", "export.push_to_hub.repo_id=tester/secret",
            "export.push_to_hub.every_save=true"]  # W&B on, offline: its files are under output_dir
    assert main(args) == 0
    out = out_dir(train_args)
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)  # it was used
    assert fake_hub.commits[0]["failed"] and len(fake_hub.commits) == 4  # one failure, two checkpoints, the final
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and (out / "logs" / "train.log").is_file()
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert "the commit failed for Bearer <redacted>" in (out / "logs" / "train.log").read_text()


def test_a_newer_checkpoint_replaces_the_one_waiting_and_the_wait_covers_both(tmp_path: Path) -> None:
    taken, release, pushed = threading.Event(), threading.Event(), []

    def push(folder: str, message: str, what: str) -> PushResult:
        taken.set()
        release.wait(10)
        pushed.append(message)
        return PushResult(True, "tester/x", "last-checkpoint", message, 1)

    background = BackgroundPush(push)
    folders = []
    for step in (2, 4, 6):
        folders.append(tmp_path / f"step-{step}")
        folders[-1].mkdir()
        background.submit(str(folders[-1]), f"step {step}", f"the model of step {step}")
        assert taken.wait(10)  # step 2 is in flight before step 4 comes
    release.set()
    background.wait()
    assert pushed == ["step 2", "step 6"]  # step 4 waited, and step 6 took its place
    assert background.last is not None and background.last.message == "step 6"
    assert not any(folder.exists() for folder in folders)  # pushed or dropped, each folder is removed
