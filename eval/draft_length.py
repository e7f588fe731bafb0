"""Cost-aware draft length (`--k auto`): how many draft nodes a step verifies.

A step that verifies n draft nodes costs c(n+1) (one target forward over the root and n nodes; the
curve is measured on the actual device, see `measure_cost_curve`) plus the drafting time, and
emits 1 + Σ_i P_i tokens in expectation, where P_i is the chance that node i and all its ancestors
are accepted. P_i is estimated as the product of a(conf) along the node's path: the drafter's own
probability of each token (`conf`), mapped to an acceptance probability by an online calibration
(a Beta-smoothed histogram of what the verifier accepted at that confidence; by depth for drafters
without a confidence, such as prompt lookup). A drafter with a confidence head (DSpark) predicts each
node's acceptance itself (`Draft.accept`): P_i is then the product of those predictions, uncalibrated
(in a tree it predicts each node's most likely child; the lower-ranked siblings are calibrated). The
rule maximises expected tokens per second:

- while drafting, a node is worth drafting and verifying iff its expected tokens per marginal cost
  (P / (c'(n) + per-node draft cost)) beat the rate the decoder currently achieves;
- after drafting, the verified draft is the best-first prefix that maximises
  (1 + Σ P_i) / (c(n+1) + drafting time);
- before drafting, the depth asked of the drafter is one past the deepest draft verified in the
  last 16 steps: a drafter that drafts every position in one forward (parallel, P-EAGLE) pays for
  all it is asked, and the stops above cannot reach inside that forward.

Adaptive draft lengths in the literature: SpecDec++ (Huang et al. 2404.19124) stops drafting on a
predicted rejection; EAGLE-2 (2406.16858) sizes trees by cumulative draft confidence; transformers'
`num_assistant_tokens_schedule="heuristic"` grows or shrinks k on full or partial acceptance.
"""

from __future__ import annotations

import bisect
import copy
import time
from dataclasses import dataclass, field

import torch

from draftsmith.protocol.tree import children, depths


@dataclass
class CostCurve:
    """Seconds of one target forward over n new tokens, measured at a few n, interpolated."""

    sizes: list[int]
    seconds: list[float]

    def __call__(self, n: int) -> float:
        i = bisect.bisect_left(self.sizes, n)
        if i < len(self.sizes) and self.sizes[i] == n:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i == len(self.sizes):   # beyond the last measurement: extend the last slope
            i -= 1
        (n0, s0), (n1, s1) = (self.sizes[i - 1], self.seconds[i - 1]), (self.sizes[i], self.seconds[i])
        return s0 + (s1 - s0) * (n - n0) / (n1 - n0)

    def as_dict(self) -> dict:
        return {"tokens": self.sizes, "ms": [round(s * 1e3, 3) for s in self.seconds]}


DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


@torch.inference_mode()
def measure_cost_curve(target, sizes=DEFAULT_SIZES, context: int = 128, reps: int = 5,
                       hidden_layers: tuple[int, ...] = (), rows: int = 1) -> CostCurve:
    """Time the target's forward over n new tokens after `context` cached ones: the median of `reps`
    rounds, each round timing every size once (interleaved, so a slow spell of a shared machine
    lands on every size alike instead of bending the curve). rows > 1: one batched forward over `rows`
    sequences of n new tokens each (batched decoding, eval/batched.py); the curve is then each row's
    share, the forward's seconds / rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (context + max(sizes),), generator=g).tolist()
    cache = target.new_cache()
    target.forward(ids[:context], cache, hidden_layers, last_only=True)
    if rows > 1:
        ragged = target.new_batch_cache()
        for r in range(rows):     # a ragged cache adopts its first row's cache object and copies the others in
            ragged.put(r, copy.deepcopy(cache) if r == 0 else cache)

        def forward(n: int) -> None:
            target.forward_rows([ids[context:context + n]] * rows, ragged, hidden_layers)
            ragged.keep([[] for _ in range(rows)])
    else:
        def forward(n: int) -> None:
            target.forward(ids[context:context + n], cache, hidden_layers)
            target.rollback(cache, context)
    forward(4)   # warm-up
    runs: list[list[float]] = [[] for _ in sizes]
    for _ in range(reps):
        for i, n in enumerate(sizes):
            start = time.perf_counter()
            forward(n)
            runs[i].append(time.perf_counter() - start)
    seconds = [sorted(r)[len(r) // 2] / rows for r in runs]
    # a forward over more tokens never costs less: keep the curve monotone against timing noise
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    return CostCurve(list(sizes), seconds)


@dataclass
class Calibration:
    """Acceptance probability of a draft node given the drafter's confidence (or its depth)."""

    bins: int = 10
    prior_weight: float = 2.0
    explore: float = 0.5
    counts: dict = field(default_factory=dict)   # key -> [accepted, reached]

    def key(self, conf: float | None, depth: int):
        if conf is None:
            return ("depth", min(depth, 16))
        return ("conf", min(int(conf * self.bins), self.bins - 1))

    def prior(self, key) -> float:
        if key[0] == "conf":
            return (key[1] + 0.5) / self.bins
        return 0.5

    def __call__(self, conf: float | None, depth: int) -> float:
        key = self.key(conf, depth)
        accepted, reached = self.counts.get(key, (0, 0))
        mean = (accepted + self.prior_weight * self.prior(key)) / (reached + self.prior_weight)
        # optimism while a bin is young: a node the rule leaves unverified teaches it nothing, so a
        # pessimistic start would never be corrected (an upper confidence bound, shrinking as 1/sqrt(n))
        return min(1.0, mean + self.explore / (reached + 1) ** 0.5)

    def record(self, conf: float | None, depth: int, accepted: bool) -> None:
        c = self.counts.setdefault(self.key(conf, depth), [0, 0])
        c[0] += int(accepted)
        c[1] += 1


class DraftLengthRule:
    """The decoder's draft-length policy for `--k auto` (see the module docstring)."""

    def __init__(self, curve: CostCurve, ema: float = 0.1, window: int = 16):
        self.curve = curve
        self.calibration = Calibration()
        self.ema = ema
        self.node_s = 0.0                    # drafting seconds per node, running mean
        self.rate = 1.0 / curve(1)           # tokens per second the decoder achieves, running mean
        self.chosen: list[int] = []          # nodes verified per step (the report's histogram)
        self.window = window
        self.verified_depth: list[int] = []  # depth of the verified draft, per step

    def depth(self, k: int) -> int:
        """The depth to ask of the drafter this step (at most k): one past the deepest draft verified
        in the last `window` steps, so the depth can grow by one a step when drafts start paying."""
        recent = self.verified_depth[-self.window:]
        return min(k, max(recent) + 1) if recent else k

    def value(self, parent_value: float, conf: float | None, depth: int, accept: float | None = None) -> float:
        """A node's chance to be accepted with its ancestors: the drafter's own prediction (`accept`, a
        confidence head) where it makes one, else the online calibration of its confidence."""
        return parent_value * (accept if accept is not None else self.calibration(conf, depth))

    def worth(self, value: float, nodes: int) -> bool:
        """Is one more node with path acceptance `value`, after `nodes` nodes, worth its cost?"""
        marginal = self.curve(nodes + 2) - self.curve(nodes + 1) + self.node_s
        return value >= self.rate * max(marginal, 1e-6)

    def path_values(self, conf: list | None, parents: list[int], accept: list | None = None) -> list[float]:
        values: list[float] = []
        depth: list[int] = []
        for i, parent in enumerate(parents):
            d = 1 if parent < 0 else depth[parent] + 1
            base = 1.0 if parent < 0 else values[parent]
            depth.append(d)
            values.append(self.value(base, None if conf is None else conf[i], d,
                                     None if accept is None else accept[i]))
        return values

    def choose(self, conf: list | None, parents: list[int], draft_s: float, accept: list | None = None) -> int:
        """How many of the draft's nodes (a best-first prefix) to verify."""
        values = self.path_values(conf, parents, accept)
        best_n, best_rate, expected = 0, 1.0 / (self.curve(1) + draft_s), 1.0
        for n, v in enumerate(values, start=1):
            expected += v
            rate = expected / (self.curve(n + 1) + draft_s)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def update(self, conf: list | None, parents: list[int], path: list[int], drafted: int,
               draft_s: float, step_s: float, emitted: int) -> None:
        """Learn from one verified step: which reached nodes were accepted, and what things cost."""
        on_path = set(path)
        kids = children(parents)
        depth = 0
        for row in [0] + [c + 1 for c in path]:
            depth += 1
            for c in kids[row]:
                self.calibration.record(None if conf is None else conf[c], depth, c in on_path)
        self.chosen.append(len(parents))
        self.verified_depth.append(max(depths(parents), default=0))
        if drafted:
            self.node_s += self.ema * (draft_s / drafted - self.node_s)
        self.rate += self.ema * (emitted / step_s - self.rate)

    def histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for n in self.chosen:
            hist[n] = hist.get(n, 0) + 1
        return dict(sorted(hist.items()))


class DraftGate:
    """Batched decoding with `--k auto` (eval/batched.py): does a step draft at all?

    At a batch, drafting costs a step a drafter forward per round and an observe over every row whatever the
    rule then verifies, and a verify of several tokens a row can cost the CPU nearly its width (it is
    compute-bound at 16 rows), so drafting can lose to plain decoding however the draft is cut. The gate
    measures both over whole steps (observe, draft, verify, keep): the tokens each row emits per second of step,
    as running means of tokens per row and of seconds (their ratio: a step's tokens vary far more than its
    seconds; per row, so a draining batch's smaller steps compare with full ones). The first step drafts, the
    second does not. From then on a step drafts unless drafting measurably loses: unless its rate, plus `z`
    standard errors of its running mean (from the spread of the steps' rates), is below plain decoding's; then
    every `probe`-th step drafts, to measure it again. Where the two are close, steps draft (what a user asked
    for); where drafting loses clearly, they do not (measured effect, flat on the 2-core CPU:
    bench/results/cpu-batched-gate). A step that does not draft skips the proposers altogether: they observe its
    positions at the next step that drafts (a DecodeState spans any number of steps); that step's observe, which
    catches up on every step since the last, counts to it as one step's share, as if the proposers had observed
    each step.
    vLLM's `speculative_disable_by_batch_size` turns drafting off above a fixed batch size; the gate measures."""

    def __init__(self, ema: float = 0.1, probe: int = 8, z: float = 2.0, least: int = 4):
        self.means: dict[bool, list[float]] = {}     # drafted? -> [tokens per row, seconds, rate, rate squared]
        self.counts = {True: 0, False: 0}
        self.ema = ema
        self.probe = probe
        self.z = z
        self.least = least                            # drafted steps measured before the gate may stop drafting
        self.since_draft = 0                          # steps since the last that drafted

    def rate(self, drafted: bool) -> float | None:
        """Tokens per row per second of the steps that drafted (True) or did not (False); None before one ran."""
        means = self.means.get(drafted)
        return None if means is None else means[0] / means[1]

    def error(self, drafted: bool) -> float:
        """The standard error of that running mean: the steps' spread over the samples it holds (an EMA holds
        about (2 - ema) / ema)."""
        means = self.means[drafted]
        spread = max(means[3] - means[2] ** 2, 0.0) ** 0.5
        return spread / min(self.counts[drafted], (2 - self.ema) / self.ema) ** 0.5

    def drafts(self) -> bool:
        if True not in self.means:
            return True
        if False not in self.means:
            return False
        if self.counts[True] < self.least:
            return True
        loses = self.rate(True) + self.z * self.error(True) < self.rate(False)
        return not loses or self.since_draft + 1 >= self.probe

    def record(self, drafted: bool, tokens: int, rows: int, seconds: float, observe_s: float = 0.0) -> None:
        """One step: did it draft, the tokens it emitted over its `rows` rows, its seconds, and of them the
        seconds of its observe (which covered the steps since the last that drafted)."""
        if drafted:
            seconds -= observe_s * (1 - 1 / (self.since_draft + 1))
            self.since_draft = 0
        else:
            self.since_draft += 1
        per_row, seconds = tokens / max(rows, 1), max(seconds, 1e-9)
        sample = [per_row, seconds, per_row / seconds, (per_row / seconds) ** 2]
        means = self.means.setdefault(drafted, list(sample))
        for i in range(4):
            means[i] += self.ema * (sample[i] - means[i])
        self.counts[drafted] += 1
