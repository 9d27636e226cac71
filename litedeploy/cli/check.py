"""`litedeploy check MODEL`: does this model run correctly here? (litedeploy vs transformers)"""

from __future__ import annotations

import argparse

from litedeploy.cli.args import (
    HelpFormatter,
    add_hub_args,
    add_log_arg,
    add_model_arg,
    positive_int,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", formatter_class=HelpFormatter,
        help="prove a model runs correctly here: litedeploy against transformers (exit 0/1)",
        description="Load the model with transformers and with litedeploy (float32, same device) "
                    "and compare tokenizer ids, the chat template's rendering, special and stop "
                    "tokens, logits and greedy tokens; on a quantized model also the perplexity "
                    "rise on our bundled prose. Prints a pass/fail table; exit code 0 = all pass.")
    add_model_arg(parser)
    add_hub_args(parser)
    parser.add_argument("--reference", default=None, metavar="DIR",
                        help="transformers model folder (or id) holding the same weights, when "
                             "the model's own transformers code cannot load (default: the model)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the model's own Python code (e.g. InternLM2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--prompt", action="append", default=None, dest="prompts",
                        help="a prompt to compare on (repeatable; default: three built-in ones)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16,
                        help="greedy tokens compared per prompt")
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="allowed max |ours - transformers| / max |transformers| of logits")
    parser.add_argument("--max-ppl-increase", type=float, default=0.10,
                        help="quantized models: allowed relative perplexity rise over float32")
    parser.add_argument("--output-json", default=None, help="also write the report here")
    add_log_arg(parser)
    parser.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from litedeploy.check import DEFAULT_PROMPTS, CheckConfig
    from litedeploy.check import run_check as check

    config = CheckConfig(args.model_path, args.reference, args.device,
                         tuple(args.prompts) if args.prompts else DEFAULT_PROMPTS,
                         args.max_new_tokens, args.rtol, args.max_ppl_increase,
                         args.trust_remote_code)
    report = check(config)
    print(report.table(), flush=True)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.passed else 1
