"""Real-target and GPU checks. `slow`: the SmolLM2 target from its package (minutes on a CPU).
`gpu`: CUDA paths, skipped without CUDA; run them with `pytest -m gpu` wherever a GPU is."""

import pytest
import torch

from draftsmith.distill.objective import Objective
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
def test_smollm2_trees_and_auto_are_lossless():
    """The real target's tree forward (4-D mask, position ids, cache gather) and `--k auto` keep
    greedy output identical to plain decoding: an untrained eagle3 head and prompt lookup as one
    composite drafter, dynamic trees and chains."""
    from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
    from draftsmith.protocol.drafting import TreeShape
    from draftsmith.models.composite import CompositeProposer
    from draftsmith.models.eagle3 import Eagle3Proposer, build_eagle3
    from draftsmith.models.layers import default_aux_layers
    from draftsmith.models.prompt_lookup import PromptLookupProposer

    target = load_target("smollm2-135m-instruct", device="cpu")
    head = build_eagle3(target.model, default_aux_layers(target.num_layers), torch.arange(0, target.vocab_size, 6))
    proposer = CompositeProposer([PromptLookupProposer(), Eagle3Proposer(head, target.model)])
    rule = DraftLengthRule(measure_cost_curve(target, sizes=(1, 2, 4, 8, 16), reps=1))
    for item in load_bench("mt_bench", num_prompts=2):
        prompt = encode_turn(target, item.turns, [])
        ar = autoregressive_generate(target, prompt, max_new_tokens=32, eos_token_ids=eos_ids(target))
        for tree, r in ((TreeShape.parse("dynamic:4,4,16"), None), (TreeShape.parse("dynamic:4,4,16"), rule),
                        (None, rule)):
            sd = speculative_generate(target, proposer, prompt, k=4, tree=tree, rule=r, max_new_tokens=32,
                                      eos_token_ids=eos_ids(target))
            assert sd.tokens == ar.tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_smollm2_eagle_heads_are_lossless(kind):
    """Fresh (untrained, target-initialised) EAGLE heads on the real SmolLM2 target: greedy output
    equals plain decoding, and the exact-law check holds for eagle3's reduced-support q."""
    from draftsmith.models.eagle import EagleProposer, build_eagle
    from draftsmith.models.eagle3 import Eagle3Proposer, build_eagle3
    from draftsmith.models.layers import default_aux_layers

    target = load_target("smollm2-135m-instruct", device="cpu")
    if kind == "eagle":
        proposer = EagleProposer(build_eagle(target.model, 1.0), target.model)
    else:
        ids = torch.arange(0, target.vocab_size, 6)           # 8192 tokens
        head = build_eagle3(target.model, default_aux_layers(target.num_layers), ids)
        proposer = Eagle3Proposer(head, target.model)
    for item in load_bench("mt_bench", num_prompts=2):
        prompt = encode_turn(target, item.turns, [])
        ar = autoregressive_generate(target, prompt, max_new_tokens=32, eos_token_ids=eos_ids(target))
        for k in (1, 4):
            sd = speculative_generate(target, proposer, prompt, k=k, max_new_tokens=32, eos_token_ids=eos_ids(target))
            assert sd.tokens == ar.tokens


@pytest.mark.slow
def test_gemma3_eagle3_is_lossless_and_trains_one_step():
    """The second family: Gemma 3 (sliding-window layers, scaled embeddings, (1 + w) norms, 262k
    vocabulary). The asset's GGUF has no chat template: the asset supplies Gemma's turn format and
    <end_of_turn> as a stop token, so assistant spans are found and generation stops per turn."""
    from draftsmith.distill.data import tokenize_conversation
    from draftsmith.models.eagle3 import Eagle3Proposer, Eagle3TrainModule, build_eagle3
    from draftsmith.models.layers import default_aux_layers
    from draftsmith.models.target import target_signals

    target = load_target("gemma3-270m", device="cpu")
    assert target.tokenizer.convert_tokens_to_ids("<end_of_turn>") in eos_ids(target)
    row = tokenize_conversation(target.tokenizer, [{"role": "user", "content": "Name three colours."},
                                                   {"role": "assistant", "content": "Red, green and blue."}], 64)
    masked = [i for i, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert target.tokenizer.decode(masked) == "Red, green and blue.<end_of_turn>"
    ids = torch.arange(0, target.vocab_size, 8)                 # 32768 draft tokens
    head = build_eagle3(target.model, default_aux_layers(target.num_layers), ids)
    prompt = encode_turn(target, ["Name three colours."], [])
    ar = autoregressive_generate(target, prompt, max_new_tokens=24, eos_token_ids=eos_ids(target))
    sd = speculative_generate(target, Eagle3Proposer(head, target.model), prompt, k=4, max_new_tokens=24,
                              eos_token_ids=eos_ids(target))
    assert sd.tokens == ar.tokens
    x = torch.tensor([row["input_ids"]])
    mask = torch.tensor([row["loss_mask"][1:]], dtype=torch.bool)
    mask[:, 0] = False
    layers = default_aux_layers(target.num_layers)
    t_logits, hidden = target_signals(target.model, x, torch.ones_like(x), mask, tuple(layers))
    ids = torch.unique(torch.cat([ids, t_logits.argmax(-1)]))     # the target's choices are draftable
    module = Eagle3TrainModule(build_eagle3(target.model, layers, ids).float(), target.model, ttt_steps=3, decay=0.8, objective=Objective())
    _, loss = module(x, torch.ones_like(x), mask, hidden, t_logits)
    loss.backward()
    assert torch.isfinite(loss) and module.model.fc.weight.grad.abs().sum() > 0


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
