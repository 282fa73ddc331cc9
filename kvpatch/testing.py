"""Tiny random-initialised models of every supported family, built from configs (no hub access).

Used by the exactness tests, the config matrix and CPU benchmarks. Random weights are right for
exactness (patched vs unpatched must agree on any weights) and wrong for quality claims: those
need the trained reference model (`kvpatch.models`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from .params import Weight

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VOCAB = 320  # >= 256 byte tokens + specials of `tiny_tokenizer`
WINDOW = 8  # small enough that test prompts cross it
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


def _common(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        **extra,
    )


def _config(model_type: str, **kwargs: Any) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kwargs)


#: Qwen's opt-in sliding window on the second of two layers (a full and a windowed layer).
_QWEN_HYBRID_WINDOW: dict[str, Any] = dict(
    use_sliding_window=True,
    sliding_window=WINDOW,
    max_window_layers=1,
    layer_types=["full_attention", "sliding_attention"],
)

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: _config("llama", **_common()),
    "mistral": lambda: _config("mistral", **_common(sliding_window=WINDOW)),
    "qwen2": lambda: _config("qwen2", **_common(**_QWEN_HYBRID_WINDOW)),
    "qwen3": lambda: _config("qwen3", **_common(head_dim=16, **_QWEN_HYBRID_WINDOW)),
    "gpt2": lambda: _config(
        "gpt2",
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        scale_attn_by_inverse_layer_idx=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
    "phi3": lambda: _config("phi3", **_common(sliding_window=WINDOW, partial_rotary_factor=0.5)),
    "gemma2": lambda: _config(
        "gemma2",
        **_common(
            head_dim=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "gemma3_text": lambda: _config(
        "gemma3_text",
        **_common(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    # a sparse (top-2 of 4 experts) and a dense MLP layer; Qwen3-MoE windows every layer or none
    "qwen3_moe": lambda: _config(
        "qwen3_moe",
        **_common(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1]),
    ),
    # MLA: a compressed K/V latent (kv_lora_rank), query and key heads of 16 + 8 (no-RoPE + RoPE)
    # channels and value heads of 12; one dense then one MoE layer (top-2 of 4 routed + 1 shared)
    "deepseek_v3": lambda: _config(
        "deepseek_v3",
        **{**_common(), "num_key_value_heads": 4},
        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1,
    ),
    "gpt_oss": lambda: _config(
        "gpt_oss",
        **_common(
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                 rope_theta=150000.0, beta_fast=32.0, beta_slow=1.0, truncate=False),
        ),
    ),
}


def _spread_sinks(model: torch.nn.Module) -> None:
    """gpt-oss initialises its attention sinks near 0; spread them so that a kernel that drops
    (or misplaces) a head's sink changes the logits well past float tolerance."""
    for module in model.modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            sinks.normal_(0.0, 2.0)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random-init causal LM of `model_type` in eval mode (deterministic for `seed`)."""
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; available: {', '.join(TINY_CONFIGS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type](), dtype=dtype)
    # Random init leaves logits nearly flat; scale them up so greedy decoding is not decided by ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
        _spread_sinks(model)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, ids 0..255) with <pad> <bos> <eos> at 256..258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {token: i for i, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {token: i for i, token in enumerate(sorted(byte_vocab, key=lambda t: ord(t)))}
    specials = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
    backend = Tokenizer(models.BPE(vocab={**byte_vocab, **specials}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def prompt_ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    """Random token ids for tiny models that avoid the special ids (256..258)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=generator)


#: Random-init Llama shapes for speed benchmarks (never for quality claims).
BENCH_SHAPES: dict[str, dict[str, Any]] = {
    "llama-tiny": _common(),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "llama-8b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
}


def bench_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random-init Llama of a named benchmark shape, built directly on `device`."""
    if shape not in BENCH_SHAPES:
        raise KeyError(f"unknown benchmark shape {shape!r}; available: {', '.join(BENCH_SHAPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config("llama", **BENCH_SHAPES[shape]), dtype=dtype)
    return model.eval()


# -- a deliberately wrong "lossless" storage (for checking that fidelity bounds can fail) ----------

NOISY_STORAGE = "_testing_noisy_values"


def noisy_values_config(eps: float) -> dict[str, Any]:
    """A config whose storage claims to be lossless but stores every value tensor with relative
    Gaussian noise `eps` (seeded): the harness's lossless bounds must flag it from eps ~1e-3.
    Registers the stage on first use (kept out of the registry otherwise, so the config matrix
    and plug-in tests never see it)."""
    from .registry import available_stages

    if NOISY_STORAGE not in available_stages()["storage"]:
        _register_noisy_storage()
    return {"name": f"noisy-{eps:g}", "fidelity": {"lossless": True},
            "stages": [{"kind": "storage", "impl": NOISY_STORAGE, "params": {"eps": eps}}]}


def _register_noisy_storage() -> None:
    from transformers.cache_utils import DynamicLayer

    from .registry import Stage, StageParams, register_stage

    class NoisyValueLayer(DynamicLayer):
        def __init__(self, eps: float) -> None:
            super().__init__()
            self.eps = eps
            self.generator: torch.Generator | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.generator is None:
                self.generator = torch.Generator(value_states.device).manual_seed(0)
            noise = torch.randn(value_states.shape, generator=self.generator, device=value_states.device)
            scale = value_states.float().pow(2).mean().sqrt()
            noisy = (value_states.float() + self.eps * scale * noise).to(value_states.dtype)
            return super().update(key_states, noisy, *args, **kwargs)

    @register_stage("storage", NOISY_STORAGE)
    class NoisyStorage(Stage):
        builds_layers = True

        class Params(StageParams):
            eps: Weight = 1e-3

        def make_layer(self, layout: Any) -> DynamicLayer:
            return NoisyValueLayer(self.params.eps)
