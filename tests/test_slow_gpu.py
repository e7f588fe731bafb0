"""Real-target and GPU checks. `slow`: the SmolLM2 target from its package (minutes on a CPU).
`gpu`: CUDA paths, skipped without CUDA; run them with `pytest -m gpu` wherever a GPU is."""

import pytest
import torch

from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.harness import EvalConfig, Runner, encode_turn, eos_ids, top2_margin
from draftsmith.models import load_drafter, load_target
from draftsmith.models.target import Target

from conftest import prompts, tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow
def test_smollm2_prompt_lookup_is_lossless_on_mt_bench():
    target = load_target("smollm2-135m-instruct", device="cpu")
    drafter = load_drafter("prompt-lookup", target)
    for item in load_bench("mt_bench", num_prompts=2):
        prompt = encode_turn(target, item.turns, [])
        ar = autoregressive_generate(target, prompt, max_new_tokens=48, eos_token_ids=eos_ids(target))
        sd = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=48, eos_token_ids=eos_ids(target))
        assert sd.tokens == ar.tokens


@pytest.mark.slow
def test_smollm2_harness_runs_all_three_decoders():
    cfg = EvalConfig(target="smollm2-135m-instruct", drafter="prompt-lookup", bench="mt_bench",
                     num_prompts=1, max_new_tokens=24, device="cpu")
    runner = Runner(cfg)
    records = runner.evaluate(load_bench("mt_bench", num_prompts=1), progress=False)
    assert records[0].sd_tokens == records[0].ar_tokens == records[0].hf_tokens


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("k", [1, 4, 7])
def test_cuda_fp32_greedy_equality(k):
    target = Target(tiny_llama(0).cuda(), tokenizer=None)
    from draftsmith.models.small_lm import SmallLMProposer
    drafter = SmallLMProposer(tiny_llama(1).cuda())
    for prompt in prompts(3):
        ar = autoregressive_generate(target, prompt, max_new_tokens=32)
        assert speculative_generate(target, drafter, prompt, k=k, max_new_tokens=32).tokens == ar.tokens


@pytest.mark.gpu
@cuda
def test_cuda_bf16_divergences_are_near_ties():
    target = Target(tiny_llama(0).cuda().to(torch.bfloat16), tokenizer=None)
    from draftsmith.models.small_lm import SmallLMProposer
    drafter = SmallLMProposer(tiny_llama(1).cuda().to(torch.bfloat16))
    for prompt in prompts(4):
        ar = autoregressive_generate(target, prompt, max_new_tokens=32)
        sd = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=32)
        if sd.tokens != ar.tokens:
            i = next(i for i, (a, b) in enumerate(zip(ar.tokens, sd.tokens)) if a != b)
            # bf16 has ~3 significant digits: a flip needs the top-2 logits within a few ulps
            assert top2_margin(target, prompt + ar.tokens[:i])["top2_margin"] < 0.25
