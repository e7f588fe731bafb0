"""draftsmith's acceptance metric as an `evaluate` module: τ (tokens per verify step, pooled and per
request), α by draft position, the acceptance rate and the accepted-length histogram of speculative
decoding, from per-step counts. The figures are acceptance_figures.py's (the eval report's own).

Load it by path, offline: `evaluate.load(str(draftsmith.metric_modules.METRICS_DIR / "acceptance"))`.
"""

import datasets
import evaluate

from .acceptance_figures import acceptance_figures
from .acceptance_figures import step_defaults

_CITATION = """\
@inproceedings{leviathan2023fast,
  title={Fast Inference from Transformers via Speculative Decoding},
  author={Leviathan, Yaniv and Kalman, Matan and Matias, Yossi},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
"""

_DESCRIPTION = """\
Acceptance of speculative decoding from per-step counts, exactly as draftsmith's eval report computes it.
A step is one target verify forward over a draft (a chain or a tree); the prefill is not a step.
tau = tokens emitted by verify steps / verify steps (the verifier's own token included, so a drafter that
is never right scores 1.0 and a perfect chain of k scores k + 1); alpha_i = #steps with >= i drafts accepted /
#steps whose draft reached depth >= i and that accepted >= i - 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    accepted (`list` of `list` of `int`): per request, per verify step: drafts the verifier accepted.
    proposed (`list` of `list` of `int`): per request, per step: draft nodes verified (a tree's nodes, not its depth).
    depth (`list` of `list` of `int`, optional): per request, per step: the longest drafted path. Default: `proposed`
        (right for chains).
    emitted (`list` of `list` of `int`, optional): per request, per step: tokens the step emitted. Default:
        accepted + 1 (pass it when EOS or a token limit cut the last step short).
    k (`int`, optional): draft positions to report alpha for, and the histogram's last bin. Default: the deepest
        draft seen.
Returns:
    tau (`float`): pooled, sum of emitted / number of steps over all requests.
    tau_per_request_mean (`float`): each request's tau, then their mean.
    tau_per_request (`list` of `float`): each request's tau (None for a request without steps).
    acceptance_rate (`float`): drafts accepted / draft nodes verified.
    acceptance_by_position (`list` of `float`): alpha_1..alpha_k (None where no step reached depth i).
    accepted_length_histogram (`list` of `int`): steps that accepted 0, 1, ..., k drafts.
    steps (`int`): verify steps.
    nodes_per_step (`float`): draft nodes verified per step.
Examples:
    >>> acceptance = evaluate.load(str(METRICS_DIR / "acceptance"))
    >>> r = acceptance.compute(accepted=[[2, 0, 3], [1]], proposed=[[3, 3, 3], [3]])
    >>> r["tau"], r["acceptance_by_position"]
    (2.5, [0.75, 0.6666666666666666, 0.5])
"""


def _filled(accepted, proposed, depth=None, emitted=None, **rest) -> dict:
    """The batch with every request's depth and emitted filled in (evaluate needs every feature)."""
    if accepted is None:
        return {"accepted": accepted, "proposed": proposed, "depth": depth, "emitted": emitted, **rest}
    depth = [None] * len(accepted) if depth is None else depth
    emitted = [None] * len(accepted) if emitted is None else emitted
    filled = [step_defaults(*request) for request in zip(accepted, proposed, depth, emitted)]
    return {"accepted": accepted, "proposed": proposed, "depth": [d for d, _ in filled],
            "emitted": [e for _, e in filled], **rest}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Acceptance(evaluate.Metric):
    def _info(self):
        counts = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accepted": counts, "proposed": counts, "depth": counts, "emitted": counts}),
            reference_urls=["https://arxiv.org/abs/2211.17192"],
        )

    # depth and emitted are optional to the user, while evaluate requires every feature in each call:
    # the three entry points fill them in the same way before evaluate stores the batch
    def compute(self, **kwargs):
        """The figures of the requests given here and added before (`depth`, `emitted` optional)."""
        return super().compute(**(_filled(**kwargs) if "accepted" in kwargs else kwargs))

    def add_batch(self, **kwargs):
        """Add requests (`accepted`, `proposed`, optionally `depth`, `emitted`: one list per request)."""
        return super().add_batch(**_filled(**kwargs))

    def add(self, *, accepted=None, proposed=None, depth=None, emitted=None, **rest):
        """Add one request (its per-step counts)."""
        batch = _filled([accepted], [proposed], None if depth is None else [depth],
                        None if emitted is None else [emitted])
        return super().add(**{key: value[0] for key, value in batch.items()}, **rest)

    def _compute(self, accepted, proposed, depth, emitted, k=None):
        return acceptance_figures(accepted, proposed, depth, emitted, k=k)
