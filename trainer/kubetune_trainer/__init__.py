"""The kubetune trainer: S3 data -> Ray Train + DeepSpeed -> checkpoints, evaluation, export (a RayJob entrypoint)."""
