"""MLLM reward for CogniEdit: the judging prompt, a robust score parser, an HTTP client and the `RewardFn`.

CogniEdit scores each edited image with a multimodal LLM served behind an OpenAI-compatible endpoint (the official
code runs UnifiedReward under vLLM) and uses the sum of its scores as the GRPO reward (eq. 12: alignment, coherence
and consistency, each on [0, 5]). This module holds:

- `REWARD_PROMPT_TEMPLATE`: the judging prompt (see its note on provenance);
- `parse_scores`: pulls the four scores (alignment, coherence, style, consistency) out of free-form model output;
- `ChatClient`: a standard-library client for `/v1/chat/completions` with images as base64 PNG data URLs, a bounded
  thread pool, per-request timeouts and exponential-backoff retries;
- `MLLMReward`: the `RewardFn` that ties them together.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import io
import json
import math
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from editing_jax.rewards import base

# ---------------------------------------------------------------------------------------------------------------------
# Prompt.

# Written in our own words. Provenance: the paper's Appendix 10.1 prompt text was not retrievable offline; this follows
# the structure of the reward template in the official code (yl4467/CogniEdit, train_qwen_grpo_v1.py): the edited
# image comes first and the original second, the judge extracts key words (subject, object, color, number, style,
# activity) and rates Alignment, Coherence, Style and Consistency in a fixed "<Name> Score (range): value" format,
# then justifies them. Differences: we give the edit instruction (the official template gives a caption of the
# edited image), ask for the [0, 5] range of eq. 12 (the official template says 1-5), and drop the per-word score
# list, which the reward never reads. `MLLMReward` accepts any template with an `{instruction}` field.
REWARD_PROMPT_TEMPLATE = """\
You are judging the result of an image edit. The first image is the edited result; the second image is the \
original it was edited from. The edit was requested with this instruction:
"{instruction}"

First, list the key elements the instruction asks for (objects, colors, numbers, positions, style, actions) and say \
for each whether the edited image shows it.

Then rate the edited image on four axes, each from 0 (worst) to 5 (best):
- Alignment: how completely and precisely the edited image carries out the instruction (right objects, colors, \
counts and positions).
- Coherence: how sound the edited image is (no misplaced, distorted, missing or extra objects, no visual glitches, \
no wrong colors or quantities).
- Style: how visually pleasing the edited image is, regardless of the instruction.
- Consistency: how well the edited image keeps everything from the original that the instruction does not ask to \
change.

Reply with exactly these four lines, then one or two sentences of reasons:
Alignment Score (0-5): <score>
Coherence Score (0-5): <score>
Style Score (0-5): <score>
Consistency Score (0-5): <score>
Reasons: <reasons>
"""

# ---------------------------------------------------------------------------------------------------------------------
# Score parsing.

SCORE_KEYS: tuple[str, ...] = ("alignment", "coherence", "style", "consistency")
# Labels a judge may use for each score (lower case, matched as whole words).
SCORE_ALIASES: dict[str, tuple[str, ...]] = {
    "alignment": ("alignment", "instruction alignment", "prompt alignment", "instruction following"),
    "coherence": ("coherence",),
    "style": ("style", "aesthetics", "aesthetic"),
    "consistency": ("consistency", "preservation"),
}
# A score: "4", "4.5", "-1", "4/5", "8 out of 10", "80%". The lookahead refuses the start of a stated range ("1-5)").
_NUMBER = (
    r"(?P<num>[-+]?\d+(?:\.\d+)?)(?!\.?\d)(?!\s*(?:-|–|to)\s*\d+(?:\.\d+)?\s*[\)\]:=])"
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)|\s*(?P<pct>%))?"
)
# A stated range such as "(1-5)", "[0 to 5]", "(scale of 0-5, higher is better)" or a bare "1-5" before a colon;
# the filler swallows it so that it is never mistaken for the score itself.
_RANGE = (
    r"(?:[\(\[][^\)\]\n\d]*\d+(?:\.\d+)?\s*(?:-|–|to|~)\s*\d+(?:\.\d+)?[^\)\]\n\d]*[\)\]]"
    r"|\d+\s*(?:-|–|to)\s*\d+(?=\s*[:=]))"
)
# A number directly followed by a word is a count in prose ("Coherence: 3 objects are distorted"), not a score,
# unless the word is a unit or a connective ("4 points", "4 because ...").
_NOT_A_COUNT = r"(?![^\S\n]*(?!(?:points?|pts|stars?|because|since|as|given|due|overall|and|but)(?![a-z]))[a-z])"
# What may sit between a label and its number on the same line: markdown, separators, a range, a few glue words.
_FILLER = (
    rf"(?:{_RANGE}|(?<![a-z])(?:scores?|ratings?|is|of|was|rated|gets?)(?![a-z])"
    r"|[^\S\n]|[*_:=|<>\(\[\"'`~\-–—“”‘’])*?"
)


class ScoreParseError(ValueError):
    """Raised by `parse_scores(strict=True)` when a score is missing."""


@dataclasses.dataclass(frozen=True)
class ParsedScores:
    """Scores parsed from one judge reply.

    Attributes:
        scores: key -> score in [low, high]; NaN where the reply gives none.
        missing: keys without a score.
        clipped: keys whose stated score lay outside [low, high] and was clipped.
        raw: the reply text.
    """

    scores: dict[str, float]
    missing: tuple[str, ...]
    clipped: tuple[str, ...]
    raw: str

    @property
    def ok(self) -> bool:
        return not self.missing


def parse_scores(
    text: str,
    keys: Sequence[str] = SCORE_KEYS,
    *,
    low: float = 0.0,
    high: float = 5.0,
    strict: bool = False,
) -> ParsedScores:
    """Extracts named scores from free-form judge output.

    Understands, in this order of preference: JSON objects anywhere in the text (also inside ``` fences, nested, keys
    like "Alignment Score" or "alignment_score", values as numbers, "4/5" strings or {"score": 4}); then labelled
    lines such as "Alignment Score (1-5): 4", "**Coherence:** 4/5", "- style = 3.5 out of 5", "| Consistency | 80% |"
    or a "### Alignment" heading followed by a "Score: 4" line. When a label occurs several times the last one wins
    (judges restate their final answer). A fraction's denominator and a percentage's 100 are mapped to `high` ("8/10"
    -> 4 and "80%" -> 4 on the default scale; "4/5" stays 4); values outside [low, high] are clipped and reported in
    `clipped`. A number directly followed by a noun ("Coherence: 3 objects are ...") is prose, not a score.

    Args:
        text: the reply.
        keys: which scores to extract; each must be in `SCORE_ALIASES`.
        low, high: the score range.
        strict: raise `ScoreParseError` instead of returning NaN for missing scores.

    Returns:
        A `ParsedScores`.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected the reply as a string, got {type(text).__name__}")
    unknown = [k for k in keys if k not in SCORE_ALIASES]
    if unknown:
        raise ValueError(f"unknown score keys {unknown}; known: {list(SCORE_ALIASES)}")
    if not high > low:
        raise ValueError(f"need high > low, got [{low}, {high}]")
    found: dict[str, float] = {}
    for key, value in _scores_from_json(text, high).items():
        if key in keys:
            found[key] = value
    for key in keys:
        if key not in found:
            value = _score_from_lines(text, key, high)
            if value is not None:
                found[key] = value
    scores, missing, clipped = {}, [], []
    for key in keys:
        value = found.get(key)
        if value is None or not math.isfinite(value):
            scores[key] = math.nan
            missing.append(key)
            continue
        if not low <= value <= high:
            clipped.append(key)
            value = min(max(value, low), high)
        scores[key] = float(value)
    if strict and missing:
        snippet = " ".join(text.split())[:200]
        raise ScoreParseError(f"no score for {missing} in judge reply: {snippet!r}")
    return ParsedScores(scores=scores, missing=tuple(missing), clipped=tuple(clipped), raw=text)


def _label_pattern(key: str) -> str:
    aliases = sorted(SCORE_ALIASES[key], key=len, reverse=True)
    return r"(?<![a-z])(?:" + "|".join(re.escape(a).replace(r"\ ", r"[\s_]+") for a in aliases) + r")(?![a-z])"


def _to_score(match: re.Match, high: float) -> float:
    value = float(match.group("num"))
    if match.group("den") is not None:
        denominator = float(match.group("den"))
        return value / denominator * high if denominator > 0 else math.nan
    if match.group("pct") is not None:
        return value / 100.0 * high
    return value


@functools.cache
def _line_patterns(key: str) -> tuple[re.Pattern, re.Pattern]:
    """(label and score on one line, heading naming the score with "Score: N" on one of the next two lines)."""
    label = _label_pattern(key)
    same_line = re.compile(label + _FILLER + _NUMBER + _NOT_A_COUNT, re.IGNORECASE)
    heading = re.compile(
        label + r"[^\n\d]*\n(?:[^\n]*\n)?[^\S\n]*(?:[-*>#]+[^\S\n]*)?[*_]*(?:scores?|ratings?)[*_]*"
        r"[^\S\n]*[:=][^\S\n]*[*_]*" + _NUMBER,
        re.IGNORECASE,
    )
    return same_line, heading


def _score_from_lines(text: str, key: str, high: float) -> float | None:
    same_line, heading = _line_patterns(key)
    matches = list(same_line.finditer(text)) or list(heading.finditer(text))
    return _to_score(matches[-1], high) if matches else None


def _json_candidates(text: str) -> list[Any]:
    """Every JSON value that starts with '{' somewhere in the text, outermost first."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while (start := text.find("{", position)) >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        values.append(value)
        position = end
    return values


def _normalize_key(name: str) -> str:
    name = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", name.lower())
    words = [w for w in re.split(r"[^a-z]+", name) if w and w not in ("score", "scores", "rating")]
    return " ".join(words)


_KEY_LOOKUP = {alias: key for key, aliases in SCORE_ALIASES.items() for alias in aliases}


def _coerce(value: Any, high: float) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = re.search(_NUMBER, value)
        return _to_score(match, high) if match else None
    if isinstance(value, Mapping):
        for name in ("score", "value", "rating"):
            if name in value:
                return _coerce(value[name], high)
        return None
    if isinstance(value, (list, tuple)) and value:
        return _coerce(value[0], high)
    return None


def _scores_from_json(text: str, high: float) -> dict[str, float]:
    found: dict[str, float] = {}

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            for name, value in node.items():
                key = _KEY_LOOKUP.get(_normalize_key(str(name)))
                score = _coerce(value, high) if key else None
                if key and score is not None and math.isfinite(score):
                    found[key] = score  # Later (deeper or later in the text) occurrences win.
                elif isinstance(value, (Mapping, list)):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for candidate in _json_candidates(text):
        visit(candidate)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# HTTP client.


class ChatError(RuntimeError):
    """A chat request failed (after its retries, when the failure was retryable).

    Attributes:
        status: the HTTP status of the last attempt, or None for connection errors, timeouts and bad bodies.
        attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: a user turn with images (in order, before the text) and an optional system prompt."""

    text: str
    images: tuple[np.ndarray, ...] = ()  # Each uint8 [H, W, 3].
    system: str | None = None


def encode_png_data_url(image: np.ndarray) -> str:
    """A uint8 [H, W, 3] image as a 'data:image/png;base64,...' URL (lossless, unlike the JPEG of the official code)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _BadResponse(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class ChatClient:
    """Client for an OpenAI-compatible `/v1/chat/completions` endpoint serving a VLM (vLLM, sglang, ...).

    Standard library only (urllib + a thread pool). Connection errors, timeouts and HTTP 408/429/5xx are retried with
    exponential backoff (`backoff_s * 2**attempt`, at most `max_backoff_s`, at least a 429's Retry-After up to that
    cap); other HTTP errors and malformed bodies fail at once. A failure raises `ChatError` naming the endpoint, the
    number of attempts and the last cause.

    Attributes:
        base_url: server root, with or without a trailing '/v1' (e.g. 'http://127.0.0.1:8000').
        model: model name sent in the payload.
        api_key: sent as 'Authorization: Bearer ...' when given.
        timeout_s: socket timeout of each attempt (connect and each read).
        max_retries: retries after the first attempt.
        backoff_s, max_backoff_s, jitter: retry delays; each delay is scaled by a random factor in [1 - jitter, 1].
        max_concurrency: requests in flight at once within one `complete_batch` call.
        max_tokens, temperature: sampling options; `extra_body` is merged into the payload last (e.g. {'seed': 0}).
        trust_env: honour http(s)_proxy / no_proxy environment variables.
        sleep_fn: how to wait between retries (tests replace it).
    """

    base_url: str
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    jitter: float = 0.1
    max_concurrency: int = 8
    max_tokens: int = 1024
    temperature: float = 0.0
    extra_body: Mapping[str, Any] | None = None
    trust_env: bool = True
    sleep_fn: Callable[[float], None] = dataclasses.field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.max_concurrency < 1:
            raise ValueError("need timeout_s > 0, max_retries >= 0 and max_concurrency >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("need backoff_s >= 0, max_backoff_s >= 0 and jitter in [0, 1]")

    @property
    def endpoint(self) -> str:
        root = self.base_url.rstrip("/")
        return root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of a request: images as PNG data URLs, then the text, in one user message."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": encode_png_data_url(image)}} for image in request.images
        ]
        content.append({"type": "text", "text": request.text})
        messages: list[dict[str, Any]] = []
        if request.system is not None:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": content})
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        body.update(self.extra_body or {})
        return body

    def complete(self, text: str, images: Sequence[np.ndarray] = (), system: str | None = None) -> str:
        """Sends one request (with retries) and returns the reply text."""
        return self.complete_request(ChatRequest(text, tuple(images), system))

    def complete_request(self, request: ChatRequest) -> str:
        body = json.dumps(self.payload(request)).encode("utf-8")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            status, retry_after = None, None
            try:
                return self._post(body)
            except urllib.error.HTTPError as e:
                status = e.code
                detail = _read_snippet(e)
                cause = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                retryable = e.code in _RETRYABLE_STATUS
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except _BadResponse as e:
                raise ChatError(f"{self.endpoint}: bad response: {e}", attempts=attempt + 1) from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                kind = "timed out" if isinstance(reason, TimeoutError) else "connection error"
                cause = f"{kind} after {self.timeout_s:g} s" if kind == "timed out" else f"{kind}: {reason}"
                retryable = True
            if not retryable or attempt == attempts - 1:
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                raise ChatError(f"{self.endpoint}: {cause} ({tries})", status=status, attempts=attempt + 1)
            self.sleep_fn(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    def complete_batch(
        self, requests: Sequence[ChatRequest], *, return_exceptions: bool = False
    ) -> list[str | ChatError]:
        """Runs requests concurrently (at most `max_concurrency` in flight) and returns replies in request order.

        Args:
            requests: the requests.
            return_exceptions: put the `ChatError` of a failed request in its slot instead of raising it.

        Raises:
            ChatError: the first failed request (by index) when `return_exceptions` is False; queued requests are
                cancelled.
        """
        if not requests:
            return []
        results: list[str | ChatError] = []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = [pool.submit(self.complete_request, r) for r in requests]
            for index, future in enumerate(futures):
                try:
                    results.append(future.result())
                except ChatError as e:
                    if not return_exceptions:
                        for pending in futures:
                            pending.cancel()
                        raise ChatError(
                            f"request {index} of {len(requests)} failed: {e}", status=e.status, attempts=e.attempts
                        ) from e
                    results.append(e)
        return results

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        handlers = [] if self.trust_env else [urllib.request.ProxyHandler({})]
        opener = urllib.request.build_opener(*handlers)
        with opener.open(request, timeout=self.timeout_s) as response:
            raw = response.read()
        return _reply_text(raw)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay * (1.0 - self.jitter * random.random())


def _reply_text(raw: bytes) -> str:
    """The assistant text of a chat-completions response body."""
    try:
        data = json.loads(raw)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _BadResponse(f"not a chat completion: {raw[:200]!r}") from None
    content = message.get("content") if isinstance(message, Mapping) else None
    if isinstance(content, list):  # Content parts.
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    if not isinstance(content, str):
        raise _BadResponse(f"no text content in the reply: {raw[:200]!r}")
    return content


def _read_snippet(error: urllib.error.HTTPError) -> str:
    try:
        return " ".join(error.read(300).decode("utf-8", "replace").split())
    except Exception:  # The body is a courtesy; never mask the HTTP error itself.
        return ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to the backoff schedule.


# ---------------------------------------------------------------------------------------------------------------------
# Reward.

REWARD_COMPONENTS: tuple[str, ...] = ("alignment", "coherence", "consistency")
MISSING_POLICIES: tuple[str, ...] = ("batch_mean", "nan", "raise")


@dataclasses.dataclass(frozen=True)
class MLLMReward:
    """`RewardFn` that asks a VLM judge for scores: R = sum of `reward_keys` scores (eq. 12: each in [0, 5]).

    Each sample is one request with the edited image first and the source second (as in the official code), and the
    prompt `prompt_template.format(instruction=...)`. The official training code sums alignment, style and
    consistency (it drops coherence); eq. 12 of the paper sums alignment, coherence and consistency, our default.

    Returned keys, float32 [B]: 'reward', every key of `SCORE_KEYS` (NaN where unavailable and not filled), and
    'valid' (1 when the request succeeded and every score in `reward_keys` was found, else 0). Only scores in
    `reward_keys` count as missing for `missing_policy`; the others are filled when possible and left NaN otherwise.

    Attributes:
        client: the chat client.
        prompt_template: judging prompt with an `{instruction}` field.
        reward_keys: the scores summed into 'reward'.
        missing_policy: what to do with a reward score that is missing (failed request or unparseable reply):
            'batch_mean' fills it with the mean of that score over the batch's valid replies (the official code's
            rule; raises if no reply in the batch has it), 'nan' leaves NaN (so 'reward' is NaN), 'raise' raises.
    """

    client: ChatClient
    prompt_template: str = REWARD_PROMPT_TEMPLATE
    reward_keys: tuple[str, ...] = REWARD_COMPONENTS
    missing_policy: str = "batch_mean"

    def __post_init__(self):
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain an {instruction} field")
        unknown = [k for k in self.reward_keys if k not in SCORE_KEYS]
        if unknown or not self.reward_keys:
            raise ValueError(f"reward_keys must be a non-empty subset of {SCORE_KEYS}, got {self.reward_keys}")
        if self.missing_policy not in MISSING_POLICIES:
            raise ValueError(f"missing_policy must be one of {MISSING_POLICIES}, got {self.missing_policy!r}")

    def requests(self, source: np.ndarray, edited: np.ndarray, instructions: Sequence[str]) -> list[ChatRequest]:
        return [
            ChatRequest(self.prompt_template.format(instruction=text), (edited[i], source[i]))
            for i, text in enumerate(instructions)
        ]

    def __call__(
        self,
        source: np.ndarray,
        edited: np.ndarray,
        instructions: Sequence[str],
        infos: Sequence[Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        batch = base.check_batch(source, edited, instructions, infos)
        replies = self.client.complete_batch(self.requests(source, edited, instructions), return_exceptions=True)
        scores = np.full((batch, len(SCORE_KEYS)), np.nan, np.float32)  # [B, K]
        problems: list[str] = []
        for i, reply in enumerate(replies):
            if isinstance(reply, ChatError):
                problems.append(f"sample {i}: {reply}")
                continue
            parsed = parse_scores(reply)
            scores[i] = [parsed.scores[k] for k in SCORE_KEYS]
            missing = [k for k in parsed.missing if k in self.reward_keys]
            if missing:
                problems.append(f"sample {i}: no {missing} in {' '.join(reply.split())[:120]!r}")
        summed = [SCORE_KEYS.index(k) for k in self.reward_keys]
        valid = np.all(np.isfinite(scores[:, summed]), axis=1).astype(np.float32)  # [B]
        if problems and self.missing_policy == "raise":
            raise ScoreParseError(f"{len(problems)} of {batch} judge replies unusable: " + "; ".join(problems[:4]))
        if self.missing_policy == "batch_mean":
            for k, key in enumerate(SCORE_KEYS):
                column = scores[:, k]  # [B]
                holes = ~np.isfinite(column)
                if holes.all() and key in self.reward_keys:
                    raise ScoreParseError(f"no judge reply in the batch of {batch} has a {key} score: " + problems[0])
                if holes.any() and not holes.all():
                    column[holes] = column[~holes].mean()
        outputs = {key: scores[:, k] for k, key in enumerate(SCORE_KEYS)}
        reward = sum(outputs[k] for k in self.reward_keys)
        return base.check_outputs({base.REWARD_KEY: reward, **outputs, "valid": valid}, batch)
