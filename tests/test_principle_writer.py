"""The principle writer: robust parsing, retries with a stricter prompt, endpoint and local LM."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sami_operator.models import EngineSpec
from sami_worker import chat, common, principle_writer, storage
from sami_worker.common import PRINCIPLES_FILE
from sami_worker.principle_writer import ParseError, parse_principles, write_principles
from sami_worker.tasks import TaskError, WritePrinciplesTask, dump_task
from tests.test_generate import VLLM_CPU, run_worker

RECORDED = json.loads((Path(__file__).parent / "data" / "writer-answers-smollm2.json").read_text())[
    "answers"
]


def test_parses_a_json_list_inside_prose():
    # A real SmolLM2 answer: prose, then the list.
    principles = parse_principles(RECORDED[1]["answer"], count=1)
    assert [(p.name, p.antithesis) for p in principles] == [
        ("concise", "The response is long-winded and padded.")
    ]


def test_parses_numbered_pipe_lines_and_code_fences():
    answer = (
        "Sure!\n1. Be Kind | The reply is warm. | The reply is cold.\n"
        "2. honest | The reply tells the truth. | The reply lies.\n"
    )
    assert [p.name for p in parse_principles(answer, 2)] == ["be-kind", "honest"]
    fenced = '```json\n[{"name": "a", "definition": "x.", "antithesis": "y."}]\n```'
    assert parse_principles(fenced, 1)[0].definition == "x."


@pytest.mark.parametrize(
    "answer, problem",
    [
        (RECORDED[0]["answer"], "no JSON list"),
        (RECORDED[1]["answer"], "asked for 2 principles, got 1"),
        (RECORDED[2]["answer"], "no JSON list"),  # two objects without a comma: not JSON
        ('[{"name": "a", "definition": "x", "antithesis": "x"}, {}]', "must differ"),
        (
            '[{"name": "a", "definition": "x", "antithesis": "y"},'
            ' {"name": "A", "definition": "z", "antithesis": "w"}]',
            "not distinct",
        ),
    ],
)
def test_rejects_unusable_answers_with_a_reason(answer, problem):
    with pytest.raises(ParseError, match=problem):
        parse_principles(answer, 2)


def test_retries_with_a_stricter_prompt():
    prompts = []
    answers = iter([RECORDED[0]["answer"], RECORDED[1]["answer"]])

    def ask(prompt: str, attempt: int) -> str:
        prompts.append(prompt)
        return next(answers)

    principles = write_principles(ask, "a helpful assistant", 1)
    assert [p.name for p in principles] == ["concise"]
    assert "could not be used: no JSON list" in prompts[1]
    assert "could not be used" not in prompts[0]


def test_gives_up_after_bounded_attempts():
    with pytest.raises(TaskError, match="no usable principles after 3 attempts"):
        write_principles(lambda prompt, attempt: "I cannot.", "anything", 2)


class _Replay(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that replays answers recorded from a real model. An
    answer that is a (status, body) pair is an error instead, sent with OpenAI's
    `retry-after-ms: 10` (the client honours it: short waits in tests). Every request's
    headers are recorded."""

    answers: list[str | tuple[int, dict]] = []
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {
                "path": self.path,
                "body": body,
                "auth": self.headers.get("Authorization"),
                "headers": dict(self.headers),
            }
        )
        answer = type(self).answers.pop(0)
        if isinstance(answer, tuple):
            status, payload = answer
        else:
            status = 200
            payload = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        data = json.dumps(payload).encode()
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
def replay_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Replay.requests = []
    yield f"http://127.0.0.1:{server.server_port}/v1", _Replay
    server.shutdown()


def writer_task(output: Path, writer: dict) -> WritePrinciplesTask:
    return WritePrinciplesTask.model_validate({"output": str(output), "writer": writer})


SECRET = {"name": "s", "key": "k"}


def run_main(task: WritePrinciplesTask, tmp_path: Path, capsys) -> dict:
    """The worker program in this process (so a test can lower chat.ATTEMPTS): its result
    line."""
    from sami_worker.__main__ import main

    path = tmp_path / "write-principles-task.json"
    path.write_text(dump_task(task))
    code = main(["write-principles", "--task", str(path)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["exit_code"] == code
    return result


def test_endpoint_writer_publishes_principles(replay_endpoint, tmp_path, monkeypatch):
    """A transient 503 is retried (the chat client's retries); the key goes to a loopback
    endpoint over plain http because it opts in."""
    url, replay = replay_endpoint
    busy = (503, {"error": {"message": "overloaded", "type": "server_error"}})
    replay.answers = [busy, RECORDED[0]["answer"], RECORDED[1]["answer"]]
    monkeypatch.setenv("SAMI_API_KEY", "test-key")
    endpoint = {"url": url, "model": "writer", "apiKeySecret": SECRET, "allowInsecureApiKey": True}
    task = writer_task(
        tmp_path / "p", {"endpoint": endpoint, "instruction": "a helpful assistant", "count": 1}
    )
    meta = principle_writer.run(task)
    assert meta == {"principles": ["concise"]}
    assert [r["path"] for r in replay.requests] == ["/v1/chat/completions"] * 3
    assert [r["auth"] for r in replay.requests] == ["Bearer test-key"] * 3
    assert replay.requests[0]["body"] == replay.requests[1]["body"]  # the same request again
    assert replay.requests[0]["body"]["model"] == "writer"
    stage = storage.open_storage(str(tmp_path / "p"))
    published = json.loads(storage.read_stage_file(stage, "", PRINCIPLES_FILE))
    assert published[0]["name"] == "concise"


def test_unreachable_endpoint_is_retryable(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(chat, "ATTEMPTS", 2)
    task = writer_task(
        tmp_path / "p",
        {
            "endpoint": {"url": "http://127.0.0.1:9/v1", "model": "m", "timeoutSeconds": 2},
            "instruction": "x",
        },
    )
    result = run_main(task, tmp_path, capsys)
    assert result["exit_code"] == 75
    assert result["error"] == (
        "principles.writer.endpoint: http://127.0.0.1:9/v1/chat/completions still failing "
        "after 2 attempts (last: ConnectError)"
    )


def test_a_rejected_key_is_bad_input_and_the_error_body_stays_out_of_the_result(
    replay_endpoint, tmp_path, monkeypatch, capsys, caplog
):
    """A 401 is not retried; the result line (the SAMIRun's status and Events) names the field
    and the status, the error's type and code, and nothing of the body's text, which here
    echoes the key; no log record at INFO or above has it either."""
    url, replay = replay_endpoint
    leaked = "sk-proj-Zq81LEAKEDxKEYx0000000000"
    error = {
        "message": f"Incorrect API key provided: {leaked}. You can find your key at ...",
        "type": "invalid_request_error",
        "param": leaked,
        "code": "invalid_api_key",
    }
    replay.answers = [(401, {"error": error})]
    monkeypatch.setenv("SAMI_API_KEY", leaked)
    endpoint = {"url": url, "model": "w", "apiKeySecret": SECRET, "allowInsecureApiKey": True}
    task = writer_task(tmp_path / "p", {"endpoint": endpoint, "instruction": "x"})
    caplog.set_level(logging.DEBUG)
    result = run_main(task, tmp_path, capsys)
    assert result["exit_code"] == 65
    assert result["error"] == (
        f"principles.writer.endpoint: {url}/chat/completions answered HTTP 401 (type "
        "invalid_request_error, code invalid_api_key); check the API key "
        "(principles.writer.endpoint.apiKeySecret)"
    )
    assert len(replay.requests) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and leaked in r.getMessage()]
    assert any(leaked in r.getMessage() for r in caplog.records)  # at debug level only


def test_no_key_over_plain_http_without_the_opt_in(replay_endpoint, tmp_path, monkeypatch, capsys):
    """Without apiKeySecret no Authorization header goes out whatever the environment holds;
    with apiKeySecret on plain http and no opt-in the stage is bad input before any request."""
    url, replay = replay_endpoint
    replay.answers = [RECORDED[0]["answer"], RECORDED[1]["answer"]]
    monkeypatch.setenv("SAMI_API_KEY", "sk-sami")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin")  # the library reads it too
    task = writer_task(
        tmp_path / "p", {"endpoint": {"url": url, "model": "w"}, "instruction": "x", "count": 1}
    )
    assert principle_writer.run(task) == {"principles": ["concise"]}
    assert len(replay.requests) == 2
    for request in replay.requests:
        assert "authorization" not in {name.lower() for name in request["headers"]}
        assert "sk-" not in json.dumps(request["headers"])

    endpoint = {"url": url, "model": "w", "apiKeySecret": SECRET}
    task = writer_task(tmp_path / "q", {"endpoint": endpoint, "instruction": "x"})
    result = run_main(task, tmp_path, capsys)
    assert result["exit_code"] == 65
    assert result["error"] == (
        "principles.writer.endpoint.apiKeySecret: the API key is sent only over https, and "
        "principles.writer.endpoint.url is plain http; for a server on this machine set "
        "principles.writer.endpoint.allowInsecureApiKey: true"
    )
    assert len(replay.requests) == 2


def test_a_writer_model_is_opened_with_its_own_engine(tiny_llama, tmp_path, monkeypatch, capsys):
    """principles.writer.model: the worker program, from its task file, loads the writer with
    generation.backend and principles.writer.engine over generation.engine (recorded by
    wrapping the backend factory, common.open_backend, that every engine is built through).
    The tiny random model writes no usable principles: bad input, nothing published."""
    opened = []
    real_open = common.open_backend

    def recording_open(kind, model_dir, model, engine, seed, scoring=False):
        opened.append((kind, model.uri, engine))
        return real_open(kind, model_dir, model, engine, seed=seed, scoring=scoring)

    monkeypatch.setattr(common, "open_backend", recording_open)
    writer = {
        "model": str(tiny_llama),
        "instruction": "a helpful assistant",
        "count": 1,
        "maxTokens": 16,
        "engine": {"maxModelLen": 1024, "enforceEager": False},
    }
    generation = {"backend": "transformers", "engine": VLLM_CPU}
    task = WritePrinciplesTask.model_validate(
        {"output": str(tmp_path / "p"), "writer": writer, "generation": generation}
    )
    result = run_main(task, tmp_path, capsys)
    assert result["exit_code"] == 65
    assert "no usable principles after 3 attempts" in result["error"]
    engine = EngineSpec(gpu_memory_utilization=0.3, enforce_eager=False, max_model_len=1024)
    assert task.engine == engine
    assert opened == [("transformers", str(tiny_llama), engine)]
    assert not storage.is_complete(storage.open_storage(str(tmp_path / "p")), "")


@pytest.mark.vllm
@pytest.mark.slow
def test_local_writer_on_the_real_small_model(smollm2, tmp_path):
    """SmolLM2-135M is too weak a writer: with greedy decoding it answers in prose three times.
    The program retries with the stricter prompt, then fails as a bad input (exit 65) with
    the reason, and publishes nothing. A stronger writer model or endpoint is needed."""
    task = WritePrinciplesTask.model_validate(
        {
            "output": str(tmp_path / "p"),
            "writer": {
                "model": str(smollm2),
                "instruction": "a helpful and harmless AI assistant",
                "count": 1,
                "temperature": 0.0,
                "maxTokens": 200,
            },
            "generation": {"engine": VLLM_CPU},
        }
    )
    result = run_worker("write-principles", task, tmp_path)
    assert result.returncode == 65, result.stderr[-3000:]
    assert result.stderr.count("unusable:") == 3
    assert "no usable principles after 3 attempts" in result.stderr
    assert not storage.is_complete(storage.open_storage(str(tmp_path / "p")), "")
