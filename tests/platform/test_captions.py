"""tvr_platform.captions: the OpenAI-compatible backend against a local HTTP server that speaks the
chat-completions API (malformed replies, 429, 5xx, 4xx, budget, the key never leaking), run_csi with
MLflow, the CLI hook, and resumable corpus captioning (Ray Data; marked slow)."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from tvr.captioning import Candidate, Example, VideoSample
from tvr_platform.captions.config import CaptionsCfg
from tvr_platform.captions.openai_backend import (
    BudgetExhausted,
    ChatClient,
    LLMError,
    LocalBudget,
    OpenAICaptioner,
    OpenAIPromptEngineer,
)
from tvr_platform.config import ConfigError, load_job

KEY = "sk-test-SECRET-0123456789abcdef"
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def ok(content, prompt_tokens=100, completion_tokens=20):
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}}, {}


class FakeChatServer:
    """chat.completions on 127.0.0.1 (a real HTTP server in a thread): replies come from a script,
    else from ``responder(body)``, else a default; requests, their start times and the most
    requests ever in flight at once are recorded. A script entry may carry a 4th item: seconds to
    wait before answering (a slow server, for timeouts)."""

    def __init__(self):
        self.script: list[tuple] = []
        self.responder = None
        self.delay = 0.0
        self.requests: list[dict] = []
        self.starts: list[float] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    server.starts.append(time.monotonic())
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    entry = server.script.pop(0) if server.script else None
                try:
                    if entry is None:
                        entry = server.responder(body) if server.responder else ok('["default caption"]')
                    status, payload, headers = entry[:3]
                    time.sleep(entry[3] if len(entry) > 3 else server.delay)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass                                  # the client timed out and went away
                finally:
                    with server.lock:
                        server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TVR_TEST_LLM_KEY", KEY)
    s = FakeChatServer()
    yield s
    s.close()


@pytest.fixture
def sleeps():
    return []


def client(server, sleeps, **kw):
    kw.setdefault("max_retries", 3)
    return ChatClient(base_url=server.url, model="test-vlm", api_key_env="TVR_TEST_LLM_KEY", timeout=10,
                      backoff_base=0.5, backoff_max=4.0, sleep=sleeps.append, **kw)


def frames(b=2, t=5, seed=0):
    return torch.randn(b, t, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- config ---------------------------------------------------------------------------------------
def test_captions_config_validation_and_overrides(tmp_path):
    job = load_job(None, [f"run.work_dir={tmp_path}", "captions.max_rounds=2", "captions.backend=openai",
                          "captions.api_key_env=MY_KEY", "captions.splits=[train]"])
    assert (job.captions.max_rounds, job.captions.backend, job.captions.splits) == (2, "openai", ["train"])
    assert job.captions.captions_per_video == 10 and job.captions.max_caption_tokens == 70
    paper = CaptionsCfg()                           # the paper's stop rule, a ~400-iteration budget
    assert (paper.patience, paper.max_rounds, paper.candidates_per_round) == (1, 400, 1)
    with pytest.raises(ConfigError, match="api_key_env"):
        load_job(None, ["captions.api_key_env=sk-abc=def"])
    for bad in ({"backend": "gpt"}, {"max_caption_tokens": 100}, {"output_name": "../x"},
                {"api_base_url": "ftp://x"}, {"cost_budget": 1.0}, {"patience": 0}, {"requests_in_flight": 0},
                {"requests_per_minute": -1}, {"candidates_per_round": 0}):
        with pytest.raises(ValueError):
            CaptionsCfg(**bad)


# -- the OpenAI-compatible backend ------------------------------------------------------------------
def test_captioner_sends_images_and_parses_captions(server, sleeps):
    server.script = [ok('```json\n["a man walks a dog", "a dog on a leash"]\n```'),
                     ok('{"captions": ["a red car", "a car drives"]}')]
    c = client(server, sleeps)
    cap = OpenAICaptioner(c, mean=MEAN, std=STD, frames_per_request=3)
    out = cap.caption(frames(), "Describe the video.", 2)
    assert out == [["a man walks a dog", "a dog on a leash"], ["a red car", "a car drives"]]
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    assert req["body"]["model"] == "test-vlm"
    user = req["body"]["messages"][-1]["content"]
    assert user[0]["type"] == "text" and user[0]["text"].startswith("Describe the video.")
    images = [p for p in user if p["type"] == "image_url"]
    assert len(images) == 3 and all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in images)
    assert (c.usage.requests, c.usage.prompt_tokens, c.usage.completion_tokens) == (2, 200, 40)


def test_retries_429_and_5xx_with_backoff_then_succeeds(server, sleeps):
    server.script = [(429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}),
                     (500, {"error": {"message": "boom"}}, {}),
                     (503, "<html>unavailable</html>", {}),
                     ok('["finally a caption", "and another"]')]
    c = client(server, sleeps)
    out = OpenAICaptioner(c, mean=MEAN, std=STD).caption(frames(b=1), "p", 5)
    assert out == [["finally a caption", "and another"]]
    assert c.usage.retries == 3 and c.usage.failed == 0 and len(server.requests) == 4
    assert len(sleeps) == 3 and sleeps[0] >= 3.0                        # Retry-After honoured
    assert 0.5 <= sleeps[1] <= 2.0 and 1.0 <= sleeps[2] <= 4.0            # base · 2^n · U[0.5, 1]


def test_malformed_replies_are_retried_then_skipped_and_counted(server, sleeps):
    server.script = [ok(""), (200, "this is not json", {}), ok(None), ok("I'm sorry, I can't help."),
                     (200, {"choices": []}, {}), ok("[1, 2, 3]"), ok('["good one", "good two"]')]
    c = client(server, sleeps, max_retries=3)
    cap = OpenAICaptioner(c, mean=MEAN, std=STD)
    out = cap.caption(frames(b=2), "p", 3)
    assert out[0] == []                                                 # 4 malformed tries: skipped
    assert out[1] == ["good one", "good two"]                            # 2 malformed, then good
    assert c.usage.failed == 1 and c.usage.malformed == 6 and c.usage.requests == 7


def test_client_errors_fail_fast_and_the_key_never_leaks(server, sleeps, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "tvr_platform"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    server.script = [(500, {"error": {"message": f"internal, key was {KEY}"}}, {}),
                     (401, {"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}},
                      {})]
    c = client(server, sleeps)
    with pytest.raises(LLMError) as info:
        c.complete([{"role": "user", "content": "hi"}], validate=lambda t: t)
    err = info.value
    assert "401" in str(err) and "***" in str(err) and KEY not in str(err)
    assert err.__cause__ is None and err.__context__ is None
    assert "HTTP 500" in caplog.text and "openai._base_client" in caplog.text   # the logs were captured
    assert KEY not in repr(c) and KEY not in caplog.text and len(server.requests) == 2
    with pytest.raises(TypeError):
        pickle.dumps(c)
    with pytest.raises(LLMError, match="NOT_SET_ANYWHERE") as missing:
        ChatClient(base_url=server.url, model="m", api_key_env="NOT_SET_ANYWHERE")
    assert KEY not in str(missing.value)


def test_budget_stops_new_requests(server, sleeps):
    server.script = [ok('["one", "two"]', 600, 100), ok('["three", "four"]', 600, 100)]
    budget = LocalBudget(token_budget=1000)
    c = client(server, sleeps, budget=budget)
    cap = OpenAICaptioner(c, mean=MEAN, std=STD)
    out = cap.caption(frames(b=3), "p", 2)
    assert out == [["one", "two"], ["three", "four"], []]
    assert cap.exhausted and budget.exhausted() and len(server.requests) == 2
    cost = LocalBudget(cost_budget=0.001, price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    cost.spend(500, 200)
    assert cost.cost == pytest.approx((500 * 1.0 + 200 * 2.0) / 1e6) and not cost.exhausted()
    cost.spend(100, 0)
    assert cost.exhausted()
    with pytest.raises(BudgetExhausted):
        client(server, sleeps, budget=cost).complete([{"role": "user", "content": "x"}], validate=lambda t: t)


def test_prompt_engineer_rewrites_with_examples_and_validates(server, sleeps):
    server.script = [ok("ok"), ok('New prompt: "Generate 10 captions that name the people, objects and actions."')]
    eng = OpenAIPromptEngineer(client(server, sleeps))
    ex = [Example("v1", ["a man cooks pasta"], ["a kitchen", "food"], 0.4, 0.2, 0.6)]
    hist = [Candidate("Generate 10 captions.", 0, 0.6), Candidate("Repeat.", 1)]
    out = eng.rewrite("Generate 10 captions.", ex, hist)
    assert out == "Generate 10 captions that name the people, objects and actions."
    text = server.requests[-1]["body"]["messages"][-1]["content"]
    assert "a man cooks pasta" in text and "a kitchen | food" in text and "[0.6000]" in text
    assert eng.client.usage.malformed == 1


def _image_tag(body) -> str:
    """A short tag of the first image of a captioning request (which video it is)."""
    import hashlib

    user = body["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in user if isinstance(p, dict) and p.get("type") == "image_url")
    return hashlib.sha256(url.encode()).hexdigest()[:8]


def test_requests_run_concurrently_within_the_limit_and_keep_video_order(server, sleeps):
    server.delay = 0.15
    server.responder = lambda body: ok(json.dumps([f"video {_image_tag(body)}", "second caption"]))
    c = client(server, sleeps)
    cap = OpenAICaptioner(c, mean=MEAN, std=STD, concurrency=3)
    fr = frames(b=7, seed=3)
    out = cap.caption(fr, "p", 2)
    assert server.max_inflight == 3 and len(server.requests) == 7        # 3 at once, never more
    import hashlib

    from tvr_platform.captions.openai_backend import frames_to_jpeg_urls
    for b in range(7):                                                   # answers land on their own video
        url = frames_to_jpeg_urls(fr[b], MEAN, STD, 4, 85)[0]
        assert out[b] == [f"video {hashlib.sha256(url.encode()).hexdigest()[:8]}", "second caption"]
    assert c.usage.requests == 7 and c.usage.prompt_tokens == 700


def test_rate_limit_spaces_request_starts(server, sleeps):
    from tvr_platform.captions.openai_backend import RateLimiter

    now, waits = [0.0], []
    rl = RateLimiter(120, clock=lambda: now[0], sleep=waits.append)     # one start every 0.5 s
    assert [rl.wait() for _ in range(3)] == [0.0, 0.5, 1.0] and waits == [0.5, 1.0]
    now[0] = 10.0
    assert rl.wait() == 0.0 and RateLimiter(0).wait() == 0.0             # idle long enough / no limit
    c = client(server, sleeps, rate_limiter=RateLimiter(600))            # real clock: >= 0.1 s apart
    OpenAICaptioner(c, mean=MEAN, std=STD, concurrency=4).caption(frames(b=4), "p", 1)
    assert len(server.starts) == 4 and server.starts[-1] - server.starts[0] >= 0.25   # 3 gaps of 0.1 s


def test_timeouts_are_retried(server, sleeps):
    server.script = [(*ok('["too late"]'), 2.5), ok('["in time", "also in time"]')]
    c = ChatClient(base_url=server.url, model="m", api_key_env="TVR_TEST_LLM_KEY", timeout=1.0, max_retries=3,
                   backoff_base=0.5, sleep=sleeps.append)
    out = OpenAICaptioner(c, mean=MEAN, std=STD).caption(frames(b=1), "p", 2)
    assert out == [["in time", "also in time"]]                          # the slow answer was never read
    assert c.usage.retries >= 1 and len(sleeps) == c.usage.retries and c.usage.failed == 0


def test_progress_reports_done_spend_and_eta():
    from tvr_platform.captions.openai_backend import Progress

    now, lines = [100.0], []
    budget = LocalBudget(price_input_per_mtok=2.0, price_output_per_mtok=4.0)
    p = Progress(10, label="captions", budget=budget, every_s=5.0, clock=lambda: now[0], emit=lines.append)
    assert p.eta_s() is None
    now[0] = 104.0
    budget.spend(1000, 500)
    p.advance(2)                                                         # first line right away
    assert lines == ["captions: 2/10 videos (20%), 1500 tokens, cost 0.0040, ETA 16s"]
    now[0] = 106.0
    p.advance(1)                                                         # 2 s later: not yet
    assert len(lines) == 1
    now[0] = 110.0
    p.advance(7)                                                         # done: always a last line
    assert lines[-1].startswith("captions: 10/10 videos (100%)") and lines[-1].endswith("ETA 0s")


def test_csi_budget_stops_the_loop_and_a_rerun_resumes_without_paying_twice(tmp_path, server):
    """Captioner + engineer against the local server under one token budget; the spent run stops
    with 'budget', the rerun replays every paid reply from the cache and only pays for new ones."""
    from tvr_platform.captions.csi import run_csi

    versions = iter(range(100))

    def respond(body):
        user = body["messages"][-1]["content"]
        if isinstance(user, list):                                       # captioning: images attached
            tag = _image_tag(body)
            return ok(json.dumps([f"a clip {tag}", f"shot {tag} again", "a video"]), 100, 20)
        return ok(f"Generate 3 captions about the objects, version {next(versions)}.", 100, 20)

    server.responder = respond
    ov = [f"run.work_dir={tmp_path}", "captions.backend=openai", "captions.engineer=openai",
          f"captions.api_base_url={server.url}", "captions.api_key_env=TVR_TEST_LLM_KEY",
          "captions.captions_per_video=3", "captions.max_rounds=3", "captions.patience=3",
          "captions.backoff_base=0", "captions.requests_in_flight=2"]
    first = run_csi(load_job(None, [*ov, "captions.token_budget=600"]), samples=samples(4), track=False)
    # round 0: 4 captions (480 tokens); round 1: the engineer (600: spent), its candidate gets no captions
    assert (first["stop_reason"], first["rounds"]) == ("budget", 1)
    assert len(server.requests) == 5 and first["budget"]["prompt_tokens"] == 500
    paid = [json.dumps(r["body"], sort_keys=True) for r in server.requests]
    second = run_csi(load_job(None, ov), samples=samples(4), track=False)
    assert second["stop_reason"] != "budget" and second["rounds"] == 3
    assert second["usage"]["captioner"]["cached"] == 4 and second["usage"]["engineer"]["cached"] == 1
    again = [json.dumps(r["body"], sort_keys=True) for r in server.requests[5:]]
    assert not set(again) & set(paid)                                    # nothing paid for twice
    cached = "".join(p.read_text() for p in tmp_path.rglob("replies/*.jsonl"))
    assert "a clip" in cached and KEY not in cached                      # the replies are on storage, no key
    assert len(again) == second["usage"]["captioner"]["requests"] + second["usage"]["engineer"]["requests"]


# -- CSI driver with MLflow -------------------------------------------------------------------------
BANK = [f"a {c} {s} {m}" for c in ("red", "blue", "green") for s in ("ball", "cube") for m in ("spins", "rolls")]
BANK_IDS = [f"v{i % 6}" for i in range(len(BANK))]


def samples(n=4):
    g = torch.Generator().manual_seed(0)
    return [VideoSample(f"v{i}", torch.randn(3, 3, 32, 32, generator=g),
                        [b for b, v in zip(BANK, BANK_IDS) if v == f"v{i}"]) for i in range(n)]


def mlflow_run(job, run_id):
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(job.tracking_uri)
    return cl, cl.get_run(run_id)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection (other than a Unix socket) fails: the offline path must not need one."""
    import socket

    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network disabled in this test: connect({address!r})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: (attempts.append(address), connect(socket.socket(), address)))
    return attempts


def test_run_csi_logs_every_round_and_saves_the_best_prompt(tmp_path, no_network):
    """The offline default (retrieval captioner, rule-based engineer, CLIP ψ, local MLflow) end to end,
    with every network connection refused."""
    from tvr_platform.captions.corpus import load_best_prompt, resolve_prompt
    from tvr_platform.captions.csi import run_csi

    job = load_job(None, [f"run.work_dir={tmp_path}", "captions.max_rounds=3", "captions.patience=2",
                          "captions.captions_per_video=3"])
    out = run_csi(job, samples=samples(), bank=(BANK, BANK_IDS))
    cl, run = mlflow_run(job, out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"{job.run.name}-csi"
    assert run.data.params["captions.max_rounds"] == "3" and run.data.params["captions.backend"] == "retrieval"
    hist = cl.get_metric_history(out["run_id"], "csi_best_score")
    assert [m.step for m in hist] == list(range(out["rounds"] + 1))
    assert max(m.value for m in hist) == pytest.approx(out["best_score"])
    arts = {a.path for a in cl.list_artifacts(out["run_id"], "csi")}
    assert {"csi/best_prompt.txt", "csi/pool.json", "csi/result.json", "csi/rounds"} <= arts
    rounds = cl.list_artifacts(out["run_id"], "csi/rounds")
    assert len(rounds) == out["rounds"] + 1
    assert load_best_prompt(job) == out["best_prompt"] == resolve_prompt(job)
    assert resolve_prompt(job, "explicit prompt") == "explicit prompt"
    assert no_network == []                                               # nothing even tried
    import socket

    with pytest.raises(OSError, match="network disabled"):                # and the guard was live
        socket.create_connection(("127.0.0.1", 9))


def test_run_csi_with_openai_backends_never_logs_the_key(tmp_path, server):
    from mlflow.artifacts import download_artifacts

    from tvr_platform.captions.csi import build_engineer, run_csi
    replies = [ok(json.dumps([f"caption {i} {j}" for j in range(3)])) for i in range(40)]
    replies.insert(4, ok("Prompt: Generate 3 captions about what people do in the video."))
    server.script = replies
    job = load_job(None, [f"run.work_dir={tmp_path}", "captions.backend=openai", "captions.engineer=openai",
                          f"captions.api_base_url={server.url}", "captions.api_key_env=TVR_TEST_LLM_KEY",
                          "captions.max_rounds=1", "captions.captions_per_video=3", "captions.backoff_base=0"])
    out = run_csi(job, samples=samples(4), engineer=build_engineer(job, sleep=lambda s: None))
    assert out["rounds"] == 1 and out["usage"]["captioner"]["requests"] == 8
    assert out["usage"]["engineer"]["requests"] == 1
    cl, run = mlflow_run(job, out["run_id"])
    assert run.data.metrics["api_captioner_requests"] == 8
    blob = json.dumps(run.data.params) + json.dumps(run.data.metrics)
    local = Path(download_artifacts(run_id=out["run_id"], tracking_uri=job.tracking_uri, dst_path=str(tmp_path / "a")))
    blob += "".join(p.read_text() for p in local.rglob("*") if p.is_file())
    assert KEY not in blob and "TVR_TEST_LLM_KEY" in blob                 # the variable name, never its value
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)


def test_add_subcommands_registers_improve_and_generate():
    from tvr_platform.captions.cli import add_subcommands, cmd_generate, cmd_improve

    parser = argparse.ArgumentParser(prog="tvr")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["captions", "improve", "job.yaml", "captions.max_rounds=2"])
    assert (a.func, a.spec, a.overrides) == (cmd_improve, "job.yaml", ["captions.max_rounds=2"])
    assert parser.parse_args(["captions", "generate", "j.yaml"]).func is cmd_generate
    with pytest.raises(SystemExit):
        parser.parse_args(["captions", "bogus", "j.yaml"])
    sub = next(a for a in parser._subparsers._actions if isinstance(a, argparse._SubParsersAction))
    captions = sub.choices["captions"]
    improve = next(a for a in captions._actions if isinstance(a, argparse._SubParsersAction)).choices["improve"]
    for p in (captions, improve):              # the offline defaults are labelled as stand-ins
        text = p.format_help()
        assert "STAND-INS" in text and "retrieval" in text and "rules" in text and "vLLM" in text


# -- corpus captioning --------------------------------------------------------------------------------
def test_caption_worker_openai_path_writes_a_part_in_process(tmp_path, server):
    from tvr_platform.captions.corpus import CaptionWorker, load_generated_captions
    from tvr_platform.config import job_to_dict

    server.script = [ok('["w one", "w two"]'), ok("nonsense"), ok("nonsense"), ok("nonsense")]
    job = load_job(None, [f"run.work_dir={tmp_path}", "captions.backend=openai", f"captions.api_base_url={server.url}",
                          "captions.api_key_env=TVR_TEST_LLM_KEY", "captions.max_retries=2",
                          "captions.backoff_base=0", "captions.captions_per_video=2",
                          "captions.requests_in_flight=1"])                # scripted replies in video order
    w = CaptionWorker(job=job_to_dict(job), prompt="P", video_ids=["a", "b", "c"], splits=["s"] * 3, bank=None,
                      ledger=None)
    stats = w({"video_index": np.array([0, 2]), "frames": frames(b=2).numpy()})
    assert stats["captioned"][0] == 1 and stats["skipped"][0] == 1 and stats["api_failed"][0] == 1
    assert load_generated_captions(job, ["a", "b", "c"]) == [["w one", "w two"], [], []]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corpus_captioning_is_resumable(tmp_path, ray_local):
    import ray.data

    from tvr_platform.captions.corpus import (
        captions_storage,
        generate_corpus_captions,
        load_generated_captions,
        read_parts,
    )

    job = load_job(None, [f"run.work_dir={tmp_path}", "captions.captions_per_video=3", "captions.batch_size=2",
                          "captions.concurrency=1", "captions.prompt=Generate 3 captions. Make every caption unique."])
    ids = [f"v{i}" for i in range(6)]
    g = np.random.default_rng(0)
    rows = [{"video_index": i, "frames": g.standard_normal((3, 3, 32, 32)).astype(np.float32)} for i in range(6)]
    first = generate_corpus_captions(job, dataset=ray.data.from_items(rows[:4]), video_ids=ids,
                                     bank=(BANK, BANK_IDS))
    assert (first["captioned"], first["skipped_done"]) == (4, 0)
    caps = load_generated_captions(job, ids)
    assert [len(c) for c in caps] == [3, 3, 3, 3, 0, 0]
    assert all(not set(c) & {b for b, v in zip(BANK, BANK_IDS) if v == vid} for c, vid in zip(caps, ids))
    table = read_parts(captions_storage(job))
    assert set(table.column("prompt").to_pylist()) == {job.captions.prompt}
    assert set(table.column("model").to_pylist()) == {"retrieval:tvr-tiny"}
    n_parts = len(captions_storage(job).list("parts"))
    second = generate_corpus_captions(job, dataset=ray.data.from_items(rows), video_ids=ids, bank=(BANK, BANK_IDS))
    assert (second["captioned"], second["skipped_done"]) == (2, 4)       # only the two new videos
    assert load_generated_captions(job, ids)[:4] == caps[:4]
    assert all(len(c) == 3 for c in load_generated_captions(job, ids))
    third = generate_corpus_captions(job, dataset=ray.data.from_items(rows), video_ids=ids, bank=(BANK, BANK_IDS))
    assert (third["captioned"], third["skipped_done"]) == (0, 6)
    assert len(captions_storage(job).list("parts")) > n_parts
    (Path(captions_storage(job).url("parts")) / "broken.parquet").write_bytes(b"PAR1 not really")
    assert all(len(c) == 3 for c in load_generated_captions(job, ids))   # a damaged part is skipped


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_improve_and_generate_through_the_data_pipeline(tmp_path, ray_local):
    """CLI handlers on the synthetic clip set: CSI samples and the bank come from the real pipeline."""
    from tvr_platform.captions.cli import add_subcommands
    from tvr_platform.captions.corpus import load_best_prompt, load_generated_captions
    from tvr_platform.data.pipeline import load_manifest
    from tvr_platform.recipes import ensure_synthetic

    ov = [f"run.work_dir={tmp_path}", "data.synth.num_clips=6", "data.num_frames=2", "captions.sample_size=3",
          "captions.max_rounds=1", "captions.captions_per_video=2", "captions.splits=[test]",
          "data.aux_captions=generated"]                  # the set being written is no input to its writer
    job = load_job(None, ov)
    ensure_synthetic(job)
    spec = tmp_path / "job.yaml"
    spec.write_text("captions:\n  patience: 1\n")
    parser = argparse.ArgumentParser(prog="tvr")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    for cmd in ("improve", "generate"):
        args = parser.parse_args(["captions", cmd, str(spec), *ov])
        assert args.func(args) == 0
    best = load_best_prompt(job)
    assert best and best.startswith("Generate 2 captions")
    test = load_manifest(job, job.data.test_split)
    caps = load_generated_captions(job, test.video_ids)
    assert [len(c) for c in caps] == [2] * test.num_videos
    train = load_manifest(job, job.data.train_split)
    assert load_generated_captions(job, train.video_ids) == [[]] * train.num_videos   # only captions.splits


def test_the_key_travels_as_a_secret_that_never_prints(server, sleeps, monkeypatch):
    from tvr_platform.captions.openai_backend import Secret, read_api_key

    secret = read_api_key("TVR_TEST_LLM_KEY", server.url)
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in f"{secret} {[secret]}"
    assert pickle.loads(pickle.dumps(secret)).reveal() == KEY             # Ray ships it to the workers
    monkeypatch.delenv("TVR_TEST_LLM_KEY")                               # a worker without the variable
    c = ChatClient(base_url=server.url, model="m", api_key_env="TVR_TEST_LLM_KEY", api_key=Secret(KEY),
                   sleep=sleeps.append)
    assert c.complete([{"role": "user", "content": "x"}], validate=lambda t: t) == '["default caption"]'
    assert server.requests[-1]["auth"] == f"Bearer {KEY}"
    with pytest.raises(LLMError, match="TVR_TEST_LLM_KEY"):
        read_api_key("TVR_TEST_LLM_KEY", server.url)


# -- generated captions as ExCae's auxiliary texts (data pipeline) ----------------------------------
def _synth_job(tmp_path, *extra):
    from tvr_platform.recipes import ensure_synthetic

    job = load_job(None, [f"run.work_dir={tmp_path}", "model.backbone.name=tvr-tiny", "data.synth.num_clips=8",
                          "data.synth.seconds=1.0", "data.synth.size=32", "data.num_frames=2",
                          "captions.captions_per_video=3", *extra])
    ensure_synthetic(job)
    return job


def test_aux_captions_become_aux_texts_rows(tmp_path):
    from tvr.backbone import get_tokenizer
    from tvr_platform.captions.corpus import aux_caption_tokens, captions_storage, write_part
    from tvr_platform.data.pipeline import _items, load_manifest

    job = _synth_job(tmp_path, "data.aux_captions=generated")
    train = load_manifest(job, job.data.train_split)
    with pytest.raises(ValueError, match="tvr captions generate"):          # nothing generated yet
        aux_caption_tokens(job, train)
    v0, v1 = train.video_ids[:2]
    row = {"prompt": "P", "backend": "retrieval", "model": "m", "split": "train"}
    write_part(captions_storage(job), [{**row, "video_id": v0, "captions": ["a b", "c d", "e f", "g h"],
                                        "created_at": "2026-01-01"},
                                       {**row, "video_id": v1, "captions": ["old"], "created_at": "2026-01-01"}])
    write_part(captions_storage(job), [{**row, "video_id": v1, "captions": ["new one"], "created_at": "2026-02-01"}])
    tok = get_tokenizer("tvr-tiny")
    for texts in (True, False):                                           # training rows and evaluation rows
        rows = _items(job, train, texts=texts, epoch_seed=0)
        aux = np.stack([r["aux_texts"] for r in rows])                    # (N, K, L)
        assert aux.shape == (train.num_videos, 3, tok.context_length) and aux.dtype == np.int64
        assert np.array_equal(aux[0], tok(["a b", "c d", "e f"]).numpy())   # capped at K
        assert np.array_equal(aux[1, 0], tok(["new one"]).numpy()[0])       # the latest part wins
        assert not aux[1, 1:].any() and not aux[2:].any()                   # padding / not captioned
    assert "aux_texts" not in _items(load_job(None, [f"run.work_dir={tmp_path}"]), train, texts=False,
                                     epoch_seed=0)[0]
    with pytest.raises(ConfigError, match="aux_captions"):
        load_job(None, ["data.aux_captions=../elsewhere"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_generate_then_train_excae_on_the_generated_captions(tmp_path, ray_local):
    """tvr captions generate -> tvr train model.method=excae data.aux_captions=generated, on the
    synthetic set: the captions reach the model and the experts' utilisation reaches MLflow."""
    from mlflow.tracking import MlflowClient

    from tiny import tiny_overrides
    from tvr_platform.captions.corpus import generate_corpus_captions, load_generated_captions
    from tvr_platform.data.pipeline import load_manifest, train_dataset
    from tvr_platform.recipes import ensure_synthetic
    from tvr_platform.train.trainer import run_training

    job = load_job(None, tiny_overrides(tmp_path, **{
        "captions.captions_per_video": 3, "captions.concurrency": 1, "captions.batch_size": 4,
        "model.method": "excae", "model.excae.num_experts": 4, "model.excae.top_k": 2,
        "model.excae.expert_heads": 2, "data.aux_captions": "generated", "train.epochs": 2,
        "run.name": "excae-captions"}))
    ensure_synthetic(job)
    report = generate_corpus_captions(job)
    train = load_manifest(job, job.data.train_split)
    test = load_manifest(job, job.data.test_split)
    assert report["captioned"] == train.num_videos + test.num_videos and report["skipped"] == 0
    row = train_dataset(job, train).take(1)[0]
    caps = load_generated_captions(job, [train.video_ids[int(row["video_index"])]])[0]
    assert len(caps) == 3 and np.array_equal(row["aux_texts"], job_tokens(job, caps))
    result = run_training(job)
    client = MlflowClient(job.tracking_uri)
    run_id = result.tracker.run_id
    metrics = client.get_run(run_id).data.metrics
    assert {"train/loss_balance", "train/expert_util_max", "train/expert_frac_00", "train/expert_frac_03",
            "train/loss_ecs"} <= set(metrics)
    fracs = [metrics[f"train/expert_frac_{m:02d}"] for m in range(4)]
    assert sum(fracs) == pytest.approx(1.0, abs=1e-5) and 0.25 <= metrics["train/expert_util_max"] <= 0.5 + 1e-6  # [1/M, 1/k]
    assert len(client.get_metric_history(run_id, "train_loss")) == 2
    assert 0.0 <= result.metrics["t2v_R1"] <= 100.0


def job_tokens(job, captions):
    from tvr.backbone import get_tokenizer

    return get_tokenizer(job.model.backbone.name)(captions).numpy()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_openai_corpus_job_budget_malformed_and_resume_under_ray(tmp_path, server, ray_local):
    """The OpenAI backend in Ray Data actors: the shared token budget stops the job, malformed replies
    are retried then skipped and counted, and the next run picks up exactly what is missing. The Ray
    workers do not have the key's variable: the driver ships it as a Secret."""
    import os

    import ray
    import ray.data

    from tvr_platform.captions.corpus import (
        captions_storage,
        generate_corpus_captions,
        load_generated_captions,
        read_parts,
    )

    assert ray.get(ray.remote(lambda: os.environ.get("TVR_TEST_LLM_KEY")).remote()) is None
    ov = [f"run.work_dir={tmp_path}", "captions.backend=openai", f"captions.api_base_url={server.url}",
          "captions.api_key_env=TVR_TEST_LLM_KEY", "captions.api_model=test-vlm", "captions.max_retries=1",
          "captions.backoff_base=0", "captions.captions_per_video=2", "captions.concurrency=1",
          "captions.batch_size=3", "captions.prompt=Describe it.",
          "captions.requests_in_flight=1"]      # one request at a time: the budget cut is exact
    ids = [f"v{i}" for i in range(6)]
    g = np.random.default_rng(0)
    rows = [{"video_index": i, "frames": g.standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(6)]

    def run(*extra):
        job = load_job(None, [*ov, *extra])
        return job, generate_corpus_captions(job, dataset=ray.data.from_items(rows), video_ids=ids)

    server.script = [ok('["first a", "first b"]', 600, 100), ok('["second a", "second b"]', 600, 100)]
    job, first = run("captions.token_budget=1000")
    assert first["budget_exhausted"] and (first["captioned"], first["skipped"]) == (2, 4)
    assert first["budget"]["prompt_tokens"] == 1200 and first["budget"]["completion_tokens"] == 200
    assert len(server.requests) == 2                                     # no request once it was spent
    server.script = [ok("I cannot see the video."), ok("still not a list")]   # one video: 2 malformed tries
    _, second = run("captions.token_budget=0")
    assert (second["skipped_done"], second["captioned"], second["skipped"]) == (2, 3, 1)
    assert (second["api_malformed"], second["api_failed"], second["api_requests"]) == (2, 1, 5)
    _, third = run()
    assert (third["skipped_done"], third["captioned"]) == (5, 1)
    caps = load_generated_captions(job, ids)
    assert sorted(map(tuple, caps)) == [("default caption",)] * 4 + [("first a", "first b"), ("second a", "second b")]
    table = read_parts(captions_storage(job))
    assert set(table.column("model").to_pylist()) == {"test-vlm"}
    assert set(table.column("prompt").to_pylist()) == {"Describe it."}
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
