"""Shared test helpers, one place: waiting and ports, S3 test data, the operator's and the trainer's helpers.

Importable as `tests.support` (pyproject.toml puts the repository root on pytest's `pythonpath`). Modules:
`waiting` (wait_for, free_port), `s3` (the session bucket), `data` (JSONL/Parquet bytes), `operator`
(examples, kubectl, conditions), `trainer` (tiny trainer runs), `k8s` (the FineTuneJob and the trainer's
identity). Fixtures that start servers stay in tests/conftest.py.
"""
