"""`python -m kubetune_trainer --config FILE [--local]`: the trainer's entry point (the RayJob's entrypoint).

setup (config, Ray) -> prepare data (tokenise, shard to S3) -> train + evaluate + export (on the Ray Train
workers) -> cleanup. The last line of output always says how it ended:

    kubetune-trainer: succeeded: step 40/40, evalLoss 3.9412, model s3://.../model (adapter)
    kubetune-trainer: error: data: 12.5% of records are invalid (more than 5%); most common: bad_json ...

Exit codes: 0 succeeded, 2 the config is invalid, 3 the data cannot be used, 1 training failed.

Settings that concern how this process runs rather than what it trains come from the environment:
KUBETUNE_MODEL_CACHE (node-local base model cache), KUBETUNE_STAGING_DIR (node-local scratch),
KUBETUNE_RAY_STORAGE (Ray Train's run folder), and for tests KUBETUNE_FAIL_AFTER_STEP (fail right after
that step's checkpoint), KUBETUNE_TRACE_DIR (record which rows every micro-batch used) and KUBETUNE_STEP_DELAY_S
(each step takes at least this much longer, so an injected fault lands mid-run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api import TrainerConfig, errors_from_validation

log = logging.getLogger("kubetune_trainer")

EXIT_OK, EXIT_TRAINING, EXIT_CONFIG, EXIT_DATA = 0, 1, 2, 3
_PREFIX = "kubetune-trainer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the resolved trainer config (JSON) the operator wrote")
    parser.add_argument(
        "--local", action="store_true", help="start a Ray cluster on this machine instead of joining KubeRay's"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # ---------------------------------------------------------------- setup
    try:
        cfg = TrainerConfig.model_validate(json.loads(Path(args.config).read_text()))
    except (OSError, ValueError) as exc:
        return _fail(EXIT_CONFIG, "config", _config_message(exc))
    from kubetune_trainer.train import RunOptions

    options = RunOptions(
        local=args.local,
        model_cache=os.environ.get("KUBETUNE_MODEL_CACHE") or "/tmp/kubetune-models",
        staging_dir=os.environ.get("KUBETUNE_STAGING_DIR", ""),
        ray_storage=os.environ.get("KUBETUNE_RAY_STORAGE", ""),
        fail_after_step=int(os.environ["KUBETUNE_FAIL_AFTER_STEP"])
        if os.environ.get("KUBETUNE_FAIL_AFTER_STEP")
        else None,
        trace_dir=os.environ.get("KUBETUNE_TRACE_DIR") or None,
        step_delay_s=float(os.environ.get("KUBETUNE_STEP_DELAY_S") or 0),
        # Workers are processes of the Ray cluster, with the cluster's environment, not this process's.
        kubeconfig=os.environ.get("KUBECONFIG") or None,
    )
    t0 = time.monotonic()
    options.startup["startedAt"] = time.time()  # time to first step counts from here (wall clock: other processes)
    try:
        summary = run(cfg, options)
    except Exception as exc:  # every failure ends in one clear line and an exit code
        code, kind, message = classify(exc, cfg)
        log.exception("the run failed")
        _quiet_ray()
        return _fail(code, kind, message)
    _quiet_ray()
    model = summary.get("model") or {}
    eval_loss = summary.get("evalLoss")
    # The leading newline: a log line of Ray's left without its newline must not swallow this one.
    print(
        f"\n{_PREFIX}: succeeded: step {summary.get('step')}/{summary.get('totalSteps')} "
        f"({summary.get('stopReason')}), evalLoss {eval_loss if eval_loss is None else round(eval_loss, 4)}, "
        f"{summary.get('tokensPerSecond')} tokens/s, model {model.get('uri')} ({model.get('kind')}), "
        f"{time.monotonic() - t0:.0f}s",
        flush=True,
    )
    return EXIT_OK


def run(cfg: TrainerConfig, options: Any) -> dict[str, Any]:
    """Prepare the data on the driver, then train on the Ray workers; returns rank 0's summary."""
    import ray

    from kubetune_trainer import model as model_lib
    from kubetune_trainer.data import prepare, s3_client
    from kubetune_trainer.layout import world_size
    from kubetune_trainer.train import fit

    t0 = time.monotonic()
    if not ray.is_initialized():
        if options.local:
            _start_local_ray()
        else:
            ray.init()  # the KubeRay cluster this RayJob's driver runs in (RAY_ADDRESS)
    options.startup["rayStartSeconds"] = round(time.monotonic() - t0, 2)

    t0 = time.monotonic()
    client = s3_client(cfg.spec.dataset.endpoint, cfg.spec.dataset.region)
    # The driver needs only the tokenizer (to tokenise the data); workers fetch the weights on their nodes.
    tokenizer_dir = model_lib.fetch_base(cfg.spec, client, Path(options.model_cache), tokenizer_only=True)
    tokenizer = model_lib.load_tokenizer(cfg.spec, tokenizer_dir)
    # In a RayJob, parsing and tokenising run in Ray actors on the worker pods (the head has no CPUs to give);
    # a --local run prepares in this process.
    cpus = 0 if options.local else ray.cluster_resources().get("CPU", 0)  # type: ignore[no-untyped-call]
    parallelism = min(int(cpus), 64)
    prepared = prepare(cfg, tokenizer, world_size(cfg.spec.resources), parallelism=parallelism)  # a shard per rank
    options.startup["dataSeconds"] = round(time.monotonic() - t0, 2)
    log.info(
        "data ready: %s (%d training sequences of %d tokens in %d shards)",
        prepared.manifest_uri,
        prepared.num_train_sequences,
        prepared.seq_length,
        len(prepared.train_shards),
    )
    if cfg.spec.tuning is not None:  # hyperparameter search: Ray Tune trials of this training, best one exported
        from kubetune_trainer.tune import run_tuning

        return run_tuning(cfg, prepared, options)
    return fit(cfg, prepared, options)


def _start_local_ray(attempts: int = 3) -> None:
    """A Ray cluster on this machine. Ray waits a fixed 30 s for its raylet to register, which a heavily
    loaded machine can exceed: that one failure is retried."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)  # --local means a new cluster, not one named in the environment
    for attempt in range(1, attempts + 1):
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            log.warning("the local Ray cluster did not start in time (attempt %d); trying again", attempt)
            ray.shutdown()


# S3 error codes that mean "these keys are wrong, expired or not allowed here".
S3_DENIED_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
)
S3_ACCESS_DENIED = "S3AccessDenied"  # the operator maps this marker to the Failed reason of the same name


def classify(exc: BaseException, cfg: TrainerConfig | None = None) -> tuple[int, str, str]:
    """(exit code, kind, message) for a failure, looking through Ray's wrappers to the worker's exception."""
    from kubetune_trainer.data import DataError

    denied = _s3_denied_code(exc)
    if denied:
        return EXIT_TRAINING, S3_ACCESS_DENIED, _access_denied_message(denied, cfg)
    root = _root_cause(exc)
    if isinstance(root, DataError):
        return EXIT_DATA, "data", str(root)
    if isinstance(root, ValidationError):
        return EXIT_CONFIG, "config", _config_message(root)
    text = str(root).strip().splitlines()
    return EXIT_TRAINING, "training", f"{type(root).__name__}: {text[0] if text else ''}"


def _s3_denied_code(exc: BaseException) -> str | None:
    """The S3 error code when S3 refused the credentials, anywhere in the chain of causes (Ray's wrappers,
    our own FetchError/DataError) or, for exceptions that lost their type on the way, in their text."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in S3_DENIED_CODES:
            return code
        text = str(e)
        for candidate in S3_DENIED_CODES:
            if f"({candidate})" in text:
                return candidate
        failures = getattr(e, "worker_failures", None) or {}
        todo.extend(
            [
                e.__cause__,
                e.__context__,
                getattr(e, "cause", None),
                getattr(e, "controller_failure", None),
                *failures.values(),
            ]
        )
    return None


def _access_denied_message(code: str, cfg: TrainerConfig | None) -> str:
    """Endpoint and buckets, never a key: the Secret's values are not even read here."""
    if cfg is None:
        return f"S3 refused the credentials ({code}); check the Secret named in spec.dataset.credentialsSecret"
    spec = cfg.spec
    sources = getattr(spec.dataset, "sources", None) or []
    uris = [
        spec.dataset.train,
        spec.dataset.validation,
        spec.output.uri,
        spec.model.uri,
        *(getattr(src, "uri", None) for src in sources),
    ]
    buckets = sorted({u[len("s3://") :].split("/", 1)[0] for u in uris if isinstance(u, str) and u.startswith("s3://")})
    return (
        f"endpoint {spec.dataset.endpoint or 'AWS S3'} refused the credentials for bucket "
        f"{', '.join(buckets)} ({code}); check the keys in Secret {spec.dataset.credentials_secret or '(none)'}"
    )


def _root_cause(exc: BaseException) -> BaseException:
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
    if failures:
        exc = failures[min(failures)]
    for _ in range(10):
        inner = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None)  # RayTaskError.cause
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _quiet_ray() -> None:
    """Disconnect from Ray, so that no forwarded worker log (Ray writes some without a final newline) lands
    on the same line as the final one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def _config_message(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{path}: {msg}" for path, msg in errors_from_validation(exc, root="config"))
    return str(exc)


def _fail(code: int, kind: str, message: str) -> int:
    print(f"\n{_PREFIX}: error: {kind}: {message}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
