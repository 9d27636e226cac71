"""`litedeploy lite auto_awq MODEL --work-dir DIR`: AWQ 4-bit weight quantization (lmdeploy's
command and flags)."""

from __future__ import annotations

import argparse

from litedeploy.cli.args import HelpFormatter, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    lite = subparsers.add_parser(
        "lite", help="compress a model (auto_awq: 4-bit AWQ weights)",
        description="Model compression.", formatter_class=HelpFormatter)
    commands = lite.add_subparsers(dest="lite_command", metavar="COMMAND",
                                   parser_class=type(lite))
    awq = commands.add_parser(
        "auto_awq", formatter_class=HelpFormatter,
        help="activation-aware 4-bit weight quantization into an AWQ folder",
        description="Quantize a float model (HF folder or .gguf) to 4-bit AWQ weights, "
                    "calibrated on text; the output folder loads with `--model-format awq` "
                    "(detected automatically).")
    awq.add_argument("model_path", help="Hugging Face model folder or .gguf file")
    awq.add_argument("--work-dir", required=True, help="output folder of the AWQ model")
    awq.add_argument("--calib-dataset", default="builtin",
                     help="calibration text: a UTF-8 text file, or 'builtin' (English prose "
                          "shipped with litedeploy)")
    awq.add_argument("--calib-samples", type=positive_int, default=128,
                     help="max calibration samples")
    awq.add_argument("--calib-seqlen", type=positive_int, default=2048,
                     help="tokens per calibration sample")
    awq.add_argument("--batch-size", type=positive_int, default=1,
                     help="samples per forward (accepted for lmdeploy compatibility; samples "
                          "run one at a time)")
    awq.add_argument("--w-bits", type=int, default=4, choices=[4], help="weight bits")
    awq.add_argument("--w-group-size", type=positive_int, default=128,
                     help="input features sharing one scale and zero point")
    awq.add_argument("--search-scale", action="store_true",
                     help="grid-search the activation-scale exponent per linear (default: 0.5)")
    awq.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    awq.set_defaults(run=run_auto_awq)
    lite.set_defaults(run=None)


def run_auto_awq(args: argparse.Namespace) -> int:
    from litedeploy.lite.auto_awq import AutoAWQConfig, auto_awq

    config = AutoAWQConfig(
        calib_dataset=args.calib_dataset, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, batch_size=args.batch_size, w_bits=args.w_bits,
        w_group_size=args.w_group_size, search_scale=args.search_scale, device=args.device)
    out = auto_awq(args.model_path, args.work_dir, config)
    print(f"AWQ model written to {out}")
    return 0
