"""Metrics reach TensorBoard event files and a real local MLflow store (SQLite), with the same values."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import CPU, read_metrics, read_summary
from dlrun.run import run


def test_tensorboard_event_files(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = trained("trainer.epochs=3", "trainer.log_every=5", *CPU)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    metrics = read_metrics(folder)
    # one x-axis for every scalar: the global step (the epoch is a scalar of its own)
    for key in ("val/acc", "train/loss", "lr", "epoch"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics]
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(5, 61, 5))  # every log interval
    assert metrics[-1]["step"] == 60
    # the test metrics of the final and the best weights, at the last step
    summary = read_summary(folder)
    for key in ("final/test/acc", "best/test/acc", "best/test/loss"):
        (event,) = events.Scalars(key)
        prefix, metric = key.split("/", 1)
        assert (event.step, event.value) == (60, pytest.approx(summary[prefix][metric], rel=1e-6))


def test_tensorboard_histograms_hparams_and_the_confusion_matrix(cli, tmp_path):
    """logger.histograms: each epoch's weights and last gradients per parameter; the config and results as hparams;
    with logger.plots, the confusion matrix as an image."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cli("dlrun", "hydra.run.dir=run", "trainer.epochs=2", "logger.histograms=true", "logger.plots=true",
        "trainer.model_summary=false", *CPU, check=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, weight in last.items():
        if "running" in name or "num_batches" in name:  # buffers, not parameters
            continue
        logged = events.Histograms(f"weights/{name}")
        assert [h.step for h in logged] == steps and [h.step for h in events.Histograms(f"gradients/{name}")] == steps
        h = logged[-1].histogram_value  # the last epoch's: the weights the run ended with
        assert (h.num, h.min, h.max) == (weight.numel(), pytest.approx(weight.min().item()),
                                         pytest.approx(weight.max().item()))
        assert h.sum == pytest.approx(weight.sum().item(), abs=1e-3)
    (image,) = events.Images("test/confusion_matrix")
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.step == steps[-1]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == 1e-3 and start.hparams["model._target_"].string_value == \
        "dlrun.models.CNN" and start.hparams["model.channels"].string_value == "[32, 64]"
    summary = read_summary(tmp_path / "run")
    (best,) = events.Scalars("best/test/acc")  # an hparams metric
    assert best.value == pytest.approx(summary["best"]["test/acc"], rel=1e-6)


def test_tensorboard_can_be_switched_off(trained):
    assert not (trained("trainer.epochs=1", "logger.tensorboard=false", *CPU) / "tensorboard").exists()


def test_mlflow_run_in_a_local_sqlite_store(make_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_dir = tmp_path / "run"
    summary = run(make_cfg("logger=mlflow", f"logger.mlflow_tracking_uri={uri}", "trainer.epochs=2", *CPU),
                  run_dir=run_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dlrun")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["model._target_"] == "dlrun.models.CNN" and found.data.params["trainer.epochs"] == "2"
    history = client.get_metric_history(found.info.run_id, "val/acc")
    assert [(h.step, h.value) for h in history] == [(m["step"], m["val/acc"]) for m in read_metrics(run_dir)]
    assert found.data.metrics["best/test/acc"] == pytest.approx(summary["best"]["test/acc"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "checkpoints"} <= artifacts
    assert (tmp_path / "store" / "mlflow-artifacts").is_dir()  # beside the database


def test_a_resumed_run_continues_its_mlflow_run(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    folder = tmp_path / "run"
    said = cli("dlrun", "logger=mlflow", f"logger.mlflow_tracking_uri={uri}", *CPU, "trainer.epochs=1",
               f"hydra.run.dir={folder}", check=True).stdout
    first = read_summary(folder)["mlflow_run_id"]
    assert f"MLflow run {first} in {uri} (to browse: mlflow ui --backend-store-uri {uri})" in said.splitlines()
    cli("dlrun", f"resume={folder}", "trainer.epochs=2", check=True)
    summary = read_summary(folder)
    assert summary["mlflow_run_id"] == first and summary["status"] == "completed" and summary["epochs"] == 2
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("dlrun").experiment_id])
    assert found.info.run_id == first and found.info.status == "FINISHED"
    history = client.get_metric_history(first, "val/acc")
    assert [(h.step, h.value) for h in history] == [(m["step"], m["val/acc"]) for m in read_metrics(folder)]
    # params cannot change: the one the resume changed is a tag
    assert found.data.params["trainer.epochs"] == "1" and found.data.tags["dlrun.resumed.trainer.epochs"] == "2"


def wandb_records(path):
    """The records of a W&B offline run file (run-<id>.wandb): LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: checksum, length, type; 1 whole, 2-4 first/middle/last), after W&B's 7-byte header,
    each record a protobuf `Record` (wandb.proto). W&B ships no reader of its own any more."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + header <= len(data):
        if block - pos % block < header:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if (length, kind) == (0, 0) or pos + header + length > len(data):  # the end, or a record being written
            break
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_it(cli, tmp_path):
    import json

    cli("dlrun", "hydra.run.dir=run", "logger=wandb", "trainer.epochs=2", "trainer.model_summary=false", *CPU,
        check=True)
    cli("dlrun", f"resume={tmp_path / 'run'}", "trainer.epochs=3", check=True)
    summary = read_summary(tmp_path / "run")
    first, second = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert first.name.endswith(summary["run_id"]) and second.name.endswith(summary["run_id"])  # one W&B run
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731  (W&B nests "val/acc" as val, acc)
    history, config, final = [], {}, {}
    for folder in (first, second):
        path = folder / f"run-{summary['run_id']}.wandb"
        deadline = time.monotonic() + 60  # W&B's service (a process of its own) may still be writing the file
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            assert time.monotonic() < deadline, f"{path} has no exit record"
            time.sleep(0.2)
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "run":
                config.update({key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "summary":
                final.update({key(i): json.loads(i.value_json) for i in record.summary.update})
    metrics = read_metrics(tmp_path / "run")
    assert [(h["_step"], h["epoch"], h["val/acc"], h["train/loss"]) for h in history] == \
        [(m["step"], m["epoch"], m["val/acc"], pytest.approx(m["train/loss"])) for m in metrics]
    assert config["optimizer.lr"] == 1e-3 and config["model._target_"] == "dlrun.models.CNN"
    assert final["best/test/acc"] == pytest.approx(summary["best"]["test/acc"])
