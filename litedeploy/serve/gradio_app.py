"""`litedeploy serve gradio`: a Gradio chat page over an in-process engine or a running api_server.

Each browser tab keeps its own conversation in a `gr.State`, so tabs never mix histories. Stop
cancels the event's task; closing the reply stream aborts the request (engine or HTTP) at once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from litedeploy.chat.prompt import PromptEncoder
from litedeploy.config import GenerationConfig
from litedeploy.errors import RequestError

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7  # lmdeploy's gradio defaults
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 40


@dataclass
class ChatSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K


class EngineChat:
    """Replies from an AsyncEngine in this process."""

    def __init__(self, engine):
        self.engine = engine
        self.prompts = PromptEncoder.for_engine(engine)
        self.model_name = engine.model_name
        self.device = str(engine.engine.device)

    async def stream(self, messages: list[dict], settings: ChatSettings) -> AsyncIterator[str]:
        gen = GenerationConfig(
            max_new_tokens=int(settings.max_new_tokens), do_sample=settings.temperature > 0,
            temperature=float(settings.temperature), top_p=float(settings.top_p),
            top_k=int(settings.top_k))
        stream = self.engine.generate(None, gen, input_ids=self.prompts.encode(messages))
        async with aclosing(stream) as outputs:
            async for out in outputs:
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                yield out.text


class RemoteChat:
    """Replies from a running api_server, through the `openai` client."""

    def __init__(self, url: str, api_key: str | None = None):
        from openai import AsyncOpenAI, OpenAI

        base_url = url.rstrip("/")
        base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        api_key = api_key or "EMPTY"
        card = OpenAI(base_url=base_url, api_key=api_key).models.list().data[0]
        self.model_name = card.id
        self.device = f"{getattr(card, 'device', None) or 'remote'} via {url}"
        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key)

    async def stream(self, messages: list[dict], settings: ChatSettings) -> AsyncIterator[str]:
        stream = await self.client.chat.completions.create(
            model=self.model_name, messages=messages, stream=True,
            max_tokens=int(settings.max_new_tokens), temperature=float(settings.temperature),
            top_p=float(settings.top_p), extra_body={"top_k": int(settings.top_k)})
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
        finally:
            await stream.close()  # closes the HTTP stream: the server aborts the request


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    return gr


def build_demo(backend: EngineChat | RemoteChat):
    gr = _import_gradio()

    async def respond(message: str, history: list[dict], system_prompt: str,
                      max_new_tokens: float, temperature: float, top_p: float, top_k: float):
        if not message or not message.strip():
            yield history, history, ""
            return
        history = [*history, {"role": "user", "content": message}]
        # components inside a closed accordion may send None: fall back to the defaults
        system_prompt = (system_prompt or "").strip()
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
        settings = ChatSettings(*(default if value is None else value for value, default in (
            (max_new_tokens, DEFAULT_MAX_NEW_TOKENS), (temperature, DEFAULT_TEMPERATURE),
            (top_p, DEFAULT_TOP_P), (top_k, DEFAULT_TOP_K))))
        reply = ""
        shown = [*history, {"role": "assistant", "content": reply}]
        yield shown, shown, ""
        try:
            async with aclosing(backend.stream(prompt, settings)) as deltas:
                async for delta in deltas:
                    reply += delta
                    shown = [*history, {"role": "assistant", "content": reply}]
                    yield shown, shown, ""
        except (RequestError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        except Exception as exc:  # openai.APIError and friends: show, don't crash the page
            raise gr.Error(f"{type(exc).__name__}: {exc}") from exc

    with gr.Blocks(title="litedeploy playground") as demo:
        gr.Markdown(f"## litedeploy playground\nModel **{backend.model_name}** on "
                    f"**{backend.device}**", elem_id="model-info")
        history = gr.State([])  # this tab's conversation: every session gets its own copy
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label=backend.model_name, height=460, elem_id="chatbot",
                                     buttons=["copy", "copy_all"])
                textbox = gr.Textbox(placeholder="Type a message and press Enter",
                                     show_label=False, elem_id="prompt")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    reset = gr.Button("Reset", elem_id="reset")
            with gr.Column(scale=1):
                system_prompt = gr.Textbox(label="System prompt", lines=3)
                max_new_tokens = gr.Slider(1, 2048, DEFAULT_MAX_NEW_TOKENS, step=1,
                                           label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, DEFAULT_TEMPERATURE, step=0.05,
                                        label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.01, 1.0, DEFAULT_TOP_P, step=0.01, label="Top p")
                top_k = gr.Slider(0, 100, DEFAULT_TOP_K, step=1, label="Top k (0 = off)")
        inputs = [textbox, history, system_prompt, max_new_tokens, temperature, top_p, top_k]
        outputs = [chatbot, history, textbox]
        # the engine batches requests, so the page need not queue them one at a time
        on_send = send.click(respond, inputs, outputs, api_name="chat", concurrency_limit=None)
        on_enter = textbox.submit(respond, inputs, outputs, api_visibility="private",
                                  concurrency_limit=None)
        running = [on_send, on_enter]
        stop.click(None, None, None, cancels=running)
        reset.click(lambda: ([], [], ""), None, outputs, cancels=running,
                    api_visibility="private")
        chatbot.clear(list, None, history, cancels=running, api_visibility="private")
    return demo


def launch(backend: EngineChat | RemoteChat, server_name: str, server_port: int,
           share: bool) -> None:
    """Serve the page; prints one line when it is reachable, then blocks until Ctrl-C."""
    demo = build_demo(backend)
    demo.queue()
    _, local_url, share_url = demo.launch(
        server_name=server_name, server_port=server_port, share=share, quiet=True,
        prevent_thread_lock=True, ssr_mode=False, footer_links=["api"])
    print(f"litedeploy gradio: {backend.model_name} on {backend.device}; open {local_url}"
          + (f" (public: {share_url})" if share_url else ""), flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
