"""``python -m mfscale.tune``: a validation-driven hyper-parameter search with Optuna (the ``tune`` extra).

    python -m mfscale.tune --study runs/tune --trials 40 --data data/ml-latest-small

Every trial is a real training run (``Trainer``, one process) of the job the other flags describe (any
``mfscale.train`` flag or ``--config FILE``: the fixed part), with these sampled on top of it:

- ``optim.lr`` (log-uniform 0.001-0.03), ``optim.reg_factor`` (log 0.003-0.3), ``optim.reg_bias`` (log
  0.0001-0.1), ``model.dim`` (16, 32, 64, 128), ``train.epochs`` (5-40);
- the model options: ``model.biases`` (on, off), ``model.max_norm`` (off, 1, 2, 4), ``model.day_bias`` (on, off),
  ``optim.reg_day`` (1-100, log) and, with biases and not sgd, ``model.time_bins`` (0, 10, 30) and
  ``model.user_drift`` (off, on); without sgd, ``model.implicit`` (off, on) and ``optim.reg_implicit`` (0.3-300,
  log);
- with ``--optimizers row_rmsprop,sgd`` (any of ``config``'s optimizers), ``optim.optimizer`` among them too, each with
  its own learning-rate range (``lr``: log 0.001-0.03; ``lr_sgd``, for sgd's per-rating steps: log 0.005-0.06) and
  no max_norm for sgd (which has none). Without it the base job's optimizer, and its ``lr`` range, as before. Which of
  the two is better depends on the data (``benchmarks/RESULTS.md``, session 13): the search decides from the
  validation split.

Its objective is the run's best validation RMSE (early stopping as configured). Each epoch's validation RMSE
goes to a median pruner, which stops a trial that is worse than the median of earlier trials at the same
epoch. The test split is never read: trials run with ``final_test=False`` (``--train.ranking_k`` is moot).

The study lives in ``STUDY/study.db`` (SQLite): a search that was killed continues where it was when run
again with the same ``--study``, and ``--trials N`` is the total of finished trials it aims for. Each trial's run
directory is ``STUDY/trial-N`` (removed when the trial ends, unless ``--keep-runs``). At the end (and after
every trial) it writes ``STUDY/best.toml``, the best trial's whole config, which ``python -m mfscale.train
--config STUDY/best.toml --run-dir DIR`` trains, and ``STUDY/trials.png``, each trial's validation RMSE
against its number with the best so far.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from . import config, distributed
from .config import JobConfig
from .errors import ConfigError, cli_entry
from .shards import write_text_atomic
from .train import Trainer, setup_logging

PROG = "mfscale.tune"
log = logging.getLogger("mfscale")
STUDY_NAME = "mfscale"
TUNE_PIP = "python -m pip install -e '.[tune]'"
DIMS = (16, 32, 64, 128)
MAX_NORMS = (0.0, 1.0, 2.0, 4.0)
TIME_BINS = (0, 10, 30)


def sample(trial: Any, base: JobConfig, run_dir: Path, optimizers: tuple[str, ...] = ()) -> JobConfig:
    """The base job with this trial's sampled values (the search space in the module docstring); ``optimizers``:
    more than one, and the optimizer is sampled among them."""
    optimizer = (trial.suggest_categorical("optimizer", optimizers) if len(optimizers) > 1
                 else optimizers[0] if optimizers else base.optim.optimizer)
    sgd = optimizer == "sgd"
    biases = trial.suggest_categorical("biases", (True, False))
    timed = biases and not sgd  # the time-aware biases are bias terms, and sgd's op does not step them
    return config.replace(
        base, run_dir=str(run_dir), optim__optimizer=optimizer,
        optim__lr=(trial.suggest_float("lr_sgd", 5e-3, 6e-2, log=True) if sgd
                   else trial.suggest_float("lr", 1e-3, 3e-2, log=True)),
        optim__reg_factor=trial.suggest_float("reg_factor", 3e-3, 0.3, log=True),
        optim__reg_bias=trial.suggest_float("reg_bias", 1e-4, 0.1, log=True),
        model__dim=trial.suggest_categorical("dim", DIMS),
        train__epochs=trial.suggest_int("epochs", 5, 40),
        model__biases=biases,
        model__max_norm=0.0 if sgd else trial.suggest_categorical("max_norm", MAX_NORMS),
        model__day_bias=trial.suggest_categorical("day_bias", (True, False)),
        optim__reg_day=trial.suggest_float("reg_day", 1.0, 100.0, log=True),
        model__time_bins=trial.suggest_categorical("time_bins", TIME_BINS) if timed else 0,
        model__user_drift=trial.suggest_categorical("user_drift", (False, True)) if timed else False,
        model__implicit=trial.suggest_categorical("implicit", (False, True)) if not sgd else False,
        optim__reg_implicit=trial.suggest_float("reg_implicit", 0.3, 300.0, log=True),
        checkpoint__resume="never",  # a trial that died is retried from scratch by a new trial
    ).validate()


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"mfscale.tune needs Optuna, which is not installed: {TUNE_PIP}") from None
    return optuna


def best_config(study: Any, base: JobConfig, optimizers: tuple[str, ...] = ()) -> JobConfig | None:
    """The best finished trial's whole job config (``run_dir`` set to ``runs/tuned``), or None yet."""
    done = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    if not done:
        return None
    best = min(done, key=lambda t: t.value)

    class Fixed:  # replays a finished trial's values through sample()
        def __init__(self, params: dict):
            self.params = params

        def suggest_float(self, name, *a, **k):
            return self.params[name]

        suggest_int = suggest_categorical = suggest_float

    return sample(Fixed(best.params), base, Path("runs/tuned"), optimizers)


def plot(study: Any, out: Path) -> bool:
    """Validation RMSE per trial and the best so far, as a PNG (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t.number for t in done], [t.value for t in done], label="finished", color="tab:blue")
    ax.scatter([t.number for t in pruned], [min(t.intermediate_values.values()) for t in pruned], marker="x",
               label="pruned (best val so far)", color="tab:gray")
    best, xs, ys = math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = min(best, t.value)
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation RMSE")
    ax.set_title(f"mfscale.tune: {len(done)} finished, {len(pruned)} pruned")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Hyper-parameter search on the validation split (Optuna); "
                                "every other flag is an mfscale.train flag for the fixed part of the job.")
    p.add_argument("--study", required=True, type=Path, metavar="DIR",
                   help="study directory: study.db (resumable), best.toml, trials.png, trial runs")
    p.add_argument("--trials", type=int, default=30, help="finished trials to reach, in all runs of the study")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the sampler (TPE)")
    p.add_argument("--keep-runs", action="store_true", help="keep each trial's run directory")
    p.add_argument("--optimizers", default="", metavar="LIST",
                   help=f"comma list of tables' optimizers to choose among ({', '.join(config.OPTIMIZERS)}), e.g. "
                        "row_rmsprop,sgd; default: the job's own (--optim.optimizer)")
    return p


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    optimizers = tuple(dict.fromkeys(x.strip() for x in args.optimizers.split(",") if x.strip()))
    unknown = [x for x in optimizers if x not in config.OPTIMIZERS]
    if unknown:
        raise ConfigError(f"--optimizers: unknown {', '.join(unknown)} (choose from {', '.join(config.OPTIMIZERS)})")
    base = config.from_args([*rest, "--run-dir", str(args.study / "unused")] if "--run-dir" not in rest else rest)
    optuna = _import_optuna()
    env = distributed.init(base.train.device, base.train.timeout_s)
    if env.distributed:
        raise ConfigError("mfscale.tune runs its trials in one process: start it with python, not torchrun")
    if "sgd" in optimizers and env.device.type != "cpu":
        raise ConfigError("--optimizers sgd: sgd runs on a CPU (add --device cpu, or leave sgd out)")
    setup_logging(0)
    args.study.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(args.study / 'study.db').resolve()}"
    try:  # a resumed search seeds its sampler past the trials it has: the same seed would redraw the same ones
        known = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    except KeyError:
        known = 0
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.tune_seed + known),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))

    def objective(trial: Any) -> float:
        run_dir = args.study / f"trial-{trial.number}"
        cfg = sample(trial, base, run_dir, optimizers)

        def report(epoch: int, val_rmse: float | None) -> None:
            if val_rmse is None:
                return
            trial.report(val_rmse, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            metrics = Trainer(cfg, env, on_epoch_end=report, final_test=False).fit()
        finally:
            if not args.keep_runs:
                shutil.rmtree(run_dir, ignore_errors=True)
        if metrics.get("best_val_rmse") is None:
            raise ConfigError(f"{cfg.data.path} has no validation split: tune needs one (re-run prepare with "
                              "--val-frac > 0)")
        return float(metrics["best_val_rmse"])

    def after(study: Any, trial: Any) -> None:
        cfg = best_config(study, base, optimizers)
        if cfg is not None:
            write_text_atomic(args.study / "best.toml", config.to_toml(cfg))
        plot(study, args.study / "trials.png")
        log.info("trial %d %s: %s (best %s)", trial.number, trial.state.name.lower(),
                 f"{trial.value:.4f}" if trial.value is not None else "-",
                 f"{study.best_value:.4f}" if cfg is not None else "-")

    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    todo = args.trials - finished
    if todo > 0:
        study.optimize(objective, n_trials=todo, timeout=args.timeout, callbacks=[after],
                       catch=(), gc_after_trial=True)
    cfg = best_config(study, base, optimizers)
    if cfg is None:
        raise ConfigError(f"no trial of {args.study} finished")
    write_text_atomic(args.study / "best.toml", config.to_toml(cfg))
    plot(study, args.study / "trials.png")
    best = study.best_trial
    print(f"best of {len(study.trials)} trials: trial {best.number}, validation RMSE {best.value:.4f}: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
    print(f"wrote {args.study / 'best.toml'} (python -m mfscale.train --config {args.study / 'best.toml'} "
          f"--run-dir DIR) and {args.study / 'trials.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
