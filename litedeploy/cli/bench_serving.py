"""`litedeploy bench serving`: load a running api_server and print the figures as JSON.

Wired into `litedeploy bench` by `add_serving_parser(kinds)` with the other bench kinds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from litedeploy.cli.args import HelpFormatter, add_log_arg, positive_int


def _rate(text: str) -> float:
    value = float(text)  # float("inf") parses "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 requests/s or inf, got {text}")
    return value


def add_serving_parser(kinds) -> None:
    parser = kinds.add_parser("serving", formatter_class=HelpFormatter,
                              help="load a running OpenAI-compatible server (streaming requests)")
    parser.add_argument("--url", default="http://127.0.0.1:23333",
                        help="the server's address; several, comma-separated, take the requests "
                             "round-robin (replicas with no router in front)")
    parser.add_argument("--num-prompts", type=positive_int, default=200)
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="requests per second (Poisson arrivals), or inf = all at once")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="max requests in flight (default: no limit)")
    parser.add_argument("--max-tokens", type=positive_int, default=64,
                        help="max_tokens of each request (ignore_eos keeps lengths equal)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--input-len", type=positive_int, default=None,
                        help="prompts of exactly N random token ids (with --endpoint "
                             "completions; default: short chat-style text prompts)")
    parser.add_argument("--vocab-size", type=positive_int, default=32000,
                        help="with --input-len: token ids are drawn below this")
    parser.add_argument("--response-format", choices=["text", "json"], default="text",
                        help="json: every request asks for a JSON schema (structured output); "
                             "its replies run to --max-tokens like ignore_eos ones")
    parser.add_argument("--tools", action="store_true",
                        help="every chat request offers a tool and requires a call (grammar-"
                             "forced tool_choice required); replies stream as tool calls")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="one of the server's --api-keys (default: $OPENAI_API_KEY)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="let replies stop at EOS (lengths then vary)")
    parser.add_argument("--seed", type=int, default=0, help="prompt choice and arrival times")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's TLS certificate")
    parser.add_argument("--output-json", default=None, help="also write the result here")
    add_log_arg(parser)
    parser.set_defaults(run=run_serving_cli)


def run_serving_cli(args: argparse.Namespace) -> int:
    """Exit 0 when every request succeeded, 1 otherwise (so scripts can stop on errors)."""
    from litedeploy.bench.serving import run_serving

    if args.input_len is not None and args.endpoint != "completions":
        print("litedeploy: error: --input-len sends token-id prompts, which only "
              "--endpoint completions takes", file=sys.stderr)
        return 2
    if args.tools and (args.endpoint != "chat" or args.response_format != "text"):
        print("litedeploy: error: --tools needs --endpoint chat and no --response-format",
              file=sys.stderr)
        return 2
    result = run_serving(args.url, args.num_prompts, args.request_rate, args.max_concurrency,
                         max_tokens=args.max_tokens, endpoint=args.endpoint, model=args.model,
                         api_key=args.api_key, seed=args.seed,
                         ignore_eos=not args.no_ignore_eos, timeout_s=args.timeout,
                         verify=not args.insecure, input_len=args.input_len,
                         vocab_size=args.vocab_size,
                         response_format="tools" if args.tools else args.response_format)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            handle.write(text + "\n")
    if result["errors"]:
        print(f"litedeploy: {result['errors']} of {args.num_prompts} requests failed",
              file=sys.stderr)
        return 1
    return 0
