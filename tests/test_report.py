"""dlrun-report on a real sweep: the table, its exports and the plots."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CPU, DLRUN
from dlrun.errors import DlrunError
from dlrun.plots import learning_curves, pareto_plot, run_pictures, save
from dlrun.rundir import LEARNING_CURVES, PARETO, RunDir, read_metrics
from dlrun.tools.report import by_configuration, pareto_front, plot_runs, rows_of, shown, sort_rows, variant_rows

DLRUN_REPORT = str(Path(DLRUN).with_name("dlrun-report"))


def test_pareto_front():
    # (cost, score): lower cost and higher score are better
    points = [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (4, 0.8), (5, 0.9), (1, 0.4)]
    assert pareto_front(points) == [0, 1, 3]


def test_report_on_a_three_job_sweep(cli, tmp_path):
    cli("dlrun", "-m", "model.channels=[4],[8],[16,32]", "trainer.epochs=2", *CPU, check=True)
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    out = cli("dlrun-report", sweep, "--sort", "params", "--desc", "--csv", "t.csv", "--markdown", "t.md", "--cost",
              "flops", check=True).stdout
    assert "3 runs" in out and "model.channels=[16,32]" in out
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["overrides"] for r in rows] == ["model.channels=[16,32]", "model.channels=[8]", "model.channels=[4]"]
    assert [int(r["params"]) for r in rows] == sorted((int(r["params"]) for r in rows), reverse=True)
    assert all(r["status"] == "completed" and 0 < float(r["test"]) <= 1 and 0 < float(r["final_test"]) <= 1
               for r in rows)
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert markdown[0].startswith("| run | overrides |") and len(markdown) == 2 + 3
    for name in (LEARNING_CURVES, PARETO):
        with Image.open(sweep / "plots" / name) as png:
            assert png.format == "PNG" and png.width > 300
    bad = cli("dlrun-report", sweep, "--sort", "nope")
    assert bad.returncode != 0 and "allowed columns: run, overrides" in bad.stderr


@pytest.mark.slow
def test_the_installed_command_refuses_a_bad_column(tmp_path):
    """The console script itself: its exit status and its one line on stderr."""
    run = fake_run(tmp_path / "run", [], 0.9, 1000, [1.0])
    bad = subprocess.run([DLRUN_REPORT, str(run), "--sort", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("dlrun-report: error: --sort nope: allowed columns: run, ")
    assert len(bad.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ readable plots, 1 to 50 runs

def fake_run(folder: Path, overrides: list[str], test: float, params: int, losses: list[float],
             best_epoch: int | None = None) -> Path:
    """A run folder in dlrun's format (summary.json, metrics.jsonl) with the given figures."""
    folder.mkdir(parents=True)
    records = [{"epoch": e, "step": 10 * e, "train/loss": loss * 1.1, "val/loss": loss, "train/acc": 1 - loss / 3,
                "val/acc": 1 - loss / 2} for e, loss in enumerate(losses, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best_epoch = best_epoch or len(losses)
    summary = {"status": "completed", "overrides": overrides, "monitor": {"metric": "val/acc", "mode": "max"},
               "monitor_value": records[best_epoch - 1]["val/acc"], "best": {"epoch": best_epoch, "test/acc": test},
               "final": {"test/acc": test}, "model": {"parameters": {"total": params}},
               "cost": {"flops_per_sample": 2 * params}, "train": {"seconds": 1.0}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def rows_for(folders: list[Path], merge_seeds: bool = True) -> list[dict]:
    return by_configuration(rows_of(folders), merge_seeds)


def with_records(rows: list[dict]) -> list[dict]:
    """Rows as `learning_curves` takes them: each with the epoch records of its runs."""
    return [{**r, "records": [read_metrics(RunDir(Path(p))) for p in r["paths"]]} for r in rows]


def visible_tick_labels(ax) -> list[str]:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.xaxis.get_major_ticks() if low <= t.get_loc() <= high]
    return [t.label1.get_text() for t in ticks if t.label1.get_text()]


def test_pareto_cost_axis_has_tick_labels_when_costs_span_less_than_a_decade(tmp_path):
    # the mnist1d mlp / rnn / cnn sweep of issue 14: 45k, 68k and 90k parameters
    folders = [fake_run(tmp_path / str(i), [f"model={m}"], test, params, [1.0])
               for i, (m, test, params) in enumerate((("mlp", 0.49, 45066), ("rnn", 0.23, 68362), ("cnn", 0.70, 89770)))]
    rows = rows_for(folders)
    fig = pareto_plot(rows, "params", "parameters", "test/acc", True, [0, 2])
    fig.canvas.draw()
    labels = visible_tick_labels(fig.axes[0])
    assert len(labels) >= 3 and "50k" in labels, labels


def test_pareto_point_labels_never_overlap(tmp_path):
    folders = [fake_run(tmp_path / f"{i:02d}", [f"model.channels=[{4 + i}]"], 0.90 + 0.001 * (i % 5), 10_000 + 300 * i,
                        [1.0]) for i in range(20)]
    rows = rows_for(folders)
    front = pareto_front([(r["params"], r["test"]) for r in rows])
    fig = pareto_plot(rows, "params", "parameters", "test/acc", True, front)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts if t.get_visible()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert texts, "no point is labelled"
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    labelled = {t.get_text() for t in texts}
    assert all(rows[i]["run"] in labelled for i in front[:3])  # the front comes first


def test_points_on_one_spot_share_a_label_and_the_legend_hides_none(tmp_path):
    """bf16, fp16 and int8 copies often score and cost what the original does: one label names them all
    (none is dropped for want of room), and the legend sits above the plot."""
    (folder,) = [fake_run(tmp_path / "run", [], 0.95, 50_000, [1.0])]
    (run,) = rows_for([folder])
    rows = [run, *({**run, "run": name, "variant": True} for name in ("bf16", "fp16", "int8-dynamic")),
            {**run, "run": "pruned-flops-0.5", "variant": True, "params": 25_000, "test": 0.96}]
    fig = pareto_plot(rows, "params", "parameters", "test/acc", True, [4])
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = sorted(t.get_text().replace("\n", " ") for t in ax.texts if t.get_visible())
    assert texts == ["pruned-flops-0.5", "run, bf16, fp16, int8-dynamic"]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())


@pytest.mark.parametrize("n_runs", [1, 4, 7, 20])
def test_learning_curve_legend_is_outside_the_data(tmp_path, n_runs):
    folders = [fake_run(tmp_path / str(i), [f"optimizer.lr={i}e-3"], 0.9, 1000, [2.0 / (e + i + 1) for e in range(5)])
               for i in range(n_runs)]
    rows = rows_for(folders)
    fig = learning_curves(with_records(rows), "acc")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    entries = [t.get_text() for t in legend.get_texts()]
    if n_runs == 1:  # one run: named by the title, the legend tells its lines apart
        assert entries == ["val", "train"] and fig.get_suptitle() == f"run {rows[0]['run']}"
    else:
        assert len(entries) == min(n_runs, 10) + (n_runs > 10)  # the best ten by name, then "10 more (grey)"
        named = [h.get_color() for h in legend.legend_handles[:min(n_runs, 10)]]
        assert len(set(named)) == len(named) and not any(len(set(c[:3])) == 1 for c in named)  # no grey


def test_one_epoch_curves_are_points_on_the_epoch_train_hollow():
    """A 1-epoch run has no lines to tell val (solid) from train (dashed): the markers do (train hollow), and
    the epoch axis shows that epoch alone, not fractions around it."""
    records = [{"epoch": 1, "train/loss": 1.5, "val/loss": 1.2, "train/acc": 0.5, "val/acc": 0.6}]
    fig = learning_curves([{"run": "r", "overrides": "", "records": [records]}], "acc")
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1]
        faces = {line.get_linestyle(): line.get_markerfacecolor() for line in ax.lines}
        assert faces["--"] == "none" and faces["-"] != "none" and all(line.get_marker() == "o" for line in ax.lines)


def test_a_configuration_of_several_seeds_is_named_by_its_seeds():
    from dlrun.plots import _label

    row = {"run": "0 (+19)", "runs": [str(i) for i in range(20)], "overrides": "optimizer.lr=0.01"}
    assert _label(row).replace("\n", " ") == "20 seeds (runs 0, 1, ..., 19): optimizer.lr=0.01"
    assert _label({**row, "runs": ["4", "7"], "overrides": ""}) == "2 seeds (runs 4, 7)"


def test_a_runs_plot_names_its_overrides_and_marks_the_best_epoch(tmp_path):
    folder = RunDir(fake_run(tmp_path / "run", ["model=cnn", "optimizer.lr=0.01"], 0.9, 1000, [1.0, 0.5, 0.7], best_epoch=2))
    (written,) = run_pictures(folder, folder.read_summary(), None)  # no classes, no predictions: the curves only
    assert written == folder.learning_curves
    # the run's picture is the figure of its records titled with the folder's name and its overrides, the
    # best epoch marked
    title = "run: model=cnn optimizer.lr=0.01"
    row = {"run": "run", "overrides": "model=cnn optimizer.lr=0.01", "records": [read_metrics(folder)]}
    fig = learning_curves([row], "acc", title, best_epoch=2)
    assert written.read_bytes() == save(fig, tmp_path / "expected.png").read_bytes()
    assert fig.get_suptitle() == title
    for ax in fig.axes:  # loss and accuracy: each with the dotted grey line at the best epoch
        (best,) = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert list(best.get_xdata()) == [2, 2] and best.get_color() == "0.5"
        curves = [line for line in ax.get_lines() if line is not best]
        assert len(curves) == 2 and all(list(line.get_xdata()) == [1, 2, 3] for line in curves)
        assert all(line.get_marker() == "o" for line in curves)  # every epoch a marker
    assert "best epoch (2)" in [t.get_text() for t in fig.legends[0].get_texts()]
    # and in the picture (laid out as `fig`: the same bytes): in each panel a column of grey dots down the
    # plot area at epoch 2, and only there
    with Image.open(written) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    for ax in fig.axes:
        assert grey_rows(pixels, ax, 2) > 0.3
        assert grey_rows(pixels, ax, 1.5) < 0.05 and grey_rows(pixels, ax, 2.5) < 0.05


def grey_rows(pixels: np.ndarray, ax, epoch: float) -> float:
    """The share of the rows of `ax`'s plot area, in the rendered `pixels` of its figure, that have a mid-grey
    pixel within a pixel of `epoch`'s column."""
    box = ax.get_window_extent()
    area = pixels[round(pixels.shape[0] - box.y1):round(pixels.shape[0] - box.y0)]  # image rows run downwards
    x = round(ax.transData.transform((epoch, 0))[0])
    band = area[:, x - 1:x + 2]
    grey = (band.max(axis=2) - band.min(axis=2) < 12) & (abs(band.mean(axis=2) - 128) < 70)
    return grey.any(axis=1).mean()


# ------------------------------------------------------------------ seeds: mean ± std (n)

def test_runs_differing_only_in_seed_are_one_configuration(cli, tmp_path):
    cli("dlrun", "-m", "model.channels=[4],[8]", "trainer.seed=0,1,2", "trainer.epochs=1", *CPU, check=True)
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    out = cli("dlrun-report", sweep, "--csv", "t.csv", "--markdown", "t.md", check=True).stdout
    assert "6 runs, 2 configurations" in out
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["overrides"], r["n"]) for r in rows] == [("model.channels=[4]", "3"), ("model.channels=[8]", "3")]
    for row in rows:
        tests = [summaries[Path(p).name]["best"]["test/acc"] for p in row["paths"].split()]
        assert float(row["test"]) == pytest.approx(statistics.fmean(tests))
        assert float(row["test_std"]) == pytest.approx(statistics.stdev(tests))
        assert len(set(tests)) > 1  # the seeds really differ
    markdown = (tmp_path / "t.md").read_text()
    assert f"{statistics.fmean(tests):.4f} ± {statistics.stdev(tests):.4f}" in markdown
    per_run = cli("dlrun-report", sweep, "--per-run", check=True).stdout
    assert "6 runs" in per_run and "configurations" not in per_run and "±" not in per_run
    with Image.open(sweep / "plots" / PARETO) as png:
        assert png.format == "PNG"


# ------------------------------------------------------------------ macro F1, baselines, compress variants

def test_macro_f1_and_the_linear_baseline_ratio_are_columns(tmp_path):
    a = fake_run(tmp_path / "a", ["trainer.seed=0"], 0.9, 1000, [1.0])
    b = fake_run(tmp_path / "b", ["trainer.seed=1"], 0.8, 1000, [1.0])
    for folder, f1 in ((a, 0.85), (b, 0.75)):
        summary = json.loads((folder / "summary.json").read_text())
        summary["best"]["test/macro_f1"] = f1
        summary["baselines"] = {"linear": {"mae": 0.2, "model_mae_ratio": {"best": f1 / 2, "final": 1.0}}}
        (folder / "summary.json").write_text(json.dumps(summary))
    (row,) = rows_for([a, b])
    assert row["macro_f1"] == pytest.approx(0.8) and row["macro_f1_std"] == pytest.approx(statistics.stdev([0.85, 0.75]))
    assert row["vs_linear"] == pytest.approx(0.4)
    assert "macro_f1" in shown([row]) and shown([{**row, "vs_linear": None}]).count("vs_linear") == 0
    assert sort_rows(rows_for([a, b], merge_seeds=False), "macro_f1", True)[0]["macro_f1"] == 0.85


def test_compress_variants_are_points_of_the_pareto_plot(tmp_path):
    run = fake_run(tmp_path / "run", [], 0.95, 50_000, [1.0])
    summary = json.loads((run / "summary.json").read_text())
    summary["cost"]["latency_ms"] = {"batch_1": 0.3, "batch_64": 2.0}
    (run / "summary.json").write_text(json.dumps(summary))
    variants = [  # as dlrun-compress writes them (src/dlrun/tools/variants.py)
        {"name": "original", "runtime": "eager", "test/acc": 0.95, "parameters": 50_000, "flops_per_sample": 100_000,
         "latency_ms": {"batch_1": 0.3, "batch_64": 2.0}},
        {"name": "pruned-flops-0.5", "runtime": "eager", "test/acc": 0.94, "parameters": 20_000,
         "flops_per_sample": 50_000, "latency_ms": {"batch_1": 0.2, "batch_64": 1.0}},
        {"name": "original+onnxruntime", "runtime": "onnxruntime", "test/acc": 0.95, "parameters": 50_000,
         "flops_per_sample": 100_000, "latency_ms": {"batch_1": 0.1, "batch_64": 0.5}},
    ]
    (run / "compress.json").write_text(json.dumps({"metric": "test/acc", "variants": variants}))
    rows = rows_for([run])
    assert rows[0]["latency_ms"] == 2.0 and "latency_ms" in shown(rows)  # the summary's full-batch median
    found = variant_rows(rows)
    assert [(v["run"], v["params"], v["latency_ms"]) for v in found] == [  # one run: named by the variant alone
        ("pruned-flops-0.5", 20_000, 1.0), ("original+onnxruntime", 50_000, 0.5)]
    (written,) = [p for p in plot_runs(rows, tmp_path / "plots", "latency_ms") if p.name == PARETO]
    with Image.open(written) as png:
        assert png.format == "PNG"
    (run / "compress.json").write_text("{not json")
    with pytest.raises(DlrunError, match="compress.json: cannot be read"):
        variant_rows(rows)


def test_latencies_on_other_thread_counts_are_not_one_axis(tmp_path, capsys):
    """The run's latency was timed on 2 threads, its variants on 1: the latency Pareto plot keeps the run's
    count only, and says what it left out (parameters and FLOPs do not depend on threads: all stay)."""
    run = fake_run(tmp_path / "run", [], 0.95, 50_000, [1.0])
    summary = json.loads((run / "summary.json").read_text())
    summary["cost"].update(latency_ms={"batch_1": 0.3, "batch_64": 2.0}, latency={"threads": 2})
    (run / "summary.json").write_text(json.dumps(summary))
    variants = [{"name": name, "test/acc": 0.9 + i / 100, "parameters": 20_000 + i, "flops_per_sample": 50_000,
                 "latency_ms": {"batch_1": 0.2, "batch_64": 1.0 + i}} for i, name in enumerate(("a", "b"))]
    (run / "compress.json").write_text(json.dumps({"metric": "test/acc", "threads": 1, "variants": variants}))
    plot_runs(rows_for([run]), tmp_path / "latency", "latency_ms")
    said = capsys.readouterr().out
    assert "pareto.png leaves out 2 variant(s) timed on 1 thread(s): the runs' latencies were timed on 2" in said
    assert not (tmp_path / "latency" / PARETO).exists()  # one point is left: no Pareto plot to draw
    plot_runs(rows_for([run]), tmp_path / "params", "params")
    assert (tmp_path / "params" / PARETO).is_file() and "leaves out" not in capsys.readouterr().out


def test_run_names_sort_as_numbers(tmp_path):
    folders = [fake_run(tmp_path / str(i), [f"optimizer.lr={i}"], 0.9, 1000, [1.0]) for i in (10, 9, 2, 100)]
    rows = sort_rows(rows_for(folders), "run", False)
    assert [r["run"] for r in rows] == ["2", "9", "10", "100"]


def test_optuna_floats_read_short_in_tables_and_pictures_but_group_and_export_exact(cli, tmp_path):
    lrs = ["0.0012520653814999472", "0.0012520653899999999"]  # equal to 4 digits: still two configurations
    folders = [fake_run(tmp_path / str(i), [f"optimizer.lr={lr}", "trainer.batch_size=64"], 0.9, 1000, [1.0])
               for i, lr in enumerate(lrs)]
    rows = by_configuration(rows_for(folders))
    assert len(rows) == 2 and [r["overrides"] for r in rows] == [f"optimizer.lr={lr}" for lr in lrs]
    ran = cli("dlrun-report", *folders, "--csv", tmp_path / "runs.csv", "--plots", tmp_path / "plots")
    assert ran.returncode == 0 and ran.stdout.count("optimizer.lr=0.001252") == 2, ran.stdout
    assert "0.00125206538" not in ran.stdout
    with open(tmp_path / "runs.csv") as f:
        assert [r["overrides"] for r in csv.DictReader(f)] == [f"optimizer.lr={lr}" for lr in lrs]


def test_figures_with_their_spread_leave_the_text_columns_readable(cli, tmp_path, monkeypatch):
    """Seeds merged into mean ± std used to squeeze overrides, status and monitor to 3 characters."""
    configs = [["optimizer=sgd", "optimizer.lr=0.05", "model.channels=[16,32]"],
               ["optimizer=adamw", "optimizer.lr=0.001", "model.channels=[32,64]"]]
    folders = [fake_run(tmp_path / f"{i}-{seed}", [*config, f"trainer.seed={seed}"], 0.9 + seed / 100, 1000, [1.0])
               for i, config in enumerate(configs) for seed in (0, 1, 2)]
    for folder in folders:  # every figure a real classification run has, each with its spread
        summary = json.loads((folder / "summary.json").read_text())
        summary["best"]["test/macro_f1"] = summary["best"]["test/acc"] - 0.01
        summary["cost"]["latency_ms"] = {"batch_1": 0.1, "batch_64": 1.0 + len(str(folder)) % 3 / 10}
        (folder / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setenv("COLUMNS", "120")
    ran = cli("dlrun-report", *folders)
    assert ran.returncode == 0
    for text in ("optimizer=sgd", "optimizer.lr=0.05", "optimizer=adamw", "completed", "val/acc"):
        assert text in ran.stdout, ran.stdout
    assert "± 0.0100" in ran.stdout  # the spread, on its own line under its mean
    assert max(len(line) for line in ran.stdout.splitlines()) <= 160


def test_a_legend_names_a_run_whole():
    """Optuna runs differ in their last override too: a legend wraps a long name, never cuts it."""
    from dlrun.plots import _label

    label = _label({"run": "3", "overrides": "optimizer.lr=0.001252 optimizer.weight_decay=1.235e-05 "
                                              "trainer.batch_size=64 model.channels=[32,64]"})
    assert label.replace("\n", " ") == ("3: optimizer.lr=0.001252 optimizer.weight_decay=1.235e-05 "
                                        "trainer.batch_size=64 model.channels=[32,64]")
    assert max(len(line) for line in label.splitlines()) <= 44
