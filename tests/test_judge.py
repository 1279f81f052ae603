"""The LLM judge: verdict parsing, seeded A/B orders, both-order combination, the HTTP client
(retries, concurrency, cache) against a scripted endpoint, win rates in the evaluation stage,
and a real judge endpoint served by vLLM's OpenAI-compatible server on CPU."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from sami_operator.models import Endpoint, EngineSpec, GenerationSpec, Metrics
from sami_worker import common, evaluate, storage
from sami_worker.common import open_model_backend
from sami_worker.judge import (
    JudgeCache,
    JudgeClient,
    JudgeItem,
    JudgeUnavailable,
    LocalJudge,
    build_judge_prompt,
    judge_items,
    orders_for,
    outcome,
    parse_verdict,
    sample_items,
)
from sami_worker.tasks import EvaluateTask, TaskError
from tests.conftest import EXAMPLES
from tests.test_generate import PRINCIPLES, VLLM_CPU

# ---------------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("A", "A"),
        ("b", "B"),
        ("Response A", "A"),
        ("**Response B**", "B"),
        ("tie", "tie"),
        ("Tie.", "tie"),
        ("Both are weak, but A is more direct.\nFinal answer: B", "B"),
        ("Final Answer: **A**", "A"),
        ("final answer - (B)", "B"),
        ("Answer: A\n...on reflection...\nFinal answer: B", "B"),  # the last keyed line wins
        ("Verdict: a tie", "tie"),
        ("The better response is Response A.", "A"),
        ('{"winner": "A"}', "A"),
        ('```json\n{"reason": "shorter", "verdict": "Response B"}\n```', "B"),
        ("[[A]]", "A"),
        ("[[C]]", "tie"),  # MT-Bench's tie
        ("Response B is clearly better: it answers.", "B"),
        ("**candidate B**", "B"),
        ("Response: A", "A"),
        ("**Final answer**: B", "B"),
        ("Final answer: a tie", "tie"),
        # The final answer wins over prose that merely contains "answer".
        ("Final answer: A. B's answer is the same length.", "A"),
        ("Final answer: B\n\nNote: the answer is the same either way.", "B"),
    ],
)
def test_parses_verdicts(answer, verdict):
    assert parse_verdict(answer) == verdict


@pytest.mark.parametrize(
    "answer",
    [
        "",
        None,
        "I like both of them.",
        "Response A is better at tone, Response B is better at facts.",  # two praised
        "fromks fromks fromraough",  # a random model's noise
        "Response A is a clear answer both in tone and content.",  # no verdict, not a tie
        "B is shorter than A.",
    ],
)
def test_unparsable_answers_are_none(answer):
    assert parse_verdict(answer) is None


def test_outcome_is_from_the_tested_responses_side():
    assert [outcome("A", "A"), outcome("B", "A"), outcome("A", "B"), outcome("B", "B")] == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]
    assert outcome("tie", "A") == outcome(None, "B") == 0.5


# ---------------------------------------------------------------------------------------------
# Items, orders, combination


def make_items(n: int, test: str = "long answer here", baseline: str = "short") -> list[JudgeItem]:
    return [
        JudgeItem(f"query {i}", "1. Be helpful.", f"{test} {i}", f"{baseline} {i}", 10 + i, 5)
        for i in range(n)
    ]


def test_orders_are_seeded_per_item_and_balanced():
    items = make_items(200)
    first = [orders_for(item, seed=0, both_orders=False) for item in items]
    assert first == [orders_for(item, seed=0, both_orders=False) for item in items]
    assert first != [orders_for(item, seed=1, both_orders=False) for item in items]
    assert 70 < sum(p == ("A",) for p in first) < 130
    # An item's order depends on the item, not on which others are judged with it.
    subset = sample_items(items, 20, seed=0)
    assert [orders_for(i, 0, False) for i in subset] == [first[items.index(i)] for i in subset]
    assert orders_for(items[0], seed=0, both_orders=True) == ("A", "B")


def test_sampling_is_seeded_and_independent_of_input_order():
    items = make_items(30)
    sample = sample_items(items, 10, seed=3)
    assert len(sample) == 10 and len(set(sample)) == 10
    assert sample == sample_items(list(reversed(items)), 10, seed=3)
    assert sample != sample_items(items, 10, seed=4)
    assert len(sample_items(items, 100, seed=3)) == 30


def always(answer: str) -> Callable[[list[str]], list[str]]:
    return lambda prompts: [answer] * len(prompts)


def test_both_orders_cancel_a_position_biased_judge():
    """A judge that always says "A": with one random order per item it hands the tested model
    about half the wins at random; with both orders every item scores 1 and 0 -> 0.5."""
    items = make_items(8)
    result = judge_items(
        items, always("Final answer: A"), task="dialogue", seed=0, both_orders=True
    )
    assert result.outcomes == [0.5] * 8
    assert [j.test_position for j in result.judgments] == ["A", "B"] * 8
    assert result.counts() == {
        "items": 8,
        "judgments": 16,
        "wins": 8,
        "losses": 8,
        "ties": 0,
        "unparsable": 0,
    }


def test_one_order_per_item_follows_the_seeded_position():
    items = make_items(8)
    result = judge_items(items, always("A"), task="dialogue", seed=0, both_orders=False)
    expected = [1.0 if orders_for(i, 0, False) == ("A",) else 0.0 for i in items]
    assert result.outcomes == expected


def test_prompts_show_the_tested_response_at_its_position():
    items = make_items(4)
    seen: list[str] = []

    def judge(prompts: list[str]) -> list[str]:
        seen.extend(prompts)
        return ["tie", "nonsense"] * (len(prompts) // 2)

    result = judge_items(items, judge, task="dialogue", seed=0, both_orders=True)
    for prompt, judgment in zip(seen, result.judgments, strict=True):
        item = items[judgment.item]
        a = prompt.index("Response A:\n")
        b = prompt.index("Response B:\n")
        first, second = (
            (item.test, item.baseline)
            if judgment.test_position == "A"
            else (
                item.baseline,
                item.test,
            )
        )
        assert prompt[a:].startswith(f"Response A:\n{first}")
        assert prompt[b:].startswith(f"Response B:\n{second}")
        assert "1. Be helpful." in prompt and item.query in prompt
    # Ties and parse failures both score 0.5 but are counted apart.
    counts = result.counts()
    assert (counts["ties"], counts["unparsable"], counts["wins"]) == (4, 4, 0)
    assert result.outcomes == [0.5] * 4


def test_summarisation_prompt_names_the_post():
    prompt = build_judge_prompt("summarization", "1. Be brief.", "A long post.", "x", "y")
    assert "Post:\nA long post." in prompt and "Final answer: A" in prompt


# ---------------------------------------------------------------------------------------------
# The HTTP client against a scripted endpoint


class _Scripted(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose answer to each request comes from `respond(body,
    n)` -> (status, content); it records requests and the most requests in flight at once.
    An error's content is the error body's "error" (a string or an OpenAI-style object); with
    it goes OpenAI's `retry-after-ms: 10`, which the client honours (short waits in tests)."""

    respond: Callable[[dict, int], tuple[int, str]] = staticmethod(lambda body, n: (200, "A"))
    delay = 0.0
    requests: list[dict] = []
    lock = threading.Lock()
    in_flight = 0
    max_in_flight = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cls.lock:
            cls.requests.append(
                {"body": body, "auth": self.headers.get("Authorization"), "headers": self.headers}
            )
            n = len(cls.requests)
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            time.sleep(cls.delay)
            status, content = cls.respond(body, n)
        finally:
            with cls.lock:
                cls.in_flight -= 1
        payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(payload if status == 200 else {"error": content}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:
            self.send_header("retry-after-ms", "10")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    _Scripted.respond = staticmethod(lambda body, n: (200, "Final answer: A"))
    _Scripted.delay = 0.0
    _Scripted.requests = []
    _Scripted.in_flight = _Scripted.max_in_flight = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", _Scripted
    server.shutdown()


def client_for(url: str, cache: JudgeCache | None = None, **kwargs) -> JudgeClient:
    return JudgeClient(Endpoint(url=url, model="judge"), 4, cache, **kwargs)


def test_concurrency_is_bounded_and_answers_keep_their_order(scripted):
    url, server = scripted
    server.delay = 0.05
    server.respond = staticmethod(lambda body, n: (200, body["messages"][0]["content"].upper()))
    prompts = [f"prompt {i}" for i in range(20)]
    client = client_for(url)
    assert client.complete_many(prompts) == [p.upper() for p in prompts]
    assert 1 < server.max_in_flight <= 4
    assert client.requests == 20
    body = server.requests[0]["body"]
    assert body["model"] == "judge" and body["temperature"] == 0.0 and body["max_tokens"] > 0


def test_transient_failures_are_retried_with_backoff(scripted):
    url, server = scripted
    server.respond = staticmethod(
        lambda body, n: (429, "slow down") if n == 1 else (503, "busy") if n == 2 else (200, "B")
    )
    client = client_for(url)
    assert client.complete_many(["p"]) == ["B"]
    assert client.requests == 3


def test_persistent_failures_are_retryable_errors_and_client_errors_are_not(scripted):
    url, server = scripted
    server.respond = staticmethod(lambda body, n: (502, "bad gateway"))
    client = client_for(url, attempts=3)
    with pytest.raises(JudgeUnavailable, match="after 3 attempts.*HTTP 502"):
        client.complete_many(["p"])
    assert client.requests == len(server.requests) == 3
    # A client error is not retried, and its message has the status but not the body's text.
    server.respond = staticmethod(lambda body, n: (400, "prompt too long"))
    with pytest.raises(TaskError, match=r"evaluation.judge.endpoint: .* answered HTTP 400$") as err:
        client_for(url).complete_many(["p"])
    assert "prompt too long" not in str(err.value)
    assert len(server.requests) == 4
    # Of an OpenAI-style error, the type and code (printable, truncated), not the message.
    error = {
        "message": "This model's maximum context length is 4096 tokens: you wrote 'Hi?'",
        "type": "invalid_request_error\n\x1b[31m",
        "code": "context_length_exceeded" + "x" * 200,
    }
    server.respond = staticmethod(lambda body, n: (400, error))
    with pytest.raises(TaskError) as err:
        client_for(url).complete_many(["p"])
    message = str(err.value)
    assert message.endswith(
        f"answered HTTP 400 (type invalid_request_error[31m, code "
        f"{('context_length_exceeded' + 'x' * 200)[:80]})"
    )
    assert "maximum context" not in message and "Hi?" not in message


def test_unreachable_endpoint_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = client_for(f"http://127.0.0.1:{port}/v1", attempts=2)
    with pytest.raises(JudgeUnavailable, match="ConnectError"):
        client.complete_many(["p"])
    assert client.requests == 2


def test_api_key_is_sent_only_when_the_endpoint_names_a_secret_and_may_get_it(
    scripted, monkeypatch
):
    """The scripted endpoint is plain http on 127.0.0.1: the key goes there only with the
    opt-in, and only SAMI_API_KEY (OPENAI_API_KEY only ever goes over https)."""
    url, server = scripted
    secret = {"name": "s", "key": "k"}
    opted_in = Endpoint(url=url, model="judge", apiKeySecret=secret, allowInsecureApiKey=True)
    monkeypatch.delenv("SAMI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    with pytest.raises(TaskError, match="no API key reached the worker: set SAMI_API_KEY"):
        JudgeClient(opted_in, 2)
    monkeypatch.setenv("SAMI_API_KEY", "sk-test")
    JudgeClient(opted_in, 2).complete_many(["p"])
    assert server.requests[-1]["auth"] == "Bearer sk-test"
    # No secret named: no key sent, nor OpenAI's organization or project from the environment.
    monkeypatch.setenv("OPENAI_ORG_ID", "org-x")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-x")
    client_for(url).complete_many(["q"])
    assert server.requests[-1]["auth"] is None
    assert {"openai-organization", "openai-project"}.isdisjoint(
        name.lower() for name in server.requests[-1]["headers"]
    )
    assert len(server.requests) == 2
    # A secret named for plain http without the opt-in, or for a host that is not loopback:
    # bad input before any request.
    plain = Endpoint(url=url, model="judge", apiKeySecret=secret)
    with pytest.raises(TaskError, match=r"sent only over https.*allowInsecureApiKey: true"):
        JudgeClient(plain, 2)
    remote = opted_in.model_copy(update={"url": "http://judge.example/v1"})
    with pytest.raises(TaskError, match=r"not loopback .* use an https URL"):
        JudgeClient(remote, 2)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.3.2.1/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://LOCALHOST:8000/v1", True),
        ("http://localhost./v1", True),
        ("http://10.0.0.1/v1", False),
        ("http://localhost.example/v1", False),
        ("http://127.0.0.1.nip.io/v1", False),
        ("http://[::ffff:10.0.0.1]/v1", False),
    ],
)
def test_which_plain_http_hosts_may_get_a_key(url, allowed, monkeypatch):
    from sami_worker.chat import api_key_for

    monkeypatch.setenv("SAMI_API_KEY", "sk-test")
    endpoint = Endpoint(url=url, model="m", apiKeySecret={"name": "s", "key": "k"})
    with pytest.raises(TaskError, match="sent only over https"):
        api_key_for(endpoint, "f")
    opted_in = endpoint.model_copy(update={"allow_insecure_api_key": True})
    if allowed:
        assert api_key_for(opted_in, "f") == "sk-test"
    else:
        with pytest.raises(TaskError, match="not loopback"):
            api_key_for(opted_in, "f")


def test_https_endpoints_get_the_key_and_openai_api_key_only_as_a_fallback(monkeypatch):
    from sami_worker.chat import api_key_for

    endpoint = Endpoint(
        url="https://api.example/v1", model="m", apiKeySecret={"name": "s", "key": "k"}
    )
    monkeypatch.delenv("SAMI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert api_key_for(endpoint, "f") == "sk-openai"
    monkeypatch.setenv("SAMI_API_KEY", "sk-sami")
    assert api_key_for(endpoint, "f") == "sk-sami"
    # No secret named: no key, whatever the environment holds.
    assert api_key_for(endpoint.model_copy(update={"api_key_secret": None}), "f") is None


def test_cache_survives_a_failure_and_a_rerun_pays_nothing(scripted, tmp_path):
    """The endpoint dies after 5 answers: those are cached in storage; the next run asks only
    for the rest, and a third run sends no request at all."""
    url, server = scripted
    server.respond = staticmethod(
        lambda body, n: (
            (200, f"answer {body['messages'][0]['content']}") if n <= 5 else (500, "down")
        )
    )
    store = storage.open_storage(str(tmp_path / "stage"))
    prompts = [f"p{i}" for i in range(8)]
    first = client_for(url, JudgeCache(store), attempts=1)
    first.max_concurrency = 1  # deterministic: exactly the first five succeed
    with pytest.raises(JudgeUnavailable):
        first.complete_many(prompts)
    assert len(JudgeCache(store).answers) == 5

    server.respond = staticmethod(lambda body, n: (200, f"answer {body['messages'][0]['content']}"))
    second = client_for(url, JudgeCache(store))
    assert second.complete_many(prompts) == [f"answer {p}" for p in prompts]
    assert (second.requests, second.cache_hits) == (3, 5)

    before = len(server.requests)
    third = client_for(url, JudgeCache(store))
    assert third.complete_many(prompts) == [f"answer {p}" for p in prompts]
    assert (third.requests, third.cache_hits, len(server.requests)) == (0, 8, before)
    # Another judge model does not reuse these answers.
    other = JudgeClient(Endpoint(url=url, model="other"), 2, JudgeCache(store))
    other.complete_many(prompts[:1])
    assert other.requests == 1


# ---------------------------------------------------------------------------------------------
# Win rates in the evaluation stage


def judge_doc(judge: str, constitutions: str = "all") -> dict:
    """evaluation.judge: an endpoint for an http(s) URL, else a model loaded in-process; 5 of
    the 6 items of every constitution ('all'), or the 3 of the all-kept one ('kept')."""
    doc = {"items": 5, "constitutions": constitutions}
    if judge.startswith(("http://", "https://")):
        return {"endpoint": {"url": judge, "model": "judge"}, **doc}
    return {"model": judge, **doc}


def evaluate_task(
    model: Path, output: Path, iteration: int, judge_url: str, **extra
) -> EvaluateTask:
    doc = {
        "output": str(output),
        "model": {"uri": str(model), "dtype": "float32"},
        "iteration": iteration,
        "principles": PRINCIPLES.model_dump(),
        "heldOut": [{"name": "brief", "definition": "Be brief.", "antithesis": "Ramble."}],
        "queries": {"uri": str(EXAMPLES / "data" / "dialogue-eval.jsonl"), "count": 3},
        "evaluation": {"constitutions": 2, "judge": judge_doc(judge_url)},
        # Sampling (not greedy) so that iteration 1's responses differ from the base model's.
        "generation": {
            "backend": "transformers",
            "maxNewTokens": 12,
            "temperature": 1.0,
            "engine": VLLM_CPU,
        },
    }
    doc.update(extra)
    return EvaluateTask.model_validate(doc)


def base_of(uri: Path | str) -> list[dict]:
    """The task's baselines: the base model's evaluation at `uri`."""
    return [{"name": "base", "uri": str(uri)}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_two_iterations(
    model: Path, tmp_path: Path, judge_url: str, reference: Path | None = None, **extra
) -> tuple[dict, Path, EvaluateTask]:
    """evaluate-0 (base), the reference stage when `reference` is a model, then evaluate-1
    judged against them, as the planner wires them: evaluate-1's meta, prefix and task.
    `extra` overrides task fields of all three."""
    base = tmp_path / "iterations" / "0" / "evaluate"
    meta0 = evaluate.run(evaluate_task(model, base, 0, judge_url, **extra))
    assert "judge" not in meta0 and not (base / evaluate.JUDGMENTS_FILE).exists()
    baselines = base_of(base)
    if reference is not None:
        out = tmp_path / "reference"
        meta = evaluate.run(evaluate_task(reference, out, 0, judge_url, reference=True, **extra))
        assert meta["reference"] is True and meta["model"] == str(reference)
        assert "judge" not in meta and not (out / evaluate.JUDGMENTS_FILE).exists()
        baselines.append({"name": "reference", "uri": str(out)})
    out = tmp_path / "iterations" / "1" / "evaluate"
    task = evaluate_task(model, out, 1, judge_url, baselines=baselines, **extra)
    return evaluate.run(task), out, task


def check_win_rates(meta: dict, out: Path, baselines: tuple[str, ...] = ("base",)) -> list[dict]:
    """Both principle sets judged against each baseline, metrics and counts consistent with
    judgments.jsonl."""
    judgments = read_jsonl(out / evaluate.JUDGMENTS_FILE)
    assert sorted(meta["judge"]["baselines"]) == sorted(baselines)
    for (key, set_name), index in itertools.product(
        (("metrics", "training"), ("heldOutMetrics", "heldOut")), range(len(baselines))
    ):
        win_rate = Metrics.model_validate(meta[key]).win_rates[index]
        assert len(Metrics.model_validate(meta[key]).win_rates) == len(baselines)
        assert win_rate.baseline == baselines[index]
        counts = meta["judge"]["baselines"][win_rate.baseline][set_name]
        lines = [j for j in judgments if (j["set"], j["baseline"]) == (set_name, win_rate.baseline)]
        assert win_rate.items == counts["items"] == counts["judgments"] == len(lines) == 5
        assert (
            counts["wins"] + counts["losses"] + counts["ties"] + counts["unparsable"]
            == counts["judgments"]
        )
        assert counts["unparsable"] == sum(j["verdict"] is None for j in lines)
        assert counts["ties"] == sum(j["verdict"] == "tie" for j in lines)
        assert (win_rate.ties, win_rate.unparsable) == (counts["ties"], counts["unparsable"])
        assert win_rate.rate == pytest.approx(sum(j["outcome"] for j in lines) / 5)
        assert win_rate.low <= win_rate.rate <= win_rate.high
        for line in lines:
            assert line["test_position"] in ("A", "B")
            assert line["verdict"] == parse_verdict(line["answer"])
    return judgments


def test_evaluation_reports_win_rates_against_the_base_model(tiny_llama, tmp_path, scripted):
    url, server = scripted
    server.respond = staticmethod(lambda body, n: (200, "Final answer: A" if n % 3 else "tie"))
    meta, out, _ = run_two_iterations(tiny_llama, tmp_path, url)
    judgments = check_win_rates(meta, out)
    assert meta["judge"]["requests"] == len(server.requests) == 10
    assert {j["verdict"] for j in judgments} <= {"A", "tie"}
    # The held-out set is judged under the held-out principle, the training set under the
    # training ones.
    held = [j for j in judgments if j["set"] == "heldOut"]
    assert all("Be brief." in j["constitution"] or "Ramble." in j["constitution"] for j in held)
    assert (out / evaluate.JUDGE_CACHE_FILE).exists()


def test_by_default_the_judge_sees_the_all_kept_constitutions_responses(
    tiny_llama, tmp_path, scripted
):
    """The paper's win rates: only responses written under the constitution with every
    principle kept are judged (one per query), and the win rate says so."""
    url, server = scripted
    server.respond = staticmethod(lambda body, n: (200, "Final answer: A"))
    evaluation = {"constitutions": 2, "judge": judge_doc(url, constitutions="kept")}
    del evaluation["judge"]["constitutions"]  # the default
    meta, out, _ = run_two_iterations(tiny_llama, tmp_path, url, evaluation=evaluation)
    judgments = read_jsonl(out / evaluate.JUDGMENTS_FILE)
    for key in ("metrics", "heldOutMetrics"):
        (win_rate,) = Metrics.model_validate(meta[key]).win_rates
        assert (win_rate.constitutions, win_rate.items) == ("kept", 3)  # of 3 queries
    assert len(judgments) == len(server.requests) == 6
    antitheses = ("Dodge.", "Help with harm.", "Ramble.")
    assert not [j for j in judgments if any(a in j["constitution"] for a in antitheses)]
    assert {j["query"] for j in judgments if j["set"] == "training"} == set(
        r["query"] for r in read_jsonl(out / evaluate.RESPONSES_FILE)
    )


def responses_of(stage: Path) -> set[str]:
    return {t.strip() for r in read_jsonl(stage / evaluate.RESPONSES_FILE) for t in r["responses"]}


def test_each_iteration_is_judged_against_the_base_and_the_reference_model(
    tiny_llama, other_llama, tmp_path, scripted
):
    """A judge that always prefers the reference model's response and otherwise calls a tie:
    iteration 1 loses every item against the reference and ties every item against the base
    model, so the two win rates show which baseline each one was computed against."""
    url, server = scripted

    def respond(body, n):
        reference = responses_of(tmp_path / "reference")
        prompt = body["messages"][0]["content"]
        a = prompt.split("Response A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0].strip()
        b = prompt.split("Response B:\n", 1)[1].split("\n\nWhich response", 1)[0].strip()
        if a in reference or b in reference:
            return 200, "Final answer: A" if a in reference else "Final answer: B"
        return 200, "Final answer: tie"

    server.respond = staticmethod(respond)
    meta, out, _ = run_two_iterations(tiny_llama, tmp_path, url, reference=other_llama)
    judgments = check_win_rates(meta, out, ("base", "reference"))
    assert meta["judge"]["requests"] == len(server.requests) == 20
    for key in ("metrics", "heldOutMetrics"):
        vs_base, vs_reference = Metrics.model_validate(meta[key]).win_rates
        assert (vs_base.rate, vs_base.ties) == (0.5, 5)
        assert (vs_reference.rate, vs_reference.ties, vs_reference.unparsable) == (0.0, 0, 0)
    # Each judgment compared iteration 1's response with that baseline's own response.
    tested, base = responses_of(out), responses_of(tmp_path / "iterations" / "0" / "evaluate")
    reference = responses_of(tmp_path / "reference")
    assert not reference & base
    for j in judgments:
        assert j["test"].strip() in tested
        assert j["baseline_response"].strip() in (base if j["baseline"] == "base" else reference)


@pytest.mark.parametrize(
    "backend", ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])]
)
def test_a_judge_model_runs_in_the_worker_after_the_evaluated_model(
    tiny_llama, tmp_path, monkeypatch, backend
):
    """evaluation.judge.model: no server; the worker closes the evaluated model's engine,
    loads the judge model with the generation backend (with vLLM: a second engine in the same
    process), and judges through the same code path (orders, verdict parsing, cache). Each
    engine has its own options: the evaluated model's evaluation.engine, the judge's
    evaluation.judge.engine, both over generation.engine (recorded by wrapping the backend
    factory, common.open_backend, that every engine is built through). A rerun from the cache
    never loads the judge model."""
    events: list[tuple[str, str, bool, EngineSpec | None]] = []
    real_open = common.open_backend

    def recording_open(kind, model_dir, model, engine, seed, scoring=False):
        backend = real_open(kind, model_dir, model, engine, seed=seed, scoring=scoring)
        events.append(("open", model.uri, scoring, engine))
        real_close = backend.close

        def close():
            events.append(("close", model.uri, scoring, None))
            real_close()

        backend.close = close
        return backend

    monkeypatch.setattr(common, "open_backend", recording_open)
    judge = str(tiny_llama)  # a random model: a weak judge, but a real one
    generation = {"backend": backend, "maxNewTokens": 12, "temperature": 1.0, "engine": VLLM_CPU}
    evaluation = {
        "constitutions": 2,
        "engine": {"maxModelLen": 1024},
        "judge": {**judge_doc(judge), "engine": {"gpuMemoryUtilization": 0.25}},
    }
    meta, out, task = run_two_iterations(
        tiny_llama, tmp_path, judge, generation=generation, evaluation=evaluation
    )
    judgments = check_win_rates(meta, out)
    assert meta["judge"]["model"] == judge
    assert (meta["judge"]["requests"], meta["judge"]["cache_hits"]) == (10, 0)
    # evaluate-0 (no judge), then evaluate-1: its own engine closed before the judge's opened;
    # generation.engine's options under each engine's own, the judge's not the evaluation's.
    engine = EngineSpec(gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=1024)
    judge_engine = EngineSpec(gpu_memory_utilization=0.25, enforce_eager=True)
    assert (task.engine, task.judge_engine) == (engine, judge_engine)
    assert events == [
        ("open", judge, True, engine),
        ("close", judge, True, None),
        ("open", judge, True, engine),
        ("close", judge, True, None),
        ("open", judge, False, judge_engine),
        ("close", judge, False, None),
    ]
    assert all(isinstance(j["answer"], str) and j["answer"] for j in judgments)
    cache = JudgeCache(storage.open_storage(str(out)), evaluate.JUDGE_CACHE_FILE)
    assert len(cache.answers) == 10

    # The stage again from scratch: responses from judge-inputs.json, answers from the cache.
    events.clear()
    storage.unpublish(storage.open_storage(str(out)), "")
    again = evaluate.run(task)
    assert events == []  # neither the evaluated model nor the judge was loaded
    assert (again["judge"]["requests"], again["judge"]["cache_hits"]) == (0, 10)
    assert again["metrics"]["winRates"] == meta["metrics"]["winRates"]


def test_a_judge_model_without_a_chat_template_is_bad_input(plain_llama):
    generation = GenerationSpec(backend="transformers")
    judge = LocalJudge(str(plain_llama), lambda m: open_model_backend(m, generation, None, 0))
    prompt = build_judge_prompt("dialogue", "1. Be brief.", "Hi?", "Hi.", "Hello there!")
    with pytest.raises(TaskError, match="cannot be prompted as a chat model"):
        judge.complete_many([prompt])
    judge.close()


def test_a_missing_baseline_fails_before_any_generation(
    tiny_llama, tmp_path, scripted, monkeypatch
):
    url, _ = scripted

    def no_generation(*args):
        raise AssertionError("generated before finding the baseline missing")

    monkeypatch.setattr(evaluate, "generate_and_score", no_generation)
    missing = tmp_path / "iterations" / "0" / "evaluate"
    task = evaluate_task(tiny_llama, tmp_path / "e1", 1, url, baselines=base_of(missing))
    with pytest.raises(storage.StageIncomplete, match="iterations/0/evaluate/_manifest.json"):
        evaluate.run(task)


def test_baselines_need_a_judge_and_unique_names(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="baselines: set, but evaluation.judge is not"):
        evaluate_task(tiny_llama, tmp_path, 1, "http://x/v1", baselines=base_of("b"), evaluation={})
    twice = base_of("a") + base_of("b")
    with pytest.raises(ValueError, match=r"names must be unique, got \['base', 'base'\]"):
        evaluate_task(tiny_llama, tmp_path, 1, "http://x/v1", baselines=twice)


def test_judge_outage_exits_75_and_the_retry_pays_only_for_the_rest(
    tiny_llama, tmp_path, scripted, monkeypatch, capsys
):
    """The judge goes down after 4 answers: the worker exits 75 (retryable) with the responses
    and those answers kept in the stage; the retried worker generates nothing, judges the same
    responses, and requests only the 6 answers it lacks."""
    from sami_worker import judge
    from sami_worker.__main__ import EXIT_OK, EXIT_RETRYABLE, main

    monkeypatch.setattr(judge, "ATTEMPTS", 2)
    url, server = scripted
    base = tmp_path / "iterations" / "0" / "evaluate"
    evaluate.run(evaluate_task(tiny_llama, base, 0, url))
    out = tmp_path / "iterations" / "1" / "evaluate"
    task = evaluate_task(tiny_llama, out, 1, url, baselines=base_of(base))
    task.evaluation.judge.max_concurrency = 1  # exactly the first 4 requests are answered
    task_file = tmp_path / "task.json"
    task_file.write_text(task.model_dump_json(by_alias=True))

    server.respond = staticmethod(lambda body, n: (200, "Final answer: B") if n <= 4 else (503, ""))
    assert main(["evaluate", "--task", str(task_file)]) == EXIT_RETRYABLE
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["exit_code"] == 75 and "still failing after 2 attempts" in result["error"]
    assert not storage.is_complete(storage.open_storage(str(out)), "")
    assert len(JudgeCache(storage.open_storage(str(out)), evaluate.JUDGE_CACHE_FILE).answers) == 4
    saved = json.loads((out / evaluate.JUDGE_INPUTS_FILE).read_text())

    def no_generation(*args):
        raise AssertionError("the retry generated responses again")

    monkeypatch.setattr(evaluate, "generate_and_score", no_generation)
    server.respond = staticmethod(lambda body, n: (200, "Final answer: B"))
    before = len(server.requests)
    assert main(["evaluate", "--task", str(task_file)]) == EXIT_OK
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert (meta["judge"]["requests"], meta["judge"]["cache_hits"]) == (6, 4)
    assert len(server.requests) - before == 6
    check_win_rates(meta, out)
    responses = read_jsonl(out / evaluate.RESPONSES_FILE)
    assert [r["responses"] for r in responses if r["set"] == "training"] == [
        r["responses"] for r in saved["records"]
    ]


def test_baseline_from_other_queries_is_a_clear_error(tiny_llama, tmp_path, scripted):
    url, _ = scripted
    base = storage.open_storage(str(tmp_path / "base"))
    other = {"set": "training", "query": "another query", "constitutions": [], "responses": []}
    other["response_tokens"] = []
    files = {evaluate.RESPONSES_FILE: (json.dumps(other) + "\n").encode()}
    storage.write_stage_files(base, "", files, stage="evaluate")
    task = evaluate_task(tiny_llama, tmp_path / "e1", 1, url, baselines=base_of(base.uri()))
    with pytest.raises(TaskError, match="none of the training responses has a base model response"):
        evaluate.run(task)


# ---------------------------------------------------------------------------------------------
# A real judge: vLLM's OpenAI-compatible server on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def vllm_judge(tiny_llama, tmp_path):
    """vLLM's OpenAI-compatible server on the tiny random Llama, stopped at the end. Its
    verdicts are noise; the test is of the mechanics."""
    port = free_port()
    log_path = tmp_path / "vllm-server.log"
    command = [
        sys.executable,
        "-m",
        # Not `vllm serve`: its CLI looks up the "vllm" distribution, which the CPU build
        # (vllm-cpu) does not provide.
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_llama),
        "--served-model-name",
        "judge",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.3",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--seed",
        "0",
    ]
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
            start_new_session=True,  # its engine process is stopped with it
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"vLLM server exited {server.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up in 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        # The whole process group: the API server and the engine process it started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def served_requests(url: str) -> float:
    """Completed requests by the server's own Prometheus counter."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=5).text
    return sum(
        float(m[1]) for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_real_judge_endpoint_end_to_end(tiny_llama, other_llama, tmp_path, vllm_judge):
    """evaluate-1 judged by a real vLLM server against the base model and a reference model."""
    meta, out, task = run_two_iterations(tiny_llama, tmp_path, vllm_judge, reference=other_llama)
    check_win_rates(meta, out, ("base", "reference"))
    assert meta["judge"]["requests"] == 20 and meta["judge"]["cache_hits"] == 0
    assert served_requests(vllm_judge) == 20

    # Run the stage again from scratch (manifest withdrawn): every answer comes from the cache.
    storage.unpublish(storage.open_storage(str(out)), "")
    again = evaluate.run(task)
    assert again["judge"]["requests"] == 0 and again["judge"]["cache_hits"] == 20
    assert served_requests(vllm_judge) == 20
    assert again["metrics"]["winRates"] == meta["metrics"]["winRates"]


# ---------------------------------------------------------------------------------------------
# The report: Figure 2b and the win-rate columns


def _win_rate(baseline: str, rate: float, **extra) -> dict:
    return {"baseline": baseline, "rate": rate, "low": rate - 0.05, "high": rate + 0.05, **extra}


def _write_evaluation(run, prefix: str, metrics: dict, held_out: dict, **meta) -> None:
    meta.update(metrics=metrics, heldOutMetrics=held_out)
    storage.write_stage_files(run, prefix, {}, stage="evaluate", meta=meta)


def test_report_plots_win_rates_and_adds_their_columns(tmp_path):
    """Two baselines: a column pair and a Figure 2b per baseline, the reference model's own
    evaluation as a row after the base model."""
    from PIL import Image

    from sami_operator.report import WIN_RATE_PLOT, build_report

    run = storage.open_storage(str(tmp_path / "run"))
    estimate = {"value": 1.0, "stderr": 0.1}
    plain = {"miLowerBound": estimate, "plugInMi": estimate, "meanResponseTokens": estimate}
    for t, rate in ((0, None), (1, 0.62), (2, 0.7)):
        metrics, held_out = dict(plain), dict(plain)
        if rate is not None:
            metrics["winRates"] = [
                _win_rate(
                    "base",
                    rate,
                    lengthCorrected=rate - 0.1,
                    lengthCorrectedLow=rate - 0.2,
                    lengthCorrectedHigh=rate,
                    items=250,
                    ties=t,
                    unparsable=1,
                ),
                _win_rate("reference", rate - 0.3, items=250, ties=3),
            ]
            held_out["winRates"] = [
                _win_rate("base", 0.55, items=250, constitutions="kept"),
                _win_rate("reference", 0.25, items=250),
            ]
        _write_evaluation(run, f"iterations/{t}/evaluate", metrics, held_out, iteration=t)
    reference = {**plain, "miLowerBound": {"value": 0.5, "stderr": 0.05}}
    _write_evaluation(
        run, "reference", reference, None, iteration=0, reference=True, model="s3://m/instruct"
    )
    markdown = build_report(run, tmp_path / "report")
    plots = {"base": WIN_RATE_PLOT, "reference": "win_rate_reference.png"}
    for name in plots.values():
        assert f"![{name.removesuffix('.png')}]({name})" in markdown
    images = [Image.open(tmp_path / "report" / name).convert("L") for name in plots.values()]
    assert images[0].tobytes() != images[1].tobytes()  # not the same plot twice

    header, _, base_row, reference_row, first_row, _ = markdown.split("\n\n")[2].split("\n", 5)
    assert header.endswith(
        "| win rate vs base | length-corrected vs base | win rate vs reference "
        "| length-corrected vs reference | held-out win rate vs base "
        "| held-out length-corrected vs base | held-out win rate vs reference "
        "| held-out length-corrected vs reference |"
    )
    assert base_row.startswith("| 0 (base) |") and base_row.endswith("| - | - | - | - " * 2 + "|")
    assert reference_row.startswith("| reference | 0.500 ± 0.050 | 1.000 ± 0.100 |")
    assert reference_row.endswith("| - | - | - | - " * 2 + "|")
    assert first_row.startswith("| 1 |")
    assert first_row.endswith(
        "| 0.62 [0.57, 0.67] | 0.52 [0.42, 0.62] | 0.32 [0.27, 0.37] | - "
        "| 0.55 [0.50, 0.60] | - | 0.25 [0.20, 0.30] | - |"
    )
    assert "Reference model (s3://m/instruct): evaluated once like the base model" in markdown
    assert "over the base model's (vs base) or the reference model's (vs reference)" in markdown
    assert (
        "- iteration 2 vs base, training principles, every evaluation constitution: 250 "
        "items judged; 2 ties and 1 unparsable verdicts (each counts 0.5)\n- iteration 2 vs "
        "base, held-out principles, all-kept constitution: 250 items judged; 0 ties and 0 "
        "unparsable verdicts (each counts 0.5)\n- iteration 2 vs reference, training "
        "principles, every evaluation constitution: 250 items judged; 3 ties"
    ) in markdown


def test_report_with_the_base_model_only_has_one_figure_2b(tmp_path):
    from sami_operator.report import WIN_RATE_PLOT, build_report

    run = storage.open_storage(str(tmp_path / "run"))
    metrics = {"miLowerBound": {"value": 1.0}, "winRates": [_win_rate("base", 0.6, items=9)]}
    _write_evaluation(run, "iterations/1/evaluate", metrics, None, iteration=1)
    markdown = build_report(run, tmp_path / "report")
    assert "| win rate vs base | length-corrected vs base |" in markdown
    assert "vs reference" not in markdown and "Reference model" not in markdown
    assert sorted(p.name for p in (tmp_path / "report").glob("win_rate*")) == [WIN_RATE_PLOT]


def test_report_without_a_judge_has_no_win_rate_columns(tmp_path):
    from sami_operator.report import build_report

    run = storage.open_storage(str(tmp_path / "run"))
    meta = {"iteration": 0, "metrics": {"miLowerBound": {"value": 1.0}}}
    storage.write_stage_files(run, "iterations/0/evaluate", {}, stage="evaluate", meta=meta)
    markdown = build_report(run, tmp_path / "report")
    assert "win rate" not in markdown.lower()
    assert not (tmp_path / "report" / "win_rate.png").exists()
