"""How big a deployment's workers must be: the memory a model needs on a GPU pool, the context length
(`MAX_MODEL_LEN`) that fits, the container disk and the cold-start allowance (`RUNPOD_INIT_TIMEOUT`).

The memory estimate, stated so a person can check it:
    weights   = parameters x bytes per parameter (2 for bf16/fp16; 1 for fp8/int8, 0.5 for 4-bit
                AWQ/GPTQ, read from the model name), parameters from the name ("…-8B-…", "8x7B") or --params
    KV cache  = context tokens x KV bytes per token, from grouped-query-attention models of that size at
                fp16 (Qwen2.5-0.5B 12 KiB, Qwen2.5-3B 36 KiB, Llama-3-8B 128 KiB, Mistral-Nemo-12B 160 KiB,
                Qwen2.5-32B 256 KiB, Llama-3-70B 320 KiB per token)
    usable    = the pool's smallest GPU memory x 0.95 (worker-vllm's GPU_MEMORY_UTILIZATION default in
                `.runpod/hub.json`) - 1 GB for activations and CUDA graphs
A model fits when weights + KV cache for its context <= usable. It is an estimate: vLLM itself decides at
start-up, and refuses to start when the KV cache for `MAX_MODEL_LEN` does not fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GPU_MEMORY_UTILIZATION = 0.95
RUNTIME_OVERHEAD_GB = 1.0
# worker-vllm v2.25.2 `.runpod/hub.json` containerDiskInGb; worker-infinity-embedding 1.1.4's is 20.
VLLM_DISK_GB = 150
EMBEDDING_DISK_GB = 20
IMAGE_DISK_GB = 30  # the worker image itself and vLLM's compile caches
# runpod/docs `serverless/development/optimization.mdx`: past 7 minutes of cold start a worker is marked
# unhealthy unless RUNPOD_INIT_TIMEOUT (seconds) extends it; its example is 800.
MIN_INIT_TIMEOUT_S = 800
INIT_SECONDS_PER_GB = 10  # a conservative ~100 MB/s model download, plus loading
MIN_CONTEXT = 1024
# The longest default context per pool memory: long enough for chat, short enough that the KV cache
# leaves room for concurrent requests. An explicit --max-model-len overrides it.
_CONTEXT_BY_MEMORY_GB = ((16, 4096), (24, 8192), (48, 16384))
_MAX_DEFAULT_CONTEXT = 32768
_KV_KIB_PER_TOKEN = ((1.0, 12), (4.0, 36), (9.0, 128), (15.0, 160), (35.0, 256))
_MAX_KV_KIB_PER_TOKEN = 320
_MOE_RE = re.compile(r"(?<![\w.])(\d+)x(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")
_PARAMS_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")
_FOUR_BIT_RE = re.compile(r"awq|gptq|int4|4bit|w4a16|bnb", re.IGNORECASE)
_EIGHT_BIT_RE = re.compile(r"fp8|int8|8bit|w8a8", re.IGNORECASE)


def params_from_name(model: str) -> float | None:
    """Billions of parameters as the model's name states them (`Llama-3.1-8B`, `Mixtral-8x7B`)."""
    name = model.rsplit("/", 1)[-1].replace("_", "-")
    moe = _MOE_RE.search(name)
    if moe:
        return int(moe.group(1)) * float(moe.group(2))
    plain = _PARAMS_RE.search(name)
    return float(plain.group(1)) if plain else None


def bytes_per_param(model: str) -> float:
    if _FOUR_BIT_RE.search(model):
        return 0.5
    return 1.0 if _EIGHT_BIT_RE.search(model) else 2.0


def kv_bytes_per_token(params_b: float) -> int:
    kib = next((k for limit, k in _KV_KIB_PER_TOKEN if params_b <= limit), _MAX_KV_KIB_PER_TOKEN)
    return kib * 1024


@dataclass(frozen=True)
class Sizing:
    params_b: float | None
    bytes_per_param: float
    weights_gb: float | None
    kv_gb: float | None  # for max_model_len tokens
    pool_memory_gb: int
    usable_gb: float
    max_model_len: int | None  # None: the worker takes no context setting (embeddings)
    disk_gb: int
    init_timeout_s: int
    warnings: tuple[str, ...]

    @property
    def needed_gb(self) -> float | None:
        return None if self.weights_gb is None else self.weights_gb + (self.kv_gb or 0.0)

    def estimate(self) -> str:
        if self.weights_gb is None:
            return "unknown: the model name states no parameter count (give --params)"
        kv = "" if self.kv_gb is None else f" + KV cache {self.kv_gb:.1f} GB for {self.max_model_len} tokens"
        return (f"weights {self.weights_gb:.1f} GB ({self.params_b:g}B parameters x {self.bytes_per_param:g} bytes)"
                f"{kv} = {self.needed_gb:.1f} GB of {self.usable_gb:.1f} GB usable on {self.pool_memory_gb} GB")


def size(model: str, llm: bool, pool_memory_gb: int, params_b: float | None = None,
         max_model_len: int | None = None, disk_gb: int | None = None,
         init_timeout_s: int | None = None) -> Sizing:
    params = params_b if params_b is not None else params_from_name(model)
    per_param = bytes_per_param(model)
    weights = None if params is None else params * per_param
    usable = pool_memory_gb * GPU_MEMORY_UTILIZATION - RUNTIME_OVERHEAD_GB
    warnings: list[str] = []
    context, kv = None, None
    if llm:
        cap = next((c for limit, c in _CONTEXT_BY_MEMORY_GB if pool_memory_gb <= limit), _MAX_DEFAULT_CONTEXT)
        per_token = kv_bytes_per_token(params) if params is not None else None
        if max_model_len is not None:
            context = max_model_len
        elif weights is not None and per_token is not None:
            room_tokens = (usable - weights) * 1e9 / per_token
            context = max(MIN_CONTEXT, min(cap, int(room_tokens) // MIN_CONTEXT * MIN_CONTEXT))
        else:
            context = cap
        kv = None if per_token is None else context * per_token / 1e9
    if weights is not None and weights + (kv or 0.0) > usable:
        what = "its weights" if kv is None else f"its weights plus the KV cache for {context} tokens"
        warnings.append(
            f"{model} will not fit: {what} need ~{weights + (kv or 0.0):.1f} GB, and a {pool_memory_gb} GB GPU leaves "
            f"~{usable:.1f} GB; choose a larger pool with --gpu"
            + (" or a quantized (AWQ, GPTQ, FP8) model" if weights > usable else " or a shorter --max-model-len")
        )
    floor = VLLM_DISK_GB if llm else EMBEDDING_DISK_GB
    disk = disk_gb or max(floor, math.ceil(((weights or 0.0) * 1.25 + IMAGE_DISK_GB) / 10) * 10)
    init = init_timeout_s or max(MIN_INIT_TIMEOUT_S, 600 + math.ceil((weights or 0.0) * INIT_SECONDS_PER_GB))
    return Sizing(params, per_param, weights, kv, pool_memory_gb, usable, context, disk, init, tuple(warnings))
