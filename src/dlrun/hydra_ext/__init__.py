"""dlrun's Hydra plugins: callbacks, the Optuna sweeper and the launchers. Hydra imports them at
every start (`dlrun --help` included), so nothing here imports torch."""
