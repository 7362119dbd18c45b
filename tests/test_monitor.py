"""mfscale.monitor: TensorBoard scalars, purge on resume, config text, hparams, projector, disabled mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mfscale.monitor import Monitor, config_to_toml, final_metric_tag, flatten, read_scalars

TAGS = ["train/loss", "val/rmse", "throughput/ratings_per_s", "time/step_ms", "time/data_wait_pct", "lr/sparse"]


def test_scalars_round_trip(tmp_path):
    log = tmp_path / "tb"
    with Monitor(log, enabled=True) as mon:
        for step in range(1, 4):
            mon.scalars(step, {tag: step * (i + 1) + 0.5 for i, tag in enumerate(TAGS)})
        mon.scalars(4, {"train/loss": torch.tensor(0.25)})  # 0-d tensors are accepted
        mon.flush()
    got = read_scalars(log)
    assert set(got) == set(TAGS)
    assert got["val/rmse"] == [(1, 2.5), (2, 4.5), (3, 6.5)]
    assert got["train/loss"] == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 0.25)]
    assert read_scalars(tmp_path / "missing") == {}


def test_purge_step_on_reopen(tmp_path):
    log = tmp_path / "tb"
    mon = Monitor(log, enabled=True)
    for step in range(10):
        mon.scalars(step, {"train/loss": float(step)})
    mon.close()  # "killed" after step 9; the checkpoint was at step 6

    mon = Monitor(log, enabled=True, purge_step=6)
    for step in range(6, 8):
        mon.scalars(step, {"train/loss": 100.0 + step})
    mon.close()
    assert read_scalars(log)["train/loss"] == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]


def test_config_hparams_and_embeddings(tmp_path):
    log = tmp_path / "tb"
    config = {
        "model": {"dim": 64, "bias": True, "init": None},
        "optim": {"lr": {"sparse": 0.01, "dense": 1e-3}, "betas": [0.9, 0.999]},
        "data": Path("/data/ml-25m"),
        "seed": 0,
    }
    mon = Monitor(log, enabled=True)
    mon.text_config(config)
    mon.hparams(config, {"hparam/test_rmse": 0.81, "hparam/val_rmse": 0.8})
    labels = [
        {"title": "Toy Story (1995)", "year": 1995, "genres": "Adventure|Animation"},
        {"title": "Tab\there\nnewline", "year": None, "genres": ["Drama", "Comedy"]},
        {"title": "No genres", "year": 2001},
    ]
    mon.embeddings(torch.randn(3, 8), labels, tag="movies", step=0)
    mon.close()

    events = sorted(p.name for p in log.iterdir() if "tfevents" in p.name)
    assert len(events) == 1  # the hparams record goes through the run's own writer, into its own file
    scalars = read_scalars(log)
    assert scalars["~final/test_rmse"] == [(0, 0.8100000023841858)]

    pbtxt = (log / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "movies:00000"' in pbtxt
    meta = (log / "00000" / "movies" / "metadata.tsv").read_text().split("\n")
    assert meta[-1] == "" and len(meta) == 5
    rows = [line.split("\t") for line in meta[:-1]]
    assert rows[0] == ["title", "year", "genres"]
    assert rows[1] == ["Toy Story (1995)", "1995", "Adventure|Animation"]
    assert rows[2] == ["Tab here newline", "", "Drama|Comedy"]
    assert rows[3] == ["No genres", "2001", ""]
    assert all(len(r) == 3 for r in rows)
    tensors = (log / "00000" / "movies" / "tensors.tsv").read_text().splitlines()
    assert len(tensors) == 3 and len(tensors[0].split("\t")) == 8

    # a resumed run adds another embedding without losing the first one's projector entry
    mon = Monitor(log, enabled=True, purge_step=5)
    mon.embeddings(torch.randn(3, 8), labels, tag="movies", step=5)
    mon.close()
    pbtxt = (log / "projector_config.pbtxt").read_text()
    assert pbtxt.count("embeddings {") == 2 and 'tensor_name: "movies:00005"' in pbtxt


def test_hparams_and_config_helpers():
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2.0})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": 2.0}
    toml = config_to_toml({"seed": 1, "model": {"dim": 8, "init": None, "name": 'a"b'}, "optim": {"lr": {"x": 0.5}}})
    assert toml.splitlines() == [
        "seed = 1",
        "",
        "[model]",
        "dim = 8",
        "# init = (unset)",
        'name = "a\\"b"',
        "",
        "[optim.lr]",
        "x = 0.5",
    ]


def test_disabled_creates_nothing(tmp_path):
    log = tmp_path / "tb"
    mon = Monitor(log, enabled=False, purge_step=3)
    mon.scalars(1, {"train/loss": 1.0})
    mon.text_config({"a": 1})
    mon.hparams({"a": 1}, {"hparam/test_rmse": 1.0})
    mon.embeddings(torch.zeros(2, 2), [{"title": "a"}, {"title": "b"}])
    mon.flush()
    mon.close()
    mon.close()
    assert not log.exists()
    assert list(tmp_path.iterdir()) == []


def _compare_tag_names(a: str, b: str) -> int:
    """TensorBoard's Time Series card order (webapp/metrics/views/utils.ts compareTagNames): character
    by character, digit runs as numbers, '/' before any other character."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i0, j0 = i, j
            while i < len(a) and (a[i].isdigit() or a[i] == "."):
                i += 1
            while j < len(b) and (b[j].isdigit() or b[j] == "."):
                j += 1
            na, nb = float(a[i0:i].rstrip(".") or 0), float(b[j0:j].rstrip(".") or 0)
            if na != nb:
                return -1 if na < nb else 1
            continue
        brk_a, brk_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if brk_a and not brk_b:
            return -1
        if brk_b and not brk_a:
            return 1
        if not brk_a and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i += 1
        j += 1


def time_series_groups(tags) -> list[str]:
    """The card groups of TensorBoard's Time Series view, top to bottom: tags sorted as TensorBoard
    sorts them, grouped by the part before the first '/'."""
    import functools

    groups: list[str] = []
    for tag in sorted(tags, key=functools.cmp_to_key(_compare_tag_names)):
        if tag.split("/", 1)[0] not in groups:
            groups.append(tag.split("/", 1)[0])
    return groups


def _hparams_plugin_view(log: Path):
    """What TensorBoard's HPARAMS tab gets: the experiment and the session groups, from the hparams
    plugin's own backend reading ``log`` as ``tensorboard --logdir log`` does."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(log))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(log))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(log), data_provider=provider,
                                                            multiplexer=mux))
    experiment = get_experiment.Handler(context.RequestContext(), backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10,
                                               allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_UNKNOWN])
    groups = list_session_groups.Handler(context.RequestContext(), backend, "", request).run().session_groups
    return experiment, list(groups)


def test_final_metrics_sort_after_the_curves_and_reach_the_hparams_tab(tmp_path):
    """Issue 24: the final metrics were one-point ``hparam/*`` cards at the top of the Time Series view.
    They must still fill the HPARAMS tab, but as cards only after every training curve."""
    log = tmp_path / "tb"
    curves = ["lr/dense", "lr/sparse", "throughput/ratings_per_s", "time/step_ms", "train/loss", "train/rmse",
              "val/mae", "val/rmse"]
    metrics = {"hparam/batch_size": 1024, "hparam/best_epoch": 1, "hparam/best_val_rmse": 0.97,
               "hparam/test_rmse": 0.985, "hparam/ndcg@10": 0.12, "hparam/world_size": 1, "hparam/unset": None}
    with Monitor(log, enabled=True) as mon:
        for step in (10, 20):
            mon.scalars(step, {tag: step / 100 for tag in curves})
        mon.scalars(20, {"test/rmse": 0.985})
        mon.hparams({"model": {"dim": 8}, "optim": {"lr": 0.01}, "data": Path("/d")}, metrics)

    assert [p for p in log.rglob("*tfevents*") if p.parent != log] == []  # no sub-run
    scalars = read_scalars(log)
    final = {final_metric_tag(k): v for k, v in metrics.items() if v is not None}
    assert set(scalars) == set(curves) | {"test/rmse"} | set(final)
    assert not [t for t in scalars if t.startswith("hparam/")]
    groups = time_series_groups(scalars)
    assert groups == ["lr", "test", "throughput", "time", "train", "val", "~final"]
    # ~ sorts after every letter, digit and '_' in TensorBoard's order: after any curve group at all
    assert all(_compare_tag_names(f"{c}{name}/x", "~final/a") < 0 for c in "azAZ09_" for name in ("", "zz"))
    for tag, value in final.items():  # one point each, at the last step logged
        assert scalars[tag] == [(20, pytest.approx(value))]

    experiment, session_groups = _hparams_plugin_view(log)
    shown = {m.name.tag: m.display_name for m in experiment.metric_infos}
    assert shown == {final_metric_tag(k): k.removeprefix("hparam/") for k, v in metrics.items() if v is not None}
    assert {h.name for h in experiment.hparam_infos} == {"model.dim", "optim.lr", "data"}
    assert len(session_groups) == 1 and session_groups[0].name == "."  # the run itself, no extra run
    got = {m.name.tag: m.value for m in session_groups[0].metric_values}
    assert got == pytest.approx(final)
    assert session_groups[0].hparams["data"].string_value == "/d"
    assert session_groups[0].hparams["model.dim"].number_value == 8


def test_final_metrics_of_a_killed_attempt_are_purged_on_resume(tmp_path):
    log = tmp_path / "tb"
    with Monitor(log, enabled=True) as mon:
        for step in range(1, 11):
            mon.scalars(step, {"train/loss": float(step)})
        mon.hparams({"a": 1}, {"hparam/test_rmse": 1.5})  # written, then the run was resumed from step 6
    with Monitor(log, enabled=True, purge_step=6) as mon:
        for step in range(6, 13):
            mon.scalars(step, {"train/loss": 100.0 + step})
        mon.hparams({"a": 2}, {"hparam/test_rmse": 0.5})
    assert read_scalars(log)["~final/test_rmse"] == [(12, 0.5)]
    _, groups = _hparams_plugin_view(log)
    # The metric values are the resumed run's. (The hparams values shown stay the first record's:
    # TensorBoard keeps a tag's first metadata, as it did with add_hparams(run_name=".") before.)
    assert [[m.value for m in g.metric_values] for g in groups] == [[0.5]]
