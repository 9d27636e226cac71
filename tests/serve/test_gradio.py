"""`litedeploy serve gradio`: gradio_client, a headless Chromium over the DevTools protocol, and
the api_server-backed mode."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import REPO_ROOT, free_port, start_litedeploy, wait_until_ready

gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHAT_ARGS = ("", 16, 0.0, 0.8, 40)  # system prompt, max new tokens, temperature, top_p, top_k


@pytest.fixture(scope="module")
def gradio_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("gradio_logs") / "gradio.log"
    server = start_litedeploy(["serve", "gradio", "--server-port", str(port),
                               "--cache-max-tokens", "16384"], port, log)
    try:
        wait_until_ready(server, path="/")
        yield server
    finally:
        server.stop()


def _texts(chat: list[dict]) -> list[tuple[str, str]]:
    """gradio 6 returns message content as a list of parts."""
    def text(content) -> str:
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))

    return [(message["role"], text(message["content"])) for message in chat]


def test_gradio_client_gets_a_streamed_reply(gradio_server):
    client = gradio_client.Client(gradio_server.url + "/", verbose=False)
    job = client.submit("Hello! Who are you?", *CHAT_ARGS, api_name="/chat")
    updates = list(job)
    chat, textbox = job.result()
    messages = _texts(chat)
    assert [role for role, _ in messages] == ["user", "assistant"] and textbox == ""
    assert messages[0][1] == "Hello! Who are you?" and messages[1][1]
    replies = [_texts(update[0])[-1][1] for update in updates if len(update[0]) == 2]
    assert len(set(replies)) >= 3  # it streamed: the reply grew over several updates
    assert all(reply.startswith(earlier) for earlier, reply in itertools.pairwise(replies))


def test_sessions_keep_their_own_history(gradio_server):
    ann = gradio_client.Client(gradio_server.url + "/", verbose=False)
    bob = gradio_client.Client(gradio_server.url + "/", verbose=False)
    ann.predict("My name is Ann.", *CHAT_ARGS, api_name="/chat")
    bob_chat, _ = bob.predict("Hi, I am Bob.", *CHAT_ARGS, api_name="/chat")
    ann_chat, _ = ann.predict("What is my name?", *CHAT_ARGS, api_name="/chat")
    assert [text for role, text in _texts(bob_chat) if role == "user"] == ["Hi, I am Bob."]
    assert [text for role, text in _texts(ann_chat) if role == "user"] == [
        "My name is Ann.", "What is my name?"]


def test_remote_mode_streams_from_the_api_server(api_server):
    openai = pytest.importorskip("openai")
    from litedeploy.serve.gradio_app import ChatSettings, RemoteChat, build_demo

    backend = RemoteChat(api_server.url)
    assert backend.device.startswith("cpu via ")
    messages = [{"role": "user", "content": "Name a color."}]

    async def reply() -> list[str]:
        return [delta async for delta in backend.stream(messages, ChatSettings(8, 0.0, 0.8, 40))]

    deltas = asyncio.run(reply())
    expected = openai.OpenAI(base_url=api_server.url + "/v1", api_key="EMPTY").chat.completions \
        .create(model=backend.model_name, messages=messages, max_tokens=8, temperature=0)
    assert len(deltas) > 1 and "".join(deltas) == expected.choices[0].message.content
    assert build_demo(backend) is not None


# ---- a real browser ---------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven through the DevTools protocol (one page)."""

    def __init__(self, user_data_dir: Path):
        import websocket

        self.proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={user_data_dir}", "--remote-debugging-port=0",
             "--window-size=1200,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(target for target in pages if target["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30):
        deadline = time.monotonic() + timeout_s
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
        while not (value := self.eval(guarded)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def type_into(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


BOT_TEXT = ("Array.from(document.querySelectorAll('#chatbot [data-testid=bot]'))"
            ".map(e => e.innerText).join('\\n')")


def _set_max_new_tokens(browser: Chromium, value: int) -> None:
    # the slider's number box: set it as typing would, then commit with blur
    browser.eval(f"""(() => {{
        const box = document.querySelector('input[type=number]');
        const setValue = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
        setValue.call(box, '{value}');
        box.dispatchEvent(new Event('input', {{bubbles: true}}));
        box.dispatchEvent(new Event('change', {{bubbles: true}}));
        box.blur();
    }})()""")


def _wait_until_stable(browser: Chromium, quiet_s: float = 1.0, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    text, since = browser.eval(BOT_TEXT), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = browser.eval(BOT_TEXT)
        if now != text:
            text, since = now, time.monotonic()
        elif text and time.monotonic() - since >= quiet_s:
            return text
    raise AssertionError(f"the reply never settled: {text!r}")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt install chromium)")
def test_browser_chat_stop_and_reset(gradio_server, tmp_path):
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=gradio_server.url + "/")
        browser.wait_for("!!document.querySelector('#prompt textarea') && "
                         "!!document.querySelector('input[type=number]')")
        assert "SmolLM2-135M-Instruct" in browser.wait_for(
            "document.querySelector('#model-info').innerText")
        _set_max_new_tokens(browser, 40)
        browser.type_into("#prompt textarea", "Hello! What can you do?")
        browser.click("#send")
        reply = _wait_until_stable(browser)
        assert reply.strip()
        browser.screenshot(ARTIFACTS / "gradio.png")

        _set_max_new_tokens(browser, 1000)  # long enough to still be running when stopped
        browser.type_into("#prompt textarea", "Write a long story about a dragon.")
        browser.click("#send")
        browser.wait_for(f"({BOT_TEXT}).length > {len(reply) + 30}")
        browser.click("#stop")
        stopped = _wait_until_stable(browser, quiet_s=1.5)
        assert len(stopped) < len(reply) + 1500  # ~40 chars/s: it did not run to the end
        browser.screenshot(ARTIFACTS / "gradio-stopped.png")

        browser.click("#reset")
        browser.wait_for(f"({BOT_TEXT}) === ''")
    finally:
        browser.close()
    assert (ARTIFACTS / "gradio.png").stat().st_size > 10_000
