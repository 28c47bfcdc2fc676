"""The `dlrun` command: the only `@hydra.main`.

Nothing heavy is imported at module level, so `dlrun --help`, `dlrun --cfg job`
and shell completion answer without importing torch; `dlrun.run` (and torch with
it) is imported only when a job actually runs.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.utils import execution_whitelist
from omegaconf import DictConfig

from dlrun.config.schema import conf_dir, register_configs
from dlrun.config.targets import import_user_code
from dlrun.cpus import set_wait_policy


def config_dir() -> str:
    """The `conf/` directory, for Hydra (see config/schema.py conf_dir)."""
    return str(conf_dir())


register_configs()


@hydra.main(config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float:
    """One job. Returns the monitored metric, which sweepers (Optuna, ...) optimise.

    Errors the user can act on become one line and their exit status (the run's summary
    already records the status and the error). In a multirun a failed job does not
    stop the sweep: it returns NaN and the sweep summary lists it.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dlrun.errors import DlrunError, Interrupted, exit_code

    try:
        from dlrun.run import run  # torch: seconds, during which Ctrl-C is an interrupt like any other

        # a single run's config was validated by the start callback, before Hydra made its folder
        # (the other tasks of a multi-task Slurm job return nothing: task 0 reports)
        return run(cfg, checked=HydraConfig.get().mode == RunMode.RUN).get("monitor_value", float("nan"))
    except Interrupted as err:
        then = f"; continue with: {resume_command(HydraConfig.get().runtime.output_dir)}" if err.checkpointed else ""
        print(f"dlrun: {err}{then}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt as err:
        print("dlrun: interrupted; the run folder keeps what was written so far", file=sys.stderr)
        raise SystemExit(exit_code(err)) from None
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"dlrun: job {HydraConfig.get().job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return float("nan")
        if isinstance(err, DlrunError):
            print(f"dlrun: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        raise


def resume_command(folder: str) -> str:
    """`dlrun resume=<folder>` as it can be pasted into a shell: Hydra's quotes around a value with
    anything but plain ASCII path characters, and the shell's around the whole argument."""
    from dlrun.hydra_ext.callbacks import override_value

    return f"dlrun {shlex.quote(f'resume={override_value(folder)}')}"


def print_help(overrides: list[str]) -> None:
    """`dlrun --help`: Hydra's help page, made here because Hydra's own deep-copies its config
    repository once per config group, which takes seconds with a schema per option."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    conf = Path(config_dir())
    groups = sorted(d.name for d in conf.iterdir() if d.is_dir())
    try:
        with initialize_config_dir(config_dir=str(conf)):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # a bad override: Hydra's message, without the traceback
        raise SystemExit(f"dlrun: error: {err.__cause__ or err}") from None
    help_cfg = cfg.hydra.help
    with open_dict(cfg):
        del cfg["hydra"]
    lines = [f"{g}: {', '.join(sorted(p.stem for p in (conf / g).glob('*.yaml')))}" for g in groups]
    print(help_cfg.header)
    print("== Configuration groups ==\nCompose your configuration from those groups (group=option)\n")
    print("\n".join(lines), end="\n\n\n")
    print("== Config ==\nOverride anything in the config (foo.bar=value)\n")
    print(OmegaConf.to_yaml(cfg))
    print(help_cfg.footer)


def main() -> None:
    set_wait_policy()  # before torch loads the OpenMP runtime: on a busy machine, waiting threads sleep (cpus.py)
    import_user_code()  # `model._target_=my_pkg.MyNet` finds my_pkg in the working directory
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun's other ranks: the job (config and run folder) comes from rank 0, which runs Hydra
        from dlrun.distributed import end_process, torchrun_env
        from dlrun.run import rank_main

        end_process(rank_main, torchrun_env())  # ends the process
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        try:
            print_help([a for a in args if a not in ("--help", "-h")])
        except BrokenPipeError:  # `dlrun --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    from dlrun.config.validate import validate_override_keys
    from dlrun.errors import ConfigError

    try:
        validate_override_keys(args)
    except ConfigError as err:
        print(f"dlrun: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    # Hydra 1.4 instantiates the callbacks in conf/config.yaml under the caller's whitelist.
    with execution_whitelist(["dlrun.hydra_ext.callbacks.DlrunCallback"]):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's rank 0 (see distributed.end_process)
            from dlrun.distributed import end_process

            end_process(_app)
        else:
            _app()


if __name__ == "__main__":
    main()
