"""draftsmith's speedup metric as an `evaluate` module: speculative over plain decoding's tokens per
second, from paired timings of the same prompts. The figures are speedup_figures.py's (the eval
report's own).

Load it by path, offline: `evaluate.load(str(draftsmith.metric_modules.METRICS_DIR / "speedup"))`.
"""

import datasets
import evaluate

from .speedup_figures import speedup_figures

_CITATION = """\
@inproceedings{leviathan2023fast,
  title={Fast Inference from Transformers via Speculative Decoding},
  author={Leviathan, Yaniv and Kalman, Matan and Matias, Yossi},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
"""

_DESCRIPTION = """\
Speedup of speculative decoding (SD) over plain autoregressive decoding (AR) of the same prompts, exactly as
draftsmith's eval report computes it: pooled tokens per second of each (total new tokens / total wall seconds),
and speedup = SD tokens/s / AR tokens/s. Under greedy decoding both emit the same tokens, so speedup is
total AR seconds / total SD seconds.
"""

_KWARGS_DESCRIPTION = """
Args:
    ar_tokens (`list` of `int`): per prompt: new tokens plain decoding emitted.
    ar_s (`list` of `float`): per prompt: its wall seconds (prefill included).
    sd_tokens (`list` of `int`): per prompt: new tokens speculative decoding emitted.
    sd_s (`list` of `float`): per prompt: its wall seconds.
Returns:
    speedup (`float`): sd_tokens_per_s / ar_tokens_per_s (None when no AR time was measured).
    ar_tokens_per_s (`float`): sum of ar_tokens / sum of ar_s.
    sd_tokens_per_s (`float`): sum of sd_tokens / sum of sd_s.
Examples:
    >>> speedup = evaluate.load(str(METRICS_DIR / "speedup"))
    >>> speedup.compute(ar_tokens=[100, 50], ar_s=[2.0, 1.0], sd_tokens=[100, 50], sd_s=[1.0, 0.5])
    {'speedup': 2.0, 'ar_tokens_per_s': 50.0, 'sd_tokens_per_s': 100.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Speedup(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"ar_tokens": datasets.Value("int64"), "ar_s": datasets.Value("float64"),
                                        "sd_tokens": datasets.Value("int64"), "sd_s": datasets.Value("float64")}),
            reference_urls=["https://arxiv.org/abs/2211.17192"],
        )

    def _compute(self, ar_tokens, ar_s, sd_tokens, sd_s):
        return speedup_figures(ar_tokens, ar_s, sd_tokens, sd_s)
