"""The S3 test bucket: created by the session's `s3_server` fixture (tests/conftest.py)."""

BUCKET = "kubetune-test"
