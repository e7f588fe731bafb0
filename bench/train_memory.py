"""Peak resident memory of a training process by phase: after building everything, after each training
forward, and around the held-out evaluation. A few steps of any recipe on this machine.

    python bench/train_memory.py smollm2-135m/eagle3-ttt-quick data.source=DIR train.max_steps=3

Prints `[mem] <phase> peak <GiB>` lines (Linux ru_maxrss of this process) and the run's summary line.
The run goes to a temporary folder that is removed afterwards.
"""

import sys
import tempfile

from draftsmith.train import trainer as trainer_module
from draftsmith.train.run import train
from draftsmith.train.trainer import peak_rss_gib


def _report(phase: str) -> None:
    print(f"[mem] {phase} peak {peak_rss_gib():.2f} GiB", flush=True)


def main(recipe: str, overrides: list[str]) -> None:
    evaluate, fit, forward = trainer_module.Trainer.evaluate, trainer_module.Trainer.fit, trainer_module.forward_batch

    def timed_evaluate(self):
        _report("before held-out evaluation")
        out = evaluate(self)
        _report("after held-out evaluation")
        return out

    def timed_fit(self):
        _report("target, data and drafter built")
        return fit(self)

    def timed_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        _report("after a training forward")
        return out

    trainer_module.Trainer.evaluate, trainer_module.Trainer.fit = timed_evaluate, timed_fit
    trainer_module.forward_batch = timed_forward
    with tempfile.TemporaryDirectory() as out:
        train(recipe, [*overrides, f"run.out_dir={out}", "run.name=memory", "log.tensorboard=false"])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
