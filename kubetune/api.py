"""The FineTuneJob API: typed models of the spec and status, and the resolved trainer config.

This module is the single source of the resource's contract. The CRD in ``crds/`` is generated from these
models (``kubetune.crd``), the operator parses every object through them, and the trainer reads its resolved
config through them. It imports nothing from Kubernetes, torch or Ray, so every layer can use it.

Field names are snake_case in Python and camelCase on the wire (``by_alias``). Unknown fields are refused, so a
misspelt key in ``kubetune run`` fails with the field's path instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune import chat_templates

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# s3://bucket[/key]; bucket per AWS naming rules. Userinfo (s3://key:secret@bucket) is refused by the pattern,
# so credentials can never ride inside a URI.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s@]*)?$"
MODEL_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s@]*)?|hf://[A-Za-z0-9][\w.\-]*/[\w.\-]+)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label: a Service name
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# http(s)://host[:port][/path]; userinfo (user:password@host) is refused, so credentials never ride in a URL.
HTTP_URL_PATTERN = r"^https?://[^\s@/]+(:[0-9]+)?(/[^\s@]*)?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # a Secret's data key

# Training fields a tuning search space may vary, by their wire path under spec.training.
TUNABLE_FIELDS: dict[str, Literal["float", "int"]] = {
    "learningRate": "float",
    "weightDecay": "float",
    "warmupRatio": "float",
    "epochs": "float",
    "perDeviceBatchSize": "int",
    "gradientAccumulationSteps": "int",
    "lora.r": "int",
    "lora.alpha": "int",
    "lora.dropout": "float",
}


class Model(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True)

    def wire(self, exclude_none: bool = True) -> dict[str, Any]:
        """The object as it appears in Kubernetes: camelCase keys, JSON types."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)


def _field(default: Any = ..., description: str = "", **kw: Any) -> Any:
    if not description:
        raise ValueError("every API field needs a description")
    if "default_factory" in kw:
        return Field(description=description, **kw)
    return Field(default, description=description, **kw)


# ----------------------------------------------------------------------------------------------- spec


class TokenSecretRef(Model):
    """A key of a Secret in the job's namespace that holds an access token."""

    name: str = _field(description="Secret name.", pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    key: str = _field(
        "HF_TOKEN", description="Key of the token in the Secret.", pattern=SECRET_KEY_PATTERN, max_length=253
    )


class ModelSpec(Model):
    """The base model to fine-tune."""

    uri: str = _field(
        description="Base model location: an s3:// prefix holding a transformers checkpoint "
        "(config.json, weights, tokenizer), or hf://org/name for clusters that reach the Hugging Face hub.",
        pattern=MODEL_URI_PATTERN,
    )
    task: Literal["causal-lm", "sequence-classification"] = _field(
        "causal-lm", description="What the model learns: next-token prediction, or a classification head."
    )
    num_labels: int | None = _field(
        None, description="Number of classes; required when task is sequence-classification.", ge=2, le=10000
    )
    revision: str | None = _field(
        None, description="Revision (branch, tag or commit) for hf:// models; ignored for s3://.", max_length=128
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", description="dtype to load the weights in; auto picks bfloat16 on GPUs and float32 on CPUs."
    )
    gguf_file: str | None = _field(
        None,
        description="Name of a GGUF file inside the model prefix to load and dequantise instead of safetensors.",
        max_length=255,
    )
    token_secret_ref: TokenSecretRef | None = _field(
        None,
        description="hf:// models: the Secret key holding a Hugging Face access token (gated or private "
        "models). The trainer's pods and the inference server's weight fetch get it as HF_TOKEN by "
        "secretKeyRef; the token itself never appears in the spec, status or logs.",
    )


class FieldMapping(Model):
    """Which keys of each record hold what; the defaults match the usual names."""

    messages: str = _field("messages", description="chat: key of the list of {role, content} messages.")
    prompt: str = _field("prompt", description="instruction: key of the prompt text.")
    response: str = _field("response", description="instruction: key of the response text (the loss target).")
    system: str = _field("system", description="instruction: optional key of a system prompt.")
    text: str = _field("text", description="completion and classification: key of the text.")
    label: str = _field("label", description="classification: key of the label (an integer id or a class name).")
    input: str | None = _field(
        None,
        description="instruction: optional key of a text appended to the prompt after a blank line (Alpaca's "
        "`input`; with prompt: instruction, response: output).",
        max_length=253,
    )
    chosen: str | None = _field(
        None,
        description="preference: key of the preferred response, text or assistant messages (default chosen).",
        max_length=253,
    )
    rejected: str | None = _field(
        None,
        description="preference: key of the dispreferred response, text or assistant messages (default rejected).",
        max_length=253,
    )


class Preprocessing(Model):
    """How raw records are cleaned, filtered, tokenised and packed before training."""

    unicode_normalization: Literal["NFC", "NFKC", "none"] = _field(
        "NFKC", description="Unicode normalisation form applied to every text field."
    )
    normalize_whitespace: bool = _field(
        True, description="Strip text and collapse runs of spaces and tabs; keep single newlines."
    )
    deduplicate: bool = _field(True, description="Drop records whose normalised text repeats an earlier one.")
    near_duplicate_threshold: float | None = _field(
        None,
        description="If set, also drop records whose MinHash Jaccard similarity to an earlier record is at "
        "least this value (0.5-1.0).",
        ge=0.5,
        le=1.0,
    )
    min_chars: int = _field(1, description="Drop records whose text is shorter than this many characters.", ge=0)
    max_chars: int | None = _field(
        None, description="Drop records whose text is longer than this many characters.", ge=1
    )
    max_seq_length: int = _field(
        1024, description="Tokens per training sequence; longer records are truncated.", ge=16, le=131072
    )
    packing: bool = _field(True, description="Pack several tokenised records into each sequence (causal-lm only).")
    max_invalid_fraction: float = _field(
        0.05,
        description="Fail the job when more than this share of records is invalid (bad JSON, missing fields, "
        "wrong types, empty text).",
        ge=0.0,
        le=1.0,
    )


# Record formats one job may mix across sources: they are rendered and masked the same way.
FORMAT_FAMILIES = ({"chat", "instruction"}, {"completion"}, {"classification"}, {"preference"})


class DataSource(Model):
    """One training source of a mixture: where it is, how to read it, and its share of the training records."""

    uri: str = _field(description="An s3:// object or prefix, as for train.", pattern=S3_URI_PATTERN)
    weight: float = _field(
        1.0,
        description="Relative share of the training examples drawn from this source (weights need not sum "
        "to 1). Sources are interleaved in proportion until the first one runs out.",
        gt=0,
        le=1e6,
    )
    format: Literal["chat", "instruction", "completion", "classification", "preference"] | None = _field(
        None,
        description="Record layout of this source; defaults to spec.dataset.format. chat and instruction "
        "sources mix (both are conversations).",
    )
    file_format: Literal["auto", "jsonl", "json", "parquet"] | None = _field(
        None, description="File format of this source; defaults to spec.dataset.fileFormat."
    )
    fields: FieldMapping | None = _field(
        None, description="Record keys of this source; defaults to spec.dataset.fields."
    )


# Names of inline credentials: never fields of the API; the CRD refuses them (see DatasetSpec).
INLINE_CREDENTIAL_FIELDS = ("accessKeyId", "secretAccessKey", "sessionToken")
INLINE_CREDENTIALS_MESSAGE = (
    "inline S3 credentials are not accepted; store them in a Secret and name it in spec.dataset.credentialsSecret"
)
REFUSED_PROPERTIES = "x-kubetune-refused-properties"


def _known_chat_template(value: str | None) -> str | None:
    """A chatTemplate value as given, or a ValueError saying why it is neither a known name nor Jinja."""
    why = chat_templates.problem(value) if value is not None else None
    if why:
        raise ValueError(why)
    return value


class DatasetSpec(Model):
    """Training and validation data in S3, and how to read it."""

    train: str | None = _field(
        None,
        description="Training data: an s3:// object or prefix of JSONL (.jsonl, .ndjson), JSON arrays (.json) "
        "or Parquet files, optionally gzipped. Set either train or sources.",
        pattern=S3_URI_PATTERN,
    )
    sources: list[DataSource] | None = _field(
        None, description="Several training sources mixed by weight, instead of train.", min_length=1, max_length=64
    )
    validation: str | None = _field(None, description="Held-out data, same layout as train.", pattern=S3_URI_PATTERN)
    validation_split: float | None = _field(
        None,
        description="Share of train records held out for evaluation when no validation set is given.",
        gt=0.0,
        lt=0.5,
    )
    format: Literal["chat", "instruction", "completion", "classification", "preference"] = _field(
        description="Record layout: chat messages, instruction prompt/response, completion text, "
        "classification text/label, or preference prompt/chosen/rejected (for training.objective dpo)."
    )
    file_format: Literal["auto", "jsonl", "json", "parquet"] = _field(
        "auto",
        description="File format: jsonl (one object a line), json (one array of objects), parquet; auto "
        "decides Parquet by extension and JSONL or JSON array by the first character.",
    )
    fields: FieldMapping = _field(default_factory=FieldMapping, description="Record keys for each format.")
    chat_template: str | None = _field(
        None,
        description="chat and instruction: the chat template to train with and serve with: a named one "
        "(chatml, llama3, zephyr) or inline Jinja. Defaults to the base tokenizer's own; a base without one "
        "needs this field. Exported beside the model as chat_template.jinja and passed to vLLM.",
        min_length=1,
        max_length=65536,
    )
    labels: list[str] | None = _field(
        None,
        description="classification: class names in id order, when labels in the data are names.",
        min_length=2,
    )
    preprocessing: Preprocessing = _field(
        default_factory=Preprocessing, description="Cleaning, filtering, tokenisation and packing."
    )
    endpoint: str | None = _field(
        None,
        description="S3 endpoint URL for every s3:// URI of this job (model, data, output); empty for AWS.",
        pattern=r"^https?://[^\s@/]+(:[0-9]+)?/?$",
    )
    region: str = _field("us-east-1", description="S3 region.", max_length=64)
    credentials_secret: str | None = _field(
        None,
        description="Name of a Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN). Keys are never accepted inline.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )
    # Inline keys are no fields at all (extra="forbid" refuses them here, with INLINE_CREDENTIALS_MESSAGE); the
    # CRD generator turns this list into properties the API server itself refuses (kubetune.crd), so that they
    # are never stored in etcd or a last-applied annotation, even without the admission webhook.
    model_config = ConfigDict(json_schema_extra={REFUSED_PROPERTIES: list(INLINE_CREDENTIAL_FIELDS)})

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        return _known_chat_template(v)

    def train_sources(self) -> list[DataSource]:
        """The training sources with every default filled in: sources, or train as a single source."""
        given = self.sources or [DataSource(uri=self.train or "")]
        return [
            src.model_copy(
                update={
                    "format": src.format or self.format,
                    "file_format": src.file_format or self.file_format,
                    "fields": src.fields or self.fields,
                }
            )
            for src in given
        ]

    def train_uris(self) -> list[str]:
        """Every training URI (train or each source's)."""
        return [s.uri for s in self.sources] if self.sources else [self.train] if self.train else []


class LoraSpec(Model):
    """LoRA adapter settings (peft)."""

    r: int = _field(16, description="Rank of the update matrices.", ge=1, le=1024)
    alpha: int = _field(32, description="Scaling numerator: updates are scaled by alpha / r.", ge=1, le=4096)
    dropout: float = _field(0.05, description="Dropout on the LoRA input.", ge=0.0, lt=1.0)
    target_modules: list[str] = _field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the modules to adapt; ['all-linear'] adapts every linear layer.",
        min_length=1,
    )


class DeepSpeedSpec(Model):
    """DeepSpeed ZeRO settings."""

    zero_stage: Literal[2, 3] = _field(
        2, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also shards the weights."
    )
    offload: Literal["none", "cpu"] = _field("none", description="Offload optimizer state (and ZeRO-3 weights) to CPU.")


class CheckpointSpec(Model):
    """How often checkpoints are written to spec.output.uri and how many are kept."""

    interval_steps: int = _field(100, description="Write a checkpoint every this many optimizer steps.", ge=1)
    keep: int = _field(3, description="Number of latest checkpoints to keep.", ge=1, le=100)


class EarlyStoppingSpec(Model):
    """Stop when the evaluation loss stops improving."""

    patience: int = _field(3, description="Evaluations without improvement before stopping.", ge=1)
    min_delta: float = _field(0.0, description="Smallest decrease of evalLoss that counts as improvement.", ge=0.0)


class DpoSpec(Model):
    """Direct Preference Optimization settings."""

    beta: float = _field(
        0.1,
        description="Strength of the pull towards the reference model (DPO's beta; higher stays closer).",
        gt=0.0,
        le=100.0,
    )


class TrainingSpec(Model):
    """How to train."""

    method: Literal["lora", "full"] = _field("lora", description="LoRA adapters (peft) or full fine-tuning.")
    objective: Literal["sft", "dpo"] | None = _field(
        None,
        description="sft (supervised fine-tuning, when unset) or dpo (Direct Preference Optimization on "
        "preference data; the reference model is the base: LoRA's adapters switched off, or for full "
        "fine-tuning the base's log-probabilities computed before the first update).",
    )
    dpo: DpoSpec | None = _field(
        None, description="DPO settings; only with objective dpo (defaults apply when omitted)."
    )
    lora: LoraSpec | None = _field(
        None, description="LoRA settings; only with method lora (defaults apply when omitted)."
    )
    epochs: float = _field(1.0, description="Passes over the training data.", gt=0, le=1000)
    max_steps: int | None = _field(None, description="Stop after this many optimizer steps (overrides epochs).", ge=1)
    learning_rate: float = _field(2e-4, description="Peak learning rate.", gt=0, lt=1)
    per_device_batch_size: int = _field(4, description="Sequences per worker per micro-step.", ge=1, le=4096)
    gradient_accumulation_steps: int = _field(1, description="Micro-steps per optimizer step.", ge=1, le=4096)
    warmup_ratio: float = _field(0.03, description="Share of steps spent warming up the learning rate.", ge=0, le=0.5)
    scheduler: Literal["cosine", "linear", "constant"] = _field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = _field(0.0, description="AdamW weight decay.", ge=0, le=1)
    max_grad_norm: float = _field(1.0, description="Gradient clipping norm; 0 disables clipping.", ge=0)
    seed: int = _field(42, description="Seed for data order, initialisation and dropout.", ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _field(
        "auto", description="Training precision; auto is bf16 on GPUs and fp32 on CPUs."
    )
    deepspeed: DeepSpeedSpec = _field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings.")
    gradient_checkpointing: bool = _field(
        False,
        description="Recompute activations in the backward pass instead of keeping them: far less "
        "memory for long sequences, about a third more compute; the same loss.",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = _field(
        "auto",
        description="Attention implementation: auto is flash_attention_2 on GPUs where the flash-attn "
        "package is installed, else sdpa (PyTorch's scaled_dot_product_attention).",
    )
    liger_kernels: bool = _field(
        False,
        description="Fused Triton kernels from the liger-kernel package (RMSNorm, RoPE, SwiGLU, fused "
        "linear cross-entropy) for the architectures it supports; GPUs only, ignored on CPU.",
    )
    eval_interval_steps: int = _field(50, description="Evaluate every this many optimizer steps.", ge=1)
    max_eval_batches: int | None = _field(
        None, description="Cap on evaluation batches per evaluation (all when unset).", ge=1
    )
    checkpoint: CheckpointSpec = _field(
        default_factory=CheckpointSpec, description="Checkpoint interval and retention."
    )
    early_stopping: EarlyStoppingSpec | None = _field(
        None, description="Stop early when evalLoss stops improving; needs validation data."
    )
    max_worker_restarts: int = _field(
        3,
        description="Times Ray Train restarts the worker group inside the running Ray cluster after a "
        "training worker fails (process killed, node lost), each time from the latest complete checkpoint "
        "(Ray Train's FailureConfig.max_failures); 0 ends the attempt at the first lost worker. Failures "
        "beyond this count fail the Ray job, which spec.backoffLimit may retry on a new cluster.",
        ge=0,
        le=100,
    )
    max_preemption_restarts: int = _field(
        10,
        description="Times the worker group restarts after a node is preempted or drained; each "
        "preemption first writes a just-in-time checkpoint (Ray Train's FailureConfig."
        "max_preemption_failures, counted apart from maxWorkerRestarts).",
        ge=0,
        le=1000,
    )

    @property
    def lora_settings(self) -> LoraSpec:
        """The effective LoRA settings (defaults when the spec omits them)."""
        return self.lora or LoraSpec()


class SearchParameter(Model):
    """One dimension of the search space."""

    type: Literal["choice", "uniform", "loguniform", "randint"] = _field(
        description="choice picks from values; uniform/loguniform draw a float in [low, high]; randint an "
        "integer in [low, high]."
    )
    values: list[float] | None = _field(None, description="choice: the candidate values.")
    low: float | None = _field(None, description="Lower bound for uniform, loguniform and randint.")
    high: float | None = _field(None, description="Upper bound for uniform, loguniform and randint.")


class ObjectiveSpec(Model):
    """The metric trials are compared on."""

    metric: Literal["evalLoss", "perplexity", "accuracy"] = _field(
        "evalLoss", description="Metric on the held-out data."
    )
    mode: Literal["min", "max"] = _field("min", description="Whether lower or higher is better.")


class TuningSpec(Model):
    """Hyperparameter search with Ray Tune; the best trial is exported and deployed."""

    objective: ObjectiveSpec = _field(default_factory=ObjectiveSpec, description="What to optimise.")
    trials: int = _field(4, description="Number of trials.", ge=1, le=1000)
    max_concurrent_trials: int = _field(1, description="Trials that run at once.", ge=1, le=1000)
    algorithm: Literal["random", "grid"] = _field(
        "random", description="random samples the space; grid tries every combination of choice values."
    )
    early_stopping: Literal["none", "asha"] = _field(
        "none", description="asha stops trials whose objective lags at the same step (ASHA)."
    )
    max_steps_per_trial: int | None = _field(
        None, description="Optimizer steps per trial (defaults to the training settings).", ge=1
    )
    search_space: dict[str, SearchParameter] = _field(
        description="Tunable training fields (e.g. learningRate, lora.r) and their distributions.",
        min_length=1,
    )


class ImageSpec(Model):
    """Container images; empty fields use the operator's defaults."""

    trainer: str | None = _field(None, description="Trainer image (Ray + DeepSpeed + kubetune trainer).")
    inference: str | None = _field(None, description="Inference image (vLLM OpenAI server + weight fetcher).")


class HeadSpec(Model):
    """Resources of the Ray head pod (it coordinates; it does not train)."""

    cpu: str = _field("2", description="CPU request and limit.", pattern=QUANTITY_PATTERN)
    memory: str = _field("8Gi", description="Memory request and limit.", pattern=QUANTITY_PATTERN)


class ScratchSpec(Model):
    """Node-local disk of each Ray pod: the base model cache, checkpoint/export staging and spill files."""

    size: str = _field(
        "100Gi",
        description="Size of the scratch volume: the emptyDir's sizeLimit (or the claim's request) "
        "and the pod's ephemeral-storage request.",
        pattern=QUANTITY_PATTERN,
    )
    storage_class_name: str | None = _field(
        None,
        description="Use a generic ephemeral volume of this StorageClass (a per-pod claim, e.g. local "
        "NVMe) instead of an emptyDir; deleted with the pod.",
        max_length=253,
    )


class ResourcesSpec(Model):
    """Where and on what the training runs."""

    workers: int = _field(1, description="Training worker pods.", ge=1, le=1024)
    gpus_per_worker: int = _field(
        1,
        description="GPUs per worker pod; 0 trains on CPU. Each GPU runs one training rank (one Ray Train "
        "worker), so a job has workers x gpusPerWorker ranks.",
        ge=0,
        le=16,
    )
    ranks_per_worker: int | None = _field(
        None,
        description="Training ranks per worker pod. Unset: one per GPU (gpusPerWorker), or one on CPU; "
        "with GPUs it must equal gpusPerWorker.",
        ge=1,
        le=64,
    )
    cpu_per_worker: str = _field("8", description="CPU request and limit per worker.", pattern=QUANTITY_PATTERN)
    memory_per_worker: str = _field(
        "32Gi", description="Memory request and limit per worker.", pattern=QUANTITY_PATTERN
    )
    gpu_resource_name: str = _field("nvidia.com/gpu", description="Extended resource name of the GPUs.", max_length=253)
    head: HeadSpec = _field(default_factory=HeadSpec, description="Ray head pod resources.")
    scratch: ScratchSpec = _field(
        default_factory=ScratchSpec, description="Node-local scratch volume of the head and worker pods."
    )
    node_selector: dict[str, str] | None = _field(None, description="Node selector for worker pods.")
    tolerations: list[dict[str, Any]] | None = _field(
        None, description="Tolerations for the head and worker pods (core/v1 Toleration objects)."
    )
    images: ImageSpec = _field(default_factory=ImageSpec, description="Image overrides.")
    queue: str | None = _field(
        None,
        description="Kueue LocalQueue name, passed through as the kueue.x-k8s.io/queue-name label.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )


class OutputSpec(Model):
    """Where checkpoints, metrics and the final model go."""

    uri: str = _field(
        description="s3:// prefix; each incarnation of the job (its uid) writes checkpoints/, metrics.jsonl, "
        "model/ and eval/ under <uri>/<namespace>/<name>/<uid>/, so a job deleted and re-created with the "
        "same name never resumes, overwrites or deletes an earlier one's files.",
        pattern=S3_URI_PATTERN,
    )
    export_merged: bool = _field(False, description="With LoRA, also export the adapter merged into the base weights.")


class DeployResources(Model):
    """Resources of each inference replica."""

    gpus: int = _field(1, description="GPUs per replica; 0 serves on CPU.", ge=0, le=16)
    cpu: str = _field("4", description="CPU request and limit.", pattern=QUANTITY_PATTERN)
    memory: str = _field("16Gi", description="Memory request and limit.", pattern=QUANTITY_PATTERN)


class DeploySpec(Model):
    """Serving the fine-tuned model with vLLM's OpenAI-compatible server."""

    enabled: bool = _field(True, description="Deploy once training succeeds.")
    replicas: int = _field(1, description="Inference replicas.", ge=0, le=1000)
    served_model_name: str | None = _field(
        None, description="Model name clients pass to the API; defaults to the job's name.", max_length=253
    )
    mode: Literal["adapter", "merged"] | None = _field(
        None,
        description="adapter serves the LoRA adapter on its base (--enable-lora); merged serves the adapter "
        "merged into the base. Unset: adapter for LoRA; full fine-tunes are always served as a full model.",
    )
    resources: DeployResources = _field(default_factory=DeployResources, description="Resources per replica.")
    max_model_len: int | None = _field(None, description="vLLM --max-model-len.", ge=16)
    min_improvement: float | None = _field(
        None,
        description="Deploy only if the fine-tuned objective beats the base model's by at least this much "
        "(absolute; e.g. 0.01 evalLoss; for objective dpo, held-out preference accuracy, e.g. 0.05).",
        ge=0.0,
    )
    server: str | None = _field(
        None,
        description="Serve the LoRA adapter on the shared inference server of this name (declared by a "
        "ConfigMap of that name labelled kubetune.io/inference-server; docs/serving.md) instead of a dedicated "
        "Deployment; replicas and resources then come from the server's declaration.",
        pattern=SERVICE_NAME_PATTERN,
        max_length=63,
    )


class InferenceServerSpec(Model):
    """A shared multi-LoRA inference server (`server.yaml` of a ConfigMap labelled kubetune.io/inference-server):
    one vLLM Deployment on `baseModel` serving the adapter of every job whose spec.deploy.server names it."""

    base_model: str = _field(
        description="The base every adapter was trained on (s3:// prefix or hf://org/name); "
        "a job whose base differs is refused.",
        pattern=MODEL_URI_PATTERN,
    )
    revision: str | None = _field(None, description="hf:// base: the revision to load.", max_length=255)
    replicas: int = _field(1, description="Server replicas; each holds every adapter.", ge=0, le=1000)
    resources: DeployResources = _field(default_factory=DeployResources, description="Resources per replica.")
    max_lora_rank: int = _field(
        16,
        description="vLLM --max-lora-rank: the largest adapter rank served (one "
        "of 1, 8, 16, 32, 64, 128, 256, 320, 512).",
        ge=1,
        le=512,
    )
    max_loras: int = _field(
        4,
        description="vLLM --max-loras: adapters held on the device at once (others wait in CPU memory).",
        ge=1,
        le=256,
    )
    max_model_len: int | None = _field(None, description="vLLM --max-model-len.", ge=16)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _field("auto", description="Weights' dtype.")
    chat_template: str | None = _field(
        None,
        description="The chat template for every model on the server (vLLM --chat-template): a named one "
        "(chatml, llama3, zephyr) or inline Jinja; unset: the base's own. A job whose "
        "spec.dataset.chatTemplate resolves to another template is not served on the server.",
        min_length=1,
        max_length=65536,
    )
    endpoint: str | None = _field(None, description="S3 endpoint URL of an s3:// base; empty for AWS.", max_length=2048)
    region: str = _field("us-east-1", description="S3 region of the base.", max_length=64)
    credentials_secret: str | None = _field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for an s3:// base.",
        pattern=DNS_SUBDOMAIN_PATTERN,
    )
    image: str | None = _field(None, description="Inference image; default: the operator's.", max_length=1024)
    token_secret_ref: TokenSecretRef | None = _field(
        None,
        description="hf:// base: the Secret key (in the server's namespace) holding a Hugging Face access "
        "token (gated or private models); the server's pods get it as HF_TOKEN by secretKeyRef.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        return _known_chat_template(v)

    @model_validator(mode="after")
    def _token_for_hub_only(self) -> InferenceServerSpec:
        if self.token_secret_ref is not None and not self.base_model.startswith("hf://"):
            raise ValueError("tokenSecretRef: applies to hf:// models only")
        return self


class MlflowSpec(Model):
    """An MLflow tracking server the trainer logs the run to."""

    uri: str = _field(
        description="Tracking server URL (http or https, e.g. http://mlflow.mlops:5000); no credentials in it.",
        pattern=HTTP_URL_PATTERN,
        max_length=2048,
    )
    experiment: str | None = _field(
        None,
        description="Experiment name, created when missing; default <namespace>/<name> of the job.",
        min_length=1,
        max_length=500,
    )
    credentials_secret: str | None = _field(
        None,
        description="For a server that needs them: a Secret in the job's namespace with MLFLOW_TRACKING_TOKEN, "
        "or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; the trainer's pods get them by secretKeyRef.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )


class TrackingSpec(Model):
    """Experiment tracking: where the trainer also logs parameters, metrics, the evaluation and the model URI.
    A tracking server that is down never fails or slows the training (a warning is logged)."""

    mlflow: MlflowSpec = _field(description="MLflow tracking server.")


class FineTuneJobSpec(Model):
    """The desired fine-tune: model, data, training, where the result goes and how it is served."""

    model: ModelSpec = _field(description="Base model.")
    dataset: DatasetSpec = _field(description="Training data and preprocessing.")
    training: TrainingSpec = _field(default_factory=TrainingSpec, description="Training settings.")
    tuning: TuningSpec | None = _field(None, description="Optional hyperparameter search.")
    tracking: TrackingSpec | None = _field(None, description="Optional experiment tracking (MLflow).")
    resources: ResourcesSpec = _field(default_factory=ResourcesSpec, description="Compute resources.")
    output: OutputSpec = _field(description="Where results go.")
    deploy: DeploySpec = _field(default_factory=DeploySpec, description="Inference deployment.")
    suspend: bool = _field(False, description="Suspend training (passed to the RayJob; Kueue toggles it).")
    active_deadline_seconds: int | None = _field(
        None, description="Fail the training when it runs longer than this.", ge=1
    )
    backoff_limit: int = _field(
        0,
        description="Retries of the whole Ray job on a new Ray cluster after it failed (KubeRay's RayJob "
        "backoffLimit); each retry resumes from the latest complete checkpoint. Worker failures inside a running "
        "cluster are handled first by spec.training.maxWorkerRestarts.",
        ge=0,
        le=100,
    )

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        problems = cross_field_errors(self)
        if problems:
            raise ValueError("; ".join(f"{path}: {msg}" for path, msg in problems))
        return self


def cross_field_errors(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """Rules that span fields (Kubernetes 1.20 has no CEL): (wire path, message) for each broken rule."""
    errs: list[tuple[str, str]] = []
    t, d, m = spec.training, spec.dataset, spec.model
    r = spec.resources
    if r.ranks_per_worker is not None and r.gpus_per_worker > 0 and r.ranks_per_worker != r.gpus_per_worker:
        errs.append(("spec.resources.ranksPerWorker", "must equal gpusPerWorker (one rank per GPU) or be unset"))
    if spec.deploy.server and (t.method != "lora" or spec.deploy.mode == "merged"):
        errs.append(
            (
                "spec.deploy.server",
                "a shared inference server serves LoRA adapters on its base: needs "
                "training.method lora and deploy.mode adapter (or unset)",
            )
        )
    if m.token_secret_ref is not None and not m.uri.startswith("hf://"):
        errs.append(("spec.model.tokenSecretRef", "applies to hf:// models only"))
    if t.method == "full" and t.lora is not None:
        errs.append(("spec.training.lora", "LoRA settings are only allowed with method: lora"))
    if m.task == "sequence-classification":
        if m.num_labels is None:
            errs.append(("spec.model.numLabels", "required when task is sequence-classification"))
        if d.format != "classification":
            errs.append(("spec.dataset.format", "must be classification when task is sequence-classification"))
        if spec.deploy.enabled:
            errs.append(("spec.deploy.enabled", "serving is supported for task causal-lm only; set it to false"))
    elif d.format == "classification":
        errs.append(("spec.dataset.format", "classification data needs task: sequence-classification"))
    if d.labels is not None and m.num_labels is not None and len(d.labels) != m.num_labels:
        errs.append(("spec.dataset.labels", f"has {len(d.labels)} names but numLabels is {m.num_labels}"))
    errs.extend(_source_errors(d))
    errs.extend(_objective_errors(spec))
    if d.validation is not None and d.validation_split is not None:
        errs.append(("spec.dataset.validationSplit", "set either validation or validationSplit, not both"))
    has_eval = d.validation is not None or d.validation_split is not None
    if t.early_stopping is not None and not has_eval:
        errs.append(("spec.training.earlyStopping", "needs spec.dataset.validation or validationSplit"))
    p = d.preprocessing
    if p.max_chars is not None and p.max_chars < p.min_chars:
        errs.append(("spec.dataset.preprocessing.maxChars", "must be at least minChars"))
    if spec.deploy.mode is not None and t.method == "full":
        # A full fine-tune has no adapter to serve or merge: the full model is the only choice.
        errs.append(("spec.deploy.mode", "applies to LoRA only; a full fine-tune is served as a full model"))
    if spec.deploy.mode == "merged" and t.method == "lora" and not spec.output.export_merged:
        # The trainer writes merged weights only when asked; without them there is nothing to serve.
        errs.append(("spec.deploy.mode", "merged needs spec.output.exportMerged: true"))
    name = spec.deploy.served_model_name
    if name is not None and (not name or any(ch.isspace() for ch in name) or "=" in name):
        errs.append(("spec.deploy.servedModelName", "must be non-empty, without whitespace or '='"))
    if spec.deploy.min_improvement is not None and not has_eval:
        errs.append(("spec.deploy.minImprovement", "needs spec.dataset.validation or validationSplit"))
    if spec.tuning is not None:
        errs.extend(_tuning_errors(spec))
    return errs


def _objective_errors(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    t, d = spec.training, spec.dataset
    errs: list[tuple[str, str]] = []
    dpo = t.objective == "dpo"
    if dpo and d.format != "preference":
        errs.append(("spec.dataset.format", "objective dpo trains on preference data: set format: preference"))
    if d.format == "preference" and not dpo:
        errs.append(("spec.training.objective", "preference data needs objective: dpo"))
    if t.dpo is not None and not dpo:
        errs.append(("spec.training.dpo", "DPO settings are only allowed with objective: dpo"))
    if dpo and spec.model.task != "causal-lm":
        errs.append(("spec.training.objective", "dpo needs task: causal-lm"))
    return errs


def _source_errors(d: DatasetSpec) -> list[tuple[str, str]]:
    if (d.train is None) == (d.sources is None):
        return [("spec.dataset.train", "set either train or sources (exactly one)")]
    family = next(f for f in FORMAT_FAMILIES if d.format in f)
    return [
        (
            f"spec.dataset.sources[{i}].format",
            f"{s.format} records cannot be mixed with {d.format} (mixable: chat with instruction)",
        )
        for i, s in enumerate(d.sources or [])
        if s.format is not None and s.format not in family
    ]


def _tuning_errors(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    tuning = spec.tuning
    assert tuning is not None
    errs: list[tuple[str, str]] = []
    base = "spec.tuning"
    if spec.dataset.validation is None and spec.dataset.validation_split is None:
        errs.append((f"{base}", "needs spec.dataset.validation or validationSplit to compare trials"))
    if tuning.max_concurrent_trials > tuning.trials:
        errs.append((f"{base}.maxConcurrentTrials", "must not exceed trials"))
    if tuning.objective.metric == "accuracy" and spec.model.task != "sequence-classification":
        errs.append((f"{base}.objective.metric", "accuracy needs task: sequence-classification"))
    expected_mode = "max" if tuning.objective.metric == "accuracy" else "min"
    if tuning.objective.mode != expected_mode:
        errs.append((f"{base}.objective.mode", f"{tuning.objective.metric} is optimised with mode {expected_mode}"))
    for key, p in tuning.search_space.items():
        path = f"{base}.searchSpace.{key}"
        kind = TUNABLE_FIELDS.get(key)
        if kind is None:
            errs.append((path, f"not a tunable field (tunable: {', '.join(sorted(TUNABLE_FIELDS))})"))
            continue
        if key.startswith("lora.") and spec.training.method != "lora":
            errs.append((path, "LoRA fields are tunable only with training.method: lora"))
        if p.type == "choice":
            if not p.values:
                errs.append((f"{path}.values", "choice needs at least one value"))
            elif kind == "int" and any(v != int(v) for v in p.values):
                errs.append((f"{path}.values", f"{key} takes integers"))
            if p.low is not None or p.high is not None:
                errs.append((path, "choice takes values, not low/high"))
        else:
            if p.values is not None:
                errs.append((f"{path}.values", f"{p.type} takes low/high, not values"))
            if p.low is None or p.high is None:
                errs.append((path, f"{p.type} needs low and high"))
            elif p.low >= p.high:
                errs.append((f"{path}.low", f"must be below high ({p.low} >= {p.high})"))
            elif p.type == "loguniform" and p.low <= 0:
                errs.append((f"{path}.low", "loguniform needs low > 0"))
            if p.type == "randint" and kind != "int":
                errs.append((path, f"randint is for integer fields; {key} is a float"))
        if tuning.algorithm == "grid" and p.type != "choice":
            errs.append((path, "grid search takes choice parameters only"))
        if not any(e[0].startswith(path) for e in errs):
            candidates = [(f"{path}.values[{i}]", v) for i, v in enumerate(p.values or [])]
            candidates += [(f"{path}.{side}", v) for side, v in (("low", p.low), ("high", p.high)) if v is not None]
            for where, value in candidates:
                problem = _tunable_value_error(spec.training, key, value)
                if problem:
                    errs.append((where, problem))
    if tuning.algorithm == "grid" and all(p.type == "choice" and p.values for p in tuning.search_space.values()):
        combinations = 1
        for p in tuning.search_space.values():
            combinations *= len(p.values or [])
        if tuning.trials != combinations:
            errs.append(
                (
                    f"{base}.trials",
                    f"grid search runs every combination of the choice values once: "
                    f"{combinations} trials, so set trials: {combinations}",
                )
            )
    return errs


def _tunable_value_error(training: TrainingSpec, key: str, value: float) -> str | None:
    """Why a search-space value breaks the tuned field's own rule (e.g. learningRate 2: must be below 1), or None."""
    wire = training.wire()
    *parents, leaf = key.split(".")
    node = wire
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = int(value) if TUNABLE_FIELDS[key] == "int" and value == int(value) else value
    try:
        TrainingSpec.model_validate(wire)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            if ".".join(str(x) for x in e["loc"]) in (key, leaf) or tuple(e["loc"])[-1:] == (leaf,):
                return f"{value:g} is not a valid {key}: {str(e['msg']).removeprefix('Value error, ')}"
    return None


# --------------------------------------------------------------------------------------------- status


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = _field(description="PascalCase condition type, e.g. Succeeded.")
    status: Literal["True", "False", "Unknown"] = _field(description="True, False or Unknown.")
    reason: str = _field("", description="CamelCase reason.")
    message: str = _field("", description="Human-readable detail.")
    last_transition_time: str | None = _field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = _field(None, description="The spec generation the condition reflects.")


class RayJobStatus(Model):
    """The RayJob that runs the training."""

    name: str | None = _field(None, description="RayJob name.")
    job_id: str | None = _field(None, description="Ray job submission id.")
    dashboard_url: str | None = _field(None, alias="dashboardURL", description="Ray dashboard URL.")
    job_status: str | None = _field(None, description="KubeRay jobStatus (PENDING, RUNNING, SUCCEEDED, ...).")
    job_deployment_status: str | None = _field(None, description="KubeRay jobDeploymentStatus.")


class Progress(Model):
    """Training progress, reported by the trainer's rank 0."""

    step: int | None = _field(None, description="Optimizer steps done.")
    total_steps: int | None = _field(None, description="Optimizer steps planned.")
    epoch: float | None = _field(None, description="Fractional epoch.")
    loss: float | None = _field(None, description="Recent training loss.")
    eval_loss: float | None = _field(None, description="Latest evaluation loss.")
    preference_accuracy: float | None = _field(
        None,
        description="objective dpo: latest held-out share of pairs where the model finds the chosen response "
        "likelier than the rejected one.",
    )
    reward_margin: float | None = _field(
        None, description="objective dpo: latest held-out mean implicit reward of chosen minus rejected."
    )
    tokens_per_second: float | None = _field(None, description="Training throughput over all workers.")
    eta_seconds: int | None = _field(None, description="Estimated seconds left.")
    percent: int | None = _field(None, description="Share of planned steps done, 0-100.", ge=0, le=100)
    trial: str | None = _field(None, description="The trial reporting, during tuning.")
    updated_at: str | None = _field(None, description="When this was reported (RFC 3339).")


class StartupTimes(Model):
    """Where the time before the first training step went (seconds), reported by the trainer's rank 0."""

    ray_start_seconds: float | None = _field(None, description="Starting or joining the Ray cluster (driver).")
    data_seconds: float | None = _field(
        None,
        description="Data preparation on the driver (read, clean, tokenise, pack, shard), then loading the "
        "worker's shard.",
    )
    worker_start_seconds: float | None = _field(None, description="Ray Train starting the worker group.")
    model_load_seconds: float | None = _field(None, description="Base model fetched (node cache) and loaded.")
    deepspeed_init_seconds: float | None = _field(
        None, description="The process group and the DeepSpeed engine set up."
    )
    resume_seconds: float | None = _field(None, description="Finding and loading the checkpoint to resume from.")
    base_eval_seconds: float | None = _field(None, description="The base model's held-out evaluation.")
    first_step_seconds: float | None = _field(None, description="The first training step itself.")
    time_to_first_step_seconds: float | None = _field(
        None, description="From the trainer's start to the end of its first training step."
    )


class DataStats(Model):
    """What preprocessing saw."""

    records: int | None = _field(None, description="Records read.")
    train_records: int | None = _field(None, description="Records kept for training.")
    validation_records: int | None = _field(None, description="Records kept for evaluation.")
    duplicates_removed: int | None = _field(None, description="Exact and near duplicates dropped.")
    filtered: int | None = _field(None, description="Records dropped by length filters.")
    invalid_records: int | None = _field(None, description="Records that could not be used.")
    invalid_by_reason: dict[str, int] | None = _field(None, description="Invalid records per reason.")
    tokens: int | None = _field(None, description="Training tokens after tokenisation.")
    sequences: int | None = _field(None, description="Training sequences after packing.")
    source_records: list[int] | None = _field(
        None, description="Examples kept from each of spec.dataset.sources, in order (mixtures only)."
    )


class CheckpointRef(Model):
    """A complete checkpoint."""

    step: int = _field(description="Optimizer step.")
    uri: str = _field(description="s3:// prefix of the checkpoint.")
    eval_loss: float | None = _field(None, description="Evaluation loss at that step.")
    time: str | None = _field(None, description="When it was written (RFC 3339).")


class Restart(Model):
    """One restart of the training, and why it happened."""

    time: str | None = _field(None, description="When the restarted workers started (RFC 3339).")
    cause: Literal["WorkerFailed", "NodePreempted", "JobRetried"] = _field(
        description="WorkerFailed: Ray Train restarted the worker group after a worker was lost "
        "(maxWorkerRestarts); NodePreempted: after a node was preempted or drained, from its just-in-time "
        "checkpoint (maxPreemptionRestarts); JobRetried: a new Ray job (backoffLimit, a new Ray cluster)."
    )
    message: str | None = _field(None, description="Detail of the cause.")
    resumed_step: int = _field(0, description="The step training resumed at (0: from the start).")
    resumed_from: str | None = _field(None, description="s3:// prefix of the checkpoint resumed from.")
    trial: str | None = _field(None, description="The tuning trial that restarted, during tuning.")


class TrialStatus(Model):
    """One hyperparameter trial."""

    id: str = _field(description="Trial id.")
    params: dict[str, float] = _field(default_factory=dict, description="The trial's parameter values.")
    objective: float | None = _field(None, description="The trial's objective value.")
    state: str = _field("PENDING", description="PENDING, RUNNING, TERMINATED, EARLY_STOPPED or ERROR.")
    step: int | None = _field(None, description="Last reported step.")


class ModelArtifact(Model):
    """Where the exported model is."""

    uri: str | None = _field(None, description="s3:// prefix of the exported model (adapter or full weights).")
    base_uri: str | None = _field(None, description="Base model the adapter applies to.")
    merged_uri: str | None = _field(None, description="Merged weights, when exported.")
    kind: Literal["adapter", "full"] | None = _field(None, description="adapter or full.")
    chat_template: str | None = _field(
        None,
        description="File under uri holding the Jinja chat template the trainer rendered conversations "
        "with (e.g. chat_template.jinja); the inference server is started with it (--chat-template).",
        max_length=253,
    )


class EvaluationSummary(Model):
    """Base versus fine-tuned figures on the same held-out data."""

    metric: str | None = _field(None, description="Objective metric.")
    base: float | None = _field(None, description="Base model's value.")
    fine_tuned: float | None = _field(None, description="Fine-tuned model's value.")
    improvement: float | None = _field(None, description="How much better the fine-tune is (positive is better).")
    report_uri: str | None = _field(None, description="s3:// URI of the full JSON report.")


class Endpoint(Model):
    """How to reach the deployed model."""

    url: str | None = _field(None, description="Base URL of the OpenAI-compatible API (ends in /v1).")
    model: str | None = _field(None, description="Model name to pass in requests.")


class FineTuneJobStatus(Model):
    """Observed state; written by the operator (and progress by the trainer)."""

    model_config = ConfigDict(extra="ignore")  # older operators' leftovers must not break parsing

    observed_generation: int | None = _field(None, description="Spec generation last reconciled.")
    state: str | None = _field(
        None,
        description="One-word summary derived from the conditions, for display: Pending, Training, Suspended, "
        "Succeeded, Deploying, Deployed, Failed.",
    )
    conditions: list[Condition] = _field(default_factory=list, description="Current conditions.")
    ray_job: RayJobStatus | None = _field(None, description="The RayJob.")
    progress: Progress | None = _field(None, description="Training progress.")
    data: DataStats | None = _field(None, description="Data statistics.")
    startup: StartupTimes | None = _field(None, description="Where the time before the first training step went.")
    checkpoints: list[CheckpointRef] | None = _field(None, description="Latest checkpoints.")
    restarts: list[Restart] | None = _field(
        None, description="Restarts of the training within this job (latest 20), each with its cause."
    )
    trials: list[TrialStatus] | None = _field(None, description="Hyperparameter trials.")
    best_trial: str | None = _field(None, description="Id of the best trial.")
    evaluation: EvaluationSummary | None = _field(None, description="Evaluation summary.")
    model: ModelArtifact | None = _field(None, description="Exported model.")
    endpoint: Endpoint | None = _field(None, description="Inference endpoint.")
    start_time: str | None = _field(None, description="When training started.")
    completion_time: str | None = _field(None, description="When training finished.")
    spec_hash: str | None = _field(None, description="Hash of the training fields the running job was built from.")


# -------------------------------------------------------------------------------- trainer config


class JobRef(Model):
    """Which FineTuneJob the trainer works for."""

    name: str = _field(description="FineTuneJob name.")
    namespace: str = _field("default", description="FineTuneJob namespace.")
    uid: str | None = _field(None, description="FineTuneJob uid.")


class ReportingSpec(Model):
    """Where the trainer reports progress."""

    kubernetes: bool = _field(True, description="Patch the FineTuneJob status through the in-cluster ServiceAccount.")
    min_interval_seconds: float = _field(10.0, description="Least time between status patches.", ge=0)


class TrainerConfig(Model):
    """The resolved config the operator hands the trainer (a ConfigMap, mounted as JSON)."""

    job: JobRef = _field(description="The FineTuneJob.")
    spec: FineTuneJobSpec = _field(description="The FineTuneJob's spec.")
    run_uri: str = _field(
        description="s3:// prefix for this job's outputs: <output.uri>/<namespace>/<name>/<uid> (see run_uri)."
    )
    reporting: ReportingSpec = _field(default_factory=ReportingSpec, description="Progress reporting.")

    @property
    def checkpoints_uri(self) -> str:
        return f"{self.run_uri}/checkpoints"

    @property
    def model_uri(self) -> str:
        return f"{self.run_uri}/model"

    @property
    def metrics_uri(self) -> str:
        return f"{self.run_uri}/metrics.jsonl"

    @property
    def eval_uri(self) -> str:
        return f"{self.run_uri}/eval"


def run_uri(output_uri: str, namespace: str, name: str, uid: str | None) -> str:
    """The prefix all of one job incarnation's outputs live under: <output>/<namespace>/<name>/<uid>.

    The uid makes each incarnation its own run: a FineTuneJob deleted and re-created with the same name (a new
    uid) starts from step 0 and never resumes, overwrites or deletes the earlier one's checkpoints or model.
    The operator always passes the job's metadata.uid and `kubetune run` a fresh one per run; only configs
    made without a Kubernetes object (library use, tests) have none and write under <output>/<namespace>/<name>.
    """
    base = f"{output_uri.rstrip('/')}/{namespace}/{name}"
    if uid is None:
        return base
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", uid):
        raise ValueError(f"a job uid is letters, digits, '.', '_' and '-', got {uid!r}")
    return f"{base}/{uid}"


def resolve_trainer_config(name: str, namespace: str, uid: str | None, spec: FineTuneJobSpec) -> TrainerConfig:
    """The config the trainer runs with: the spec with every default filled in, plus where to write."""
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid),
        spec=spec,
        run_uri=run_uri(spec.output.uri, namespace, name, uid),
    )


# -------------------------------------------------------------------------------------- parsing


class SpecError(ValueError):
    """An invalid FineTuneJob spec; ``errors`` holds (wire path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))


_CROSS_FIELD_LINE = re.compile(r"(spec(?:\.[A-Za-z0-9_\-]+(?:\[\d+\])?)+): ([^;]+)")


_PATTERN_MEANING = {
    S3_URI_PATTERN: "must be an s3:// URI such as s3://bucket/prefix (lowercase bucket, no credentials)",
    MODEL_URI_PATTERN: "must be s3://bucket/prefix or hf://org/name (no credentials)",
    DNS_LABEL_PATTERN: "must be a DNS label (lowercase letters, digits and '-')",
    DNS_SUBDOMAIN_PATTERN: "must be a DNS name (lowercase letters, digits, '-' and '.')",
    QUANTITY_PATTERN: "must be a Kubernetes quantity such as 4, 500m or 16Gi",
    HTTP_URL_PATTERN: "must be an http:// or https:// URL such as http://mlflow.mlops:5000 (no credentials)",
}


def _loc_path(root: str, loc: tuple[Any, ...]) -> str:
    parts = [root]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def errors_from_validation(exc: ValidationError, root: str = "spec") -> list[tuple[str, str]]:
    """Turn pydantic errors into (wire path, message) pairs, with cross-field rules split back out."""
    out: list[tuple[str, str]] = []
    for e in exc.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"] and e["loc"][-1] in INLINE_CREDENTIAL_FIELDS:
            msg = INLINE_CREDENTIALS_MESSAGE
        if e["type"] == "string_pattern_mismatch":
            meaning = _PATTERN_MEANING.get((e.get("ctx") or {}).get("pattern", ""))
            msg = meaning or msg  # never echo the input: a malformed URI may carry a key
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        found = _CROSS_FIELD_LINE.findall(msg) if e["type"] == "value_error" else []
        if found:
            out.extend((p, m.strip()) for p, m in found)
        else:
            out.append((_loc_path(root, loc), msg))
    return out


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a wire-format spec; raise SpecError naming every bad field."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(errors_from_validation(exc)) from None


def parse_manifest(obj: dict[str, Any]) -> tuple[str, str, FineTuneJobSpec]:
    """Parse a whole FineTuneJob manifest into (name, namespace, spec)."""
    errs: list[tuple[str, str]] = []
    if obj.get("apiVersion") != API_VERSION:
        errs.append(("apiVersion", f"must be {API_VERSION}"))
    if obj.get("kind") != KIND:
        errs.append(("kind", f"must be {KIND}"))
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not re.match(DNS_LABEL_PATTERN, name) or len(name) > 63:
        errs.append(("metadata.name", "must be a DNS label (lowercase letters, digits, '-'; at most 63)"))
    if not isinstance(obj.get("spec"), dict):
        errs.append(("spec", "required"))
    if errs:
        raise SpecError(errs)
    return name, meta.get("namespace") or "default", parse_spec(obj["spec"])
