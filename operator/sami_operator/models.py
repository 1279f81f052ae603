"""The SAMIRun API: spec and status as pydantic models.

This module is the one source of truth for the API (docs/architecture.md, 'One source of truth
for the API'): the CRD in crds/ and in the Helm chart is generated from these models (`sami
crd`), the operator, the local runner and `sami validate` all parse a SAMIRun through them, and
each field's description becomes `kubectl explain` text. Keys are camelCase as in every
Kubernetes API; unknown keys are errors.

Pure: pydantic only, no I/O, importable by both the operator and the worker programs.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "sami.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SAMIRun"
PLURAL = "samiruns"
SINGULAR = "samirun"
SHORT_NAMES = ["sami"]

# A Kubernetes resource quantity ("4", "16Gi", "500m", "1e3").
QUANTITY_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$"
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_QUANTITY_SUFFIXES = {
    "": 1,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")},
}


def _check_quantity(where: str, value: Quantity) -> None:
    if not _QUANTITY_RE.match(str(value)):
        raise ValueError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")


def quantity_value(value: Quantity) -> float:
    """A valid quantity as a number ("16Gi" -> 17179869184.0, "500m" -> 0.5)."""
    number, suffix = _QUANTITY_RE.match(str(value)).groups()
    if suffix and suffix[0] in "eE" and len(suffix) > 1:
        return float(number + suffix)
    return float(number) * _QUANTITY_SUFFIXES[suffix or ""]


# Bounds of the API that fix how long the names of a run's children can get (see MAX_RUN_NAME).
MAX_ITERATIONS = 100
MAX_RESTARTS = 100
MAX_NODES = 1024

# ---------------------------------------------------------------------------------------------
# Names
#
# A run's children are named <run>-it<N>-<stage>[-r<attempt>] (builders.child_name), and the
# training launchers name pods and Services after a child: PyTorchJob <child>-master-0 and
# <child>-worker-<i>, JobSet <child>-node-<job>-<pod> (the pod's hostname under the JobSet's
# headless Service). Pod hostnames and Service names are DNS-1035 labels of at most 63
# characters, and the PyTorchJob and JobSet webhooks refuse a name that starts with a digit, so
# the run name is held to the same rule with room left for the longest suffix.
DNS_LABEL_MAX = 63
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_DNS_1035_RE = re.compile(DNS_1035_LABEL)
# A namespace's name: a DNS-1123 label.
_DNS_1123_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# attempt: the first try and up to training.maxRestarts retries.
_LONGEST_ATTEMPT = f"-r{MAX_RESTARTS + 1}"
# What a launcher appends to a training child's name (builders.build_pytorchjob/build_jobset).
LONGEST_POD_SUFFIX = max(
    ("-master-0", f"-worker-{MAX_NODES - 2}", f"-node-{MAX_NODES - 1}-0"), key=len
)
# The longest child name leaves room for LONGEST_POD_SUFFIX.
MAX_CHILD_NAME = DNS_LABEL_MAX - len(LONGEST_POD_SUFFIX)
# The stages' name stems (planner.plan, planner.cleanup_stage).
_LONGEST_STEM = max(
    [f"-it{MAX_ITERATIONS}-{s}" for s in ("generate", "train", "evaluate")]
    + ["-principles", "-reference", "-cleanup"],
    key=len,
)
LONGEST_CHILD_SUFFIX = _LONGEST_STEM + _LONGEST_ATTEMPT
MAX_RUN_NAME = MAX_CHILD_NAME - len(LONGEST_CHILD_SUFFIX)


def check_run_name(name: str) -> str:
    """A SAMIRun's metadata.name, or ValueError saying which rule it breaks."""
    shown = repr(name if len(name) <= 40 else name[:37] + "...")
    if not _DNS_1035_RE.match(name):
        raise ValueError(
            f"{shown} is not a DNS-1035 label: use lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit (the PyTorchJob and "
            "JobSet of its training stages are named after it and must be DNS-1035 labels)"
        )
    if len(name) > MAX_RUN_NAME:
        raise ValueError(
            f"{shown} is {len(name)} characters; at most {MAX_RUN_NAME}, so that child names "
            f"such as <run>{LONGEST_CHILD_SUFFIX} stay within {MAX_CHILD_NAME} characters and "
            f"the pod names launchers derive from them, such as <child>{LONGEST_POD_SUFFIX}, "
            f"within {DNS_LABEL_MAX}"
        )
    return name


# Free-form Kubernetes objects (tolerations, affinity, volumes, ...) are passed through to the
# child pods as written: the API server validates them against the core schemas when the child
# is created, and duplicating those schemas here would only drift.
KubeObject = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
]


class APIModel(BaseModel):
    """Base for every API object: camelCase keys, unknown fields rejected."""

    # Python code may build objects by field name; manifests are parsed by alias only
    # (validate.parse_samirun), so a snake_case key in YAML is an unknown field.
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset defaults omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------
# Model


class PromptFormat(str, Enum):
    chat = "chat"
    base = "base"


class Task(str, Enum):
    dialogue = "dialogue"
    summarization = "summarization"


class ModelSpec(APIModel):
    """The base (target) model: it is fine-tuned and also writes its own training data."""

    uri: str = Field(
        min_length=1,
        description="Base model: an s3:// URI of a Hugging Face folder, a local path, or a "
        "Hugging Face hub name.",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer location when it differs from the model's."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights dtype for generation and scoring; 'auto' follows the model config.",
    )
    prompt_format: PromptFormat = Field(
        default=PromptFormat.chat,
        description="'chat' renders prompts with the tokenizer's chat template; 'base' uses the "
        "paper's plain-text format prompts (for pretrained, non-instruct models).",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the hub.")


# ---------------------------------------------------------------------------------------------
# Principles


class Principle(APIModel):
    """One behaviour and its opposite."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$",
        description="Short identifier, lower case, e.g. 'concise'.",
    )
    definition: str = Field(min_length=1, description="The behaviour, one sentence.")
    antithesis: str = Field(min_length=1, description="The opposite behaviour, one sentence.")

    @model_validator(mode="after")
    def _antithesis_differs(self) -> Principle:
        if self.definition.strip() == self.antithesis.strip():
            raise ValueError(
                f"antithesis: must differ from the definition (principle {self.name!r})"
            )
        return self


class SecretKeyRef(APIModel):
    """A key inside a Secret in the SAMIRun's namespace."""

    name: str = Field(min_length=1, description="Secret name.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class Endpoint(APIModel):
    """An OpenAI-compatible chat completions endpoint."""

    url: str = Field(
        pattern=r"^https?://",
        description="Base URL of the OpenAI-compatible API, e.g. http://vllm.svc:8000/v1.",
    )
    model: str = Field(min_length=1, description="Model name to request from the endpoint.")
    api_key_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key, sent as 'Authorization: Bearer'; none "
        "for endpoints without auth. The key is sent only over https (or, with "
        "allowInsecureApiKey, over http to a loopback host); an http URL with a key fails the "
        "stage as bad input.",
    )
    allow_insecure_api_key: bool = Field(
        default=False,
        description="Send the API key over plain http when url's host is loopback (127.0.0.0/8, "
        "::1, localhost), e.g. a server beside the worker or `sami run`. Any other http host "
        "never gets the key. Only SAMI_API_KEY is sent this way, never OPENAI_API_KEY.",
    )
    timeout_seconds: float = Field(
        default=120, gt=0, le=3600, description="Per-request timeout (each attempt)."
    )


class PrincipleWriter(APIModel):
    """An LM that writes principles and antitheses from a short instruction."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.engine) || has(self.model)",
                    "message": "principles.writer.engine needs principles.writer.model",
                }
            ]
        }
    )

    model: str | None = Field(
        default=None,
        description="Writer model run locally with generation.backend (URI as in "
        "spec.model.uri). Exactly one of model and endpoint.",
    )
    endpoint: Endpoint | None = Field(
        default=None, description="Writer behind an OpenAI-compatible endpoint."
    )
    engine: EngineOverrides | None = Field(
        default=None,
        description="vLLM options of the writer model's engine, each over generation.engine's "
        "(only those set here differ); default: generation.engine. Only with model.",
    )
    instruction: str = Field(
        min_length=1,
        description="What the principles should be about, e.g. 'a helpful and harmless assistant'.",
    )
    count: int = Field(default=2, ge=1, le=64, description="How many principles to write.")
    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(default=1024, ge=16, le=16384, description="Answer length cap.")

    @model_validator(mode="after")
    def _one_source(self) -> PrincipleWriter:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("set exactly one of 'model' and 'endpoint'")
        if self.engine is not None and self.model is None:
            raise ValueError(
                "engine: vLLM options for a writer model that the principles worker loads "
                "itself (principles.writer.model), but the writer is an endpoint; remove "
                "principles.writer.engine"
            )
        return self


class PrinciplesSpec(APIModel):
    """Training principles (inline or written by an LM) and held-out principles."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.inline) != has(self.writer)",
                    "message": "set exactly one of principles.inline and principles.writer",
                }
            ]
        }
    )

    inline: list[Principle] | None = Field(
        default=None, min_length=1, description="Principles given by hand."
    )
    writer: PrincipleWriter | None = Field(
        default=None, description="Ask an LM to write the principles (the 'principles' stage)."
    )
    held_out: list[Principle] = Field(
        default_factory=list,
        description="Principles never used in training; evaluation reports them apart to "
        "measure generalisation.",
    )

    @model_validator(mode="after")
    def _check(self) -> PrinciplesSpec:
        if (self.inline is None) == (self.writer is None):
            raise ValueError("set exactly one of 'inline' and 'writer'")
        if self.inline is not None:
            _check_unique([p.name for p in self.inline], "inline")
        _check_unique([p.name for p in self.held_out], "heldOut")
        overlap = {p.name for p in self.inline or []} & {p.name for p in self.held_out}
        if overlap:
            raise ValueError(
                f"heldOut: must be disjoint from the training principles; "
                f"both contain {sorted(overlap)}"
            )
        return self


def _check_unique(names: list[str], where: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: principle names must be unique; repeated: {dupes}")


# ---------------------------------------------------------------------------------------------
# Constitutions


class ConstitutionMode(str, Enum):
    pair = "pair"
    diverse = "diverse"


class ConstitutionsSpec(APIModel):
    """How constitutions are sampled for each query (docs/method.md, 'Constitutions')."""

    per_query: int = Field(
        default=2,
        ge=2,
        le=16,
        description="C: constitutions (and responses) per query; the contrastive matrix is "
        "C x C. The paper uses 2.",
    )
    mode: ConstitutionMode = Field(
        default=ConstitutionMode.pair,
        description="'pair': constitution 0 keeps every principle, the others negate a "
        "non-empty subset. 'diverse': draw principlesPerConstitution principles, flip a coin "
        "per principle; the other constitutions flip them.",
    )
    principles_per_constitution: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Principles drawn per constitution in 'diverse' mode.",
    )
    seed: int = Field(default=0, ge=0, description="Seed for sampling and shuffling.")


# ---------------------------------------------------------------------------------------------
# Data


class HFAdapter(str, Enum):
    field = "field"
    hh_rlhf = "hh-rlhf"
    tldr = "tldr"


class QuerySource(APIModel):
    """Where queries come from: a file (JSONL/Parquet, local or S3) or a Hugging Face dataset."""

    uri: str | None = Field(
        default=None,
        description="JSONL or Parquet file: s3://bucket/key, file:// or a local path. "
        "Exactly one of uri and dataset.",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="File format; 'auto' goes by the file extension."
    )
    field: str = Field(default="query", min_length=1, description="Record field holding the query.")
    dataset: str | None = Field(
        default=None, description="Hugging Face dataset name, e.g. Anthropic/hh-rlhf."
    )
    split: str = Field(default="train", description="Dataset split.")
    subset: str | None = Field(default=None, description="Dataset configuration or data_dir.")
    adapter: HFAdapter = Field(
        default=HFAdapter.field,
        description="How a record becomes a query: 'field' reads `field`; 'hh-rlhf' takes the "
        "first human turn of `chosen`; 'tldr' takes `info.post`.",
    )
    count: int = Field(ge=1, le=1_000_000, description="How many queries to take from the source.")

    @model_validator(mode="after")
    def _one_source(self) -> QuerySource:
        if (self.uri is None) == (self.dataset is None):
            raise ValueError("set exactly one of 'uri' and 'dataset'")
        return self


# A data source is one QuerySource or a list of them. Pydantic names the form it validated
# against in an error's location (spec.data.train.list[QuerySource].1.count);
# validate.describe_error leaves these names out of the field path (spec.data.train[1].count).
ONE_SOURCE = "QuerySource"
SOURCE_LIST = "list[QuerySource]"
MAX_SOURCES = 64


def _source_form(value: Any) -> str | None:
    if isinstance(value, (dict, QuerySource)):
        return ONE_SOURCE
    if isinstance(value, (list, tuple)):
        return SOURCE_LIST
    return None  # neither: the union's own error, below


QuerySources = Annotated[
    Annotated[QuerySource, Tag(ONE_SOURCE)]
    | Annotated[
        Annotated[list[QuerySource], Field(min_length=1, max_length=MAX_SOURCES)],
        Tag(SOURCE_LIST),
    ],
    Discriminator(
        _source_form,
        custom_error_type="query_sources",
        custom_error_message="Input should be a query source (a mapping) or a list of them",
    ),
    # Kubernetes' structural schemas cannot type a field that is an object or a list: the CRD
    # keeps it as written (crd.build_structural_schema) and the models validate it.
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
]

_SOURCES_HELP = (
    f" One query source, or a list of up to {MAX_SOURCES} read in order and concatenated, "
    "each with its own count, adapter, subset and split (e.g. 1000 queries of HH-RLHF's "
    "helpful-base, then 1000 of its harmless-base); repeats are dropped within a source, not "
    "across sources."
)


def query_sources(sources: QuerySource | list[QuerySource]) -> list[QuerySource]:
    """A data field's sources as a list, in order (one source is a list of one)."""
    return [sources] if isinstance(sources, QuerySource) else list(sources)


def describe_sources(field: str, sources: QuerySource | list[QuerySource]) -> list[str]:
    """Each source's path in messages: `data.train` for one source, `data.train[i]` in a
    list."""
    if isinstance(sources, QuerySource):
        return [field]
    return [f"{field}[{i}]" for i in range(len(sources))]


class DataSpec(APIModel):
    """Training and held-out evaluation queries."""

    train: QuerySources = Field(
        description="Training queries: each iteration generates responses for all of them "
        "(the counts summed); training.steps decides how many of the generated query blocks "
        "train-t trains on." + _SOURCES_HELP
    )
    eval: QuerySources = Field(
        description="Held-out queries for evaluation (the paper uses 250 per query set): "
        "other files, or other splits of the datasets (split defaults to train), than "
        "data.train's." + _SOURCES_HELP
    )

    @model_validator(mode="after")
    def _held_out(self) -> DataSpec:
        def source(q: QuerySource):
            return (q.uri.rstrip("/"),) if q.uri else (q.dataset, q.subset, q.split)

        train = dict(
            zip(
                map(source, query_sources(self.train)),
                describe_sources("data.train", self.train),
                strict=True,
            )
        )
        for field, q in zip(
            describe_sources("eval", self.eval), query_sources(self.eval), strict=True
        ):
            if source(q) in train:
                subset = f" subset {q.subset!r}," if q.subset else ""
                where = q.uri or f"{q.dataset}{subset} split {q.split!r}"
                raise ValueError(
                    f"{field}: reads the same queries as {train[source(q)]} ({where}), so the "
                    "evaluation would not be held out: name another file or split (e.g. "
                    "split: test)"
                )
        return self


# ---------------------------------------------------------------------------------------------
# Generation


# engine.loadFormat: how a vLLM engine gets an s3:// model's weights.
LoadFormat = Literal["download", "stream"]
LOAD_FORMAT_HELP = (
    "How the engine gets an s3:// model's weights. download: the model folder is fetched "
    "to the cache volume first (once per node, verified against its manifest), then "
    "loaded. stream: vLLM's Run:ai model streamer reads the safetensors from S3 straight "
    "into the engine, so generation starts without a full download and nothing is written "
    "to disk (config and tokenizer files are fetched; the weights are checked by S3's "
    "transfer, not against the manifest's digests). Local and hub models load as usual; "
    "the transformers backend always downloads."
)


class EngineSpec(APIModel):
    """vLLM engine options."""

    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs per engine (tensor parallelism). Above 1, the pods of every stage "
        "whose engine has it (generate; evaluate and, with a writer model, principles, unless "
        "their engine overrides it) must ask for at least this many GPUs.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=64,
        le=1_048_576,
        description="Context length cap; default from the model config.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may use (on CPU builds: of host memory).",
    )
    enforce_eager: bool = Field(default=False, description="Skip CUDA graph capture / compilation.")
    load_format: LoadFormat = Field(default="download", description=LOAD_FORMAT_HELP)


class EngineOverrides(APIModel):
    """One engine's vLLM options that differ from generation.engine: each field left out (or
    null) is generation.engine's. No defaults of its own, so neither the API server nor a task
    file fills in a field the user did not set."""

    tensor_parallel_size: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs per engine (tensor parallelism); default generation.engine's. Above "
        "1, the pods of the stage that runs this engine must ask for at least this many GPUs.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=64,
        le=1_048_576,
        description="Context length cap; default generation.engine's.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may use; default generation.engine's.",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="Skip CUDA graph capture / compilation; default generation.engine's.",
    )
    load_format: LoadFormat | None = Field(
        default=None, description=LOAD_FORMAT_HELP + " Default generation.engine's."
    )

    def merged_over(self, default: EngineSpec) -> EngineSpec:
        """The engine: these options, falling back field by field to `default`. A null counts
        as unset: the API server drops nulls and task files are written without them."""
        own = {f: v for f in type(self).model_fields if (v := getattr(self, f)) is not None}
        return default.model_copy(update=own)


class FiltersSpec(APIModel):
    """Which generated pairs are dropped before training (docs/method.md, 'Generation')."""

    drop_empty: bool = Field(default=True, description="Drop empty responses.")
    drop_identical: bool = Field(
        default=True,
        description="Drop queries whose responses are identical across constitutions.",
    )
    debris_markers: list[str] = Field(
        default_factory=lambda: ["[insert", "[Insert"],
        description="Drop queries whose responses contain any of these template fragments.",
    )


# generation.shards: each shard is a pod (or a local process) of its own.
MAX_SHARDS = 512


class GenerationSpec(APIModel):
    """Sampling of the model's own training data."""

    backend: Literal["vllm", "transformers"] = Field(
        default="vllm",
        description="'vllm' (offline LLM.generate); 'transformers' is a slower fallback for "
        "environments where vLLM cannot run.",
    )
    max_new_tokens: int = Field(
        default=350,
        ge=1,
        le=32768,
        description="Response length cap in tokens (paper: 350).",
    )
    temperature: float = Field(
        default=0.0, ge=0, le=2, description="0 is greedy decoding, as in the paper."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling.")
    stop: list[str] = Field(
        default_factory=lambda: ["Human:", "###"],
        description="Turn markers: responses are cut at the first one.",
    )
    filters: FiltersSpec = Field(default_factory=FiltersSpec, description="Post-filters.")
    shards: int = Field(
        default=1,
        ge=1,
        le=MAX_SHARDS,
        description="Generate with this many workers at once, each a contiguous slice of "
        "data.train's queries with a dataset of its own (train reads them all, in order). "
        "The dataset is one worker's: greedy, and sampled where vLLM seeds each request (on "
        "GPUs; on CPUs the engine's seed applies per worker). On a cluster: an Indexed Job where "
        "Kubernetes has per-index retries (1.29+: the other shards run on when one fails, "
        "and the Job is retried once all are done), else one Job per shard (a failed shard "
        "is retried alone); a finished shard never generates again. `sami run` runs them as "
        "processes side by side, each on GPUs of its own where there are GPUs. At most the "
        "number of training queries.",
    )
    engine: EngineSpec = Field(
        default_factory=EngineSpec,
        description="vLLM engine options of every engine a run builds: generation's, and, "
        "unless evaluation.engine, evaluation.judge.engine or principles.writer.engine "
        "override some of them, evaluation's, the judge model's and the writer model's.",
    )

    def engine_with(self, overrides: EngineOverrides | None) -> EngineSpec:
        """One engine's vLLM options: `engine`, with a stage's `overrides` (evaluation.engine,
        evaluation.judge.engine, principles.writer.engine) over it field by field. The one
        place these are resolved: the spec's GPU checks and the workers call it."""
        return self.engine if overrides is None else overrides.merged_over(self.engine)


# ---------------------------------------------------------------------------------------------
# Training


class Launcher(str, Enum):
    pytorchjob = "PyTorchJob"
    jobset = "JobSet"
    trainjob = "TrainJob"
    job = "Job"


# What the launchers that start torchrun on several nodes wait for the last node by default:
# GPU node autoscaling (a few minutes) plus the pull of a worker image of about 15 GB.
DEFAULT_RENDEZVOUS_SECONDS = 1800


class OptimizerSpec(APIModel):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "rmsprop"] = Field(
        default="adamw", description="AdamW (paper, mistral-7b) or RMSprop (mixtral, llama3-70b)."
    )
    lr: float = Field(
        default=5e-7, gt=0, le=1, description="Peak learning rate (paper: 5e-7 for 7B models)."
    )
    weight_decay: float = Field(
        default=0.0, ge=0, le=1, description="Decoupled weight decay (AdamW) or L2 (RMSprop)."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Decay after warmup."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup.")
    grad_clip: float = Field(default=1.0, ge=0, description="Max global grad norm; 0 disables.")


# The attention and MLP projections of Llama, Mistral, Qwen2 and SmolLM2 (module names inside
# each decoder layer): LoRA on all of them is what the QLoRA paper found to match full
# fine-tuning best, and what TRL's and OpenRLHF's examples target.
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules outside the decoder layers: the scorer reads the LM head's weight directly
# (sami_worker/train.py, SamiScorer) and the embeddings are looked up, so an adapter on either
# would be skipped or unsupported.
LORA_REFUSED_TARGETS = ("lm_head", "embed_tokens")


class LoraSpec(APIModel):
    """LoRA adapters (Hu et al., 2021): W + (alpha / rank) * B A on each targeted linear
    layer, B zero at the start, only A and B trained."""

    rank: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="r, the adapters' inner dimension: trainable parameters grow linearly with "
        "it (16: about 0.6% of a 7B model's weights on the default targets).",
    )
    alpha: float = Field(
        default=32.0,
        gt=0,
        le=4096,
        description="Scale of the adapter's update: W + (alpha / rank) * B A. Keeping "
        "alpha / rank fixed when changing rank keeps the learning rate meaningful.",
    )
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input in training. 0 keeps a run's trajectory "
        "the same for any number of processes.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        min_length=1,
        description="Names of the linear layers inside each decoder layer that get an adapter "
        "(the last part of their module path). Default: the attention and MLP projections "
        "of Llama, Mistral, Qwen2 and SmolLM2. A model that lacks some of them needs its own "
        "list (Mixtral's experts are fused parameters, not linear layers: name its attention "
        "projections); the train stage names the valid ones. lm_head and embed_tokens are "
        "refused.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, names: list[str]) -> list[str]:
        refused = sorted(set(names) & set(LORA_REFUSED_TARGETS))
        if refused:
            raise ValueError(
                f"{refused} are outside the decoder layers and cannot get an adapter; "
                f"valid: linear layers inside a decoder layer, such as {list(LORA_DEFAULT_TARGETS)}"
            )
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ValueError(f"{bad}: a target is one module name (letters, digits, '_')")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"names a module more than once: {repeated}")
        return names


class TrainingSpec(APIModel):
    """SAMI fine-tuning per iteration."""

    iterations: int = Field(default=3, ge=1, le=MAX_ITERATIONS, description="T: SAMI iterations.")
    steps: int = Field(
        default=2,
        ge=1,
        le=1_000_000,
        description="Optimizer steps in iteration 1.",
    )
    steps_growth: Literal["constant", "linear"] = Field(
        default="linear",
        description="'linear': iteration t trains t x steps (the paper trains each iteration "
        "longer than the last); 'constant': every iteration trains `steps`.",
    )
    init: Literal["base", "previous"] = Field(
        default="base",
        description="'base': each iteration starts again from the base model (paper; the step "
        "count is the only regulariser). 'previous': continue from iteration t-1.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    micro_batch_queries: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Query blocks (each C x C sequences) per process per micro-step.",
    )
    gradient_accumulation: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Micro-steps per optimizer step (gradients really accumulate).",
    )
    score_eos: bool = Field(
        default=True,
        description="Score the end-of-sequence token after a response that ended with it, in "
        "training and in the evaluation's log-probs: how a response ends is part of following "
        "the constitution. false leaves it out, as the paper-era code did (an empty "
        "evaluation response is still scored as its EOS alone).",
    )
    precision: Literal["bf16", "bf16-mixed", "fp32"] = Field(
        default="bf16",
        description="Number formats, on GPU and CPU alike, and their memory per parameter "
        "sharded over all training processes. 'bf16': parameters, gradients and optimizer "
        "state in bfloat16, as in the paper's runs: 2 (weights) + 2 (gradients) + optimizer "
        "state (AdamW 4, RMSprop 2) = 8 or 6 bytes. 'bf16-mixed': float32 master weights and "
        "gradients, bfloat16 compute, gradients reduced in float32: 4 + 4 + (AdamW 8, RMSprop "
        "4) = 16 or 12 bytes. 'fp32': everything in float32 (16 or 12 bytes), slowest on GPU; "
        "the CPU examples use it.",
    )
    gradient_sync: Literal["microStep", "step"] = Field(
        default="microStep",
        description="When gradients are reduce-scattered. 'microStep': after every "
        "micro-step, so each process keeps only its shard (gradient memory falls with the "
        "number of processes). 'step': once per optimizer step, fewer collectives (faster for "
        "small models), but with gradientAccumulation > 1 every process holds the whole "
        "model's unsharded gradients between micro-steps (2 bytes per parameter in bf16, 4 in "
        "bf16-mixed and fp32: 141 or 282 GB for a 70B model).",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Keep only each decoder layer's input and recompute the layer's "
        "activations in backward: far less activation memory for about one extra forward "
        "pass of compute (the paper uses it for llama3-70b).",
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="Train LoRA adapters instead of every weight; absent or null: full-weight "
        "training, as in the paper. LoRA suits few GPUs and memory-bound runs on large "
        "models: the base weights stay frozen (no gradients, no optimizer state: only the "
        "adapters, well under 1% of the weights, are in the optimizer), so a 70B model in "
        "bf16 needs about 2 bytes per parameter sharded instead of 8. It changes what is "
        "learnt (a low-rank update), so results may differ from the paper's. Each "
        "iteration's checkpoint is the adapter merged into a full Hugging Face model, loaded "
        "by vLLM and by the next iteration like any other; the adapter alone is also saved "
        "under the train stage's adapter/.",
    )
    checkpoint_every: int = Field(
        default=50,
        ge=1,
        description="Save resumable training state every N optimizer steps.",
    )
    launcher: Launcher = Field(
        default=Launcher.pytorchjob,
        description="Training workload on Kubernetes: a Kubeflow Training Operator v1 "
        "PyTorchJob (kubeflow.org/v1), a JobSet (jobset.x-k8s.io/v1alpha2), a Kubeflow "
        "Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1, running the ClusterTrainingRuntime "
        "named by trainingRuntime), or a single-node batch/v1 Job.",
    )
    training_runtime: str = Field(
        default="torch-distributed",
        min_length=1,
        max_length=253,
        description="launcher TrainJob: the ClusterTrainingRuntime the TrainJob runs "
        "(spec.runtimeRef); a torch runtime whose trainer Job and container are named 'node', "
        "as Kubeflow Trainer's torch-distributed.",
    )
    rendezvous_seconds: int = Field(
        default=DEFAULT_RENDEZVOUS_SECONDS,
        ge=60,
        le=86400,
        description="Multi-node launchers (PyTorchJob, JobSet, TrainJob): how long torchrun on "
        "each node waits for the others to join (its rendezvous timeout), long enough for GPU "
        "node autoscaling and a large image pull on the slowest node.",
    )
    nodes: int = Field(default=1, ge=1, le=MAX_NODES, description="Training nodes (pods).")
    procs_per_node: int = Field(default=1, ge=1, le=64, description="Processes (GPUs) per node.")
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=MAX_RESTARTS,
        description="Retryable failures tolerated before the run fails.",
    )

    @model_validator(mode="after")
    def _launcher_fits(self) -> TrainingSpec:
        if self.launcher == Launcher.job and self.nodes != 1:
            raise ValueError(
                f"nodes: launcher Job runs on a single node, got nodes={self.nodes}; "
                "use PyTorchJob, JobSet or TrainJob for multi-node training"
            )
        return self

    def steps_for(self, iteration: int) -> int:
        """Optimizer steps for iteration t (1-based)."""
        return self.steps * iteration if self.steps_growth == "linear" else self.steps


# ---------------------------------------------------------------------------------------------
# Evaluation


class ReferenceModelSpec(ModelSpec):
    """A reference model (e.g. an instruct model): evaluated once on the held-out queries under
    the evaluation constitutions, never trained; each iteration is also judged against it."""

    uri: str = Field(
        min_length=1,
        description="Reference model: an s3:// URI of a Hugging Face folder, a local path, or "
        "a Hugging Face hub name.",
    )


JudgedConstitutions = Literal["kept", "all"]


class JudgeSpec(APIModel):
    """An LLM judge for win rates: each iteration's responses against the base model's (and an
    optional reference model's), for the same query and constitution (needs
    evaluation.includeBase)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.endpoint) != has(self.model)",
                    "message": "set exactly one of evaluation.judge.endpoint and "
                    "evaluation.judge.model",
                },
                {
                    "rule": "!has(self.engine) || has(self.model)",
                    "message": "evaluation.judge.engine needs evaluation.judge.model",
                },
            ]
        }
    )

    endpoint: Endpoint | None = Field(
        default=None,
        description="The judge behind an OpenAI-compatible endpoint (a vLLM server, a hosted "
        "API). Exactly one of endpoint and model.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description="A judge model that the evaluation worker loads itself, after the evaluated "
        "model, with generation.backend and evaluation.judge.engine (URI as in spec.model.uri; "
        "prompted with its chat template). No server needed; a small model is a weak judge.",
    )
    engine: EngineOverrides | None = Field(
        default=None,
        description="vLLM options of the judge model's engine, each over generation.engine's "
        "(only those set here differ; evaluation.engine does not apply to the judge); default: "
        "generation.engine. Only with model.",
    )
    reference: ReferenceModelSpec | None = Field(
        default=None,
        description="Also judge each iteration against this model's responses (e.g. an "
        "instruct model): the 'reference' stage evaluates it once, after the base model, on "
        "the same queries and evaluation constitutions; its win rates have baseline "
        "'reference'.",
    )
    both_orders: bool = Field(
        default=False,
        description="Judge every item as A/B and as B/A and average the two outcomes; "
        "default one order per item, chosen by a seeded coin (as in the paper).",
    )
    items: int = Field(
        default=250,
        ge=1,
        le=100_000,
        description="Items (query, constitution) judged per iteration and baseline, for "
        "training and for held-out principles each; a seeded sample, the same in every "
        "iteration.",
    )
    constitutions: JudgedConstitutions = Field(
        default="kept",
        description="Whose responses are judged: 'kept', those written under the evaluation "
        "constitution with every principle kept (the paper's win rates); 'all', those of every "
        "evaluation constitution, negated ones too, where the judge is asked which response "
        "better follows the antitheses.",
    )
    max_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Judge requests in flight at once (endpoint only; a model judges its "
        "prompts in batches).",
    )

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeSpec:
        if (self.endpoint is None) == (self.model is None):
            given = "both are" if self.endpoint is not None else "neither is"
            raise ValueError(
                f"set exactly one of 'endpoint' (an OpenAI-compatible server) and 'model' (a "
                f"model the evaluation worker loads itself); {given} set"
            )
        if self.engine is not None and self.model is None:
            raise ValueError(
                "engine: vLLM options for a judge model that the evaluation worker loads "
                "itself (evaluation.judge.model), but the judge is an endpoint; remove "
                "evaluation.judge.engine"
            )
        return self


class EvaluationSpec(APIModel):
    """Per-iteration evaluation on held-out queries."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.judge) || !has(self.includeBase) || self.includeBase",
                    "message": "evaluation.judge needs evaluation.includeBase: true",
                }
            ]
        }
    )

    constitutions: int = Field(
        default=4,
        ge=2,
        le=16,
        description="K evaluation constitutions: 2 (all kept, all negated) or 2^n (every "
        "variant of the n principles of a constitution, training and held-out alike); paper: 4 "
        "for two principles, 2 for diverse.",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=32768,
        description="Response cap for evaluation; default generation.maxNewTokens.",
    )
    include_base: bool = Field(
        default=True,
        description="Also evaluate the base model, reported as iteration 0.",
    )
    seeds: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Generation seeds per evaluation: each generates and scores every "
        "response again (that much more evaluation time) and the metrics report their spread "
        "over seeds (seedStderr), beside the spread over queries. Only sampled decoding "
        "(generation.temperature > 0) differs by seed.",
    )
    engine: EngineOverrides | None = Field(
        default=None,
        description="vLLM options of the engine that generates and scores the evaluated model's "
        "responses (evaluate and reference stages), each over generation.engine's (only those "
        "set here differ, e.g. a lower gpuMemoryUtilization for headroom while scoring); "
        "default: generation.engine.",
    )
    judge: JudgeSpec | None = Field(
        default=None,
        description="Optional LLM judge: win rates of each iteration against the base model "
        "(and an optional reference model).",
    )

    @model_validator(mode="after")
    def _judge_needs_base(self) -> EvaluationSpec:
        if self.judge is not None and not self.include_base:
            raise ValueError(
                "judge: needs evaluation.includeBase: true, got false; the judge compares each "
                "iteration's responses with the base model's, which includeBase evaluates"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Storage


class S3Credentials(APIModel):
    """S3 keys from a Secret in the run's namespace (values never leave the Secret)."""

    secret_name: str = Field(min_length=1, description="Secret in the run's namespace.")
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", description="Key of the secret access key in the Secret."
    )


class StorageSpec(APIModel):
    """Where datasets, checkpoints and metrics live: s3://bucket/prefix or a local directory."""

    uri: str = Field(
        min_length=1,
        description="s3://bucket/prefix, file:///path or a path. Outputs go under "
        "<uri>/<namespace>/<run>/<uid>/.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, SeaweedFS, ...); default AWS.",
    )
    region: str | None = Field(default=None, description="S3 region.")
    force_path_style: bool = Field(default=False, description="Path-style addressing.")
    credentials: S3Credentials | None = Field(
        default=None,
        description="Secret with S3 keys; omit to use ambient identity (the pods' service "
        "account, e.g. IRSA or workload identity).",
    )

    @model_validator(mode="after")
    def _credentials_need_s3(self) -> StorageSpec:
        if self.credentials is not None and not self.uri.startswith("s3://"):
            raise ValueError(f"credentials: only used with s3:// storage, got uri={self.uri!r}")
        return self


# ---------------------------------------------------------------------------------------------
# Pods


class ResourcesSpec(APIModel):
    """Container resources, as in a Pod spec (GPUs as e.g. nvidia.com/gpu)."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Minimum resources, e.g. {cpu: 8, memory: 64Gi}."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Maximum resources, e.g. {nvidia.com/gpu: 8}."
    )

    @model_validator(mode="after")
    def _quantities(self) -> ResourcesSpec:
        for part, values in (("requests", self.requests), ("limits", self.limits)):
            for name, value in values.items():
                _check_quantity(f"{part}.{name}", value)
        return self

    def gpus(self) -> tuple[int, str] | None:
        """(count, resource) of the largest GPU ask (a resource named like nvidia.com/gpu or
        amd.com/gpu, requested or limited), or None for a CPU-only container."""
        asks = [
            (int(quantity_value(value)), name)
            for values in (self.requests, self.limits)
            for name, value in values.items()
            if name.endswith("/gpu")
        ]
        best = max(asks, default=None)
        return best if best is not None and best[0] > 0 else None


# Pod labels the operator owns: its own, and Kueue's, which belong on the workload Kueue admits
# as a whole (a queue-name label on a pod hands that pod alone to Kueue's pod integration).
RESERVED_LABEL_PREFIXES = (f"{GROUP}/", "kueue.x-k8s.io/")
RESERVED_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/name")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY_RE = re.compile(
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$"
)
_LABEL_VALUE_RE = re.compile(rf"^({_LABEL_NAME})?$")


def _check_pod_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if key.startswith("kueue.x-k8s.io/"):
        raise ValueError(
            f"labels: {key!r} cannot be a pod label: Kueue admits each stage's Job, PyTorchJob "
            "or JobSet as a whole, and a pod with a Kueue label is queued on its own; set "
            "spec.queueName (or the label on the SAMIRun) instead"
        )
    if key.startswith(RESERVED_LABEL_PREFIXES) or key in RESERVED_LABELS:
        raise ValueError(
            f"labels: {key!r} is set by the operator on every stage pod (keys under "
            f"{RESERVED_LABEL_PREFIXES[0]}, {' and '.join(RESERVED_LABELS)}); choose another key"
        )
    if not _LABEL_KEY_RE.match(key) or len(name) > 63 or len(prefix) > 253:
        raise ValueError(
            f"labels: key {key!r} is not a label key: an optional DNS subdomain prefix and '/', "
            "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit"
        )
    if not _LABEL_VALUE_RE.match(value) or len(value) > 63:
        raise ValueError(
            f"labels: value {value!r} of {key!r} is not a label value: at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit, or empty"
        )


class PodSpec(APIModel):
    """Pod knobs applied to a stage's pods."""

    image: str | None = Field(default=None, description="Worker image; default: the operator's.")
    resources: ResourcesSpec | None = Field(
        default=None, description="Worker container resources (GPUs included)."
    )
    node_selector: dict[str, str] | None = Field(default=None, description="Pod nodeSelector.")
    tolerations: list[KubeObject] | None = Field(default=None, description="Pod tolerations.")
    affinity: KubeObject | None = Field(default=None, description="Pod affinity.")
    priority_class_name: str | None = Field(default=None, description="Pod priority class.")
    image_pull_secrets: list[str] | None = Field(
        default=None, description="Names of image pull Secrets."
    )
    service_account_name: str | None = Field(
        default=None,
        description="Service account (e.g. with cloud IAM for S3).",
    )
    volumes: list[KubeObject] | None = Field(default=None, description="Extra pod volumes.")
    volume_mounts: list[KubeObject] | None = Field(
        default=None, description="Extra mounts in the worker container."
    )
    env: list[KubeObject] | None = Field(default=None, description="Extra container env.")
    shm_size: Quantity | None = Field(
        default=None,
        description="Size of the memory-backed /dev/shm (NCCL and dataloaders need more than "
        "the 64Mi default); default 16Gi for training, 2Gi otherwise.",
    )
    cache_size: Quantity | None = Field(
        default=None,
        description="Size limit of the /var/cache/sami volume (an emptyDir on the node's "
        "disk) where workers download the model and training writes its export shards; also "
        "requested as the worker's ephemeral-storage unless resources set that, so the pod "
        "lands on a node with the room. A 70B bfloat16 model needs about 141 GB for the "
        "download plus up to 5 GB per export shard in flight. Default: no limit, no request.",
    )
    cache_volume: KubeObject | None = Field(
        default=None,
        description="The /var/cache/sami volume's source instead of an emptyDir, as a "
        "Kubernetes volume without its name, with exactly one of persistentVolumeClaim, "
        "ephemeral or csi (the sources Pod Security 'restricted' allows): e.g. "
        "{persistentVolumeClaim: {claimName: sami-models}}. A ReadWriteMany claim shared by "
        "the nodes fetches each model once for all pods and stages of a run (the first "
        "process to lock a model's folder downloads it, the others wait and reuse it; models "
        "are kept there across runs, keyed by URI); ephemeral gives each pod a fresh claim "
        "from a storage class. cacheSize does not apply to it.",
    )
    annotations: dict[str, str] | None = Field(default=None, description="Pod annotations.")
    labels: dict[str, str] | None = Field(
        default=None,
        description="Pod labels; keys under sami.dev/ and kueue.x-k8s.io/ and the "
        "app.kubernetes.io labels the operator sets are refused.",
    )
    security_context: KubeObject | None = Field(
        default=None,
        description="Pod securityContext, merged key by key over the defaults that meet Pod "
        "Security 'restricted': runAsNonRoot, runAsUser/runAsGroup/fsGroup 10001 (the worker "
        "image's user), seccompProfile RuntimeDefault.",
    )
    container_security_context: KubeObject | None = Field(
        default=None,
        description="Worker container securityContext, merged over the defaults "
        "(allowPrivilegeEscalation false, capabilities drop ALL); e.g. capabilities.add "
        "[IPC_LOCK] for RDMA, which fails Pod Security 'restricted' and 'baseline' (only "
        "NET_BIND_SERVICE may be added under 'restricted').",
    )
    automount_service_account_token: bool | None = Field(
        default=None,
        description="Mount the service account's API token. Default false: no stage talks "
        "to the Kubernetes API; IRSA, EKS Pod Identity and Azure Workload Identity inject "
        "their own projected token and GKE Workload Identity needs none. Set true for a setup "
        "that reads the mounted token.",
    )
    host_network: bool | None = Field(
        default=None,
        description="Run in the node's network namespace (some RDMA/RoCE fabrics); fails Pod "
        "Security 'baseline' and 'restricted'. Default false.",
    )
    dns_policy: Literal["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"] | None = (
        Field(
            default=None,
            description="Pod dnsPolicy; default ClusterFirst, or ClusterFirstWithHostNet with "
            "hostNetwork (training pods find each other by cluster DNS).",
        )
    )
    runtime_class_name: str | None = Field(
        default=None, description="Pod runtimeClassName (e.g. nvidia)."
    )
    scheduler_name: str | None = Field(
        default=None, description="Pod schedulerName (e.g. a gang or topology-aware scheduler)."
    )
    topology_spread_constraints: list[KubeObject] | None = Field(
        default=None, description="Pod topologySpreadConstraints."
    )

    @model_validator(mode="after")
    def _sizes(self) -> PodSpec:
        for where, value in (("shmSize", self.shm_size), ("cacheSize", self.cache_size)):
            if value is not None:
                _check_quantity(where, value)
        return self

    @model_validator(mode="after")
    def _cache_volume(self) -> PodSpec:
        if self.cache_volume is not None:
            keys = sorted(self.cache_volume)
            if len(keys) != 1 or keys[0] not in CACHE_VOLUME_SOURCES:
                raise ValueError(
                    f"cacheVolume: exactly one of {', '.join(CACHE_VOLUME_SOURCES)}, got "
                    f"{keys or 'none'}"
                )
            if not isinstance(self.cache_volume[keys[0]], dict):
                raise ValueError(f"cacheVolume.{keys[0]}: must be an object")
        return self

    @model_validator(mode="after")
    def _labels(self) -> PodSpec:
        for key, value in (self.labels or {}).items():
            _check_pod_label(key, value)
        return self

    def gpus(self) -> tuple[int, str] | None:
        """(count, resource) of the worker container's GPU ask; None: CPU only."""
        return self.resources.gpus() if self.resources is not None else None

    def merged_over(self, default: PodSpec) -> PodSpec:
        """This stage's settings, falling back field by field to `default`."""
        return default.model_copy(update={f: getattr(self, f) for f in self.model_fields_set})


# pods.*.cacheVolume: the volume sources Pod Security 'restricted' allows that can hold a
# shared or per-pod model cache.
CACHE_VOLUME_SOURCES = ("persistentVolumeClaim", "ephemeral", "csi")

# Pod fields a Kubeflow Trainer v2.3 TrainJob cannot set on its pods (its runtimePatches carry
# a PodSpecPatch without them): they come from the ClusterTrainingRuntime.
TRAINJOB_POD_FIELDS_FROM_RUNTIME = (
    "priority_class_name",
    "host_network",
    "dns_policy",
    "runtime_class_name",
    "scheduler_name",
    "topology_spread_constraints",
)


class PodsSpec(APIModel):
    """Pod settings: `default` for every stage, overridden field by field per stage."""

    default: PodSpec = Field(default_factory=PodSpec)
    principles: PodSpec = Field(default_factory=PodSpec)
    generate: PodSpec = Field(default_factory=PodSpec)
    train: PodSpec = Field(default_factory=PodSpec)
    evaluate: PodSpec = Field(
        default_factory=PodSpec,
        description="Evaluation pods: evaluate-t, and the reference model's evaluation.",
    )


# ---------------------------------------------------------------------------------------------
# Run-level settings


class DeadlinesSpec(APIModel):
    """Deadlines, in seconds; none by default."""

    start_seconds: int | None = Field(
        default=None,
        ge=60,
        description="Fail when a stage's pods do not all run within this many seconds of "
        "its workload's creation (the clock restarts when a pod is replaced or a queue "
        "suspends or admits the workload), or when the first stage has not started this "
        "long after the run's creation: image pull errors, unschedulable pods, pods that "
        "admission refuses, a queue that never admits the run. Unset: wait forever (the "
        "Stalled condition says why).",
    )
    active_seconds: int | None = Field(
        default=None, ge=60, description="Fail when the run takes longer."
    )


class CleanupSpec(APIModel):
    """What happens to children and storage."""

    children: Literal["keep", "deleteOnSuccess", "delete"] = Field(
        default="keep",
        description="Finished child workloads (with their task ConfigMaps): keep, delete all "
        "when the run succeeds, or delete a stage's as soon as it succeeds. Failed ones are "
        "kept for their logs until the run is deleted.",
    )
    storage_on_delete: Literal["retain", "delete"] = Field(
        default="retain",
        description="Whether deleting the SAMIRun deletes its storage prefix: with delete, "
        "the operator stops the run's workloads, runs a Job (worker image, the run's "
        "credentials) that empties <storage uri>/<namespace>/<run>/<uid>/, and only then lets "
        "the SAMIRun go.",
    )
    training_states: Literal["delete", "keep"] = Field(
        default="delete",
        description="Each train stage's resumable training states (state/ under the stage: "
        "sharded parameters and optimizer state; with AdamW about 6 bytes per parameter in "
        "bf16 and 12 in bf16-mixed or fp32, and the two newest saves): deleted once the stage "
        "has published its model and results, or kept (to continue training from them by hand).",
    )


class SAMIRunSpec(APIModel):
    """A SAMI run: principles, a base model, queries, and how to iterate."""

    model: ModelSpec = Field(description="The base model to align.")
    task: Task = Field(
        default=Task.dialogue,
        description="Prompt templates: 'dialogue' (assistant replies) or 'summarization'.",
    )
    principles: PrinciplesSpec
    constitutions: ConstitutionsSpec = Field(default_factory=ConstitutionsSpec)
    data: DataSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    storage: StorageSpec | None = Field(
        default=None,
        description="Where the run's data goes. Default: the operator's default storage "
        "(SAMI_DEFAULT_STORAGE, the chart's operator.defaultStorage); `sami run`: "
        "<workdir>/storage.",
    )
    pods: PodsSpec = Field(default_factory=PodsSpec)
    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue: set as kueue.x-k8s.io/queue-name on each stage's "
        "workload (Job, PyTorchJob or JobSet), which Kueue admits as a whole; never on its pods.",
    )
    suspend: bool = Field(
        default=False, description="Pause the run (see suspendPolicy); false resumes it."
    )
    suspend_policy: Literal["finishStage", "stopStage"] = Field(
        default="finishStage",
        description="What suspend does to a running stage: finishStage lets it finish and "
        "starts no new one; stopStage deletes its workload now and reruns the stage on "
        "resume (training resumes from its last checkpoint; the rerun counts as an attempt).",
    )
    deadlines: DeadlinesSpec = Field(default_factory=DeadlinesSpec)
    cleanup: CleanupSpec = Field(default_factory=CleanupSpec)

    @model_validator(mode="after")
    def _cross_field(self) -> SAMIRunSpec:
        c = self.constitutions.per_query
        inline = self.principles.inline
        if inline is not None:
            n = len(inline)
            if self.constitutions.mode == ConstitutionMode.pair and c - 1 > 2**n - 1:
                raise ValueError(
                    f"constitutions.perQuery: pair mode with {n} principle(s) has "
                    f"{2**n - 1} negating variant(s), so perQuery must be <= {2**n}, got {c}"
                )
            if self.constitutions.mode == ConstitutionMode.diverse:
                k = self.constitutions.principles_per_constitution
                if k > n:
                    raise ValueError(
                        f"constitutions.principlesPerConstitution: {k} exceeds the {n} "
                        "training principles"
                    )
                if c > 2**k:
                    raise ValueError(
                        f"constitutions.perQuery: diverse mode with {k} principles per "
                        f"constitution allows at most {2**k} distinct constitutions, got {c}"
                    )
        self._check_evaluation_constitutions()
        queries = sum(q.count for q in query_sources(self.data.train))
        if self.generation.shards > queries:
            raise ValueError(
                f"generation.shards: {self.generation.shards} shards for {queries} training "
                f"queries (data.train counts); use 1 to {queries}"
            )
        return self

    def _check_evaluation_constitutions(self) -> None:
        """evaluation.constitutions K is 2 (all kept, all negated) or 2^n (every variant of
        the n principles of an evaluation constitution) for the training principles and the
        held-out ones alike: nothing falls back to another K, and with it another MI
        ceiling (log K)."""
        k = self.evaluation.constitutions
        p = self.principles
        sets = {"training": len(p.inline) if p.inline is not None else p.writer.count}
        if p.held_out:
            sets["held-out"] = len(p.held_out)
        if self.constitutions.mode == ConstitutionMode.diverse:
            per = self.constitutions.principles_per_constitution
            sets = {name: min(n, per) for name, n in sets.items()}
        sizes = set(sets.values())
        if k == 2 or (k & (k - 1) == 0 and sizes == {k.bit_length() - 1}):  # k = 2^n
            return
        valid = sorted({2} | ({2 ** sizes.pop()} if len(sizes) == 1 else set()))
        counts = " and ".join(f"{n} {name}" for name, n in sets.items())
        raise ValueError(
            f"evaluation.constitutions: {k} is not 2 (all kept, all negated) or 2^n (every "
            f"variant of n principles) for evaluation constitutions of {counts} principles; "
            f"valid: {valid}"
        )

    @model_validator(mode="after")
    def _launcher_carries_the_pods(self) -> SAMIRunSpec:
        """A TrainJob can set only some pod fields of its trainer pods (its runtimePatches,
        builders.build_trainjob); the others come from the ClusterTrainingRuntime."""
        if self.training.launcher != Launcher.trainjob:
            return self
        pods = self.pods.train.merged_over(self.pods.default)
        for field in TRAINJOB_POD_FIELDS_FROM_RUNTIME:
            if getattr(pods, field) is not None:
                name = to_camel(field)
                where = "train" if field in self.pods.train.model_fields_set else "default"
                raise ValueError(
                    f"pods.{where}.{name}: launcher TrainJob cannot set {name} on the training "
                    f"pods; set it in the ClusterTrainingRuntime "
                    f"{self.training.training_runtime!r} instead (or set it on the other "
                    "stages' pods only)"
                )
        return self

    @model_validator(mode="after")
    def _fits_the_pods(self) -> SAMIRunSpec:
        """Processes and engines fit the GPUs their pods ask for. Pods without GPUs run on
        CPU: any number of training processes, but no tensor parallelism."""
        n = self.training.procs_per_node
        where, gpus = self._pod_gpus("train")
        if gpus is not None and n > gpus[0]:
            raise ValueError(
                f"training.procsPerNode: {n} processes per node but {where} asks for "
                f"{gpus[0]} {gpus[1]}; set procsPerNode <= {gpus[0]} or ask for more GPUs"
            )
        if self.generation.backend != "vllm":
            return self  # the transformers backend has no tensor parallelism
        for stage, field, overrides in self._engines():
            tp = self.generation.engine_with(overrides).tensor_parallel_size
            if tp == 1:
                continue
            if overrides is None or overrides.tensor_parallel_size is None:
                field = "generation.engine"  # where this engine's tensorParallelSize comes from
            where, gpus = self._pod_gpus(stage)
            if gpus is None:
                raise ValueError(
                    f"{field}.tensorParallelSize: {tp} GPUs per vLLM engine but {where} asks "
                    f"for no GPUs; ask for at least {tp} GPUs (e.g. nvidia.com/gpu: {tp}) or set "
                    "tensorParallelSize: 1"
                )
            if tp > gpus[0]:
                raise ValueError(
                    f"{field}.tensorParallelSize: {tp} GPUs per vLLM engine but {where} asks "
                    f"for {gpus[0]} {gpus[1]}; set tensorParallelSize <= {gpus[0]} or ask for "
                    "more GPUs"
                )
        return self

    def _engines(self) -> list[tuple[str, str, EngineOverrides | None]]:
        """Every vLLM engine a run builds: (the stage whose pods run it, the field of its
        overrides, the overrides); generation.engine under the overrides."""
        engines: list[tuple[str, str, EngineOverrides | None]] = []
        writer = self.principles.writer
        if writer is not None and writer.model is not None:
            engines.append(("principles", "principles.writer.engine", writer.engine))
        engines.append(("generate", "generation.engine", None))
        engines.append(("evaluate", "evaluation.engine", self.evaluation.engine))
        judge = self.evaluation.judge
        if judge is not None and judge.model is not None:
            engines.append(("evaluate", "evaluation.judge.engine", judge.engine))
        return engines

    def _pod_gpus(self, stage: str) -> tuple[str, tuple[int, str] | None]:
        """Where a stage's pods get their resources from (spec.pods.<stage>, else
        spec.pods.default; see PodSpec.merged_over) and the GPUs they ask for."""
        own: PodSpec = getattr(self.pods, stage)
        inherited = "resources" not in own.model_fields_set
        if inherited and "resources" in self.pods.default.model_fields_set:
            return "spec.pods.default", self.pods.default.gpus()
        return f"spec.pods.{stage}", own.merged_over(self.pods.default).gpus()


# ---------------------------------------------------------------------------------------------
# Status


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class StagePhase(str, Enum):
    pending = "Pending"
    queued = "Queued"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(APIModel):
    """A Kubernetes condition (metav1.Condition fields)."""

    type: str = Field(description="Condition type, e.g. Succeeded, Failed, Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason, e.g. InvalidSpec.",
    )
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class Sharding(str, Enum):
    """How a sharded stage (generation.shards > 1) runs its shards."""

    indexed_job = "IndexedJob"
    job_per_shard = "JobPerShard"
    processes = "Processes"


class ShardStatus(APIModel):
    """One shard of a sharded stage."""

    index: int = Field(ge=0, description="The shard's index: its slice of the queries.")
    phase: StagePhase = Field(
        default=StagePhase.pending, description="Pending, Queued, Running, Succeeded or Failed."
    )
    child: str | None = Field(
        default=None, description="The shard's own Job (JobPerShard); none in an Indexed Job."
    )
    attempts: int = Field(
        default=0,
        ge=0,
        description="Times the shard was started (in an Indexed Job: the Job's attempt it "
        "last ran in; under `sami run`: in this invocation).",
    )
    disruptions: int = Field(
        default=0, ge=0, description="Attempts whose pods were taken away (not counted)."
    )
    message: str | None = Field(default=None, description="Why the shard is where it is.")


class StageStatus(APIModel):
    """One stage of one iteration."""

    phase: StagePhase = Field(
        default=StagePhase.pending,
        description="Pending, Queued (admitted by no queue yet), Running, Succeeded or Failed.",
    )
    child: str | None = Field(default=None, description="Name of the child workload.")
    attempts: int = Field(default=0, ge=0, description="Children created for this stage.")
    disruptions: int = Field(
        default=0,
        ge=0,
        description="Attempts whose pods were taken away (a drained or lost node, "
        "preemption, eviction): retried without counting against training.maxRestarts.",
    )
    start_time: str | None = Field(default=None, description="When the stage started.")
    completion_time: str | None = Field(default=None, description="When the stage finished.")
    message: str | None = Field(default=None, description="Why the stage is where it is.")
    reason: str | None = Field(
        default=None,
        description="Why the stage failed, as the Failed condition's reason: StageFailed (the "
        "worker's own error), RetriesExhausted, CreateRefused (the API server refused its "
        "workload), StartDeadlineExceeded, ActiveDeadlineExceeded.",
    )
    sharding: Sharding | None = Field(
        default=None,
        description="A sharded generation's workloads: IndexedJob (one Job, a pod per "
        "shard), JobPerShard (clusters before Kubernetes 1.29, which has no per-index "
        "retries) or Processes (`sami run`).",
    )
    shards: list[ShardStatus] = Field(
        default_factory=list, description="Each shard of a sharded generation."
    )


class Estimate(APIModel):
    """A mean with its standard errors over queries and over generation seeds."""

    value: float = Field(description="Mean over held-out queries (and generation seeds).")
    stderr: float | None = Field(
        default=None,
        description="Standard error over queries (of each query's mean over seeds); none for "
        "one query.",
    )
    seed_stderr: float | None = Field(
        default=None,
        description="Standard error over generation seeds (of each seed's mean over queries); "
        "set when evaluation.seeds > 1.",
    )


# WinRate.baseline values: the base model (evaluate-0) and evaluation.judge.reference.
BASELINE_BASE = "base"
BASELINE_REFERENCE = "reference"


class WinRate(APIModel):
    """Pairwise win rate against a baseline, with 95% intervals."""

    baseline: str = Field(
        description="What the iteration was compared with: 'base' (the base model) or "
        "'reference' (evaluation.judge.reference)."
    )
    constitutions: JudgedConstitutions = Field(
        default="all",
        description="Whose responses were judged (evaluation.judge.constitutions): 'kept', "
        "the all-principles-kept constitution's; 'all', every evaluation constitution's "
        "(what results from before the field judged).",
    )
    rate: float = Field(ge=0, le=1, description="Raw win rate (ties count 0.5).")
    low: float = Field(ge=0, le=1, description="95% interval, lower end.")
    high: float = Field(ge=0, le=1, description="95% interval, upper end.")
    length_corrected: float | None = Field(
        default=None, ge=0, le=1, description="Win rate at equal response length."
    )
    length_corrected_low: float | None = Field(
        default=None, ge=0, le=1, description="95% interval of the corrected rate, lower end."
    )
    length_corrected_high: float | None = Field(
        default=None, ge=0, le=1, description="95% interval of the corrected rate, upper end."
    )
    items: int = Field(ge=0, description="Items judged.")
    ties: int = Field(
        default=0,
        ge=0,
        description="Judgments that were ties (each counts 0.5); one judgment per item, two "
        "with bothOrders.",
    )
    unparsable: int = Field(
        default=0,
        ge=0,
        description="Judgments whose verdict did not parse (each counts 0.5).",
    )


class Metrics(APIModel):
    """Evaluation metrics of one model on held-out queries."""

    mi_lower_bound: Estimate | None = Field(
        default=None,
        description="InfoNCE lower bound on I(y; c | x) in nats (at most log K, K = "
        "evaluation.constitutions).",
    )
    plug_in_mi: Estimate | None = Field(
        default=None,
        description="The paper's plotted plug-in MI estimate in nats (not bounded by log K).",
    )
    mean_response_tokens: Estimate | None = Field(
        default=None, description="Mean response length in tokens."
    )
    win_rates: list[WinRate] = Field(
        default_factory=list, max_length=8, description="Win rates against each baseline."
    )


class IterationStatus(APIModel):
    """One SAMI iteration (0 is the base model's evaluation)."""

    iteration: int = Field(ge=0, description="Iteration number; 0 is the base model.")
    generate: StageStatus | None = Field(default=None, description="Generation stage.")
    train: StageStatus | None = Field(default=None, description="Training stage.")
    evaluate: StageStatus | None = Field(default=None, description="Evaluation stage.")
    metrics: Metrics | None = Field(default=None, description="Metrics on training principles.")
    held_out_metrics: Metrics | None = Field(
        default=None, description="Metrics on held-out principles."
    )
    checkpoint_uri: str | None = Field(
        default=None, description="The iteration's trained model (Hugging Face format)."
    )


class Reproducibility(APIModel):
    """What a run's numbers depend on beyond its spec (sami_worker.reproducibility)."""

    versions: dict[str, str] = Field(
        default_factory=dict, description="Python and the packages that compute the numbers."
    )
    seed: int = Field(ge=0, description="constitutions.seed, from which every seed derives.")
    settings: dict[str, str] = Field(
        default_factory=dict,
        description="Environment settings that change results, as the workers had them "
        "(VLLM_ENABLE_V1_MULTIPROCESSING, VLLM_BATCH_INVARIANT, OMP_NUM_THREADS, ...), "
        "the CPU count and the machine type.",
    )


class SAMIRunStatus(APIModel):
    """Observed state of a SAMIRun. Full metric histories live in storage, not here."""

    phase: Phase = Field(
        default=Phase.pending, description="Pending, Running, Succeeded, Failed or Suspended."
    )
    message: str | None = Field(default=None, description="Short summary, e.g. the last error.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Kubernetes conditions."
    )
    iteration: int = Field(default=0, ge=0, description="Iteration in progress or last done.")
    stage: str | None = Field(default=None, description="Stage in progress.")
    latest_mi_lower_bound: float | None = Field(
        default=None, description="MI lower bound (nats) of the latest evaluated iteration."
    )
    storage_uri: str | None = Field(default=None, description="The run's storage prefix.")
    model_uri: str | None = Field(
        default=None,
        description="The newest trained model, a Hugging Face folder (what `vllm serve` "
        "loads): the last iteration's once the run has succeeded.",
    )
    principles: StageStatus | None = Field(default=None, description="The principle writer.")
    reference: StageStatus | None = Field(
        default=None,
        description="The reference model's evaluation (evaluation.judge.reference).",
    )
    iterations: list[IterationStatus] = Field(
        default_factory=list, max_length=101, description="Per iteration, 0 (base) first."
    )
    start_time: str | None = Field(default=None, description="When the first stage started.")
    completion_time: str | None = Field(default=None, description="When the run finished.")
    reproducibility: Reproducibility | None = Field(
        default=None,
        description="Versions, seed and settings the workers ran with; written by `sami "
        "run`, whose workers share its environment (the operator leaves it unset).",
    )


class ObjectMeta(BaseModel):
    """The subset of metadata a SAMIRun manifest needs; other keys are kept as written."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description=f"A DNS-1035 label of at most {MAX_RUN_NAME} characters (see "
        "check_run_name): children and their pods are named after it."
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _run_name(cls, name: str) -> str:
        return check_run_name(name)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, namespace: str | None) -> str | None:
        if namespace is not None and (
            len(namespace) > DNS_LABEL_MAX or not _DNS_1123_RE.match(namespace)
        ):
            shown = repr(namespace if len(namespace) <= 40 else namespace[:37] + "...")
            raise ValueError(
                f"{shown} is not a namespace name: a DNS-1123 label of at most {DNS_LABEL_MAX} "
                "characters (lower-case letters, digits and '-', starting and ending with a "
                "letter or digit)"
            )
        return namespace


class SAMIRun(APIModel):
    """A SAMI run as a Kubernetes object."""

    api_version: Literal["sami.dev/v1alpha1"] = Field()
    kind: Literal["SAMIRun"]
    metadata: ObjectMeta
    spec: SAMIRunSpec
    status: SAMIRunStatus | None = None
