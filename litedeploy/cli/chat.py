"""`litedeploy chat [MODEL]`: chat with a model in the terminal (or answer piped stdin lines)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from litedeploy.cli.args import (
    HelpFormatter,
    add_engine_args,
    add_generation_args,
    add_log_arg,
    add_model_arg,
    engine_config_from,
    generation_config_from,
)
from litedeploy.config import GuidedDecoding
from litedeploy.errors import RequestError

DESCRIPTION = """\
Chat with a model. In a terminal: an empty line ends your input (a line break does not),
`exit` or Ctrl-D quits, `end` starts a new session, Ctrl-C stops the reply being generated.
With piped stdin each non-empty line is one user turn and stdout gets one reply per line:
  echo "Tell me a story" | litedeploy chat"""


class _ChatHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Flag defaults in the help, and the description's example kept on its own line."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal",
                                   description=DESCRIPTION, formatter_class=_ChatHelpFormatter)
    add_model_arg(parser)
    parser.add_argument("--system", default=None, help="system prompt of every session")
    parser.add_argument("--json", action="store_true",
                        help="every reply is a JSON object (structured output, as OpenAI's "
                             "response_format json_object)")
    add_generation_args(parser)
    add_engine_args(parser)
    # the history is re-sent each turn: reusing its KV blocks makes later turns cheap
    parser.set_defaults(enable_prefix_caching=True)
    # one conversation at a time: the KV cache is sized for one session (max batch x session
    # length), ~0.4 GiB for the default model on CPU instead of a server's several GiB
    parser.set_defaults(max_batch_size=1)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                        action="store_false", default=argparse.SUPPRESS,
                        help="re-prefill the whole history every turn (chat turns prefix "
                             "caching on by default)")
    add_log_arg(parser)
    _one_line_errors(parser)
    parser.set_defaults(run=run)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A bad flag value prints one line (not the long usage block) and exits 2."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from litedeploy.chat.terminal import run_chat
    from litedeploy.engine.async_engine import AsyncEngine

    gen = generation_config_from(args)
    if args.json:
        gen = dataclasses.replace(gen, guided=GuidedDecoding("json_object"))
    try:
        gen.validate()
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    config = engine_config_from(args)
    _status(f"loading {args.model_path or 'the default model (SmolLM2-135M-Instruct)'} ...")
    engine = AsyncEngine.from_pretrained(args.model_path, config)
    _status(ready_line(engine))
    return run_chat(engine, gen, args.system)


def ready_line(engine) -> str:
    """One line: model, device, dtype, KV cache capacity, session length, CPU decode mode."""
    from litedeploy.engine.cpu_compile_cache import decode_status_text

    inner = engine.engine
    device = inner.device
    if device.type == "cuda":
        import torch

        device_text = f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    else:
        device_text = "cpu"
    shape = inner.kv_cache.shape
    dtype = str(inner.bundle.dtype).removeprefix("torch.")
    decode = decode_status_text(inner)  # CPU: compiled decode on, compiling or off, and why
    return (f"ready: {engine.model_name} on {device_text}, {dtype} | KV cache {shape.num_tokens} "
            f"tokens, {shape.size_gib:.2f} GiB | session {inner.session_len} tokens"
            + (f" | decode {decode}" if decode else ""))


def _status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
