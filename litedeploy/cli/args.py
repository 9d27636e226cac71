"""Command-line flags shared by several subcommands, each defined once (lmdeploy's names/defaults)."""

from __future__ import annotations

import argparse

from litedeploy.config import EngineConfig, GenerationConfig, ParallelConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    pass


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None,
                        help="Hugging Face model folder or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """How a model id (`org/name`, not an existing path) is fetched from the hub."""
    group = parser.add_argument_group("model id (Hugging Face Hub, or ModelScope with "
                                      "LITEDEPLOY_USE_MODELSCOPE=True)")
    group.add_argument("--revision", default=None,
                       help="branch, tag or commit of a model id (default: main)")
    group.add_argument("--gguf-file", default=None,
                       help="the one GGUF file to fetch from a model id's repository (or write "
                            "the id as org/name:Q4_K_M)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_hub_args(parser)
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights and activations dtype; auto = the checkpoint's on GPU, "
                            "float32 on CPU")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    group.add_argument("--session-len", type=positive_int, default=None,
                       help="max tokens of one conversation (default: the model's context length)")
    group.add_argument("--max-batch-size", type=positive_int, default=128,
                       help="max sequences in one step")
    group.add_argument("--cache-max-entry-count", type=_fraction, default=0.8,
                       help="KV cache size as a fraction of free GPU memory after weights "
                            "(of available RAM on CPU)")
    group.add_argument("--cache-max-tokens", type=positive_int, default=None,
                       help="KV cache size in tokens (overrides --cache-max-entry-count)")
    group.add_argument("--cache-block-seq-len", type=positive_int, default=64,
                       help="tokens per KV cache block")
    group.add_argument("--enable-prefix-caching", action="store_true",
                       help="reuse the KV cache of shared prompt prefixes")
    group.add_argument("--max-prefill-token-num", type=positive_int, default=8192,
                       help="token budget of one step (longer prompts are prefilled in chunks)")
    group.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8],
                       help="KV cache quantization (0 = off)")
    group.add_argument("--model-format", default=None, choices=["hf", "awq", "gguf"],
                       help="checkpoint format (default: detected)")
    group.add_argument("--chat-template", default=None,
                       help="built-in template name, or a .jinja / .json file")
    group.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size")
    add_multinode_args(parser)
    group.add_argument("--eager-mode", action="store_true",
                       help="disable CUDA graphs (GPU) and the compiled decode step (CPU)")
    group.add_argument("--num-scheduler-steps", type=positive_int, default=None,
                       help="greedy decode steps run on the device between two host syncs "
                            "(default: 8 on CUDA, 1 on CPU)")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy = random weights from config.json alone (benchmarks)")
    group.add_argument("--max-gpu-memory", type=positive_gib, default=None, metavar="GIB",
                       help="cap this process's CUDA memory (weights, activations, KV cache) "
                            "at GIB GiB; the KV cache is sized inside the cap (CUDA only)")


def add_multinode_args(parser: argparse.ArgumentParser) -> None:
    """--tp over several nodes (lmdeploy's names); under torchrun its environment places ranks."""
    group = parser.add_argument_group("multi-node tensor parallelism (start the same command "
                                      "on every node, each with its own --node-rank)")
    group.add_argument("--nnodes", type=positive_int, default=1,
                       help="nodes the --tp ranks are spread over (tp / nnodes ranks each)")
    group.add_argument("--node-rank", type=int, default=0,
                       help="this node's index, 0..nnodes-1 (node 0 serves; the others follow)")
    group.add_argument("--master-addr", default=None,
                       help="address of node 0 that every node can reach (needed with --nnodes)")
    group.add_argument("--master-port", type=positive_int, default=29500,
                       help="port on node 0 where the ranks meet")


def add_log_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging verbosity")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    defaults = GenerationConfig()
    group.add_argument("--temperature", type=float, default=defaults.temperature,
                       help="sampling temperature (with --do-sample)")
    group.add_argument("--top-p", type=float, default=defaults.top_p,
                       help="nucleus sampling mass (with --do-sample)")
    group.add_argument("--top-k", type=int, default=defaults.top_k,
                       help="sample among the k most likely tokens (with --do-sample)")
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                       help="penalty for tokens already seen (1.0 = off)")
    group.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                       help="max tokens of one reply")
    group.add_argument("--do-sample", action="store_true",
                       help="sample with temperature/top-p/top-k (default: greedy, as lmdeploy)")


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        dtype=args.dtype, device=args.device, session_len=args.session_len,
        max_batch_size=args.max_batch_size, cache_max_entry_count=args.cache_max_entry_count,
        cache_max_tokens=args.cache_max_tokens, cache_block_seq_len=args.cache_block_seq_len,
        enable_prefix_caching=args.enable_prefix_caching,
        max_prefill_token_num=args.max_prefill_token_num, quant_policy=args.quant_policy,
        model_format=args.model_format, chat_template=args.chat_template, tp=args.tp,
        eager_mode=args.eager_mode, load_format=args.load_format,
        num_scheduler_steps=args.num_scheduler_steps, max_gpu_memory=args.max_gpu_memory,
        parallel=parallel_config_from(args),
    )


def parallel_config_from(args: argparse.Namespace) -> ParallelConfig:
    defaults = ParallelConfig()  # for callers whose namespace predates the multi-node flags
    return ParallelConfig(
        nnodes=getattr(args, "nnodes", defaults.nnodes),
        node_rank=getattr(args, "node_rank", defaults.node_rank),
        master_addr=getattr(args, "master_addr", defaults.master_addr),
        master_port=getattr(args, "master_port", defaults.master_port))


def generation_config_from(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
    )
