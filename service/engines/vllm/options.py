"""Settings of the vLLM engine (``settings.vllm``): pydantic only, so settings stay light to import."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VLLMOptions(BaseModel):
    """How the vLLM engine is started (``settings.vllm``)."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field("auto", pattern=r"^(auto|float32|bfloat16|float16)$", description="weights and activations")
    enforce_eager: bool | None = Field(None, description="no torch.compile/CUDA graphs; null = eager on CPU only")
    max_model_len: int = Field(4096, ge=16, le=1_048_576, description="context length (prompt + output)")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="requests batched at once")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="tokens per step (chunked prefill)")
    kv_cache_gb: int = Field(2, ge=1, le=4096, description="CPU only: KV cache size in GiB")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica")
    enable_prefix_caching: bool = Field(True, description="steered and monitored requests get a cache salt")
    readout_timeout_s: float = Field(30.0, gt=0, le=600, description="longest wait for a token's readings")
    seed: int = Field(0, ge=0)
