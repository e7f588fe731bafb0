"""Draft trees: the target's tree forward equals a chain forward per path, the cache keeps exactly the
accepted path, greedy trees (static, dynamic, lookup branches) reproduce the target's output for
every proposer, and tree sampling's output law is exactly p (computed, not sampled)."""

import copy
import itertools
import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.verify import acceptance_probability, residual, verify_tree_greedy, verify_tree_sampling
from draftsmith.models.eagle3 import Eagle3Proposer
from draftsmith.models.prompt_lookup import PromptLookupProposer, trie
from draftsmith.models.small_lm import SmallLMProposer
from draftsmith.models.target import Target
from draftsmith.protocol.drafting import TreeShape
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling, warp
from draftsmith.protocol.tree import ancestor_mask, children, depths

from conftest import VOCAB, prompts, tiny_llama
from test_eagle3 import random_head
from test_verify import SAMPLINGS, random_logits

TREES = [TreeShape.parse("dynamic:4,3,10"), TreeShape.parse("dynamic:6,2,16"), TreeShape.parse("dynamic:3,5,40")]


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                              max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_structure():
    parents = [-1, -1, 0, 0, 2]
    assert depths(parents) == [1, 1, 2, 2, 3]
    assert children(parents) == [[0, 1], [2, 3], [], [4], [], []]
    mask = ancestor_mask(parents)
    assert mask[5].tolist() == [True, True, False, True, False, True]   # node 4: root, 0, 2, itself
    with pytest.raises(ValueError):
        depths([0])
    assert trie([[5, 6, 7], [5, 8], [9]]) == ([5, 6, 7, 8, 9], [-1, 0, 1, 0, -1])


@pytest.mark.parametrize("make", [lambda: tiny_llama(0), tiny_gemma3])
def test_tree_forward_equals_chain_forward_per_path(make):
    target = Target(make(), tokenizer=None)
    prompt = prompts(1, length=10)[0]
    tokens, parents = [11, 12, 13, 14, 15, 16], [-1, -1, 0, 0, 2, 1]
    cache = target.new_cache()
    target.forward(prompt, cache)
    tree = target.forward([7] + tokens, cache, hidden_layers=(0, -1), parents=parents)
    for node in range(len(tokens)):
        path, n = [], node
        while n >= 0:
            path.insert(0, n)
            n = parents[n]
        fresh = target.new_cache()
        chain = target.forward(prompt + [7] + [tokens[i] for i in path], fresh, hidden_layers=(0, -1))
        torch.testing.assert_close(tree.logits[node + 1], chain.logits[-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tree.hidden[1][node + 1], chain.hidden[1][-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: tiny_llama(0), tiny_gemma3])
def test_masked_gqa_gives_the_same_logits(make, monkeypatch):
    """A CPU target lets torch's sdpa take grouped KV heads with a mask (no `repeat_kv` copy of the
    cache each verify step); chains and trees give bit-identical logits either way."""
    target = Target(make(), tokenizer=None)
    import os
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    prompt = prompts(1, length=40)[0]
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", flag)
        cache = target.new_cache()
        target.forward(prompt, cache)
        chain = target.forward([7, 11, 12, 13], cache).logits
        target.rollback(cache, len(prompt))
        tree = target.forward([7, 11, 12, 13, 14], cache, parents=[-1, -1, 0, 1]).logits
        outs[flag] = (chain, tree)
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda: tiny_llama(0), tiny_gemma3])
def test_keep_leaves_the_cache_of_the_accepted_path(make):
    target = Target(make(), tokenizer=None)
    prompt = prompts(1, length=10)[0]
    tokens, parents = [11, 12, 13, 14], [-1, -1, 1, 2]
    cache = target.new_cache()
    target.forward(prompt, cache)
    target.forward([7] + tokens, cache, parents=parents)
    target.keep(cache, len(prompt), [0, 2, 3, 4])              # root, nodes 1, 2, 3
    assert cache.get_seq_length() == len(prompt) + 4
    after = target.forward([20], cache).logits[-1]
    fresh = target.forward(prompt + [7, 12, 13, 14, 20], target.new_cache()).logits[-1]
    torch.testing.assert_close(after, fresh, rtol=1e-4, atol=1e-4)


def test_greedy_tree_verify_takes_the_matching_path():
    logits = torch.full((6, 30), -5.0)
    for row, best in enumerate([3, 9, 4, 8, 2, 1]):   # argmax after root, node 0, ..., node 4
        logits[row, best] = 5.0
    # root -> {0: 9 (wrong), 1: 3 (right)}; node 1 -> {2: 4 (right)}; node 2 -> {3: 7 (wrong)}, node 4 -> 5
    tokens, parents = [9, 3, 4, 7, 5], [-1, -1, 1, 2, 2]
    path, nxt = verify_tree_greedy(tokens, parents, logits)
    assert path == [1, 2] and nxt == 8


def test_proposer_without_trees_is_refused(target):
    class ChainOnly:
        hidden_layers = ()

        def reset(self):
            pass

        def observe(self, state):
            pass

        def propose(self, state, k, sampler):
            return None

    with pytest.raises(DraftsmithError, match="chains only"):
        speculative_generate(target, ChainOnly(), prompts(1)[0], k=3, tree=TREES[0])


@pytest.mark.parametrize("tree", TREES)
def test_greedy_equality_small_lm_trees(target, tree):
    noisy = copy.deepcopy(target.model)
    torch.manual_seed(3)
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(torch.randn_like(w) * w.std() * 0.5)
    proposer = SmallLMProposer(noisy)
    accepted = 0
    for prompt in prompts(3, seed=7):
        ar = autoregressive_generate(target, prompt, max_new_tokens=30)
        sd = speculative_generate(target, proposer, prompt, k=tree.depth, tree=tree, max_new_tokens=30)
        assert sd.tokens == ar.tokens
        assert all(p <= tree.nodes for p in sd.proposed)
        accepted += sum(sd.accepted)
    assert accepted > 0


@pytest.mark.parametrize("tree", TREES)
def test_greedy_equality_eagle3_trees(tree):
    target4 = Target(tiny_llama(0, layers=4), tokenizer=None)
    proposer = Eagle3Proposer(random_head(target4), target4.model)
    for prompt in prompts(3, seed=11):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
        sd = speculative_generate(target4, proposer, prompt, k=tree.depth, tree=tree, max_new_tokens=24)
        assert sd.tokens == ar.tokens


def test_tree_beats_chain_for_a_noisy_drafter(target):
    """Branching must find accepted tokens the chain misses (same depth)."""
    noisy = copy.deepcopy(target.model)
    torch.manual_seed(5)
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(torch.randn_like(w) * w.std() * 0.7)
    chain, tree = [], []
    for prompt in prompts(4, seed=2):
        chain.append(speculative_generate(target, SmallLMProposer(noisy), prompt, k=4, max_new_tokens=40).tau)
        tree.append(speculative_generate(target, SmallLMProposer(noisy), prompt, k=4, max_new_tokens=40,
                                         tree=TreeShape.parse("dynamic:4,4,30")).tau)
    assert sum(tree) > sum(chain)


def test_drafter_equal_to_target_accepts_the_whole_depth(target):
    proposer = SmallLMProposer(copy.deepcopy(target.model))
    sd = speculative_generate(target, proposer, prompts(1)[0], k=4, tree=TreeShape.parse("dynamic:4,3,12"),
                              max_new_tokens=1 + 3 * 5)
    assert sd.accepted == [4, 4, 4]


def test_static_tree_from_file(target, tmp_path):
    spec = tmp_path / "tree.json"
    spec.write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    tree = TreeShape.parse(f"static:{spec}")
    assert (tree.depth, tree.topk, tree.nodes) == (3, 2, 6)
    proposer = SmallLMProposer(tiny_llama(1))
    for prompt in prompts(2, seed=4):
        ar = autoregressive_generate(target, prompt, max_new_tokens=20)
        sd = speculative_generate(target, proposer, prompt, k=3, tree=tree, max_new_tokens=20)
        assert sd.tokens == ar.tokens
        assert max(sd.proposed) <= 6
    spec.write_text(json.dumps([[0, 1]]))
    with pytest.raises(DraftsmithError, match="parent path"):
        TreeShape.parse(f"static:{spec}")


def test_prompt_lookup_branches(target):
    tokens = [5, 6, 40, 41, 42, 9, 5, 6, 43, 44, 9, 5, 6]     # "5 6" followed by 40 41 .. and by 43 44 ..
    state = DecodeState(tokens=tokens, committed=len(tokens) - 1, hidden=[], hidden_start=0)
    draft = PromptLookupProposer().propose(state, 3, None, tree=TreeShape.parse("dynamic:3,3,12"))
    assert (draft.tokens, draft.parents) == ([43, 44, 9, 40, 41, 42], [-1, 0, 1, -1, 3, 4])
    prompt = prompts(1, length=8, seed=1)[0] * 3
    ar = autoregressive_generate(target, prompt, max_new_tokens=20)
    sd = speculative_generate(target, PromptLookupProposer(), prompt, k=3,
                              tree=TreeShape.parse("dynamic:3,3,12"), max_new_tokens=20)
    assert sd.tokens == ar.tokens


@pytest.mark.parametrize("bad", ["dynamic:0", "dynamic:a,b", "dynamic:1,2,3,4", "ring"])
def test_bad_tree_specs(bad):
    with pytest.raises(DraftsmithError):
        TreeShape.parse(bad)


@pytest.mark.parametrize("paths", [[], [[0], [0.9]], [[0], [1.7]], [[0], [1.0]], [[True]], [[0], [-1]], [[0], []],
                                   [0], {"0": [0]}, "[[0]]"])
def test_static_tree_ranks_are_non_negative_integers(tmp_path, paths):
    """0.9 and 1.7 were read as ranks 0 and 1; [] was a traceback."""
    (tmp_path / "t.json").write_text(json.dumps(paths))
    with pytest.raises(DraftsmithError, match="rank paths|integer ranks"):
        TreeShape.parse(f"static:{tmp_path / 't.json'}")


def test_tree_sizes_are_capped_by_what_a_step_costs(tmp_path):
    from draftsmith.protocol.drafting import MAX_DRAFTED_NODES, MAX_TREE_NODES

    assert TreeShape.parse("dynamic:6,8,48").nodes == 48                 # EAGLE-2's size: 8 + 5 x 64 drafted
    assert TreeShape.parse(f"dynamic:2,127,{MAX_TREE_NODES}").topk == 127    # 127 + 127^2 = 16256 drafted
    for spec in ["dynamic:1000000,1000000,1000000", "dynamic:2,128,48", f"dynamic:6,8,{MAX_TREE_NODES + 1}",
                 f"dynamic:{MAX_DRAFTED_NODES + 1},1,8"]:
        with pytest.raises(DraftsmithError, match="verifies at most"):
            TreeShape.parse(spec)
    (tmp_path / "t.json").write_text(json.dumps([[i] for i in range(MAX_TREE_NODES + 1)]))
    with pytest.raises(DraftsmithError, match="at most 1024 nodes"):
        TreeShape.parse(f"static:{tmp_path / 't.json'}")


# ------------------------------------------------------------------------- exact law of tree sampling

def rrs_law(p: torch.Tensor, kids: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
    """Law of the first token verify_tree_sampling emits, given the drawn children (token, q or None),
    from the building blocks it uses: accept with acceptance_probability, else go on with the residual."""
    if not kids:
        return p
    x, q = kids[0]
    if q is None:
        q = torch.nn.functional.one_hot(torch.tensor(x), len(p)).float()
    a = acceptance_probability(p, q, x)
    law = (1 - a) * rrs_law(residual(p, q), kids[1:])
    law[x] += a
    return law


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("width", [1, 2, 3])
def test_exact_law_sampled_siblings(sampling, width):
    """Siblings drawn i.i.d. from q (SpecInfer): averaged over the draws, the law is exactly p."""
    v = 6
    p = warp(random_logits(width, v=v), sampling)
    q = warp(random_logits(width + 30, v=v), sampling)
    law = torch.zeros(v)
    for draw in itertools.product(range(v), repeat=width):
        weight = torch.prod(torch.stack([q[x] for x in draw]))
        if weight > 0:
            law += weight * rrs_law(p, [(x, q) for x in draw])
    torch.testing.assert_close(law, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_law_deterministic_siblings(sampling):
    """Top-k children (EAGLE-2's dynamic tree, static trees, lookups) are deterministic: exactly p."""
    p = warp(random_logits(7), sampling)
    for kids in ([3], [3, 5], [5, 3, 0], [3, 3]):
        torch.testing.assert_close(rrs_law(p, [(x, None) for x in kids]), p, rtol=0, atol=1e-6)


def test_implementation_follows_the_law_it_is_checked_against():
    """verify_tree_sampling makes exactly rrs_law's decisions: the empirical law of its first token
    over many seeded runs matches rrs_law for a fixed tree (sampled child + deterministic child)."""
    v = 5
    p = warp(random_logits(1, v=v), Sampling(1.0))
    q = warp(random_logits(2, v=v), Sampling(1.0))
    tokens, parents = [1, 3], [-1, -1]
    qs = torch.stack([q, torch.nn.functional.one_hot(torch.tensor(3), v).float()])
    expect = rrs_law(p, [(1, q), (3, qs[1])])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(v)
    n = 6000
    for _ in range(n):
        path, nxt = verify_tree_sampling(tokens, parents, qs, torch.stack([p, p, p]), g)
        counts[tokens[path[0]] if path else nxt] += 1
    assert (counts / n - expect).abs().max() < 4 * (0.25 / n) ** 0.5


def test_sampling_with_trees_runs_end_to_end(target):
    proposer = SmallLMProposer(tiny_llama(1))
    out = speculative_generate(target, proposer, prompts(1)[0], k=3, tree=TreeShape.parse("dynamic:3,3,8"),
                               sampling=Sampling(0.8, top_k=20), max_new_tokens=20,
                               generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 20


@pytest.mark.parametrize("tree", [None, TREES[0]])
def test_composite_lookup_and_model_is_lossless(target, tree):
    from draftsmith.models.composite import CompositeProposer

    proposer = CompositeProposer([PromptLookupProposer(), SmallLMProposer(tiny_llama(1))])
    for prompt in prompts(3, seed=21):
        prompt = prompt + prompt[:6]
        ar = autoregressive_generate(target, prompt, max_new_tokens=30)
        sd = speculative_generate(target, proposer, prompt, k=4, tree=tree, max_new_tokens=30)
        assert sd.tokens == ar.tokens
    out = speculative_generate(target, proposer, prompts(1)[0], k=4, tree=tree, sampling=Sampling(1.0),
                               max_new_tokens=20, generator=torch.Generator().manual_seed(1))
    assert len(out.tokens) == 20


def test_composite_merges_agreeing_branches():
    from draftsmith.protocol.drafting import Draft, DraftSampler
    from draftsmith.models.composite import merge

    a = Draft([5, 6, 7])                                        # a lookup chain
    b = Draft([5, 9], parents=[-1, 0], conf=[0.9, 0.6])         # a model's chain sharing the first token
    out = merge([a, b], DraftSampler(Sampling()), merge_equal=True)
    assert sorted(zip(out.tokens, out.parents)) == sorted([(5, -1), (6, 0), (9, 0), (7, out.tokens.index(6))])
    assert out.conf[out.tokens.index(5)] == 0.9


def test_shipped_static_trees_parse():
    from pathlib import Path

    import draftsmith

    folder = Path(draftsmith.__file__).parent / "recipes" / "trees"
    shapes = {f.stem: TreeShape.parse(f"static:{f}") for f in folder.glob("*.json")}
    assert shapes["cpu-7"].nodes == 7 and shapes["gpu-25"].nodes == 25


@pytest.mark.parametrize("spec", ["none", "dynamic:3,2,5", "static"])
def test_grow_rows_builds_each_rows_draft_in_one_call_per_round(spec, tmp_path):
    """protocol/drafting.py: grow_rows answers every row still drafting with ONE expand_rows call per round, and
    row r's draft is grow_draft's from the same logits (rows of different depths k; a row with k = 0 drafts nothing)."""
    from draftsmith.protocol.drafting import DraftSampler, grow_draft, grow_rows
    if spec == "static":
        (tmp_path / "tree.json").write_text(json.dumps([[0], [1], [0, 0], [0, 1], [0, 0, 0]]))
        spec = f"static:{tmp_path / 'tree.json'}"
    tree = TreeShape.parse(spec)
    vocab = 12

    def logits_after(row: int, nodes, tokens, parents) -> torch.Tensor:
        """Deterministic logits that depend on the row and each node's path, as a drafter's would."""
        out = []
        for n in nodes:
            path, node = [], n
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            g = torch.Generator().manual_seed(1000 * row + hash(tuple(path)) % 997)
            out.append(torch.randn(vocab, generator=g))
        return torch.stack(out)

    laws = []

    class Counting(DraftSampler):        # counts the draft-law computations (softmax over the vocabulary)
        def law(self, logits):
            laws.append(logits.shape[0] if logits.dim() > 1 else 1)
            return super().law(logits)

    ks, roots = [3, 1, 0, 2], [torch.randn(vocab, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    samplers = [Counting(Sampling()) for _ in ks]
    calls = []

    def expand_rows(requests):
        calls.append(sorted(requests))
        return {r: logits_after(r, *req) for r, req in requests.items()}

    drafts = grow_rows(expand_rows, roots, ks, samplers, tree)
    if tree is not None:     # a tree ranks every row's nodes of a round with ONE law (and one topk): not per node
        assert len(laws) == len(calls) + 1 and laws[0] == 3
    laws.clear()
    alone = [grow_draft(lambda *req, r=r: logits_after(r, *req), roots[r], ks[r], samplers[r], tree) for r in range(4)]
    assert [(d.tokens, d.parents, d.conf) for d in drafts] == [(d.tokens, d.parents, d.conf) for d in alone]
    assert drafts[2].tokens == [] and all(d.tokens for i, d in enumerate(drafts) if i != 2)
    assert len(calls) == max(ks) - 1 and calls[0] == [0, 3]      # rounds, not rows: depth 3 needs two expansions


def test_rank_ranks_each_block_as_alone_and_samplers_of_different_laws_apart():
    """protocol/drafting.py rank: one law and topk over several blocks gives each block the ranks it gets alone;
    blocks whose samplers draw from different laws (greedy, a temperature) are ranked apart, each by its own."""
    from draftsmith.protocol.drafting import DraftSampler, rank

    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(n, 50, generator=g) for n in (1, 3, 2)]
    blocks[1][0, :4] = 7.0                                       # ties among the top tokens
    greedy, warm = DraftSampler(Sampling()), DraftSampler(Sampling(temperature=0.7, top_k=5))
    for samplers in ([greedy] * 3, [greedy, warm, greedy]):
        together = rank(samplers, blocks, 4)
        alone = [rank([s], [b], 4)[0] for s, b in zip(samplers, blocks)]
        assert [(r.ids, r.probs) for r in together] == [(r.ids, r.probs) for r in alone]
        for s, b, r in zip(samplers, blocks, together):
            probs, ids = s.law(b).topk(4)
            assert r.ids == ids.tolist() and r.probs == probs.tolist() and r.logits is b
    class Other(DraftSampler):                                   # a sampler class of its own law
        def law(self, logits):
            return super().law(-logits)

    mixed = rank([greedy, Other(Sampling()), greedy], blocks, 4)
    assert mixed[1].ids == Other(Sampling()).law(blocks[1]).topk(4).indices.tolist() != rank([greedy], blocks[1:2], 4)[0].ids
    hot = rank([warm], blocks[:1], 8)[0]
    assert len(hot.top(0)) == 5 and len(hot.ids[0]) == 8         # top_k=5: tokens of probability 0 left out
    assert rank([greedy], blocks[:1], 0)[0].ids == [[]]          # a chain ranks nothing
