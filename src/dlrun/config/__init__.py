"""dlrun's configuration: `schema` (dataclasses in Hydra's ConfigStore, every default declared
once), `validate` (ranges and cross-field rules), `targets` (what a `_target_` may name).
All three are torch-free: the CLI imports them for `--help`, `--cfg` and completion."""
