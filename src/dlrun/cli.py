"""The `dlrun` command: the only `@hydra.main`.

Nothing heavy is imported at module level, so `dlrun --help`, `dlrun --cfg job`
and shell completion answer without importing torch; `dlrun.run` (and torch with
it) is imported only when a job actually runs.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dlrun.config import register_configs


def config_dir() -> str:
    """The `conf/` directory: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"dlrun's config directory was not found next to {here}")


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    import sys

    from dlrun.config import ConfigError
    from dlrun.run import run

    # Clear one-line messages and non-zero exits where Python would print a traceback;
    # summary.json already records the status and the error.
    try:
        result = run(cfg)
    except ConfigError as err:
        raise SystemExit(f"dlrun: error: {err}") from None
    except KeyboardInterrupt:
        print("dlrun: interrupted; the run folder keeps what was written so far", file=sys.stderr)
        raise SystemExit(130) from None
    # The monitored metric is what sweepers (Optuna, ...) optimise.
    return result["monitor_value"]


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
