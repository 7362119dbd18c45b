"""TensorBoard logging: scalars, the resolved config, hparams and the movie-embedding projector.

Only rank 0 writes; every other rank builds ``Monitor(..., enabled=False)``, whose methods are cheap
no-ops that touch nothing on disk (TensorBoard is not even imported for it).

A run keeps one stable log directory. On resume it is reopened with ``purge_step`` set to the step the
checkpoint was taken at: TensorBoard then discards the events a killed attempt wrote at or after that
step, so curves do not fold back on themselves.

A full disk or quota while writing (events, the projector's files) ends the job with one line, like a full disk
anywhere else in the run directory: see ``Monitor`` and ``_quiet_writer_thread_disk_full``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import disk_full, is_disk_full

HPARAM_TYPES = (bool, int, float, str)
# Final metrics: callers name them ``hparam/<name>`` (add_hparams' documented convention); they are
# written as ``~final/<name>`` so that they sort after the training curves (see Monitor.hparams).
LEGACY_METRIC_PREFIX = "hparam/"
FINAL_METRIC_PREFIX = "~final/"


def final_metric_tag(name: str) -> str:
    """The scalar tag a final metric is written under: ``hparam/test_rmse`` -> ``~final/test_rmse``."""
    return FINAL_METRIC_PREFIX + str(name).removeprefix(LEGACY_METRIC_PREFIX)


def _set_metric_display_names(experiment_summary: Any, names: Mapping[str, str]) -> None:
    """Give the experiment's metrics readable names in the HPARAMS tab (the tag without ``~final/``)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    value = experiment_summary.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.metric_infos:
        info.display_name = names.get(info.name.tag, info.name.tag)
    value.metadata.plugin_data.content = data.SerializeToString()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _hparam_value(v: Any) -> bool | int | float | str:
    if isinstance(v, HPARAM_TYPES):
        return v
    if v is None:
        return "none"
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def config_to_toml(config: Mapping[str, Any]) -> str:
    """A TOML rendering of a (nested) config dict; ``None`` values appear as comments (TOML has no null)."""
    lines: list[str] = []

    def table(d: Mapping[str, Any], name: str) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, Mapping)]
        subtables = [(k, v) for k, v in d.items() if isinstance(v, Mapping)]
        if name and (scalars or not subtables):
            if lines:
                lines.append("")
            lines.append(f"[{name}]")
        for k, v in scalars:
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
        for k, v in subtables:
            table(v, f"{name}.{k}" if name else str(k))

    table(config, "")
    return "\n".join(lines)


def _clean_label(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        v = "|".join(str(x) for x in v)
    return " ".join(str(v).replace("\t", " ").splitlines()).strip()


def _wait_for_later_event_file_name(log_dir: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and the purge marker of a reopened run
    only drops events read before it. Names are ``events.out.tfevents.<unix seconds>.<host>.<pid>.<n>``:
    a file made in the same second as an existing one could sort before it (pid 999 vs 1000), so wait
    for the next second when that could happen (only ever within a second of the previous writer)."""
    newest = -1
    for p in log_dir.glob("events.out.tfevents.*"):
        parts = p.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            newest = max(newest, int(parts[3]))
    while int(time.time()) <= newest:
        time.sleep(min(0.05, max(0.0, newest + 1 - time.time())) or 0.01)


def _quiet_writer_thread_disk_full() -> None:
    """Keep the default threading.excepthook from printing the traceback of TensorBoard's writer thread when it
    dies of a full disk (only then): Monitor reports that error as one line at its next call, where it surfaces."""
    previous = threading.excepthook
    if getattr(previous, "mfscale_quiet_disk_full", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and args.exc_value is not None \
                and is_disk_full(args.exc_value):
            return
        previous(args)

    hook.mfscale_quiet_disk_full = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Monitor:
    """TensorBoard writer for rank 0; a no-op object when ``enabled`` is False.

    A full disk or quota: SummaryWriter writes events from a background thread, one record at a time as soon as it
    is queued. On a full disk that thread dies (its traceback, printed by Python's threading.excepthook, is
    dropped: see ``_quiet_writer_thread_disk_full``) and the error surfaces at the writer's next call (the next
    scalars, flush or close). Whichever call it surfaces in, and a projector file written by the calling thread, raise
    one DataError instead: ``no space left in RUN/tb: writing TensorBoard events does not fit in the N bytes that
    are free; ...`` (exit code 2 from the job), and the writer is dropped. The job stops rather than going on
    without its curves: the checkpoints go to the same disk, so the next one would fail anyway (losing the work in
    between), and a run that ends normally has all of its outputs. The events written before stay readable (the
    file ends in a partial record, which TensorBoard skips); a projector's partial files are removed and its
    ``projector_config.pbtxt`` is put back as it was.
    """

    def __init__(self, log_dir: Path, *, enabled: bool, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.enabled = bool(enabled)
        self._writer = None
        self._last_step = int(purge_step or 0)  # the step Monitor.hparams writes at: the last one logged
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_thread_disk_full()
        with self._writing():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            _wait_for_later_event_file_name(self.log_dir)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    @contextlib.contextmanager
    def _writing(self, what: str = "writing TensorBoard events", undo: Any = None):
        """Turn a full disk inside the block into one DataError, after dropping the writer and calling ``undo``."""
        try:
            yield
        except Exception as exc:
            if not is_disk_full(exc, self.log_dir if self.log_dir.is_dir() else None):
                raise
            writer, self._writer = self._writer, None
            if writer is not None:
                with contextlib.suppress(Exception):  # its flush fails the same way: nothing more to write
                    writer.close()
            if undo is not None:
                with contextlib.suppress(Exception):
                    undo()
            where = self.log_dir if self.log_dir.is_dir() else self.log_dir.parent
            raise disk_full(where, None, what, exc=exc) from None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writing():
            for tag, value in values.items():
                if value is None:
                    continue
                self._writer.add_scalar(tag, float(value), global_step=int(step))
        self._last_step = max(self._last_step, int(step))

    def text_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config as a TOML code block under tag ``config``."""
        if self._writer is None:
            return
        with self._writing():
            self._writer.add_text("config", "```toml\n" + config_to_toml(config) + "\n```", global_step=0)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's config and final metrics for TensorBoard's HPARAMS tab.

        Nested hparams are flattened with ``.``; values other than int/float/str/bool become strings.
        ``metrics`` keys are names such as ``hparam/test_rmse`` (the ``hparam/`` prefix is optional); each
        value is written as a scalar ``~final/test_rmse`` and shown as ``test_rmse`` in the HPARAMS tab.

        Where the values go, and why. The hparams plugin reads a metric's value from an ordinary scalar
        series of the session's run (or of a run below it), so the values must exist as scalars, and
        every scalar under the log directory is a card in the Time Series view, whichever run it is in:
        a sub-directory run (what ``SummaryWriter.add_hparams`` makes by default) would not remove the
        cards, and with ``--logdir RUN/tb`` its metrics would not even belong to the ``.`` session.
        What decides where the cards appear is their tag: the view groups cards by the part before the
        first ``/`` and orders them by name, so ``hparam/*`` came before ``lr/``, ``train/`` and ``val/``.
        ``~`` sorts after every letter and digit, so ``~final/*`` is always the last group, below the
        curves; the plugin's display name drops the prefix again. Everything is written by this run's
        own writer into its own event file, at the last step logged: one run per training run in the run
        list and the HPARAMS table, and a resume that purges from an earlier step drops the metric values
        a killed attempt wrote with the rest of its events. (The hparams values shown stay those of the
        run's first record: TensorBoard keeps the first metadata of a tag, as with add_hparams before.)
        """
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {k: _hparam_value(v) for k, v in flatten(hparams).items()}
        names = {final_metric_tag(k): str(k).removeprefix(LEGACY_METRIC_PREFIX)
                 for k, v in metrics.items() if v is not None}
        values = {final_metric_tag(k): float(v) for k, v in metrics.items() if v is not None}
        exp, ssi, sei = hparams_summary(hp, values)
        _set_metric_display_names(exp, names)
        step = self._last_step
        with self._writing():
            file_writer = self._writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary, step)
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)

    def embeddings(
        self, vectors: torch.Tensor, labels: list[dict[str, object]], *, tag: str = "movies", step: int = 0
    ) -> None:
        """Write ``vectors`` (one row per item) for the projector, with ``labels`` as per-row metadata.

        The metadata header is the union of the label keys in first-seen order; missing keys and None
        become "", lists are joined with "|", and tabs/newlines are replaced so each row stays one TSV line.
        """
        if self._writer is None:
            return
        mat = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
        if mat.ndim != 2:
            raise ValueError(f"embedding matrix must be 2-D, got shape {tuple(mat.shape)}")
        if len(labels) != mat.shape[0]:
            raise ValueError(f"{len(labels)} labels for {mat.shape[0]} embedding rows")
        header: list[str] = []
        for row in labels:
            for k in row:
                if k not in header:
                    header.append(k)
        self._merge_existing_projector_config(f"{tag}:{str(int(step)).zfill(5)}")
        with self._writing("writing the TensorBoard projector's files", self._projector_undo(tag, int(step))):
            if not header:
                self._writer.add_embedding(mat, global_step=int(step), tag=tag)
            elif len(header) == 1:  # the projector reads single-column metadata without a header line
                meta = [_clean_label(row.get(header[0])) for row in labels]
                self._writer.add_embedding(mat, metadata=meta, global_step=int(step), tag=tag)
            else:
                rows = [[_clean_label(row.get(k)) for k in header] for row in labels]
                self._writer.add_embedding(mat, metadata=rows, metadata_header=[_clean_label(k) for k in header],
                                           global_step=int(step), tag=tag)

    def _projector_undo(self, tag: str, step: int) -> Any:
        """What puts the projector back as it was if add_embedding(tag, step) fails part way: its new directory
        removed, ``projector_config.pbtxt`` (which add_embedding rewrites in place) restored."""
        new_dir = self.log_dir / str(step).zfill(5) / self._writer._encode(tag)
        existed = new_dir.exists()
        config = self.log_dir / "projector_config.pbtxt"
        old = config.read_bytes() if config.is_file() else None

        def undo() -> None:
            if not existed:
                shutil.rmtree(new_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    new_dir.parent.rmdir()  # the step's directory, if it holds nothing else
            if old is None:
                config.unlink(missing_ok=True)
            elif not config.is_file() or config.read_bytes() != old:
                config.write_bytes(old)

        return undo

    def _merge_existing_projector_config(self, tensor_name: str) -> None:
        """SummaryWriter rewrites projector_config.pbtxt from its own in-memory list. After a resume keep
        the embeddings an earlier attempt registered, and drop the entry about to be rewritten so
        re-logging the same tag and step does not list it twice."""
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        writer = self._writer
        config = getattr(writer, "_projector_config", None)
        if config is None:
            config = ProjectorConfig()
            path = self.log_dir / "projector_config.pbtxt"
            if path.is_file():
                from google.protobuf import text_format

                try:
                    text_format.Parse(path.read_text(), config)
                except Exception:
                    config = ProjectorConfig()  # unreadable: start a fresh one
        kept = [e for e in config.embeddings if e.tensor_name != tensor_name]
        if len(kept) != len(config.embeddings):
            del config.embeddings[:]
            config.embeddings.extend(kept)
        writer._projector_config = config

    def flush(self) -> None:
        if self._writer is not None:
            with self._writing():
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with self._writing():
                self._writer.close()
            self._writer = None


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in ``log_dir`` (not its subdirectories) as ``{tag: [(step, value), ...]}``.

    Uses TensorBoard's own EventAccumulator, so events purged by a resume (``purge_step``) are dropped
    exactly as TensorBoard shows them.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[ea.SCALARS]}
