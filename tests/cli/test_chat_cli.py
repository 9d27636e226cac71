"""`litedeploy chat` driven as a user would: through a pseudo-terminal and through a pipe.

Greedy replies of the CLI are compared with `pipeline().chat()` run in-process with the same
settings, so a lost history, a stale session after `end` or a broken abort changes the text.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from litedeploy.api import pipeline
from litedeploy.config import EngineConfig, GenerationConfig
from tests.helpers.subprocess_env import repo_env

pexpect = pytest.importorskip("pexpect")

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 16
CACHE_TOKENS = 8192
FIRST = "Tell me a story"
SECOND = "What did I\njust ask?"  # typed as two lines: the first Enter must not send it
CLI_FLAGS = ["--max-new-tokens", str(MAX_NEW_TOKENS), "--cache-max-tokens", str(CACHE_TOKENS)]
PROMPT_MARK = "input >>>"  # prompt_toolkit draws the trailing space as a cursor move


def _env() -> dict[str, str]:
    # no cursor-position requests: pexpect's pty does not answer them
    return repo_env(PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")


@pytest.fixture(scope="module")
def piped_run() -> subprocess.Popen:
    """Started first so its model load overlaps the in-process reference; a prompt too long for
    the session comes before the real one: it must be refused and leave no trace in the history."""
    too_long = " ".join(["word"] * 200)
    proc = subprocess.Popen(
        [sys.executable, "-m", "litedeploy", "chat", "--max_new_tokens", str(MAX_NEW_TOKENS),
         "--cache-max-tokens", str(CACHE_TOKENS), "--session-len", "128"],
        cwd=REPO_ROOT, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    proc.stdin.write(f"{too_long}\n\n{FIRST}\n")  # as `printf ... | litedeploy chat`
    proc.stdin.close()
    yield proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def reference(piped_run) -> dict[str, str]:
    """Greedy replies of pipeline().chat() with the CLI's settings (prefix caching on, one
    sequence at a time: an engine that batches keeps bf16 weight copies for prefills of 8+
    tokens, whose rounding may change a quantized model's greedy text)."""
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    pipe = pipeline(None, EngineConfig(cache_max_tokens=CACHE_TOKENS, enable_prefix_caching=True,
                                       max_batch_size=1))
    session = pipe.chat(FIRST, gen_config=gen)
    first = session.response.text
    second = pipe.chat(SECOND, session, gen_config=gen).response.text
    second_alone = pipe.chat(SECOND, gen_config=gen).response.text
    return {"first": first, "second": second, "second_alone": second_alone}


def test_piped_stdin_prints_only_replies(piped_run, reference):
    stdout, stderr = piped_run.stdout.read(), piped_run.stderr.read()  # both small
    piped_run.wait(timeout=60)
    assert piped_run.returncode == 0, stderr
    assert stdout == reference["first"] + "\n"
    assert "session holds 128" in stderr and "Traceback" not in stderr
    assert "ready:" in stderr and "KV cache 8192 tokens" in stderr


def _pty_terminal_text(child) -> str:
    return child.before.replace("\r\n", "\n")


def _send_turn(child, text: str) -> None:
    for line in text.split("\n"):
        child.send(line + "\r")  # Enter ends a line, not the input
    child.send("\r")  # the empty line sends it


def test_terminal_chat_history_end_interrupt_exit(reference):
    # the second reply must depend on the first turn, or this test could not see a lost history
    assert reference["second"] != reference["second_alone"]
    child = pexpect.spawn(sys.executable, ["-m", "litedeploy", "chat", *CLI_FLAGS],
                          cwd=str(REPO_ROOT), env=_env(), encoding="utf-8", timeout=90,
                          dimensions=(40, 200))
    try:
        child.expect_exact(PROMPT_MARK)
        _send_turn(child, FIRST)
        child.expect_exact(reference["first"].replace("\n", "\r\n") + "\r\n")
        _send_turn(child, SECOND)  # the history is re-sent
        child.expect_exact(reference["second"].replace("\n", "\r\n") + "\r\n")

        _send_turn(child, "end")
        child.expect_exact("(new session)")
        _send_turn(child, FIRST)  # a fresh session answers as the first time
        child.expect_exact(reference["first"].replace("\n", "\r\n") + "\r\n")
        child.expect_exact(PROMPT_MARK)

        _send_turn(child, SECOND)
        child.expect_exact(reference["second"][:4])  # the reply is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT_MARK)  # still chatting: the aborted request freed its blocks
        _send_turn(child, "end")
        _send_turn(child, FIRST)
        child.expect_exact(reference["first"].replace("\n", "\r\n") + "\r\n")
        child.expect_exact(PROMPT_MARK)

        _send_turn(child, "exit")
        child.expect(pexpect.EOF)
        terminal_text = _pty_terminal_text(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in terminal_text


def test_kv_cache_sized_for_one_session():
    """With no cache flags the chat's KV cache holds one session (it serves one conversation),
    not a server's share of the machine's RAM, and the ready line says how much it took."""
    proc = subprocess.run(
        [sys.executable, "-m", "litedeploy", "chat", "--max-new-tokens", "1",
         "--session-len", "512"],
        cwd=REPO_ROOT, env=_env(), input="hi\n", capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache 512 tokens" in proc.stderr, proc.stderr
