"""The `dlrun` command end to end, as a user types it (in this process: `cli`; a process of its own
only for which modules the interpreter loads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import CPU, read_metrics, read_summary

TIMING_KEYS = {"seconds", "samples_per_s"}


def test_default_run_reaches_97_percent_on_digits(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", *CPU, check=True)
    run = tmp_path / "run"
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "dlrun.log"):
        assert (run / name).is_file(), name
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["best"]["test/acc"] >= 0.97
    assert summary["model"]["parameters"]["total"] > 0
    assert summary["device"] == "cpu" and summary["versions"]["torch"] == torch.__version__
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, 16))
    assert {"epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr"} <= metrics[0].keys()
    assert max(m["val/acc"] for m in metrics) == summary["best"]["val/acc"] == summary["monitor_value"]
    # the console shows epoch lines and the final table with the run folder
    assert "epoch 15/15" in ran.stdout and "test/acc" in ran.stdout and str(run) in ran.stdout
    # checkpoints are plain dicts that load with weights_only=True
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best"]["epoch"] and best["config"]["model"]["_target_"] == "dlrun.models.CNN"
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 15 and {"optimizer", "scheduler", "rng", "config"} <= last.keys()


def test_seeded_runs_are_identical(cli, tmp_path):
    args = ["trainer.epochs=3", "model=rnn", "model.cell=gru", "scheduler=cosine", *CPU]
    for name in ("a", "b"):
        cli("dlrun", f"hydra.run.dir={name}", *args, check=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    a, b = strip(read_metrics(tmp_path / "a")), strip(read_metrics(tmp_path / "b"))
    assert len(a) == 3 and a == b
    assert read_summary(tmp_path / "a")["final"] == read_summary(tmp_path / "b")["final"]
    cli("dlrun", "hydra.run.dir=c", *args, "trainer.seed=1", check=True)
    assert strip(read_metrics(tmp_path / "c")) != a


def test_mnist1d_with_every_option_group(cli, tmp_path):
    cli("dlrun", "hydra.run.dir=run", "dataset=mnist1d", "model=cnn", "optimizer=momentum", "scheduler=onecycle",
        "trainer.epochs=2", "trainer.batch_size=128", *CPU, check=True)
    summary = read_summary(tmp_path / "run")
    assert summary["data"]["sizes"] == {"train": 3601, "val": 399, "test": 1000}
    assert summary["data"]["input_shape"] == [1, 40]
    assert summary["best"]["val/acc"] > 0.2  # chance is 0.1


def test_multirun_gives_each_job_a_folder(cli, tmp_path):
    cli("dlrun", "-m", "optimizer=sgd,adam", "trainer.epochs=2", *CPU, check=True)
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/summary.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    summaries = [read_summary(job) for job in jobs]
    assert [s["choices"]["optimizer"] for s in summaries] == ["sgd", "adam"]
    assert all(s["status"] == "completed" and (job / "checkpoints" / "best.pt").is_file()
               for s, job in zip(summaries, jobs))
    assert [s["overrides"] for s in summaries] == [
        ["optimizer=sgd", "trainer.epochs=2", *CPU],
        ["optimizer=adam", "trainer.epochs=2", *CPU],
    ]


def test_default_run_folder_is_timestamped_under_outputs(cli, tmp_path):
    cli("dlrun", "trainer.epochs=1", *CPU, check=True)
    (run,) = list((tmp_path / "outputs").glob("????-??-??/??-??-??"))
    assert read_summary(run)["status"] == "completed"


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=vgg"], "Could not find 'model/vgg'"),
        (["trainer.epoch=3"], "dlrun: error: trainer.epoch is not a key of trainer (did you mean trainer.epochs?"),
        (["-m", "trainer.early_stopping.patiense=1,2"],
         "dlrun: error: trainer.early_stopping.patiense is not a key of trainer.early_stopping (did you mean "
         "trainer.early_stopping.patience?"),
        (["model=cnn_blocks", "model.blocks=[{channels:8},{chanels:8}]"],
         "dlrun: error: model.blocks[1].chanels is not a key of model.blocks[1] (did you mean "
         "model.blocks[1].channels?"),
        (["trainer.epochs=many"], "Value 'many' of type 'str' could not be converted to Integer"),
        (["optimizer.lr=0"], "optimizer.lr=0.0 is invalid: must be > 0"),
        (["+trainer.epoch=3"], "trainer.epoch is not a key of trainer (did you mean trainer.epochs?"),
    ],
)
def test_bad_input_is_a_clear_error(cli, args, message):
    ran = cli("dlrun", *args)
    assert ran.returncode != 0
    assert message in ran.stderr
    assert "Traceback" not in ran.stderr and "use +" not in ran.stderr  # Hydra's advice adds a key that does nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so device=cuda is valid")
def test_cuda_without_cuda_is_a_clear_error(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "device=cuda")
    assert ran.returncode != 0
    assert "device=cuda was asked for, but torch finds no CUDA device" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.slow
def test_help_cfg_and_completion_do_not_import_torch(tmp_path):
    """Which modules load is the interpreter's to say: a fresh one answers the three in turn, and
    says after each whether torch has been imported by then."""
    answered = (["--help"], ["--cfg", "job"], ["-sc", "query=bash"])
    code = (
        "import sys\n"
        "from dlrun.cli import main\n"
        f"for args in {answered!r}:\n"
        "    sys.argv = ['dlrun', *args]\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "    print(args, 'TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    env = {"COMP_LINE": "dlrun model=", "COMP_POINT": "12", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    answers = [line for line in proc.stdout.splitlines() if line.endswith(("NO_TORCH", "TORCH_IMPORTED"))]
    assert answers == [f"{args} NO_TORCH" for args in answered], proc.stdout + proc.stderr


def test_help_lists_the_groups(cli):
    out = cli("dlrun", "--help", check=True).stdout
    for line in ("model: cnn, cnn_blocks, custom, mlp, resnet, rnn, timm, transformer",
                 "debug: fast_dev_run, limit, overfit",
                 "optimizer: adadelta, adam, adamw, momentum, rmsprop, sgd",
                 "scheduler: cosine, none, onecycle, plateau, step",
                 "logger: default, mlflow, wandb",
                 "dataset: cifar10, cifar100, digits, fashion_mnist, imagefolder, mnist, mnist1d, sequence",
                 "device: auto, cpu, cuda"):
        assert line in out


def test_cfg_job_prints_the_composed_config(cli):
    out = cli("dlrun", "--cfg", "job", "model=rnn", "optimizer.lr=0.5", check=True).stdout
    assert "_target_: dlrun.models.RNN" in out and "lr: 0.5" in out


@pytest.mark.parametrize("folder", ["outputs/2026-11-29/10-49-07-1", "/x/pa th/rün 名 #1", "/tmp/it's a\\b",
                                    "/tmp/ends\\", "/tmp/x\\'y"])
def test_folder_names_survive_hydras_override_parser(folder):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dlrun.hydra_ext.callbacks import override_value

    assert OverridesParser.create().parse_override(f"resume={override_value(folder)}").value() == folder
