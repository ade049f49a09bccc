"""The pieces of `crlft train` (jobs/train.py is the command and the driver): `data` checks the packed data against
the config, `runs` keeps the Ray Train run folders (naming, resume), `mlflow_run` is the MLflow run and the metrics
logger, `plan` is what the driver tells every worker, `worker` is the recipe every Ray Train worker runs (setup, loop,
checkpoint)."""
