"""Every bundled config x every supported family: the invariants each config declares.

Lossless configs must reproduce the unpatched model (logits within tolerance, identical greedy
tokens); lossy configs must stay inside their declared logit-cosine / top-1 bounds. A new YAML in
configs/ is picked up here automatically.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.config import bundled_configs
from kvpatch.testing import prompt_ids, tiny_model

#: Compiled configs pay a torch.compile per family (~20 s each on a 2-core CPU): marked slow.
CONFIGS = [pytest.param(name, marks=pytest.mark.slow) if kvpatch.load_config(path).compile.enabled else name
           for name, path in bundled_configs().items()]
FAMILIES = sorted(kvpatch.supported_families())


def _teacher_forced_logits(model: torch.nn.Module, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a prefill, then of one decode step per forced token."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        steps = [out.logits[:, -1]]
        for i in range(forced.shape[1] - 1):
            out = model(input_ids=forced[:, i : i + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_config_invariants(config_name: str, family: str) -> None:
    config = kvpatch.load_config(config_name)
    torch._dynamo.reset()
    model = tiny_model(family)
    ids = prompt_ids(batch=2, length=20)
    forced = prompt_ids(batch=2, length=12, seed=7)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        reference = _teacher_forced_logits(model, ids, forced)
        reference_tokens = model.generate(ids, **gen)
    try:
        kvpatch.apply(model, config)
    except kvpatch.ConfigError as refusal:
        # A config whose stages cannot work on the tiny model's shapes (kivi's groups of 32 channels,
        # head_dim 16) is refused at apply, and the model is left exactly as it was.
        assert "does not fit" in str(refusal) and kvpatch.get_handle(model) is None
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **gen), reference_tokens)
        return
    with torch.no_grad():
        patched = _teacher_forced_logits(model, ids, forced)
        patched_tokens = model.generate(ids, **gen)

    check_fidelity(config, patched, reference, patched_tokens, reference_tokens)


def check_fidelity(config: kvpatch.PipelineConfig, patched: torch.Tensor, reference: torch.Tensor,
                   patched_tokens: torch.Tensor, reference_tokens: torch.Tensor) -> dict[str, float]:
    """What a config promises, asserted on its outputs: lossless = logits within float tolerance
    and identical tokens; lossy = its declared logit-cosine and top-1 bounds. Returns the figures."""
    if config.fidelity.lossless:
        tolerance = 1e-4 if config.compile.enabled else 1e-5
        torch.testing.assert_close(patched, reference, atol=tolerance, rtol=0)
        assert torch.equal(patched_tokens, reference_tokens)
    cosine = torch.nn.functional.cosine_similarity(patched.flatten(0, 1), reference.flatten(0, 1), dim=-1)
    top1 = (patched.argmax(-1) == reference.argmax(-1)).float().mean().item()
    if config.fidelity.min_logit_cosine is not None:
        assert cosine.min().item() >= config.fidelity.min_logit_cosine
    if config.fidelity.min_top1_agreement is not None:
        assert top1 >= config.fidelity.min_top1_agreement
    return {"min_cosine": cosine.min().item(), "top1": top1, "max_abs": (patched - reference).abs().max().item()}
