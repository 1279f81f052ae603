"""The principle writer: robust parsing, retries with a stricter prompt, endpoint and local LM."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sami_worker import principle_writer, storage
from sami_worker.common import PRINCIPLES_FILE
from sami_worker.principle_writer import ParseError, parse_principles, write_principles
from sami_worker.tasks import TaskError, WritePrinciplesTask
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
    """An OpenAI-compatible endpoint that replays answers recorded from a real model."""

    answers: list[str] = []
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        answer = type(self).answers.pop(0)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

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


def test_endpoint_writer_publishes_principles(replay_endpoint, tmp_path, monkeypatch):
    url, replay = replay_endpoint
    replay.answers = [RECORDED[0]["answer"], RECORDED[1]["answer"]]
    monkeypatch.setenv("SAMI_API_KEY", "test-key")
    task = writer_task(
        tmp_path / "p",
        {
            "endpoint": {"url": url, "model": "writer", "apiKeySecret": {"name": "s", "key": "k"}},
            "instruction": "a helpful assistant",
            "count": 1,
        },
    )
    meta = principle_writer.run(task)
    assert meta == {"principles": ["concise"]}
    assert [r["path"] for r in replay.requests] == ["/v1/chat/completions"] * 2
    assert replay.requests[0]["auth"] == "Bearer test-key"
    assert replay.requests[0]["body"]["model"] == "writer"
    stage = storage.open_storage(str(tmp_path / "p"))
    published = json.loads(storage.read_stage_file(stage, "", PRINCIPLES_FILE))
    assert published[0]["name"] == "concise"


def test_unreachable_endpoint_fails_clearly(tmp_path):
    task = writer_task(
        tmp_path / "p",
        {
            "endpoint": {"url": "http://127.0.0.1:9/v1", "model": "m", "timeoutSeconds": 2},
            "instruction": "x",
        },
    )
    result = run_worker("write-principles", task, tmp_path)
    assert result.returncode == 65
    assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in result.stderr


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
