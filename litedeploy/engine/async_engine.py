"""AsyncEngine: one background thread steps the LLMEngine; each request streams through a queue.

Front-ends (terminal chat, OpenAI server, Gradio) are clients of this class only. Leaving the async
iterator early (a client disconnect, a cancelled task) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from litedeploy.config import EngineConfig, GenerationConfig, GuidedDecoding
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.guided.compiler import COMPILE_TIMEOUT_S
from litedeploy.engine.request import RequestOutput
from litedeploy.errors import RequestError

logger = logging.getLogger(__name__)

# While closing, how often to say that a step still runs.
CLOSE_LOG_S = 10.0


@dataclass
class _Command:
    kind: str  # "add" | "abort" | "call"
    request_id: str
    prompt_ids: list[int] | None = None
    gen: GenerationConfig | None = None
    sink: _Sink | None = None
    fn: Callable[[LLMEngine], Any] | None = None  # "call": run on the engine thread
    future: concurrent.futures.Future | None = None


class _Sink:
    """Delivers outputs from the engine thread to the asyncio loop of the consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's event loop is closed: nobody is listening any more


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.bundle.name
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        # counts the engine thread publishes after every step, read without waiting for one
        # (/debug/state); the block integrity check runs only when idle and when asked
        self.check_integrity_when_idle = False
        self.state: dict[str, object] = {}
        self._publish_state()
        self._thread = threading.Thread(target=self._loop, name="litedeploy-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_path: str | None = None,
                        config: EngineConfig | None = None) -> AsyncEngine:
        return cls(LLMEngine.from_pretrained(model_path, config))

    # ---- prompts -----------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Raw text -> token ids (with BOS). Messages are the front-ends' to render
        (`litedeploy.chat.prompt.PromptEncoder`)."""
        if self.tokenizer is None:
            raise RequestError("this engine was loaded without a tokenizer (--load-format dummy)")
        return self.tokenizer.encode(text)

    # ---- generation --------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | None,
        gen: GenerationConfig | None = None,
        *,
        input_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs for `input_ids` (or raw text `prompt`); the last one has
        `finished` True. Raises RequestError before yielding anything when the request can never
        be served."""
        gen = gen or GenerationConfig()
        prompt_ids = input_ids if input_ids is not None else self.encode_text(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if gen.guided is not None:
            await self.compile_grammar(gen.guided)
        sink = _Sink(asyncio.get_running_loop())
        self._commands.put(_Command("add", request_id, prompt_ids, gen, sink))
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(_Command("abort", request_id))

    async def compile_grammar(self, guided: GuidedDecoding) -> None:
        """Compile (or find cached) a structured-output grammar on the grammar pool, so the
        engine thread only looks it up; raises RequestError (the library's reason) if it cannot
        be compiled or takes longer than COMPILE_TIMEOUT_S."""
        await asyncio.wrap_future(self.engine.grammars.vocab_ready())
        future = self.engine.grammars.compile_async(guided)
        try:
            # shielded: a timed-out or disconnected waiter must not cancel the cached compile
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(
                f"compiling the {guided.kind} constraint took longer than "
                f"{COMPILE_TIMEOUT_S:.0f} s; simplify the schema or pattern") from None

    def abort(self, request_id: str) -> None:
        self._commands.put(_Command("abort", request_id))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """`fn(engine)` on the engine thread between two steps, so it sees consistent state
        (integrity checks, fault injection in tests)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command("call", "", fn=fn, future=future))
        return await asyncio.wrap_future(future)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop the engine thread after its current step; False if that step still runs after
        `timeout_s` (None: wait however long it takes). A process must not exit normally while
        a step runs: torch aborts it ("terminate called without an active exception"), so a
        caller that gives up exits with os._exit."""
        self._stopped.set()
        self._commands.put(_Command("abort", ""))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._thread.is_alive():
            left_s = CLOSE_LOG_S if deadline is None else deadline - time.monotonic()
            if left_s <= 0:
                break
            self._thread.join(timeout=min(left_s, CLOSE_LOG_S))
            if self._thread.is_alive():
                logger.warning("waiting for the engine step in progress to end")
        self.engine.close()
        return not self._thread.is_alive()

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            self._drain_commands(block)
            if self._stopped.is_set():
                break
            try:
                outputs = self.engine.step()
            except Exception as exc:
                logger.exception("engine step crashed")
                for sink in self._sinks.values():
                    sink.put(exc)
                self._sinks.clear()
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                sink.put(out)
                if out.finished:
                    self._sinks.pop(out.request_id, None)
            self._publish_state()

    def _publish_state(self) -> None:
        """A consistent snapshot of the counts, taken between two steps (one dict assignment,
        so readers on other threads see the old one or the new one)."""
        engine = self.engine
        state: dict[str, object] = dict(engine.stats(), num_engine_requests=len(engine._requests),
                                        num_engine_streams=len(self._sinks))
        state["integrity"] = "checked when idle"
        if self.check_integrity_when_idle and not engine.has_unfinished():
            try:
                engine.scheduler.check_integrity()
                state["integrity"] = "ok"
            except AssertionError as exc:
                state["integrity"] = str(exc)
        self.state = state

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: _Command) -> None:
        if command.kind == "call":
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - raised in the caller instead
                command.future.set_exception(exc)
            return
        if command.kind == "abort":
            if self.engine.abort(command.request_id):
                self._sinks.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_ids, command.gen)
        except Exception as exc:  # noqa: BLE001 - reported to that request's consumer only
            command.sink.put(exc)
            return
        self._sinks[command.request_id] = command.sink
