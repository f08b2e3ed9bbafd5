"""The embedded model: a GGUF file run in-process by llama.cpp, with no network and no key.

``LocalModel()`` runs the pinned default weights, Qwen2.5-Coder-1.5B-Instruct;
``LocalModel(weights=SMALL)`` the 0.5B (``local:small``; see ``weights.py``);
``LocalModel(path)`` any GGUF with a chat template. The weights load lazily, on the first
request, in the worker thread (1-3 s once the file is assembled; assembling it from the
packages on the very first run adds a few seconds); ``await model.warm_up(tools,
system_prompt=...)`` pays for it ahead, as the server does in the background at start.

How it works, and where it departs from a hosted provider:

* One generation at a time runs on the shared model; later requests wait their turn in
  FIFO order, at most ``queue_limit`` of them, beyond which ``ModelBusyError``
  (``MODEL_BUSY``) is raised at once instead of queueing without bound.
* Blocking llama.cpp code runs in a worker thread per request; ``_bridge`` is the one place
  where it meets the event loop. Closing the stream sets a ``threading.Event`` that the
  worker checks between tokens (and between chunks of the prompt), so a cancelled run
  stops within one token; ``aclose`` on the stream returns once the worker has let go.
* Tool calls come from constrained decoding (``grammar.py``): a reply is plain text or
  exactly one well-formed call of an offered tool with arguments that fit its schema.
  Which of the two is decided before the first token, from how much probability the model
  puts on call-shaped first tokens (``_call_intent``). A text reply's first token must fit
  the text grammar (it is drawn again under it when it does not), the rest is sampled
  freely at full speed and streamed token by token; a call is decoded greedily under the
  call grammar and never streamed as text.
* Each set of weights has its own ``Tuning`` (sampling, the call threshold, which worked
  examples the prompt shows, whether a text reply sees the tools), measured with the
  benches. The default's text replies are written from the conversation without the tools:
  the call decision is read from one prompt, the text from another, each cached; once a
  reply is out, the worker reads it into the first prompt's cache too (``_catch_up``),
  until another request wants the model.
* Tool results are folded into the user message of their turn, with a request to answer
  (and, for the 0.5B, a few worked examples), not sent as the template's tool message: on
  the latter the 0.5B model called the tool again and again, or answered in JSON. A call
  that repeats one already made in the same turn is dropped and the model answers in text.
* llama.cpp caches the last prompt, so a chat's next turn reads only its new message; when
  another chat's turn would overwrite that cache, it is copied aside first and put back
  for the chat's next turn (``_Snapshots``).
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from chatstream.errors import ErrorCode, ModelError
from chatstream.messages import Message, ToolCallRequest, model_text
from chatstream.models import grammar
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.weights import DEFAULT, SMALL, Weights, model_path
from chatstream.prompts import (
    SYSTEM_PROMPT,
    local_answer_examples,
    local_tool_guide,
    restate_results,
)

log = logging.getLogger("chatstream.models.local")

# The prompt is evaluated in chunks of this many tokens, so a cancel waits at most one
# chunk (about 0.6 s on two cores) instead of the whole prompt. Smaller chunks cost prompt
# speed (64: 5% on bench/local_model.py --tools); from 128 on it was within noise.
_PREFILL_CHUNK = 128
# A catch-up read after a reply (``LocalModel._catch_up``) gives way to the next request
# between smaller chunks: at most about half a second of the default's reading.
_CATCH_UP_CHUNK = 32


@dataclass(frozen=True, slots=True)
class Tuning:
    """How a model is sampled and prompted; measured per set of weights (``TUNINGS``)."""

    # Of text replies; a call is always decoded greedily.
    temperature: float
    # A reply is a call when call-shaped tokens get at least this share of the first
    # token's probability (see ``LocalModel._call_intent``).
    call_threshold: float
    # Whether the tool guide shows worked example calls, and whether a turn's answer
    # from tool results is preceded by worked answers (see ``render``).
    call_examples: bool
    answer_examples: bool
    # Whether a text reply is written with the tools in the prompt (the prompt the call
    # decision was read from) or from the same conversation without them (a second prompt,
    # which costs reading each turn's new messages twice).
    text_sees_tools: bool = True


# Measured with bench/tool_accuracy.py and bench/answers.py on two cores (see the README).
TUNINGS = {
    # The 0.5B follows examples far better than rules: most calls score 0.75-0.99 with
    # them and most text 0.0-0.3; the few hard cases of both sit near 0.5.
    SMALL.spec: Tuning(
        temperature=0.3, call_threshold=0.5, call_examples=True, answer_examples=True
    ),
    # The 1.5B: greedy text (factual answers came out no worse than at 0.3, and the same
    # each time). With the 0.5B's example calls, a Korean question about a train between
    # two cities scored 0.66 and called get_weather; without them, and with a rule on what
    # to answer directly, intents run lower: the calls 0.40-0.96, text up to 0.33.
    # Its text is written without the tools in sight: with them, bench/answers.py got 15
    # of 24 right (travel-time questions were answered with a JSON call written as text),
    # without them 18.
    DEFAULT.spec: Tuning(
        temperature=0.0,
        call_threshold=0.37,
        call_examples=False,
        answer_examples=True,
        text_sees_tools=False,
    ),
}

# Replies that only acknowledge or answer yes/no, compared without case, spaces or
# punctuation. The tool guide primes this small model so strongly that a bare "ok" or "응"
# scored 0.9 as a call and got a made-up get_weather call; such a message names nothing a
# tool could use, so it is answered in text without asking the model.
_ACKNOWLEDGEMENTS = frozenset(
    "ok okay k kk yes yeah yep yup no nope nah sure fine great cool nice good "
    "응 어 엉 네 넵 넹 예 아니 아니요 아뇨 그래 좋아 ㅇㅇ ㅇㅋ ㄴㄴ はい いいえ うん".split()
)

_QUESTION_MARKS = ("?", "\uff1f", "\u304b\u3002")  # ?, fullwidth ?, Japanese ka + full stop

# What the first character of each vocabulary entry says about a reply that starts with it.
_NEUTRAL, _TEXT_SHAPED, _CALL_SHAPED = 0, 1, 2

# A chat's cache is copied out before another chat's turn overwrites it when at least this
# many of its tokens would be lost, and a copy is put back when it spares at least as many
# (half a second of reading on two cores; a copy of that many costs about a millisecond).
_SNAPSHOT_MIN_TOKENS = 32

# Used when a GGUF carries no chat template: ChatML, which most instruct models know.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Appended to the system message when the model's template ignores the tools it is given.
_TOOLS_SECTION = (
    "\n\n# Tools\n\nYou may call one of these functions when the user asks for what it "
    "provides:\n<tools>\n{tools}\n</tools>\n\nTo call one, reply with only:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class ModelBusyError(ModelError):
    """Too many requests are already waiting for the local model."""

    code = ErrorCode.MODEL_BUSY


Job = Callable[[threading.Event], Iterator[ModelEvent]]


class LocalModel:
    """A GGUF model run by llama.cpp in-process; see the module docstring."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        weights: Weights = DEFAULT,
        n_ctx: int = 4096,
        max_tokens: int = 512,
        queue_limit: int = 8,
        n_threads: int | None = None,
        temperature: float | None = None,
        snapshot_bytes: int = 256 << 20,
    ) -> None:
        self.name = weights.spec if path is None else f"local:{path}"
        self.path = path
        self.weights = weights
        # Another GGUF is prompted as the default is: a model that follows rules.
        self.tuning = TUNINGS[weights.spec]
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.n_threads = n_threads or _decode_threads()
        self.temperature = self.tuning.temperature if temperature is None else temperature
        self.load_seconds: float | None = None
        self._turns = _TurnQueue(queue_limit)
        # Serialises every use of the llama.cpp objects across worker threads, even when a
        # cancelled consumer has already given its turn away.
        self._llm_lock = threading.Lock()
        self._llm: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._grammars: dict[str, LlamaGrammar] = {}
        self._shapes: npt.NDArray[np.int8] | None = None
        self._snapshots = _Snapshots(snapshot_bytes)
        self._running: set[threading.Event] = set()
        # The tool prompt a text reply written without the tools left unread (the reply
        # itself), read after the reply has ended, until another request wants the model.
        self._behind: list[int] | None = None
        # Set while any worker waits for the model: a catch-up stops for it.
        self._wanted = threading.Event()
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    async def warm_up(
        self, tools: Sequence[ToolSpec] = (), *, system_prompt: str = SYSTEM_PROMPT
    ) -> None:
        """Load the weights now rather than on the first request.

        With ``tools``, also evaluate the prompt that a conversation offering them starts
        with (``system_prompt``, the one the server gives every conversation, and the tool
        guide), which every request then finds cached (about 5 s on two cores).
        """
        job = functools.partial(self._warm_up, list(tools), system_prompt)
        async with self._turns.turn(), aclosing(self._bridge(job)) as events:
            async for _ in events:
                pass

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        """Stream one reply: text deltas or one tool call, then usage."""
        job = functools.partial(self._reply, list(messages), list(tools))
        # aclosing: when our consumer closes us, the bridge must stop its worker now, not
        # whenever the garbage collector finalises it.
        async with self._turns.turn(), aclosing(self._bridge(job)) as events:
            async for event in events:
                yield event

    async def aclose(self) -> None:
        """Stop a running generation and free the weights (a later request reloads them)."""
        for stop in list(self._running):
            stop.set()
        async for _ in self._bridge(self._unload_job):
            pass

    async def _bridge(self, job: Job) -> AsyncGenerator[ModelEvent, None]:
        """Run ``job`` in a worker thread and yield what it makes: the one sync/async bridge."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ModelEvent | Exception | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: ModelEvent | Exception | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                stop.set()

        def work() -> None:
            with self._waiting_lock:
                self._waiting += 1
                self._wanted.set()  # a catch-up still reading gives the model up
            with self._llm_lock:
                with self._waiting_lock:
                    self._waiting -= 1
                    if not self._waiting:
                        self._wanted.clear()
                try:
                    for event in job(stop):
                        if stop.is_set():
                            break
                        emit(event)
                except Exception as exc:  # handed to the consumer, raised there
                    emit(exc)
                finally:
                    emit(None)
                self._catch_up()

        thread = threading.Thread(target=work, name="chatstream-local-model", daemon=True)
        self._running.add(stop)
        thread.start()
        finished = False
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, ModelError):
                    raise item
                if isinstance(item, Exception):
                    # llama.cpp's own words are for the log; the client learns that it failed.
                    log.error("the local model failed: %r", item)
                    raise ModelError("the local model failed while generating") from item
                yield item
            finished = True
        finally:
            stop.set()
            self._running.discard(stop)
            if not finished:
                # Keep our turn until the worker has let go of the model, so that the next
                # request never waits on it unseen; the worker stops within one token.
                while await queue.get() is not None:
                    pass

    def _warm_up(
        self, tools: list[ToolSpec], system_prompt: str, stop: threading.Event
    ) -> Iterator[ModelEvent]:
        llm = self._loaded()
        if tools:
            assert self._formatter is not None
            opening = [Message("system", system_prompt), Message("user", "")]
            # The text prompt first, so that the tools' (read first by every turn) stays live.
            offers = [tools] if self.tuning.text_sees_tools else [[], tools]
            for offered in offers:
                prompt = _prompt_tokens(
                    llm, self._formatter, opening, offered, self.n_ctx, self.tuning
                )
                self._snapshots.prepare(llm, prompt)
                _prefill(llm, prompt, stop)
        return iter(())

    def _catch_up(self) -> None:
        """Read what a text reply left unread into the tool prompt's cache, after the reply.

        It runs in the worker thread once the consumer has its last event, while the
        person reads the answer, so that the next turn's call decision reads only its new
        message; a request that comes first stops it within one small chunk, and its
        prompt then reads the rest (nothing read is lost).
        """
        prompt, self._behind = self._behind, None
        if prompt is None or self._llm is None:
            return
        try:
            self._snapshots.prepare(self._llm, prompt)
            _prefill(self._llm, prompt, self._wanted, chunk=_CATCH_UP_CHUNK)
        except Exception as exc:  # nobody is waiting for it: the next turn reads it instead
            log.warning("reading a reply into the tool prompt's cache failed: %r", exc)

    def _unload_job(self, stop: threading.Event) -> Iterator[ModelEvent]:
        self._behind = None
        if self._llm is not None:
            self._llm.close()
        self._llm = self._formatter = self._shapes = None
        self._grammars.clear()
        self._snapshots.clear()
        return iter(())

    def _loaded(self) -> llama_cpp.Llama:
        """The llama.cpp model, loaded on first use (worker thread, under the model lock)."""
        if self._llm is not None:
            return self._llm
        started = time.perf_counter()
        path = self.path if self.path is not None else model_path(self.weights)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        try:
            llm = _llama(path, n_ctx=self.n_ctx, n_threads=self.n_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load model file {path}: {exc}") from exc
        self._formatter = _formatter(llm)
        self._shapes = _shapes(llm)
        self._llm = llm
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.2f s", path, self.load_seconds)
        return llm

    def _reply(
        self, messages: list[Message], tools: list[ToolSpec], stop: threading.Event
    ) -> Iterator[ModelEvent]:
        """One reply, in the worker thread: text deltas or one call, then usage."""
        llm = self._loaded()
        assert self._formatter is not None
        prompt = _prompt_tokens(
            llm, self._formatter, messages, tools, self.n_ctx - self.max_tokens, self.tuning
        )
        self._snapshots.prepare(llm, prompt)
        if not _prefill(llm, prompt, stop):
            return
        completion = 0
        intent = self._call_intent(llm) if tools and not _acknowledges(messages) else 0.0
        log.debug("call intent %.2f", intent)
        if intent >= self.tuning.call_threshold:
            ids = self._call(llm, prompt, tools, stop)
            completion += len(ids)
            if stop.is_set():
                return
            parsed = grammar.parse_call(llm.detokenize(ids).decode("utf-8", "replace"))
            if parsed is None:
                raise ModelError(
                    f"the local model's tool call did not finish within {self.max_tokens} tokens"
                )
            name, arguments = parsed
            if _call_key(name, arguments) not in _calls_this_turn(messages):
                yield ToolCallRequest(f"call_{secrets.token_hex(6)}", name, arguments)
                yield Usage(prompt_tokens=len(prompt), completion_tokens=completion)
                return
            # The same call again, whose result the model already has: answer in text.
            log.info("dropped a repeated call of %s; asking for a text reply", name)
        if not tools or self.tuning.text_sees_tools:
            completion += yield from self._text(llm, prompt, stop)
            yield Usage(prompt_tokens=len(prompt), completion_tokens=completion)
            return
        budget = self.n_ctx - self.max_tokens
        text_prompt = _prompt_tokens(llm, self._formatter, messages, [], budget, self.tuning)
        self._snapshots.prepare(llm, text_prompt)
        if not _prefill(llm, text_prompt, stop):
            return
        answer: list[str] = []
        completion += yield from _recorded(self._text(llm, text_prompt, stop), answer)
        if stop.is_set():
            return
        # The next turn's call decision reads the tool prompt, which has not seen this
        # reply: have it read after the reply (``_catch_up``) instead of before the next.
        replied = [*messages, Message("assistant", "".join(answer))]
        self._behind = _prompt_tokens(llm, self._formatter, replied, tools, budget, self.tuning)
        yield Usage(prompt_tokens=len(prompt) + len(text_prompt), completion_tokens=completion)

    def _call_intent(self, llm: llama_cpp.Llama) -> float:
        """How much of the next-token probability goes to call-shaped tokens rather than text.

        Small models show that they mean to call a tool in several ways (bare JSON, a code
        fence, ``<tool_call>``); counting them all, and then holding the model to the real
        call format with the grammar, gets far more calls right than letting the grammar
        alone pick the likeliest allowed token.
        """
        assert self._shapes is not None
        raw = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(raw, shape=(llm.n_vocab(),))
        weights = np.exp(logits - logits.max())
        call = float(weights[self._shapes == _CALL_SHAPED].sum())
        text = float(weights[self._shapes == _TEXT_SHAPED].sum())
        return call / (call + text) if call + text > 0 else 0.0

    def _call(
        self, llm: llama_cpp.Llama, prompt: list[int], tools: list[ToolSpec], stop: threading.Event
    ) -> list[int]:
        """The tokens of one call, decoded greedily under the call grammar."""
        ids: list[int] = []
        for token in self._generate(llm, prompt, self._grammar(tools), 0.0):
            if stop.is_set() or _ends(llm, token) or len(ids) >= self.max_tokens:
                break
            ids.append(token)
        return ids

    def _text(
        self, llm: llama_cpp.Llama, prompt: list[int], stop: threading.Event
    ) -> Generator[TextDelta, None, int]:
        """A text reply, one delta per token as it comes; returns how many tokens it took."""
        assert self._shapes is not None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        tokens = self._generate(llm, prompt, None, self.temperature)
        first = next(tokens)
        if self._shapes[first] != _TEXT_SHAPED:
            # Only the first token is held to the text grammar (it may not open a call), and
            # only when it breaks it: the grammar costs a pass over the whole vocabulary.
            tokens.close()
            opening = self._generate(llm, prompt, self._grammar(()), self.temperature)
            first = next(opening)
            opening.close()
            tokens = self._generate(llm, [*prompt, first], None, self.temperature)
        count = 1
        if text := decoder.decode(llm.detokenize([first])):
            yield TextDelta(text)
        budget = min(self.max_tokens, self.n_ctx - len(prompt))
        for token in tokens:
            if stop.is_set() or _ends(llm, token) or count >= budget:
                break
            count += 1
            # A token may end inside a UTF-8 sequence (Korean often does): the decoder
            # holds those bytes back until the next token completes the character.
            if text := decoder.decode(llm.detokenize([token])):
                yield TextDelta(text)
        tokens.close()
        if tail := decoder.decode(b"", final=True):
            yield TextDelta(tail)
        return count

    def _generate(
        self,
        llm: llama_cpp.Llama,
        prompt: list[int],
        constraint: LlamaGrammar | None,
        temperature: float,
    ) -> Generator[int, Sequence[int] | None, None]:
        """llama.cpp's token generator over ``prompt`` with this model's sampling settings."""
        return llm.generate(
            prompt,
            top_k=20,
            top_p=0.8,
            min_p=0.05,
            temp=temperature,
            repeat_penalty=1.05,
            grammar=constraint,
        )

    def _grammar(self, tools: Sequence[ToolSpec]) -> LlamaGrammar:
        """The grammar for one call of ``tools``, or for text when there are none; cached."""
        text = grammar.call_grammar(tools) if tools else grammar.TEXT_GRAMMAR
        compiled = self._grammars.get(text)
        if compiled is None:
            compiled = self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        return compiled


class _Snapshots:
    """Copies of the context's cache for recent chats, so that a chat's turn resumes its own.

    llama.cpp's context caches one token sequence: a turn of another chat overwrites it past
    the system prompt they share, and the next turn of the first chat would read its whole
    history again (about 15 s a thousand tokens for the default model on two cores). So
    before that happens the cached sequence is copied out (``llama_state_seq_get_data``:
    the KV cells alone, about 28 KB a token for the default, 12 KB for ``local:small``),
    and a prompt that continues a copy further than the live cache does gets it put back
    (a few milliseconds). At most ``capacity`` bytes are kept, least recently used first out.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[npt.NDArray[np.intc], Any, int]] = OrderedDict()
        self._size = 0

    def prepare(self, llm: llama_cpp.Llama, prompt: list[int]) -> None:
        """Make the live cache the best start for ``prompt``: keep a copy of what it would
        overwrite, and put back a copy that ``prompt`` continues further."""
        if self.capacity <= 0:
            return
        wanted = np.asarray(prompt, dtype=np.intc)
        kept = _common(llm.input_ids[: llm.n_tokens], wanted)
        if llm.n_tokens - kept >= _SNAPSHOT_MIN_TOKENS:
            self._save(llm)
        best, reach = None, kept
        for key, (tokens, _, _) in self._entries.items():
            if (common := _common(tokens, wanted)) > reach:
                best, reach = key, common
        if best is not None and reach - kept >= _SNAPSHOT_MIN_TOKENS:
            self._restore(llm, best)

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

    def _save(self, llm: llama_cpp.Llama) -> None:
        tokens = llm.input_ids[: llm.n_tokens].copy()
        for key, (older, _, size) in list(self._entries.items()):
            if len(older) <= len(tokens) and _common(older, tokens) == len(older):
                del self._entries[key]  # this copy goes further: the older one is of no use
                self._size -= size
        size = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        if size > self.capacity:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, 0))
        if written == 0:
            return
        self._entries[tokens.tobytes()] = (tokens, buffer, written)
        self._size += written
        while self._size > self.capacity:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self._size -= dropped

    def _restore(self, llm: llama_cpp.Llama, key: bytes) -> None:
        tokens, buffer, written = self._entries[key]
        self._entries.move_to_end(key)
        memory = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        if llama_cpp.llama_state_seq_set_data(llm.ctx, buffer, written, 0) == 0:
            # Refused (it should not be): forget the copy; the prompt is read from scratch.
            log.warning("llama.cpp refused a cached chat state; reading the prompt again")
            del self._entries[key]
            self._size -= written
            llm.n_tokens = 0
            return
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        # llama-cpp-python's mark for "these logits are not from a live decode".
        llm._requires_eval = True
        log.debug("resumed a cached chat of %d tokens", len(tokens))


def _recorded(
    deltas: Generator[TextDelta, None, int], into: list[str]
) -> Generator[TextDelta, None, int]:
    """``deltas`` passed on, their text appended to ``into``; returns what ``deltas`` does."""
    try:
        while True:
            try:
                delta = next(deltas)
            except StopIteration as end:
                count: int = end.value
                return count
            into.append(delta.text)
            yield delta
    finally:
        deltas.close()


def _common(a: npt.NDArray[np.intc], b: npt.NDArray[np.intc]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


# Held while llama.cpp's default model parameters are swapped out (see ``_llama``).
_LOAD_LOCK = threading.Lock()


def _decode_threads() -> int:
    """Threads for decoding: every core this process may use, up to four; half beyond.

    llama-cpp-python's default is half the cores, assuming two hyper-threads to a core: on
    a two-core machine that decoded the default model at 7.8 tokens/s on one thread, and
    at 13.5 on two (bench/local_model.py). Past four cores it keeps the half (unmeasured
    here: hyper-threads are likelier there).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return cores if cores <= 4 else cores // 2


def _llama(path: Path, *, n_ctx: int, n_threads: int | None) -> llama_cpp.Llama:
    """llama.cpp's model for ``path``, without the AMX weight buffers on a CPU that has AMX.

    With them (llama.cpp's default where the CPU has AMX, as Sapphire Rapids and later
    do), the first decode of this model crashed the process with SIGSEGV. ``Llama`` takes
    no option for it, so its defaults are swapped for the load; other CPUs keep theirs
    (their repacked weights are faster).
    """
    options: dict[str, Any] = {"n_ctx": n_ctx, "n_threads": n_threads, "verbose": False}
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return llama_cpp.Llama(model_path=str(path), **options)
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        low_level.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model_path=str(path), **options)
        finally:
            low_level.llama_model_default_params = defaults


def _ends(llm: llama_cpp.Llama, token: int) -> bool:
    """Whether ``token`` ends a generation (end of text, end of turn)."""
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def _prefill(
    llm: llama_cpp.Llama, prompt: list[int], stop: threading.Event, chunk: int = _PREFILL_CHUNK
) -> bool:
    """Evaluate ``prompt`` past its cached prefix in chunks; False when stopped on the way.

    Afterwards the model's logits are those for the token after ``prompt``.
    """
    cached = llama_cpp.Llama.longest_token_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
    ends = [*range(cached + chunk, len(prompt), chunk), len(prompt)]
    for end in ends:
        if stop.is_set():
            return False
        # generate() evaluates what is not cached yet, then samples a token, which is
        # dropped: the next call reuses the evaluated prefix (llama.cpp's prefix cache).
        tokens = llm.generate(prompt[:end], temp=0.0)
        next(tokens)
        tokens.close()
    return not stop.is_set()


def _shapes(llm: llama_cpp.Llama) -> npt.NDArray[np.int8]:
    """For each token, whether a reply that starts with it is call-shaped, text, or neither."""
    shapes = np.full(llm.n_vocab(), _NEUTRAL, dtype=np.int8)
    for token in range(llm.n_vocab()):
        # One leading space is part of the word in SentencePiece vocabularies ("▁Hello").
        piece = llm.detokenize([token]).removeprefix(b" ")
        if not piece or piece[:1].isspace() or _ends(llm, token):
            continue
        shapes[token] = _CALL_SHAPED if piece[:1] in grammar.CALL_SHAPED.encode() else _TEXT_SHAPED
    return shapes


def _formatter(llm: llama_cpp.Llama) -> Jinja2ChatFormatter:
    """The chat formatter from the model's own template (ChatML when it has none)."""
    metadata: dict[str, str] = llm.metadata
    template = metadata.get("tokenizer.chat_template") or _CHATML

    def token(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", "replace")

    return Jinja2ChatFormatter(
        template=template, eos_token=token(llm.token_eos()), bos_token=token(llm.token_bos())
    )


# A conversation this many times longer, in characters, than the prompt's token budget is not
# tried whole first: a Qwen token is one to four characters of text, so it hardly ever fits,
# and rendering and tokenizing a long chat's megabytes took seconds a prompt. The search from
# the newest turn finds the same cut either way.
_CHARS_PER_TOKEN_BOUND = 8


def _prompt_tokens(
    llm: llama_cpp.Llama,
    formatter: Jinja2ChatFormatter,
    messages: list[Message],
    tools: list[ToolSpec],
    budget: int,
    tuning: Tuning,
) -> list[int]:
    """The prompt's tokens: the system prompt and as many of the newest turns as fit in ``budget``.

    A turn starts at a user message. The cut is searched back from the newest turn (1, 2, 4 …
    turns, then halving the gap), so a chat far longer than the context costs a few renders of
    about the budget's size, not one render of the whole history per turn dropped: with 99
    turns of 30,000 characters that took 133 s, on the model's only worker.
    """
    head = messages[:1] if messages and messages[0].role == "system" else []
    users = [i for i, message in enumerate(messages) if message.role == "user"]
    # Cut k keeps the messages from starts[k] on: all of them, or from a later user message.
    starts = [len(head), *users[1:]]
    bos = llm.detokenize([llm.token_bos()], special=True)
    tried: dict[int, list[int]] = {}

    def fits(k: int) -> bool:
        if k not in tried:
            text = render(formatter, [*head, *messages[starts[k] :]], tools, tuning)
            encoded = text.encode("utf-8")
            tried[k] = llm.tokenize(encoded, add_bos=not encoded.startswith(bos), special=True)
        return len(tried[k]) <= budget

    not_fitting = -1  # the largest cut known not to fit
    if sum(len(message.content) for message in messages) <= _CHARS_PER_TOKEN_BOUND * budget:
        if fits(0):
            return tried[0]
        not_fitting = 0
    fitting = len(starts) - 1
    if not fits(fitting):
        raise ModelError(
            f"the message is too long for the local model: {len(tried[fitting])} prompt "
            f"tokens, at most {budget} fit"
        )
    step = 1
    while fitting - not_fitting > 1:
        k = max(not_fitting + 1, fitting - step)
        if not fits(k):
            not_fitting = k
            break
        fitting, step = k, step * 2
    while fitting - not_fitting > 1:
        k = (fitting + not_fitting) // 2
        fitting, not_fitting = (k, not_fitting) if fits(k) else (fitting, k)
    return tried[fitting]


def render(
    formatter: Jinja2ChatFormatter,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec],
    tuning: Tuning = TUNINGS[DEFAULT.spec],
) -> str:
    """The prompt text: the conversation through the model's chat template."""
    chat = chat_messages(messages)
    if tuning.answer_examples and _calls_this_turn(messages):
        # Examples of answering from results, just before the turn that has them: earlier
        # they would make the model answer questions in text that want a call, and here
        # the prompt still shares its whole history with the turn's first round (cache).
        last_user = max(i for i, turn in enumerate(chat) if turn["role"] == "user")
        chat[last_user:last_user] = [
            {"role": role, "content": content}
            for pair in local_answer_examples()
            for role, content in zip(("user", "assistant"), pair, strict=True)
        ]
    if not tools:
        return _apply(formatter, chat, None)
    guide = local_tool_guide(tools, examples=tuning.call_examples)
    chat[0] = {**chat[0], "content": chat[0]["content"] + "\n" + guide}
    specs = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]
    text = _apply(formatter, chat, specs)
    if all(f'"{t.name}"' in text for t in tools):
        return text
    # The template ignores tools: describe them in the system message ourselves.
    listing = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in specs)
    chat[0] = {
        "role": "system",
        "content": chat[0]["content"] + _TOOLS_SECTION.format(tools=listing),
    }
    return _apply(formatter, chat, None)


def _apply(formatter: Jinja2ChatFormatter, chat: list[dict[str, str]], tools: Any) -> str:
    # The formatter's annotations want OpenAI's TypedDicts; plain dicts are what it reads.
    response: Any = formatter(messages=chat, tools=tools)  # type: ignore[arg-type]
    return str(response.prompt)


def chat_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """``messages`` as system/user/assistant turns, each turn's tool results in its user turn.

    The calls themselves are left out: what the model needs is what they returned, and
    an assistant turn of JSON before the results made it answer in JSON.
    """
    chat: list[dict[str, str]] = []
    if not messages or messages[0].role != "system":
        chat.append({"role": "system", "content": SYSTEM_PROMPT})
    question: int | None = None  # where in ``chat`` the current turn's user message is
    results: list[tuple[str, str, bool]] = []

    def fold() -> None:
        nonlocal question
        if not results:
            return
        if question is None:
            chat.append({"role": "user", "content": ""})
            question = len(chat) - 1
        content = restate_results(chat[question]["content"], results)
        chat[question] = {"role": "user", "content": content.strip()}
        results.clear()

    for message in messages:
        if message.role == "tool":
            results.append((message.tool or "tool", message.content, message.is_error))
        elif message.role == "assistant" and message.tool_calls:
            continue
        elif message.role == "assistant":
            fold()
            chat.append({"role": "assistant", "content": model_text(message)})
        else:
            fold()
            chat.append({"role": message.role, "content": message.content})
            question = len(chat) - 1 if message.role == "user" else None
    fold()
    return chat


def _acknowledges(messages: Sequence[Message]) -> bool:
    """True when the last message is the user's bare acknowledgement ("ok", "네", ".").

    Not when it may answer something the assistant just asked ("Shall I check Busan too?
    Just say the word." "yes"): then the history says what the yes is for, and the model
    decides. Any question mark counts, and Japanese's question particle ``か`` before a
    full stop, which often ends a question without one.
    """
    if not messages or messages[-1].role != "user":
        return False
    if len(messages) > 1 and messages[-2].role == "assistant":
        if any(mark in messages[-2].content for mark in _QUESTION_MARKS):
            return False
    bare = "".join(ch for ch in messages[-1].content.casefold() if ch.isalnum())
    return not bare or bare in _ACKNOWLEDGEMENTS


def _calls_this_turn(messages: Sequence[Message]) -> set[str]:
    """The calls made since the last user message, as comparable keys."""
    made: set[str] = set()
    for message in reversed(messages):
        if message.role == "user":
            break
        made.update(_call_key(c.name, c.arguments) for c in message.tool_calls)
    return made


def _call_key(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps([name, arguments], sort_keys=True, ensure_ascii=False)


class _TurnQueue:
    """One holder at a time; the rest wait in FIFO order, at most ``limit`` of them.

    Not an ``asyncio.Lock``: it holds no event loop, so one model can serve tests that each
    run their own loop.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        if len(self._waiters) >= self.limit:
            raise ModelBusyError(
                f"the local model is busy: {len(self._waiters)} requests are already waiting "
                "for it; try again shortly"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the turn was handed to us as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the turn passes straight on; _held stays True
                return
        self._held = False
