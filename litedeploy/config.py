"""Configuration dataclasses.

`ModelConfig.from_hf` is the one place where Hugging Face config names are normalized: everything
after it reads our field names only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from litedeploy.errors import ModelLoadError

# HF architectures[0] -> our model family; older InternLM2 uploads say model_type "internlm".
SUPPORTED_ARCHITECTURES = ("InternLM2ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # None | "linear" | "dynamic" | "llama3"
    scaling_type: str | None = None
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # dtype the checkpoint declares ("bfloat16", "float16", "float32")
    checkpoint_dtype: str = "float32"
    # tensor parallelism: num_heads, num_kv_heads and intermediate_size are this rank's share;
    # vocab_size stays the full vocabulary (embedding and LM head hold vocab_size / tp_size rows)
    tp_size: int = 1
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def shard(self, tp_size: int) -> ModelConfig:
        """This rank's view of the model under `tp_size`-way tensor parallelism."""
        if tp_size == 1:
            return self
        sizes = {
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
        }
        for name, size in sizes.items():
            if size % tp_size:
                raise ModelLoadError(
                    f"--tp {tp_size} does not divide {name} {size}; choose a --tp that does")
        return dataclasses.replace(
            self, num_heads=self.num_heads // tp_size,
            num_kv_heads=self.num_kv_heads // tp_size,
            intermediate_size=self.intermediate_size // tp_size, tp_size=tp_size,
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = cfg["hidden_size"]
        num_heads = cfg["num_attention_heads"]
        num_kv_heads = cfg.get("num_key_value_heads") or num_heads
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        qkv_bias = arch == "Qwen2ForCausalLM" or bool(
            cfg.get("attention_bias", False) or (arch == "InternLM2ForCausalLM" and cfg.get("bias"))
        )
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            hf_config=cfg,
        )


def _arch_from_model_type(model_type: str | None) -> str:
    return {
        "internlm2": "InternLM2ForCausalLM",
        "internlm": "InternLM2ForCausalLM",
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }.get(model_type or "", str(model_type))


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    scaling = cfg.get("rope_scaling") or {}
    # transformers >= 5 may store theta inside rope_parameters
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if not scaling and params.get("rope_type") not in (None, "default"):
        scaling = params
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return RopeConfig(theta=theta)
    if kind not in ("linear", "dynamic", "llama3"):
        raise ModelLoadError(f"unsupported rope_scaling type {kind!r} (linear, dynamic, llama3)")
    return RopeConfig(
        theta=theta,
        scaling_type=kind,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)
        ),
    )


@dataclass
class CacheConfig:
    block_size: int = 64
    # lmdeploy's meaning: fraction of free GPU memory after weights; on CPU of available RAM
    cache_max_entry_count: float = 0.8
    # absolute override in tokens (takes precedence when set)
    max_cache_tokens: int | None = None
    enable_prefix_caching: bool = False
    quant_policy: int = 0
    # --max-gpu-memory: the process's CUDA allocator is capped at this many GiB, and the cache
    # takes its share of what the cap leaves (not of the device's free memory)
    max_gpu_memory: float | None = None


@dataclass
class SchedulerConfig:
    max_batch_size: int = 128
    max_prefill_token_num: int = 8192
    session_len: int | None = None


@dataclass(frozen=True)
class ParallelConfig:
    """Where the --tp ranks run: one host by default; several with --nnodes (each node starts
    tp / nnodes ranks and rendezvouses at node 0's --master-addr:--master-port). Under torchrun
    the ranks come from its environment instead (distributed/launch.py)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # None on one host: 127.0.0.1 and a free port
    master_port: int = 29500  # torch.distributed's usual MASTER_PORT
    # a rank whose heartbeat is this late counts as lost: every rank then exits non-zero
    heartbeat_timeout_s: float = 10.0

    def validate(self, tp: int) -> None:
        if self.nnodes < 1:
            raise ModelLoadError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ModelLoadError(f"--node-rank {self.node_rank} is out of range for --nnodes "
                                 f"{self.nnodes} (use 0..{self.nnodes - 1})")
        if self.nnodes > 1 and not self.master_addr:
            raise ModelLoadError(f"--nnodes {self.nnodes} needs --master-addr: the address of "
                                 "node 0 that every node can reach")
        if tp % self.nnodes:
            raise ModelLoadError(f"--tp {tp} is not divisible by --nnodes {self.nnodes}: each "
                                 "node runs tp / nnodes ranks")
        if not 0 < self.master_port < 65536:
            raise ModelLoadError(f"--master-port must be in 1..65535, got {self.master_port}")


@dataclass
class EngineConfig:
    dtype: str = "auto"
    device: str = "auto"
    session_len: int | None = None
    max_batch_size: int = 128
    cache_max_entry_count: float = 0.8
    cache_max_tokens: int | None = None
    cache_block_seq_len: int = 64
    enable_prefix_caching: bool = False
    max_prefill_token_num: int = 8192
    quant_policy: int = 0
    model_format: str | None = None
    chat_template: str | None = None
    tp: int = 1
    eager_mode: bool = False
    load_format: str = "auto"  # "auto" | "dummy"
    check_integrity: bool = False
    max_gpu_memory: float | None = None  # GiB; caps this process's CUDA allocations
    # decode steps run back to back on the device between two host syncs (engine/multi_step.py);
    # None = 8 on CUDA (hides the host's per-step work), 1 on CPU (tokens stream one by one)
    num_scheduler_steps: int | None = None
    # a busy batch (over half full) admits waiting requests every this many decode steps
    prefill_interval: int = 16
    # multi-node tensor parallelism (--nnodes, --node-rank, --master-addr, --master-port)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Refuse settings this version cannot honour, instead of silently ignoring them."""
        if self.quant_policy not in (0, 4, 8):
            raise ModelLoadError(f"--quant-policy must be 0, 4 or 8, got {self.quant_policy}")
        if self.tp < 1:
            raise ModelLoadError(f"--tp must be >= 1, got {self.tp}")
        self.parallel.validate(self.tp)
        if self.model_format not in (None, "hf", "awq", "gguf"):
            raise ModelLoadError(f"unknown --model-format {self.model_format} "
                                 "(supported: hf, awq, gguf)")
        if not 0.0 < self.cache_max_entry_count < 1.0:
            raise ModelLoadError("--cache-max-entry-count must be between 0 and 1, "
                                 f"got {self.cache_max_entry_count}")
        if self.max_gpu_memory is not None and not self.max_gpu_memory > 0:
            raise ModelLoadError(f"--max-gpu-memory must be a positive number of GiB, "
                                 f"got {self.max_gpu_memory}")

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.cache_block_seq_len,
            cache_max_entry_count=self.cache_max_entry_count,
            max_cache_tokens=self.cache_max_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            quant_policy=self.quant_policy,
            max_gpu_memory=self.max_gpu_memory,
        )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_batch_size=self.max_batch_size,
            max_prefill_token_num=self.max_prefill_token_num,
            session_len=self.session_len,
        )


GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on the generated text, enforced by a grammar mask in the sampler.

    spec by kind: json_schema -> the schema as a JSON string; json_object -> None (any JSON
    object); regex -> the pattern; choice -> a JSON list of strings; grammar -> EBNF/lark text.
    Frozen and hashable: (kind, spec) is the key of the compiled-grammar cache.
    """

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    spec: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"guided kind must be one of {GUIDED_KINDS}, got {self.kind!r}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"guided kind {self.kind!r} needs a spec")


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-300 is a division by 0
# in float32 (NaN scores), and anything this small already puts all mass on the argmax.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class GenerationConfig:
    """Per-request generation settings (lmdeploy's names and defaults)."""

    n: int = 1
    max_new_tokens: int | None = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    logprobs: int | None = None
    # logprobs of the prompt tokens (the first has none) with this many top alternatives;
    # None = off. With it, max_new_tokens may be 0: prefill only (OpenAI's echo + max_tokens 0)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    # structured output: a grammar the output must follow (None = unconstrained)
    guided: GuidedDecoding | None = None

    def validate(self) -> None:
        min_new = 0 if self.prompt_logprobs is not None else 1  # 0: prompt logprobs only
        if self.max_new_tokens is not None and self.max_new_tokens < min_new:
            raise ValueError(f"max_new_tokens must be >= {min_new}, got {self.max_new_tokens}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.logit_bias and not all(-100 <= v <= 100 for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        # lmdeploy: do_sample=False forces greedy whatever temperature/top_k say
        return (not self.do_sample or self.top_k == 1
                or self.temperature < MIN_SAMPLING_TEMPERATURE)
