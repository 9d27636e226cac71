"""The terminal chat REPL: multi-turn history, streamed replies, lmdeploy's input conventions.

Interactive (stdin and stdout are terminals): prompt_toolkit reads multi-line input that an empty
line ends ("double enter"); `exit` or Ctrl-D quits, `end` starts a new session, Ctrl-C stops the
reply being generated and returns to the prompt. Piped: each non-empty stdin line is one user turn
of the same conversation; stdout gets only the replies, one per turn, each followed by a newline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TextIO

from litedeploy.chat.prompt import PromptEncoder
from litedeploy.config import GenerationConfig
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.errors import RequestError

logger = logging.getLogger(__name__)

PROMPT = "double enter to end input >>> "
EXIT_COMMAND = "exit"
END_COMMAND = "end"


@dataclass
class Conversation:
    """The messages of one session; all of them are re-sent each turn (prefix caching reuses the
    KV of the shared history, so only the new turn is prefilled)."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.messages.clear()

    def with_user_turn(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages + [{"role": "user", "content": text}]

    def add_turn(self, user_text: str, reply_text: str) -> None:
        self.messages += [{"role": "user", "content": user_text},
                          {"role": "assistant", "content": reply_text}]


@dataclass
class TurnResult:
    text: str
    finish_reason: str | None  # stop | length | abort | error; None when nothing ran
    num_cached_tokens: int = 0


class TerminalChat:
    """Drives one conversation against an AsyncEngine; `out` gets replies, `err` status lines."""

    def __init__(self, engine: AsyncEngine, gen: GenerationConfig, system: str | None = None,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.engine = engine
        self.prompts = PromptEncoder.for_engine(engine)
        self.gen = gen
        self.conversation = Conversation(system)
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    # ---- one turn ----------------------------------------------------------------------------
    async def turn(self, user_text: str) -> TurnResult:
        """Stream the reply to `user_text`; the turn joins the history unless it failed.
        Cancelling the coroutine (Ctrl-C) closes the generate iterator, which aborts the request."""
        messages = self.conversation.with_user_turn(user_text)
        try:
            prompt_ids, gen = self._fit_to_session(self.prompts.encode(messages))
        except RequestError as exc:
            self._status(f"error: {exc}")
            return TurnResult("", None)
        pieces: list[str] = []
        result = TurnResult("", "abort")
        try:
            stream = self.engine.generate(None, gen, input_ids=prompt_ids)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    self.out.write(out.text)
                    self.out.flush()
                    pieces.append(out.text)
                    result = TurnResult("".join(pieces), out.finish_reason, out.num_cached_tokens)
                    if out.finished and out.error:
                        self._status(f"\nerror: {out.error}")
        except RequestError as exc:
            self._status(f"error: {exc}")
            return TurnResult("", None)
        finally:
            # keep what the user saw, even when interrupted: the model remembers what was shown
            reply_text = "".join(pieces)
            if reply_text and result.finish_reason != "error":
                self.conversation.add_turn(user_text, reply_text)
        logger.debug("turn: %d messages, %d prompt tokens, %d cached, finish %s",
                     len(messages), len(prompt_ids), result.num_cached_tokens,
                     result.finish_reason)
        return result

    def _fit_to_session(self, prompt_ids: list[int]) -> tuple[list[int], GenerationConfig]:
        """Clamp max_new_tokens to what is left of the session, so a long conversation ends its
        replies early instead of being refused; refuse only a prompt that leaves no room."""
        limit = min(self.engine.engine.session_len, self.engine.engine.kv_cache.shape.num_tokens)
        room = limit - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the conversation is {len(prompt_ids)} tokens, the session holds {limit}; "
                f"shorten the message or type `{END_COMMAND}` to start a new session "
                "(or raise --session-len / the KV cache size)")
        gen = self.gen
        if gen.max_new_tokens is None or gen.max_new_tokens > room:
            gen = replace(gen, max_new_tokens=room)
        return prompt_ids, gen

    def _status(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def _command(self, text: str) -> str | None:
        """`exit` / `end` (the whole input, any case) or None for a user message."""
        word = text.strip().lower()
        return word if word in (EXIT_COMMAND, END_COMMAND) else None

    # ---- piped stdin -------------------------------------------------------------------------
    async def run_lines(self, lines: Iterable[str]) -> int:
        for line in lines:
            text = line.strip()
            if not text:
                continue
            command = self._command(text)
            if command == EXIT_COMMAND:
                break
            if command == END_COMMAND:
                self.conversation.reset()
                continue
            result = await self.turn(text)
            if result.finish_reason is not None:
                self.out.write("\n")
                self.out.flush()
        return 0

    # ---- interactive terminal ----------------------------------------------------------------
    async def run_interactive(self) -> int:
        session = _prompt_session()
        self._status(f"An empty line sends your message; `{EXIT_COMMAND}` or Ctrl-D quits, "
                     f"`{END_COMMAND}` starts a new session, Ctrl-C stops a reply.")
        while True:
            try:
                text = await session.prompt_async([("class:prompt", PROMPT)])
            except KeyboardInterrupt:  # Ctrl-C while typing: drop the input, ask again
                continue
            except EOFError:  # Ctrl-D
                return 0
            command = self._command(text)
            if command == EXIT_COMMAND:
                return 0
            if command == END_COMMAND:
                self.conversation.reset()
                self._status("(new session)")
                continue
            if text.strip():
                await self._interruptible_turn(text.strip())

    async def _interruptible_turn(self, text: str) -> None:
        """Ctrl-C (SIGINT: the terminal is in cooked mode while the reply streams) cancels the
        turn; the prompt comes back."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.turn(text))
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
            self.out.write("\n\n")  # a blank line between the reply and the next prompt
        except asyncio.CancelledError:
            self._status("\n[interrupted]\n")
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        self.out.flush()


def _prompt_session():
    """prompt_toolkit session: Enter on an empty last line sends (lmdeploy's "double enter"),
    otherwise Enter starts a new line; Alt-Enter sends at once."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style

    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event) -> None:
        buffer = event.current_buffer
        document = buffer.document
        if document.is_cursor_at_the_end and document.current_line.strip() == "":
            buffer.text = buffer.text.rstrip("\n")
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    @bindings.add("escape", "enter")
    def _send_now(event) -> None:
        event.current_buffer.validate_and_handle()

    def continuation(width: int, line_number: int, is_soft_wrap: bool) -> str:
        return "." * (width - 1) + " "

    return PromptSession(multiline=True, key_bindings=bindings, prompt_continuation=continuation,
                         style=Style.from_dict({"prompt": "ansigreen bold"}))


def run_chat(engine: AsyncEngine, gen: GenerationConfig, system: str | None = None) -> int:
    """The REPL on a terminal, line-by-line turns otherwise; returns the exit code."""
    chat = TerminalChat(engine, gen, system)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()

    async def main() -> int:
        try:
            return await (chat.run_interactive() if interactive else chat.run_lines(sys.stdin))
        finally:
            # stop the engine thread while this loop is still open: a step that was running
            # when the user quit still delivers its output to the (now unread) queue
            engine.close()

    return asyncio.run(main())
