"""mfscale beside LIBMF, cornac and Spark ALS on the CPU: the same prepared dataset, split, epochs and factors.

    python -m pip install torch==2.13.0 && python -m pip install -e '.[bench]'   # libmf 0.9.2, cornac 3.0.1
    python benchmarks/peers.py --data data/ml-10m --out-jsonl peers.jsonl --out-md peers.md   # + peers.png
    python -m pip install -e '.[spark]' && apt-get install openjdk-17-jre-headless           # pyspark 4.3.0
    python benchmarks/peers.py --data data/ml-10m --trainers mfscale,libmf,cornac,spark

Trainers, each on the train split of ``--data`` (a directory written by ``python -m mfscale.prepare``) and
scored on its test split, predictions clipped to the rating scale:

- mfscale: the real job, ``python -m mfscale.train --data DIR --run-dir TMP --train.ranking_k 0`` with all
  defaults (plus ``--epochs``/``--dim``/``--seed`` at their values here), as a subprocess of this checkout.
  ratings/s and test RMSE come from its metrics.json (training steps only; early stopping on the val split
  may end it before ``--epochs``; the test RMSE is that of the best val epoch's weights).
- mfscale_sgd (on request, ``--trainers mfscale,mfscale_sgd,libmf,cornac``): the same job with
  ``--optim.optimizer sgd --optim.lr 0.03`` (one SGD update per rating, the peers' algorithm) before ``--extra``.
- LIBMF (``libmf`` binding): FPSGD + AdaGrad, no biases, LIBMF's own defaults (``mf_get_default_param`` of
  the C++ library bundled in the binding: L1 0, eta 0.1, 26 bins, squared loss, no NMF, copy_data) except k,
  iterations, threads, quiet, and L2 regularization 0.05 on P and Q instead of 0.1 (``--libmf-lambda``,
  ``--libmf-l1``, ``--libmf-eta``, ``--libmf-bins``). Two things to know:

  * the binding's Python defaults are not LIBMF's: ``libmf.mf.MF()`` passes L1 0.04 and L2 0 on P and Q
    (``get_default_options``), overriding the library's L1 0 / L2 0.1. Its L1 proximal step is two extra scalar
    passes per update (the wheel is built without LIBMF's SSE/AVX path), so with the binding's defaults LIBMF
    was 2.5-3.5x slower and far less accurate (ml-10m preset, d=64, 20 epochs, 2 threads: test RMSE 0.8245
    against 0.8021 with LIBMF's defaults). This script therefore passes all four lambdas explicitly.
  * L2 0.05 (the lambda of the FPSGD paper for MovieLens) rather than LIBMF's default 0.1: it is the setting
    that reproduces the issue-12 report's LIBMF row ("FPSGD + AdaGrad, 2 threads, no biases", test RMSE
    0.7584 on the ml-10m preset; 0.7581-0.7583 here, LIBMF's scheduling is not deterministic), and it is the
    better one on that data (L2 0.1: 0.8021; 0.02: 0.7803; eta 0.05: 0.7675; ratings centered on the
    training mean, which LIBMF does not do itself: 0.7635 at 0.05). The number of bins (20, LIBMF's README
    default, or 26) changes neither the RMSE nor, within this machine's noise, the speed at 2 threads.

  LIBMF's scheduler has a known hang (cjlin1/libmf#12: fit() never returns, its threads idle). Seen here only
  on a 9,600-rating set with 2 threads (about 1 run in 6; the tests use 1 thread), never on ml-10m. Each peer
  therefore runs in a spawned child process, stopped with a one-line error after ``--peer-timeout`` seconds.

  Predicted from ``p_factors()``/``q_factors()``: the binding's ``predict()`` reads its (n, 2) input
  column-major while ``fit()`` reads rows. Rows without training ratings are NaN in LIBMF; they are predicted
  as LIBMF's own ``mf_predict`` does, by the training mean ``b``.
- cornac ``MF``: Hogwild SGD in Cython, lr 0.01, lambda_reg 0.02, biases (its usual settings). ``seed=None``
  with numpy seeded instead, because cornac runs one thread whenever a seed is given.
- Spark ALS (``--trainers ...,spark``; the ``spark`` extra, pyspark 4.3.0, and Java 17+ from the system's
  packages): what a cluster user would run instead. ``pyspark.ml.recommendation.ALS`` on explicit ratings,
  rank ``--dim``, maxIter ``--epochs`` (an "epoch" is one ALS iteration: every user row solved exactly given
  the movie factors, then every movie row), no biases, Spark's defaults otherwise (10 x 10 blocks,
  nonnegative off), in a ``local[--threads]`` SparkSession with ``spark.driver.memory`` ``--spark-driver-memory``
  (8g; driver and executor are one JVM in local mode). regParam (``--spark-reg``) 0.05: MLlib scales it by
  each row's rating count (ALS-WR), so it is not the lambda of the SGD peers; chosen on the val split of the
  ml-10m preset, never the test split (d=64, 20 iterations, 2 threads; val RMSE at 0.03: 0.7839, 0.05: 0.7664,
  0.065: 0.7686, 0.1: 0.7968). coldStartStrategy "nan", and those rows (a user or movie without training ratings) are
  predicted as the training mean, as for LIBMF. The fit time is ``als.fit`` alone (eager: it materializes
  the final factors before it returns); the JVM's start (5-10 s, also in ``jvm_start_s``) and the conversion
  of the arrays into a cached DataFrame (Arrow, no pandas) come before it and are in wall s. Spark's output
  stays off stdout (the JVM's stdout goes to stderr, log4j at ERROR); two lines remain on stderr: the JVM's
  note on its incubator Vector module and netlib's, that it found no system BLAS/LAPACK (libblas.so.3) and
  uses its Java ones (the table's model column names the BLAS and LAPACK in use).

ratings/s is (training ratings x epochs) / wall time of the fit call for the peers, and mfscale's
``train_ratings_per_s`` (wall time of its training steps) for mfscale; our data conversion and prediction are
outside it for everyone (LIBMF's fit call still includes its own setup: the binding's copy of the (n, 3)
array into LIBMF's nodes, then LIBMF's copy, shuffle and grid of them, a few percent of the fit). The ratio
column divides by the faster of the peers in the same round: compare only ratios measured side by side,
absolute numbers change with the machine. ``--repeat N`` runs N rounds of all trainers, the order rotated
each round, and prints the medians; on a shared machine one round's ratio can swing by a third. mfscale's
first turn runs before this process reads the train/test arrays; in later rounds this process holds them
(12 bytes a rating) while mfscale trains.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport, as mfscale.config does
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("mfscale", "mfscale_sgd", "libmf", "cornac", "spark")
OURS = ("mfscale", "mfscale_sgd")
SGD_FLAGS = "--optim.optimizer sgd --optim.lr 0.03"  # mfscale_sgd: the job with these before --extra
DEFAULT_TRAINERS = ("mfscale", "libmf", "cornac")  # spark on request: its own extra, Java, minutes of JVM work
NAMES = {"mfscale": "mfscale", "mfscale_sgd": "mfscale sgd", "libmf": "LIBMF", "cornac": "cornac",
         "spark": "Spark ALS"}  # in titles and the plot
PEERS = ("libmf", "cornac", "spark")
BENCH_PIP = "python -m pip install -e '.[bench]'  (libmf==0.9.2 cornac==3.0.1)"
SPARK_PIP = "python -m pip install -e '.[spark]'  (pyspark==4.3.0)"
JAVA_APT = "apt-get install -y openjdk-17-jre-headless"


def java_problem() -> str | None:
    """None when the java that pyspark would start ($JAVA_HOME/bin/java, else java on PATH) is 17 or later
    (pyspark 4's minimum), else why not."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        return f"no {java} (JAVA_HOME={home})" if home else "no java on PATH"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{java} -version failed ({exc})"
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return f"cannot read the version of {java}"
    major = int(m.group(2) or 0) if m.group(1) == "1" else int(m.group(1))  # "1.8.0_x" is Java 8
    return None if major >= 17 else f"{java} is Java {major}, pyspark 4 needs 17 or later"


def check_extra(trainers: list[str]) -> None:
    """Fail in one line, before any training, when an extra a trainer needs is missing (libmf, cornac: the
    bench extra; spark: the spark extra and a Java runtime from the system's packages)."""
    missing, problems = [], []
    for name in trainers:
        if name not in ("libmf", "cornac"):
            continue
        try:
            # libmf's import prints where it found its shared library: keep stdout for the table
            with contextlib.redirect_stdout(io.StringIO()):
                __import__("libmf.mf" if name == "libmf" else "cornac.models")
        except (ImportError, OSError) as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        problems.append(f"the bench extra is not installed, missing {', '.join(missing)}; run: {BENCH_PIP}")
    if "spark" in trainers:
        try:
            import pyspark.ml.recommendation  # noqa: F401
        except ImportError as exc:
            problems.append(f"the spark extra is not installed, missing pyspark ({exc}); run: {SPARK_PIP}")
        else:
            if reason := java_problem():
                problems.append(f"spark needs Java 17 or later: {reason}; run: {JAVA_APT}")
    if problems:
        raise SystemExit("peers.py: " + "; and ".join(problems))


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_name() -> str:
    # platform.processor() is empty on most Linux machines; the CPU model matters here (see DESIGN.md)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def clipped_rmse(pred: np.ndarray, rating: np.ndarray, lo: float, hi: float) -> float:
    err = np.clip(pred.astype(np.float64), lo, hi) - rating.astype(np.float64)
    return float(np.sqrt(np.mean(err * err))) if len(err) else float("nan")


def run_mfscale(a: argparse.Namespace, tmp: str, rnd: int, name: str = "mfscale") -> dict[str, Any]:
    run_dir = str(Path(tmp) / f"{name}-run-{rnd}")  # a fresh run each round: an existing one would resume
    extra = f"{SGD_FLAGS} {a.extra}" if name == "mfscale_sgd" else a.extra
    cmd = [sys.executable, "-m", "mfscale.train", "--data", str(a.data), "--run-dir", run_dir,
           "--train.ranking_k", "0", "--epochs", str(a.epochs), "--dim", str(a.dim), "--seed", str(a.seed),
           *shlex.split(extra)]
    # This checkout's mfscale, whatever is pip-installed (the commit in the table must be the one measured)
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"peers.py: mfscale failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    rate = m["train_ratings_per_s"]
    opt = tomllib.loads((Path(run_dir) / "config.toml").read_text())["optim"]["optimizer"]
    how = f"flags {extra.strip()}" if extra.strip() else "the job's defaults"
    return {"trainer": name, "version": f"mfscale {git_commit()}, torch {version('torch')}",
            "model": f"BiasedMF, {opt} ({how}), batch {m['batch_size']}, best val epoch {m['best_epoch']}",
            "biases": True, "epochs": m["epochs"], "train_ratings_per_s": rate,
            "train_s": m["epochs"] * a.n_train / rate if rate else None, "wall_s": wall,
            "test_rmse": m["test_rmse"], "command": f"OMP_NUM_THREADS={a.threads} " + shlex.join(["python", *cmd[1:]]),
            "synthetic_best_rmse": m.get("synthetic_best_rmse")}


def run_libmf(a: argparse.Namespace, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):
        from libmf import mf
    t_wall = time.perf_counter()
    # (n, 3) float32 rows (user, item, rating): what fit() reads; ids stay exact in float32 below 2**24
    x = np.stack([train["user"], train["item"], train["rating"]], axis=1).astype(np.float32)
    # Every lambda explicitly: the binding's own defaults are L1 0.04 / L2 0, not LIBMF's (module docstring).
    # LIBMF wants more bins than 2 x threads; its default 26 covers up to 12 threads
    bins = a.libmf_bins if a.libmf_bins else max(26, 2 * a.threads + 1)
    opts = {"k": a.dim, "nr_iters": a.epochs, "nr_threads": a.threads, "nr_bins": bins,
            "lambda_p1": a.libmf_l1, "lambda_q1": a.libmf_l1, "lambda_p2": a.libmf_lambda,
            "lambda_q2": a.libmf_lambda, "eta": a.libmf_eta, "quiet": True}
    model = mf.MF(**opts)
    t0 = time.perf_counter()
    model.fit(x)
    fit_s = time.perf_counter() - t0
    p, q, b = model.p_factors(), model.q_factors(), float(model.model.b)
    u, i = test["user"].astype(np.int64), test["item"].astype(np.int64)
    known = (u < p.shape[0]) & (i < q.shape[0])
    pred = np.full(len(u), b, dtype=np.float64)
    pred[known] = np.einsum("nk,nk->n", p[u[known]], q[i[known]], dtype=np.float64)
    pred[~np.isfinite(pred)] = b  # NaN rows: a user or movie without training ratings, as mf_predict does
    lo, hi = a.scale
    call = "libmf.mf.MF(" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ").fit(X)"
    return {"trainer": "libmf", "version": f"libmf {version('libmf')}",
            "model": f"FPSGD + AdaGrad, no biases (p.q only), L2 {a.libmf_lambda:g}, L1 {a.libmf_l1:g}, "
                     f"eta {a.libmf_eta:g}, {bins} bins", "biases": False, "epochs": a.epochs,
            "train_ratings_per_s": a.n_train * a.epochs / fit_s, "train_s": fit_s,
            "wall_s": time.perf_counter() - t_wall, "test_rmse": clipped_rmse(pred, test["rating"], lo, hi),
            "command": call}


def run_cornac(a: argparse.Namespace, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, Any]:
    from cornac.data import Dataset as CornacDataset
    from cornac.models import MF

    t_wall = time.perf_counter()
    # Built from the encoded arrays directly: Dataset.build() loops over 9M tuples in Python. Identity id maps
    # over all encoded ids; users/movies only in val/test keep their initial factors and zero bias.
    n_users, n_items = a.n_users, a.n_items
    uir = (train["user"].astype(np.int64), train["item"].astype(np.int64), train["rating"].astype(np.float32))
    train_set = CornacDataset(n_users, n_items, dict(zip(range(n_users), range(n_users), strict=True)),
                              dict(zip(range(n_items), range(n_items), strict=True)), uir)
    np.random.seed(a.seed)  # cornac draws its initial factors from numpy's global RandomState when seed=None
    opts = {"k": a.dim, "max_iter": a.epochs, "learning_rate": 0.01, "lambda_reg": 0.02, "use_bias": True,
            "num_threads": a.threads, "seed": None, "verbose": False}
    model = MF(**opts)
    t0 = time.perf_counter()
    model.fit(train_set)
    fit_s = time.perf_counter() - t0
    u, i = test["user"].astype(np.int64), test["item"].astype(np.int64)
    # cornac's score(): global mean + biases + dot product, vectorized
    pred = (float(model.global_mean) + model.u_biases[u].astype(np.float64) + model.i_biases[i]
            + np.einsum("nk,nk->n", model.u_factors[u], model.i_factors[i], dtype=np.float64))
    lo, hi = a.scale
    call = (f"np.random.seed({a.seed}); cornac.models.MF(" + ", ".join(f"{k}={v}" for k, v in opts.items())
            + ").fit(train_set)")
    return {"trainer": "cornac", "version": f"cornac {version('cornac')}",
            "model": f"Hogwild SGD, biases, {model.num_threads} thread(s)", "biases": True, "epochs": a.epochs,
            "train_ratings_per_s": a.n_train * a.epochs / fit_s, "train_s": fit_s,
            "wall_s": time.perf_counter() - t_wall, "test_rmse": clipped_rmse(pred, test["rating"], lo, hi),
            "command": call}


LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = stderr
logger.repl.name = org.apache.spark.api.python.PythonGatewayServer
logger.repl.level = error
appender.console.type = Console
appender.console.name = stderr
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = spark: %p %c{1}: %m%n
"""


def run_spark(a: argparse.Namespace, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, Any]:
    """Spark MLlib's ALS (explicit ratings) in a local[threads] SparkSession started here, in the peer's child
    process. train s is ``als.fit`` alone; the JVM's start and the conversion of the arrays into a cached
    DataFrame come before it, and are in wall s (the JVM's start also in jvm_start_s)."""
    # The JVM inherits this process's stdout: send fd 1 to stderr, so nothing of Spark's lands in the table
    sys.stdout.flush()
    os.dup2(2, 1)
    import warnings

    import pyarrow as pa
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    # pyspark 4.3 warns about pandas >= 3 when it converts; no pandas is involved here (Arrow both ways)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    t_wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mfscale-spark-") as tmp:
        # errors only, to stderr: no INFO/WARN lines (the repl logger: pyspark's JVM counts as a shell, which
        # otherwise sets WARN and says so)
        (Path(tmp) / "log4j2.properties").write_text(LOG4J2)
        conf = {"spark.master": f"local[{a.threads}]", "spark.app.name": "mfscale-peers",
                "spark.driver.memory": a.spark_driver_memory,  # read by spark-submit before the JVM starts
                "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{tmp}/log4j2.properties",
                "spark.local.dir": tmp, "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                "spark.log.level": "ERROR"}
        builder = SparkSession.builder
        for k, v in conf.items():
            builder = builder.config(k, v)
        t0 = time.perf_counter()
        spark = builder.getOrCreate()
        jvm_s = time.perf_counter() - t0
        try:
            jvm = spark.sparkContext._jvm
            java = f"Java {jvm.System.getProperty('java.version')} ({jvm.System.getProperty('java.vendor')})"
            blas = jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getSimpleName()
            lapack = jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName()
            # Bounds the lineage of long runs: ALS checkpoints its factors every checkpointInterval (10) iterations
            spark.sparkContext.setCheckpointDir(str(Path(tmp) / "checkpoints"))

            def frame(d: dict[str, np.ndarray]) -> Any:
                return spark.createDataFrame(pa.table({"user": d["user"].astype(np.int32),
                                                       "item": d["item"].astype(np.int32),
                                                       "rating": d["rating"].astype(np.float32)}))

            train_df = frame(train).cache()
            train_df.count()  # converted and cached before the fit, not in it
            mean = float(np.mean(train["rating"], dtype=np.float64))
            opts = {"rank": a.dim, "maxIter": a.epochs, "regParam": a.spark_reg, "implicitPrefs": False,
                    "nonnegative": False, "coldStartStrategy": "nan", "seed": a.seed, "userCol": "user",
                    "itemCol": "item", "ratingCol": "rating"}
            als = ALS(**opts)
            t0 = time.perf_counter()
            model = als.fit(train_df)  # eager: ALS.train materializes the final factors before it returns
            fit_s = time.perf_counter() - t0
            scored = model.transform(frame(test)).select("rating", "prediction").toArrow()
            pred = scored.column("prediction").to_numpy().astype(np.float64)
            pred[~np.isfinite(pred)] = mean  # coldStartStrategy "nan": a user or movie without training ratings
            rating = scored.column("rating").to_numpy()
            blocks = f"{als.getNumUserBlocks()}x{als.getNumItemBlocks()}"
        finally:
            spark.stop()
    lo, hi = a.scale
    call = "pyspark.ml.recommendation.ALS(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ").fit(train_df)"
    return {"trainer": "spark", "version": f"pyspark {version('pyspark')}, {java}",
            "model": f"ALS (MLlib), explicit ratings, no biases, regParam {a.spark_reg:g} (ALS-WR: times each "
                     f"row's rating count), local[{a.threads}], {blocks} blocks, BLAS {blas}, LAPACK {lapack}",
            "biases": False, "epochs": a.epochs, "train_ratings_per_s": a.n_train * a.epochs / fit_s,
            "train_s": fit_s, "wall_s": time.perf_counter() - t_wall, "jvm_start_s": jvm_s,
            "test_rmse": clipped_rmse(pred, rating, lo, hi), "command": call}


def _peer_child(conn: Any, fit: Any, a: argparse.Namespace, train: dict[str, np.ndarray],
                test: dict[str, np.ndarray]) -> None:
    try:
        conn.send(("ok", fit(a, train, test)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_peer(name: str, fit: Any, a: argparse.Namespace, train: dict[str, np.ndarray],
             test: dict[str, np.ndarray]) -> dict[str, Any]:
    """``fit(a, train, test)`` in a child process (it times its own fit call), so a peer that never returns
    (LIBMF's scheduler, cjlin1/libmf#12) ends this script with one line after ``--peer-timeout`` seconds instead
    of hanging it. A spawned child, not a forked one: this process has run polars and torch thread pools, which
    a fork would copy in an unknown state; the arrays travel pickled (12 bytes a rating, a fraction of a fit)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peer_child, args=(child, fit, a, train, test), daemon=True)
    proc.start()
    child.close()
    deadline = time.monotonic() + a.peer_timeout if a.peer_timeout > 0 else float("inf")
    try:
        # Polled in steps with a look at the child: one that dies before it has unpickled its end of the pipe
        # (a crash while it starts, e.g. a calling script without a __main__ guard) leaves no EOF to read
        while not parent.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
            if not proc.is_alive() and not parent.poll():
                raise EOFError
            if time.monotonic() < deadline:
                continue
            hint = ("(LIBMF's scheduler can hang, cjlin1/libmf#12); rerun it, or use --threads 1" if name == "libmf"
                    else "(raise --peer-timeout; 0: no limit)")
            raise SystemExit(f"peers.py: {name} did not finish in {a.peer_timeout:g} s and was stopped {hint}")
        status, value = parent.recv()
    except EOFError:
        proc.join(5)
        raise SystemExit(f"peers.py: {name} died (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if status != "ok":
        raise SystemExit(f"peers.py: {name} failed: {value}")
    return value


def plot(rows: list[dict[str, Any]], trainers: list[str], path: Path, title: str,
         synthetic_best: float | None) -> None:
    """Two panels, one bar per trainer: train ratings/s and test RMSE, medians over the rounds with min-max
    whiskers when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, rates, rmses = [], [], []
    for name in trainers:
        mine = [r for r in rows if r["trainer"] == name]
        labels.append(f"{NAMES[name]}\n{mine[0]['version'].split(',')[0]}")  # "LIBMF\nlibmf 0.9.2"
        rates.append(np.array([r["train_ratings_per_s"] for r in mine]) / 1e6)
        rmses.append(np.array([r["test_rmse"] for r in mine if r["test_rmse"] is not None] or [np.nan]))
    x = np.arange(len(trainers))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = [colours[TRAINERS.index(t) % len(colours)] for t in trainers]  # a trainer keeps its colour
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 2.6 * len(trainers)), 4.6))
    for ax, values, fmt in ((ax1, rates, "{:.2f}M"), (ax2, rmses, "{:.4f}")):
        med = np.array([np.median(v) for v in values])
        err = np.array([[m - np.min(v) for m, v in zip(med, values, strict=True)],
                        [np.max(v) - m for m, v in zip(med, values, strict=True)]])
        ax.bar(x, med, 0.6, color=colour, yerr=err if err.any() else None, capsize=4)
        for xi, m, v in zip(x, med, values, strict=True):  # above the whisker, not under it
            ax.annotate(fmt.format(m), (xi, np.max(v)), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
    ax1.set_ylabel("train ratings/s, millions\n(ratings x epochs or iterations / fit s)")
    ax1.margins(y=0.15)
    ax2.set_ylabel("test RMSE (clipped; lower is better)\naxis not from 0")
    finite = [v for v in np.concatenate(rmses) if np.isfinite(v)] + ([synthetic_best] if synthetic_best else [])
    if finite:  # RMSEs differ in the second decimal: a zero-based axis would hide that
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 0.01)
        ax2.set_ylim(lo - 0.6 * pad, hi + 0.35 * pad)
    if synthetic_best:
        ax2.axhline(synthetic_best, color="grey", linestyle="--", linewidth=1,
                    label=f"Bayes-optimal RMSE of this synthetic data, {synthetic_best:.4f}")
        ax2.legend(loc="upper left", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset written by python -m mfscale.prepare")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--dim", type=int, default=64, help="latent factors for every trainer")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every trainer (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="mfscale's --seed and numpy's seed for cornac")
    p.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS),
                   help=f"comma list of {', '.join(TRAINERS)} (default {','.join(DEFAULT_TRAINERS)})")
    p.add_argument("--extra", default="", help="more flags for mfscale.train, one string")
    p.add_argument("--libmf-lambda", type=float, default=0.05,
                   help="LIBMF's L2 regularization on P and Q (LIBMF's default 0.1; 0.05 reproduces issue 12)")
    p.add_argument("--libmf-l1", type=float, default=0.0,
                   help="LIBMF's L1 regularization on P and Q (LIBMF's default 0; the binding's 0.04)")
    p.add_argument("--libmf-eta", type=float, default=0.1, help="LIBMF's initial AdaGrad learning rate")
    p.add_argument("--libmf-bins", type=int, default=0,
                   help="LIBMF's bins per side of the rating grid (default 0: max(26, 2 x threads + 1))")
    p.add_argument("--spark-reg", type=float, default=0.05,
                   help="Spark ALS's regParam (scaled by each row's rating count, ALS-WR); 0.05 chosen on the val "
                        "split of the ml-10m preset (module docstring)")
    p.add_argument("--spark-driver-memory", default="8g",
                   help="spark.driver.memory of the local[threads] session (driver and executor are one JVM)")
    p.add_argument("--peer-timeout", type=float, default=1800,
                   help="seconds a peer's fit and scoring may take before the script stops it with an error "
                        "(0 = no limit; LIBMF's scheduler can hang)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all trainers, in rotating order; with more than one, medians are printed too")
    p.add_argument("--out-jsonl", type=Path, help="append one JSON line per trainer and round")
    p.add_argument("--out-md", type=Path, help="also write the markdown tables printed to stdout to this file")
    p.add_argument("--out-png", type=Path,
                   help="write a PNG of train ratings/s and test RMSE per trainer (medians over the rounds); "
                        "default: beside --out-md (its name, .png), none without it; 'none': no PNG; needs "
                        "matplotlib")
    a = p.parse_args(argv)
    trainers = list(dict.fromkeys(t.strip() for t in a.trainers.split(",") if t.strip()))  # each once
    if not trainers or any(t not in TRAINERS for t in trainers):
        p.error(f"--trainers: choose from {', '.join(TRAINERS)}")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    check_extra(trainers)
    if a.out_png is None and a.out_md is not None:
        a.out_png = a.out_md.with_suffix(".png")
    elif a.out_png is not None and str(a.out_png).lower() == "none":
        a.out_png = None
    if a.out_png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(f"peers.py: the PNG ({a.out_png}) needs matplotlib: python -m pip install matplotlib "
                             f"(or the bench extra: {BENCH_PIP})") from None
    sys.path.insert(0, str(REPO))  # read the data with this checkout's mfscale, as the subprocess trains
    from mfscale.errors import DataError
    from mfscale.shards import Dataset

    try:
        ds = Dataset(a.data)
    except DataError as exc:
        raise SystemExit(f"peers.py: {exc}") from None
    a.n_users, a.n_items, a.scale, a.n_train = ds.n_users, ds.n_items, ds.rating_range, ds.split_rows("train")
    synthetic_best = (ds.manifest["source"].get("params") or {}).get("best_rmse")
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cores = os.cpu_count() or 1
    # run_id ties the lines of one invocation together in a shared JSONL file (date has minute resolution)
    common = {"date": date, "run_id": f"{datetime.datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}", "repeat": a.repeat,
              "data": str(a.data), "n_train": a.n_train, "dim": a.dim, "threads": a.threads, "machine": cpu_name(),
              "cores": cores, "git_commit": git_commit()}
    rows: list[dict[str, Any]] = []
    data: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    with tempfile.TemporaryDirectory(prefix="mfscale-peers-") as tmp:
        for rnd in range(a.repeat):
            # Rounds rotate the order, so no trainer always runs first (or last) on a machine whose speed drifts.
            # mfscale's first turn comes before this process reads the data (the job gets the memory to itself).
            order = trainers[rnd % len(trainers):] + trainers[:rnd % len(trainers)]
            rnd_rows = []
            for name in order:
                print(f"round {rnd + 1}/{a.repeat}: running {name} ({a.epochs} epochs, d={a.dim}, "
                      f"{a.threads} threads) ...", file=sys.stderr)
                if name in OURS:
                    rnd_rows.append(run_mfscale(a, tmp, rnd, name))
                    continue
                if data is None:
                    data = ds.read_split("train"), ds.read_split("test")
                fit = {"libmf": run_libmf, "cornac": run_cornac, "spark": run_spark}[name]
                rnd_rows.append(run_peer(name, fit, a, *data))
            # The ratio within one round: trainers that ran minutes apart on the same machine
            fastest = max((r["train_ratings_per_s"] for r in rnd_rows if r["trainer"] in PEERS), default=None)
            for r in rnd_rows:
                r["round"] = rnd + 1
                r["vs_fastest_peer"] = r["train_ratings_per_s"] / fastest if fastest else None
                r["test_rmse_over_best"] = (r["test_rmse"] / synthetic_best
                                            if synthetic_best and r["test_rmse"] else None)
            rnd_rows.sort(key=lambda r: trainers.index(r["trainer"]))
            rows.extend(rnd_rows)
            if a.out_jsonl:  # each round as it ends: a failure later keeps what was measured
                with open(a.out_jsonl, "a") as f:
                    for r in rnd_rows:
                        f.write(json.dumps({**common, **r}) + "\n")
    md: list[str] = []
    out = md.append
    others = [NAMES[t] for t in trainers if t not in OURS]
    who = (f"mfscale beside {', '.join(others)}" if set(OURS) & set(trainers) and others
           else ", ".join(NAMES[t] for t in trainers))
    title = (f"{who}: {a.data} ({a.n_train:,} training ratings, {ds.split_rows('test'):,} test), d={a.dim}, {a.epochs} "
             f"epochs, {a.threads} threads")
    out(f"### {title}\n")
    out("| round | trainer | model | train ratings/s | vs fastest peer | test RMSE | epochs | train s | wall s |")
    out("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_fastest_peer']:.2f}x" if r["vs_fastest_peer"] else "-"
        rmse = f"{r['test_rmse']:.4f}" if r["test_rmse"] is not None else "-"
        train_s = f"{r['train_s']:.1f}" if r["train_s"] is not None else "-"
        out(f"| {r['round']} | {r['version']} | {r['model']} | {r['train_ratings_per_s']:,.0f} | {ratio} | "
            f"{rmse} | {r['epochs']} | {train_s} | {r['wall_s']:.1f} |")
    if a.repeat > 1:
        out(f"\nMedians over {a.repeat} rounds (vs fastest peer: the median of the per-round ratios):\n")
        out("| trainer | train ratings/s (min-max) | vs fastest peer (min-max) | test RMSE |")
        out("|---|---|---|---|")
        for name in trainers:
            mine = [r for r in rows if r["trainer"] == name]
            rate = [r["train_ratings_per_s"] for r in mine]
            ratios = [r["vs_fastest_peer"] for r in mine if r["vs_fastest_peer"]]
            ratio = (f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
            rmse = [r["test_rmse"] for r in mine if r["test_rmse"] is not None]
            rmse_s = f"{np.median(rmse):.4f}" if rmse else "-"
            out(f"| {name} | {np.median(rate):,.0f} ({min(rate):,.0f}-{max(rate):,.0f}) | {ratio} | {rmse_s} |")
    out(f"\nMachine: {cpu_name()}, {cores} cores, Python {platform.python_version()}, numpy {np.__version__}; "
        f"{date}. Test RMSE of predictions clipped to {a.scale[0]:g}-{a.scale[1]:g}"
        + (f"; Bayes-optimal RMSE of this synthetic data {synthetic_best:.4f}" if synthetic_best else "") + ".")
    out("train s: the fit call (peers) or mfscale's training steps; wall s: conversion + fit + prediction "
        "(peers) or the whole job, start-up, validation each epoch and test included (mfscale). LIBMF has no "
        "biases. mfscale stops early when val RMSE stops improving and keeps the best epoch."
        + (" Spark ALS: an epoch is one ALS iteration (every user row solved, then every movie row); its JVM's "
           "start is in wall s, not in train s (median "
           f"{np.median([r['jvm_start_s'] for r in rows if r['trainer'] == 'spark']):.1f} s)."
           if "spark" in trainers else "") + "\n")
    out("Commands:\n")
    out(f"- `{shlex.join([sys.executable, *sys.argv])}`" if argv is None else f"- `peers.py {shlex.join(argv)}`")
    for r in rows:
        if r["round"] == 1:  # later rounds repeat these (mfscale with another run dir)
            out(f"- {r['trainer']}: `{r['command']}`")
    text = "\n".join(md) + "\n"
    sys.stdout.write(text)
    if a.out_md:
        a.out_md.write_text(text)
    if a.out_png:
        plot(rows, trainers, a.out_png, f"{title}\n{date}" + (f", medians of {a.repeat} rounds (bars: min-max)"
                                                              if a.repeat > 1 else ""), synthetic_best)
        print(f"\nPlot: {a.out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
