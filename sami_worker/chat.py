"""One client for OpenAI-compatible chat completions: the judge's and the principle writer's.

Built on the `openai` library, configured explicitly rather than from its environment:

- Retries: the library's, ATTEMPTS attempts per request in all, on connection errors,
  timeouts, 408, 409, 429 and 5xx, with its exponential backoff and jitter (about 0.5, 1, 2,
  4, 8, 8, 8 s) unless the server asks otherwise with Retry-After / retry-after-ms (honoured
  up to two minutes; a longer one is not waited for). Each attempt has the endpoint's
  timeoutSeconds. Redirects are not followed: a chat endpoint that redirects is misconfigured,
  and following one would re-send the prompt (and the key) elsewhere.
- Errors, mapped to the worker's exit codes: still failing after the retries (connection,
  timeout, 429, 5xx) -> EndpointUnavailable (exit 75, retryable); any other answer (400, 401,
  403, 404, 422, a redirect, a body that is not a chat completion) -> TaskError (exit 65, bad
  input) naming the spec field and the HTTP status.
- Error messages reach the result line, hence the SAMIRun's status and Events, which anyone
  who may read the run can see. They carry a sanitised reason only: the HTTP status and the
  `type` and `code` of an OpenAI-style error body, printable ASCII, at most 80 characters
  each. The body itself, which may echo the prompt or a key, is logged at debug level only.
- The API key (see api_key_for): only to an endpoint that names apiKeySecret, and only over
  https, or over plain http to a loopback host when the endpoint opts in with
  allowInsecureApiKey. No other request carries an Authorization header, nor the library's
  OpenAI-Organization / OpenAI-Project headers from OPENAI_ORG_ID / OPENAI_PROJECT_ID.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI

from sami_operator.models import Endpoint
from sami_worker import settings
from sami_worker.tasks import TaskError

log = logging.getLogger(__name__)

ATTEMPTS = 8  # per request, the first included
REASON_CHARS = 80  # longest error `type` / `code` copied into a message


class EndpointUnavailable(RuntimeError):
    """An endpoint kept failing transiently (connection errors, timeouts, 429, 5xx) past the
    retries. Retrying the stage later may help (exit 75)."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: a server on this machine (this pod)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(endpoint: Endpoint, field: str) -> str | None:
    """The API key to send to `endpoint` (spec field `field`), None to send none.

    A key goes only to an endpoint that names apiKeySecret; the worker then reads it from
    SAMI_API_KEY (which the operator fills from that Secret). Over https, OPENAI_API_KEY is the
    fallback when SAMI_API_KEY is unset (`sami run` on a workstation). Over plain http a key
    would travel readable by anyone on the path, so it is sent only to a loopback host
    (127.0.0.0/8, ::1, localhost) and only when the endpoint sets allowInsecureApiKey, and then
    only SAMI_API_KEY: OPENAI_API_KEY, a key for a hosted API, never goes over plain http. An
    endpoint that names apiKeySecret but may not get the key is bad input (TaskError), rather
    than being called without the key it says it needs.
    """
    if endpoint.api_key_secret is None:
        return None
    url = urlsplit(endpoint.url)
    if url.scheme == "https":
        key = settings.api_key(over_https=True)
        missing = "set SAMI_API_KEY (the operator fills it from that Secret) or OPENAI_API_KEY"
    elif url.scheme == "http" and is_loopback(url.hostname or ""):
        if not endpoint.allow_insecure_api_key:
            raise TaskError(
                f"{field}.apiKeySecret: the API key is sent only over https, and {field}.url is "
                f"plain http; for a server on this machine set {field}.allowInsecureApiKey: true"
            )
        key = settings.api_key(over_https=False)
        missing = "set SAMI_API_KEY (OPENAI_API_KEY is sent only to https endpoints)"
    else:
        raise TaskError(
            f"{field}.apiKeySecret: the API key is sent only over https, and {field}.url is "
            f"plain http to a host that is not loopback (allowInsecureApiKey applies only to "
            f"127.0.0.0/8, ::1 and localhost): use an https URL"
        )
    if not key:
        raise TaskError(f"{field}.apiKeySecret is set but no API key reached the worker: {missing}")
    return key


def _clean(value: object) -> str:
    """Printable ASCII only, at most REASON_CHARS characters."""
    text = "".join(c for c in str(value) if " " <= c <= "~")
    return text[:REASON_CHARS]


def status_reason(err: openai.APIStatusError) -> str:
    """'HTTP 401 (type invalid_request_error, code invalid_api_key)': the status and the
    `type` and `code` of an OpenAI-style error body, never the body's text."""
    reason = f"HTTP {err.status_code}"
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict):
        fields = [
            f"{name} {_clean(body[name])}"
            for name in ("type", "code")
            if isinstance(body.get(name), (str, int)) and _clean(body[name])
        ]
        if fields:
            reason += f" ({', '.join(fields)})"
    return reason


# Attempts of the request the current asyncio task is making (each prompt has its own task).
_attempts: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_attempts")


class ChatClient:
    """Chat completions from one OpenAI-compatible endpoint, named `field` in the spec
    (e.g. "evaluation.judge.endpoint") in every error. `requests` counts the HTTP requests
    sent, retries included."""

    def __init__(self, endpoint: Endpoint, field: str, *, attempts: int | None = None):
        self.endpoint = endpoint
        self.field = field
        self.url = endpoint.url.rstrip("/") + "/chat/completions"  # for messages
        # Read here, not at import, so a test can lower it.
        self.attempts = ATTEMPTS if attempts is None else attempts
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1; got {self.attempts}")
        self._key = api_key_for(endpoint, field)  # bad input surfaces before any request
        self.requests = 0

    def complete(self, prompt: str, *, temperature: float, max_tokens: int) -> str:
        """The answer to one prompt."""
        return self.complete_many([prompt], temperature=temperature, max_tokens=max_tokens)[0]

    def complete_many(
        self,
        prompts: Sequence[str],
        *,
        temperature: float,
        max_tokens: int,
        concurrency: int = 1,
        on_answer: Callable[[str, str], None] | None = None,
    ) -> list[str]:
        """The answers to `prompts`, in order, at most `concurrency` requests in flight.
        `on_answer(prompt, answer)` is called as each arrives, so a caller can keep what
        arrived before a failure; on the first failure the other requests are cancelled."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1; got {concurrency}")
        return asyncio.run(
            self._complete_all(list(prompts), temperature, max_tokens, concurrency, on_answer)
        )

    def _client(self) -> AsyncOpenAI:
        async def count(request) -> None:
            self.requests += 1
            attempts = _attempts.get(None)
            if attempts is not None:
                attempts[0] += 1

        # The library's HTTP client and defaults; the semaphore in _complete_all bounds the
        # requests in flight, retries included.
        http = openai.DefaultAsyncHttpxClient(
            follow_redirects=False,
            event_hooks={"request": [count]},
        )
        return AsyncOpenAI(
            # Never None: the library would read OPENAI_API_KEY from the environment. Without
            # a key the Authorization header is omitted from every request (_create).
            api_key=self._key or "no-key",
            base_url=self.endpoint.url,
            timeout=self.endpoint.timeout_seconds,
            max_retries=self.attempts - 1,
            http_client=http,
            # Not from OPENAI_ORG_ID / OPENAI_PROJECT_ID: this endpoint may not be OpenAI's.
            default_headers={"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit},
        )

    async def _complete_all(
        self,
        prompts: list[str],
        temperature: float,
        max_tokens: int,
        concurrency: int,
        on_answer: Callable[[str, str], None] | None,
    ) -> list[str]:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(client: AsyncOpenAI, prompt: str) -> str:
            async with semaphore:
                answer = await self._create(client, prompt, temperature, max_tokens)
            if on_answer is not None:
                on_answer(prompt, answer)
            return answer

        async with self._client() as client:
            tasks = [asyncio.create_task(one(client, p)) for p in prompts]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                # On the first failure the rest are cancelled; what arrived was handed over.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _create(
        self, client: AsyncOpenAI, prompt: str, temperature: float, max_tokens: int
    ) -> str:
        attempts = [0]
        _attempts.set(attempts)  # this task's own context
        extra = {} if self._key else {"Authorization": openai.omit}
        try:
            completion = await client.chat.completions.create(
                model=self.endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=temperature,
                max_tokens=max_tokens,
                extra_headers=extra,
            )
        except openai.APITimeoutError:
            raise EndpointUnavailable(
                f"{self.field}: {self.url} still failing after {attempts[0]} attempts (last: "
                f"no answer within timeoutSeconds {self.endpoint.timeout_seconds:g})"
            ) from None
        except openai.APIConnectionError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ else "connection error"
            raise EndpointUnavailable(
                f"{self.field}: {self.url} still failing after {attempts[0]} attempts "
                f"(last: {cause})"
            ) from None
        except openai.APIStatusError as err:
            raise self._status_error(err, attempts[0]) from None
        except (openai.APIResponseValidationError, ValueError):
            raise self._not_chat() from None
        try:
            return completion.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise self._not_chat() from None

    def _status_error(self, err: openai.APIStatusError, attempts: int) -> Exception:
        reason = status_reason(err)
        log.debug("%s answered %s: %s", self.url, reason, err.response.text[:4000])
        status = err.status_code
        if status in (408, 409, 429) or status >= 500:
            return EndpointUnavailable(
                f"{self.field}: {self.url} still failing after {attempts} attempts (last: {reason})"
            )
        hint = ""
        if status in (401, 403):
            hint = f"; check the API key ({self.field}.apiKeySecret)"
        elif status == 404:
            hint = f"; check {self.field}.url and {self.field}.model"
        elif 300 <= status < 400:
            hint = f"; redirects are not followed: set {self.field}.url to where it leads"
        return TaskError(f"{self.field}: {self.url} answered {reason}{hint}")

    def _not_chat(self) -> TaskError:
        return TaskError(
            f"{self.field}: {self.url} did not answer like an OpenAI-compatible chat endpoint"
        )
