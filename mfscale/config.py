"""One config tree per job: defaults < optional TOML file < command-line flags.

Every field is a flag ``--section.field VALUE`` (e.g. ``--optim.lr 0.01``); the common ones also have
short aliases (``--data``, ``--run-dir``, ``--epochs``, ``--dim``, ``--lr``, ``--batch-size``, ...).
The resolved config is written to the run directory, into every checkpoint and into TensorBoard.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory (python -m mfscale.prepare --out ...)
    workers: int = 0  # DataLoader worker processes per rank; 0 reads in the training process (fastest on CPU)
    resident: str = "auto"  # on | off | auto: hold the training split on the device when it is small enough
    # on | off | auto: check the shards against the manifest at start-up (mfscale.shards.Dataset.verify): sizes
    # and row counts always, sha256 with on, or with auto where a rank reads whole files anyway
    verify: str = "auto"


@dataclass
class ModelConfig:
    dim: int = 64  # latent factors per user and movie
    init_std: float = 0.01  # factor init; biases start at 0 so unseen rows predict the mean
    dropout: float = 0.0  # dropout on factor vectors during training
    # on: rating ~ mean + b_u + b_i + <p_u, q_i>; off: plain MF, <p_u, q_i> alone (no global mean, ratings not
    # centred), as a notebook's two nn.Embedding tables. Off keeps the tables' shape (bias columns held at 0).
    biases: bool = True
    # > 0: nn.Embedding(max_norm=X)'s bound: the factor vectors p_u, q_i a batch touches are renormalized in place
    # to norm <= X before they are used (predictions too); 0 = off
    max_norm: float = 0.0
    # on: + b_{u,day}, one bias per user and day with training ratings (mfscale/daybias.py; timeSVD's per-day user
    # bias): real ml-latest-small 0.01 lower test RMSE (benchmarks/RESULTS.md, session 11). A bias term: plain MF
    # (biases off) has none.
    day_bias: bool = True
    # timeSVD's other two time effects (Koren, KDD 2009; mfscale/timebias.py), both off by default: on real
    # ml-latest-small together 0.0011 better beside the user-day biases (about one seed spread), on the synthetic
    # presets 0.0008-0.0009 worse, 0.73x the ratings/s (benchmarks/RESULTS.md, session 14).
    # > 0: + b_{i,bin(t)}, an item bias per time bin, the training split's days cut into this many equal bins
    time_bins: int = 0
    # on: + alpha_u dev_u(t), each user's drift: dev = sign(t - t_u) |t - t_u|^0.4, t in days, t_u the mean day of
    # the user's training ratings
    user_drift: bool = False
    # on: SVD++'s implicit feedback (Koren, KDD 2008; mfscale/implicit.py): the user's vector is regularized toward
    # |N(u)|^-1/2 sum_{j in N(u)} y_j, the movies they rated in training, instead of toward 0 (the same objective as
    # SVD++'s p_u + |N(u)|^-1/2 sum y_j). Off by default: on real ml-latest-small it cost 0.001-0.01 in every setting
    # tried (benchmarks/RESULTS.md, session 15).
    implicit: bool = False


OPTIMIZERS = ("lazy_adam", "row_rmsprop", "sparse_adam", "sgd")  # --optim.optimizer's choices
FUSED_OPTIMIZERS = ("lazy_adam", "row_rmsprop", "sgd")  # the tables' optimizers the fused steps implement
MAX_TIME_BINS = 1000  # --model.time_bins: Koren used 30 over Netflix's ~6 years
SGD_LR = 0.03  # --optim.optimizer sgd: best by validation RMSE of 0.02-0.05 on ml-10m, ml-1m, ml-latest-small (RESULTS)


@dataclass
class OptimConfig:
    # row_rmsprop (mfscale.optim.RowRMSprop: Adam without a first moment and one second moment per row: 1/3 of
    # Adam's memory; the CPU job 1.2-1.5x faster at the same test RMSE on ml-latest-small, ml-1m, ml-10m and ml-32m,
    # benchmarks/RESULTS.md, session 10) | lazy_adam (mfscale.optim.LazyAdam: SparseAdam's update, the default
    # before) | sparse_adam (torch.optim.SparseAdam, the reference) | sgd (one plain SGD update per rating, as
    # cornac and LIBMF do, in a C++ op on the CPU, one process or blocks tables: 2-3x the default's ratings/s and
    # better RMSE on the synthetic presets, 0.009 worse on real ml-latest-small; wants --optim.lr 0.03; RESULTS.md,
    # session 13)
    optimizer: str = "row_rmsprop"
    # Defaults chosen on ml-10m and ml-1m synthetic and real ml-latest-small, several seeds each
    # (benchmarks/RESULTS.md, issue 12); every one of the three is better with them than with the previous
    # (lr 0.003, reg 0.04, beta2 0.999) and previous-but-one (lr 0.005, reg 0.05) defaults.
    lr: float = 0.003  # learning rate of the embedding tables
    # Adam's moment decays for the tables (LazyAdam or SparseAdam; RowRMSprop uses beta2 alone). beta2 0.98, not
    # torch's 0.999: the bias correction counts the table's steps, but a row's moments move only when a batch
    # touches it, so a row touched n << 1/(1 - beta2) times has v ~ n (1 - beta2) g^2, which the correction does not
    # scale back up. With 0.999 a row touched 10-100 times takes steps of 3-6x lr (a steady gradient); with 0.98 at
    # most 1.5x. Most rows of a long-tailed catalogue are touched that rarely. 0.95-0.98 tied; 0.995 and 0.999 were
    # worse on ml-10m and ml-latest-small. With 0.999 the real data wanted reg 0.04 where the synthetic sets wanted
    # 0.03; with 0.98, 0.03 is best on two of the three and 0.0006 from best on the third.
    beta1: float = 0.9
    beta2: float = 0.98
    dense_lr: float = 0.01  # learning rate of dense parameters (the global bias), Adam
    reg_factor: float = 0.03  # L2 on the factor rows a batch touches, per rating
    reg_bias: float = 0.005  # L2 on the bias rows a batch touches, per rating
    # --model.day_bias: each user-day bias's L2, reg_day b^2 once per epoch (not per rating): a bias of n training
    # ratings is their mean error damped by n / (n + reg_day), so a day of few ratings keeps its bias small
    reg_day: float = 30.0
    # --model.time_bins: each bin bias's L2, reg_time b^2 once per epoch, spread over the bin's training ratings (as
    # reg_day); --model.user_drift: alpha_u's, reg_drift alpha^2 once per epoch over the user's ratings. Chosen among
    # 10/30/100 and 100/1000/10000 on real ml-latest-small and the ml-1m preset, seed 0 (RESULTS.md, session 14)
    reg_time: float = 100.0
    reg_drift: float = 1000.0
    # --model.implicit: each implicit row y_j's L2, per training rating of its movie (reg_implicit m_j |y_j|^2)
    reg_implicit: float = 30.0
    gravity: float = 0.0  # penalty on predictions over all user-movie pairs (via d x d Gram matrices)
    schedule: str = "cosine"  # none | cosine | linear: decay of both learning rates over the run
    min_lr_frac: float = 0.1  # the schedule ends at this fraction of the initial learning rates


@dataclass
class TrainConfig:
    epochs: int = 20
    # ratings per rank per step; 0 = auto: ~auto_steps steps per epoch, global batch 1Ki..256Ki, each table's lr
    # scaled so its rows move per epoch as at 200 steps (mfscale.layout.auto_lr_scales)
    batch_size: int = 0
    # the auto batch's steps per epoch; 0 = 200, or 100 from 20M training ratings (where the 2x batch measured free
    # in test RMSE and ran the step 1.12x faster on the CPU; benchmarks/RESULTS.md, session 17)
    auto_steps: int = 0
    # Evaluation batch: its (batch, dim+1) temporaries stay under 32 MiB, so on CPU they reuse mapped memory
    # (262,144 made validation 3x slower: every batch's temporaries were page-faulted in afresh).
    eval_batch_size: int = 65_536
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, CUDA only)
    step: str = "auto"  # fused (closed-form gradients, the tables' optimizer) | autograd | auto: fused where it applies
    compile: str = "auto"  # on | off | auto: torch.compile the fused step's kernels on >= 1M training ratings
    # on | off | auto: on a CPU, run the fused step as one C++ op (mfscale/cpu_step.py; built on first use)
    # where a rank's row gradients are local (one process, blocks tables); auto falls back to torch ops
    cpu_kernel: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    patience: int = 3  # early stopping: epochs without val improvement (0 = off)
    log_every: int = 50  # steps between TensorBoard scalar points
    ranking_k: int = 10  # Recall/NDCG/MAP@K on test ratings >= 4 at the end (0 = skip)
    timeout_s: float = 600.0  # collective timeout: a rank stuck this long fails the job instead of hanging
    # replicated | blocks | auto: how the tables are spread over ranks (mfscale/layout/); auto = blocks on
    # more than one rank, replicated on one
    tables: str = "auto"
    # k > 1: batches drawn from k x k strata (user block x movie block) in turn, so a batch's rows stay in the
    # CPU caches (replicated layout, resident split): ~2x faster steps, worse RMSE (benchmarks/RESULTS.md,
    # issue 22); 1 = one global shuffle (default); 0 = k sized to the cache (layout.rows.auto_strata)
    strata: int = 1
    # Blocks tables: each movie block rotates in this many pieces, each sent as soon as its ratings of the
    # sub-epoch are trained, so the transfer overlaps the training of the other pieces; 1 = the whole block at
    # each sub-epoch's end. 1 by default: a movie row trains in 1 of P phases, so it gets 1/P of the Adam steps
    # per epoch (ml-10m, 3 epochs: test RMSE 0.8335 at P = 2 against 0.8174), and on one host the transfer it
    # hides costs ~1% (benchmarks/RESULTS.md, session 9); 2-4 pays over slow links (1.3-1.7x at 100 Mbit/s).
    block_pieces: int = 1


@dataclass
class CheckpointConfig:
    keep_last: int = 3
    every_steps: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    resume: str = "auto"  # auto: continue from the newest valid checkpoint in the run dir | never


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uses_day_bias(self) -> bool:
        """Whether the model has user-day biases: ``model.day_bias``, a bias term, so never in plain MF."""
        return self.model.day_bias and self.model.biases

    def uses_time_bias(self) -> bool:
        """Whether the model has time-aware biases (``model.time_bins`` > 0 or ``model.user_drift``)."""
        return self.model.time_bins > 0 or self.model.user_drift

    def fused_blockers(self) -> list[str]:
        """Settings the fused (closed-form) training step does not implement; autograd handles them."""
        out = []
        if self.optim.optimizer not in FUSED_OPTIMIZERS:
            out.append(f"optim.optimizer {self.optim.optimizer}")
        if self.model.dropout > 0:
            out.append("model.dropout > 0")
        if self.optim.gravity > 0:
            out.append("optim.gravity > 0")
        if self.train.precision != "fp32":
            out.append(f"train.precision {self.train.precision}")
        return out

    def validate(self) -> JobConfig:
        checks = [
            (self.data.path != "", "--data is required (a directory written by python -m mfscale.prepare)"),
            (self.data.workers >= 0, "data.workers must be >= 0"),
            (self.data.resident in ("auto", "on", "off"), "data.resident must be auto, on or off"),
            (self.data.verify in ("auto", "on", "off"), "data.verify must be auto, on or off"),
            (self.model.dim >= 1, "model.dim must be >= 1"),
            (self.model.init_std >= 0, "model.init_std must be >= 0"),
            (0 <= self.model.dropout < 1, "model.dropout must be in [0, 1)"),
            (self.model.max_norm >= 0 and math.isfinite(self.model.max_norm),
             "model.max_norm must be a finite number >= 0 (0 = off)"),
            (0 <= self.model.time_bins <= MAX_TIME_BINS, f"model.time_bins must be in [0, {MAX_TIME_BINS}] (0 = off)"),
            (not self.uses_time_bias() or self.model.biases,
             "--model.time_bins and --model.user_drift are bias terms: they need --model.biases on"),
            (self.optim.optimizer in OPTIMIZERS,
             "optim.optimizer must be lazy_adam, row_rmsprop, sparse_adam or sgd"),
            (self.optim.lr > 0 and self.optim.dense_lr >= 0, "optim.lr must be > 0 and optim.dense_lr >= 0"),
            (0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
            (min(self.optim.reg_factor, self.optim.reg_bias, self.optim.reg_day, self.optim.reg_time,
                 self.optim.reg_drift, self.optim.reg_implicit, self.optim.gravity) >= 0,
             "optim.reg_factor, optim.reg_bias, optim.reg_day, optim.reg_time, optim.reg_drift, optim.reg_implicit "
             "and optim.gravity must be >= 0"),
            (self.optim.schedule in ("none", "cosine", "linear"), "optim.schedule must be none, cosine or linear"),
            (0 <= self.optim.min_lr_frac <= 1, "optim.min_lr_frac must be in [0, 1]"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.batch_size >= 0, "train.batch_size must be >= 0 (0 = auto)"),
            (self.train.auto_steps >= 0, "train.auto_steps must be >= 0 (0 = by the data size)"),
            (self.train.strata >= 0, "train.strata must be >= 0 (1 = one global shuffle, 0 = sized to the cache)"),
            (self.train.block_pieces >= 1, "train.block_pieces must be >= 1"),
            (self.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
            (self.train.precision in ("fp32", "bf16", "fp16"), "train.precision must be fp32, bf16 or fp16"),
            (self.train.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
            (self.train.patience >= 0 and self.train.log_every >= 1, "train.patience >= 0, train.log_every >= 1"),
            (self.train.ranking_k >= 0, "train.ranking_k must be >= 0"),
            (self.train.step in ("auto", "fused", "autograd"), "train.step must be auto, fused or autograd"),
            (self.train.compile in ("auto", "on", "off"), "train.compile must be auto, on or off"),
            (self.train.cpu_kernel in ("auto", "on", "off"), "train.cpu_kernel must be auto, on or off"),
            (self.train.timeout_s > 0, "train.timeout_s must be > 0"),
            (self.train.tables in ("auto", "replicated", "blocks"), "train.tables must be auto, replicated or blocks"),
            (self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
            (self.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
            (self.checkpoint.resume in ("auto", "never"), "checkpoint.resume must be auto or never"),
        ]
        if self.optim.optimizer == "sgd":
            blockers = self.fused_blockers() + [name for name, on in (
                ("model.max_norm > 0", self.model.max_norm > 0), ("train.step autograd", self.train.step == "autograd"),
                ("train.cpu_kernel off", self.train.cpu_kernel == "off"),
                ("model.time_bins or model.user_drift", self.uses_time_bias()),
                ("model.implicit", self.model.implicit)) if on]
            if blockers:
                checks.append((False, "--optim.optimizer sgd (per-rating updates in the C++ op) cannot be used with "
                               + ", ".join(blockers)))
        if self.train.step == "fused" and self.fused_blockers():
            checks.append((False, "--train.step fused cannot be used with " + ", ".join(self.fused_blockers())
                           + "; use --train.step auto or autograd"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


SECTIONS = {f.name: f.type for f in fields(JobConfig) if f.name != "run_dir"}
ALIASES = {
    "--data": "data.path", "--workers": "data.workers", "--run-dir": "run_dir", "--dim": "model.dim",
    "--lr": "optim.lr", "--epochs": "train.epochs", "--batch-size": "train.batch_size", "--seed": "train.seed",
    "--precision": "train.precision", "--device": "train.device",
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _convert(key: str, kind: type, raw: Any) -> Any:
    try:
        if kind is bool:
            return raw if isinstance(raw, bool) else _parse_bool(str(raw))
        if kind is int and isinstance(raw, float):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None


def _set(cfg: JobConfig, key: str, raw: Any) -> None:
    if key == "run_dir":
        cfg.run_dir = str(raw)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {key!r}")
    obj = getattr(cfg, section)
    types = {f.name: f.type for f in fields(obj)}
    if name not in types:
        raise ConfigError(f"unknown config key {key!r} (known in [{section}]: {', '.join(types)})")
    kind = {"int": int, "float": float, "str": str, "bool": bool}[types[name]]
    setattr(obj, name, _convert(key, kind, raw))


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def apply_mapping(cfg: JobConfig, data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v)
        else:
            _set(cfg, key, value)


def build_parser(prog: str = "python -m mfscale.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train biased matrix factorization on prepared shards.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="TOML file with [data], [model], [optim], [train], [checkpoint]")
    default = JobConfig()
    alias_of = {v: k for k, v in ALIASES.items()}
    p.add_argument(*(["--run_dir"] + ([alias_of["run_dir"]])), dest="run_dir", metavar="DIR",
                   help=f"run directory: config, checkpoints, TensorBoard, metrics (default {default.run_dir})")
    for section in SECTIONS:
        group = p.add_argument_group(f"[{section}]")
        for f in fields(getattr(default, section)):
            key = f"{section}.{f.name}"
            names = [f"--{key}"] + ([alias_of[key]] if key in alias_of else [])
            group.add_argument(*names, dest=key, metavar=f.type.upper() if isinstance(f.type, str) else "X",
                               help=f"default {getattr(getattr(default, section), f.name)!r}")
    return p


def from_args(argv: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML file, then flags; validated."""
    args = vars(build_parser().parse_args(argv))
    cfg = JobConfig()
    config_file = args.pop("config", None)
    if config_file is not None:
        apply_mapping(cfg, load_toml(config_file))
    for key, value in args.items():
        _set(cfg, key, value)
    return cfg.validate()


def from_dict(data: dict[str, Any]) -> JobConfig:
    cfg = JobConfig()
    apply_mapping(cfg, data)
    return cfg


def to_toml(cfg: JobConfig) -> str:
    d = cfg.to_dict()
    lines = [f"run_dir = {_toml_value(d.pop('run_dir'))}"]
    for section, values in d.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def replace(cfg: JobConfig, **changes: Any) -> JobConfig:
    """A copy with ``section__field=value`` changes (for tests and benchmarks)."""
    new = from_dict(cfg.to_dict())
    for key, value in changes.items():
        _set(new, key.replace("__", "."), value)
    return new
