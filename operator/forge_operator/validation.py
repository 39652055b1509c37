"""Semantic checks of a ForgeJob spec that the CRD schema cannot express (Kubernetes 1.20 has no CEL rules).

Every check returns ``FieldError``s naming the field by its path in the object (``spec.data.general``), so the
Accepted condition's message and the Event tell the user exactly what to change.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from forge_operator.api import (
    BACKENDS,
    Affinity,
    BackendName,
    EnvVar,
    ForgeJobSpec,
    LabelSelector,
    NodeSelectorTerm,
    PodAffinity,
    PodAffinityTerm,
    Source,
    Toleration,
)
from forge_operator.defaults import MAX_LEARNING_RATE, parse_decimal, world_size

# Kubeflow names pods and services <job>-master-0 / <job>-worker-<i>: DNS-1035 labels of at most 63 characters.
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 63 - len("-worker-1023")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")
LOCAL_PATH = re.compile(r"^/[^\s]*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
GPU_RESOURCE = "nvidia.com/gpu"
# Set by the training operator (or the trainer's own launcher) in every replica; a user value would break ranks.
RESERVED_ENV = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"}
)
RESERVED_ENV_PREFIXES = ("PET_",)
# A container image reference: [registry[:port]/]path[:tag][@digest], as the container runtimes parse it.
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
_QUANTITY_PARTS = re.compile(r"^([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(.*)$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Forge's own volumes and mount paths in every trainer pod (render.py): user volumes may not take them.
RESERVED_VOLUMES = frozenset({"forge-config", "scratch", "tmp", "dshm"})
RESERVED_MOUNT_PATHS = ("/etc/forge", "/tmp/forge", "/tmp", "/dev/shm")
# Label and annotation prefixes whose keys belong to Forge, Kubernetes' recommended labels, the training operator,
# Kueue and the gang schedulers: never set from a ForgeJob, whatever the allow-list says (sub-domains included).
RESERVED_METADATA_PREFIXES = (
    "forge.dev",
    "app.kubernetes.io",
    "training.kubeflow.org",
    "kubeflow.org",
    "kueue.x-k8s.io",
    "scheduling.x-k8s.io",
    "scheduling.k8s.io",
    "volcano.sh",
    "jobset.sigs.k8s.io",
)
# The operator's default allow-list of pod label and annotation keys (FORGE_POD_METADATA_ALLOWED_KEYS): "*" is any
# key without a prefix (team, cost-center), "prefix/*" any key under a prefix, anything else one exact key.
DEFAULT_POD_METADATA_ALLOWED_KEYS = (
    "*",
    "sidecar.istio.io/inject",
    "cluster-autoscaler.kubernetes.io/safe-to-evict",
    "prometheus.io/*",
)
MAX_GRADIENT_CLIPPING = 100.0
MAX_WEIGHT_DECAY = 1.0


@dataclass(frozen=True)
class FieldError:
    """One problem with one field."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_errors(errors: Sequence[FieldError]) -> str:
    """One sentence-like line for a condition message: every problem, in order."""
    return "; ".join(str(error) for error in errors)


def _loc_path(prefix: str, loc: Iterable[int | str]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(raw: Any) -> ForgeJobSpec | list[FieldError]:
    """The typed spec, or the schema errors as field errors (the API server normally catches these first)."""
    try:
        return ForgeJobSpec.model_validate(raw)
    except ValidationError as error:
        return [FieldError(_loc_path("spec", e["loc"]), e["msg"]) for e in error.errors()]


def check_name(name: str) -> list[FieldError]:
    if not NAME_PATTERN.match(name):
        return [
            FieldError(
                "metadata.name",
                f"{name!r} must be a DNS-1035 label (lower-case letters, digits, '-', starting with a letter): "
                "the PyTorchJob's pods and services are named after it",
            )
        ]
    if len(name) > MAX_NAME_LENGTH:
        return [
            FieldError(
                "metadata.name",
                f"{name!r} is {len(name)} characters; at most {MAX_NAME_LENGTH} so that '<name>-worker-<i>' "
                "stays a valid 63-character service name",
            )
        ]
    return []


def check_uri(path: str, uri: str) -> list[FieldError]:
    if S3_URI.match(uri) or LOCAL_PATH.match(uri):
        return []
    return [FieldError(path, f"{uri!r} must be s3://bucket/prefix or an absolute path (/...)")]


def _check_sources(path: str, sources: Sequence[Source]) -> list[FieldError]:
    errors: list[FieldError] = []
    seen: dict[str, int] = {}
    for index, source in enumerate(sources):
        errors += check_uri(f"{path}[{index}].uri", source.uri)
        if source.uri in seen:
            errors.append(
                FieldError(f"{path}[{index}].uri", f"{source.uri!r} repeats {path}[{seen[source.uri]}]; use weight")
            )
        seen.setdefault(source.uri, index)
    return errors


def check_uris(spec: ForgeJobSpec) -> list[FieldError]:
    errors = check_uri("spec.model.base", spec.model.base)
    errors += _check_sources("spec.data.domain", spec.data.domain)
    errors += _check_sources("spec.data.general", spec.data.general)
    errors += _check_sources("spec.eval.domain", spec.eval.domain)
    errors += _check_sources("spec.eval.general", spec.eval.general)
    errors += _check_sources("spec.eval.unseenGeneral", spec.eval.unseen_general)
    errors += check_unseen_general(spec)
    errors += check_uri("spec.checkpoints.output", spec.checkpoints.output)
    return errors


def check_unseen_general(spec: ForgeJobSpec) -> list[FieldError]:
    """spec.eval.unseenGeneral must be text from neither training set: a uri that is also in data.domain or
    data.general would be trained on (replayed), and its forgetting would read optimistic."""
    training = {s.uri: f"spec.data.domain[{i}]" for i, s in enumerate(spec.data.domain)}
    training |= {s.uri: f"spec.data.general[{i}]" for i, s in enumerate(spec.data.general)}
    return [
        FieldError(
            f"spec.eval.unseenGeneral[{i}].uri",
            f"{s.uri!r} is also {training[s.uri]}: unseen general text must come from neither training set",
        )
        for i, s in enumerate(spec.eval.unseen_general)
        if s.uri in training
    ]


def check_data(spec: ForgeJobSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    if spec.data.domain_percent < 100 and not spec.data.general:
        errors.append(
            FieldError(
                "spec.data.general",
                f"required when spec.data.domainPercent is {spec.data.domain_percent} (< 100): "
                f"{100 - spec.data.domain_percent}% of the tokens come from general data",
            )
        )
    if spec.data.domain_percent == 100 and not (spec.data.general or spec.eval.general or spec.eval.unseen_general):
        errors.append(
            FieldError(
                "spec.eval.general",
                "required when spec.data.general is empty (or give spec.eval.unseenGeneral): forgetting is measured "
                "on general held-out data",
            )
        )
    if spec.eval.max_tokens < spec.data.seq_length:
        errors.append(
            FieldError(
                "spec.eval.maxTokens",
                f"{spec.eval.max_tokens} is less than one sequence (spec.data.seqLength {spec.data.seq_length})",
            )
        )
    return errors


def check_training(spec: ForgeJobSpec) -> list[FieldError]:
    training = spec.training
    errors: list[FieldError] = []
    if training.learning_rate != "auto":
        value = parse_decimal(training.learning_rate)
        if not 0 < value <= MAX_LEARNING_RATE:
            errors.append(
                FieldError(
                    "spec.training.learningRate",
                    f"{training.learning_rate} is outside (0, {MAX_LEARNING_RATE:g}]; use a value like 2e-5 or auto",
                )
            )
    if parse_decimal(training.gradient_clipping) > MAX_GRADIENT_CLIPPING:
        errors.append(
            FieldError(
                "spec.training.gradientClipping", f"{training.gradient_clipping} exceeds {MAX_GRADIENT_CLIPPING:g}"
            )
        )
    if parse_decimal(training.weight_decay) > MAX_WEIGHT_DECAY:
        errors.append(FieldError("spec.training.weightDecay", f"{training.weight_decay} exceeds {MAX_WEIGHT_DECAY:g}"))
    if spec.eval.every_steps is not None and spec.eval.every_steps > training.max_steps:
        errors.append(
            FieldError(
                "spec.eval.everySteps",
                f"{spec.eval.every_steps} exceeds spec.training.maxSteps {training.max_steps}: forgetting would never "
                "be measured during the run",
            )
        )
    if training.loss_chunk_tokens and training.zero_stage == 3:
        errors.append(
            FieldError(
                "spec.training.lossChunkTokens",
                f"{training.loss_chunk_tokens} needs zeroStage 0-2 (ZeRO-3 partitions the output head); use 0",
            )
        )
    minimum = spec.data.seq_length * training.micro_batch_size * world_size(spec.resources)
    if training.global_batch_tokens is not None and training.global_batch_tokens < minimum:
        errors.append(
            FieldError(
                "spec.training.globalBatchTokens",
                f"{training.global_batch_tokens} is below one micro-batch on every process: seqLength "
                f"{spec.data.seq_length} x microBatchSize {training.micro_batch_size} x worldSize "
                f"{world_size(spec.resources)} = {minimum}",
            )
        )
    return errors


def check_learning_rate_probe(spec: ForgeJobSpec) -> list[FieldError]:
    probe = spec.training.learning_rate_probe
    if probe is None:
        return []
    path = "spec.training.learningRateProbe"
    errors: list[FieldError] = []
    percents = probe.multiplier_percents
    repeated = sorted({value for value in percents if percents.count(value) > 1})
    if repeated:
        errors.append(
            FieldError(
                f"{path}.multiplierPercents",
                f"values must be distinct (one probe run each): {', '.join(map(str, repeated))} repeated in {percents}",
            )
        )
    if probe.steps > spec.training.max_steps:
        errors.append(
            FieldError(
                f"{path}.steps",
                f"{probe.steps} exceeds spec.training.maxSteps {spec.training.max_steps}: a probe run would be longer "
                "than the run",
            )
        )
    if probe.evaluations > probe.steps:
        errors.append(FieldError(f"{path}.evaluations", f"{probe.evaluations} exceeds steps {probe.steps}"))
    return errors


def check_checkpoints(spec: ForgeJobSpec) -> list[FieldError]:
    alphas = spec.checkpoints.candidates.interpolation_alpha_percents
    repeated = sorted({value for value in alphas if alphas.count(value) > 1})
    if repeated:
        return [
            FieldError(
                "spec.checkpoints.candidates.interpolationAlphaPercents",
                f"values must be distinct (one candidate each): {', '.join(map(str, repeated))} repeated in {alphas}",
            )
        ]
    return []


def check_technique(spec: ForgeJobSpec) -> list[FieldError]:
    if spec.lora is not None and spec.technique != "lora":
        return [FieldError("spec.lora", f"only allowed with technique lora, not {spec.technique}")]
    return []


def check_attention(spec: ForgeJobSpec) -> list[FieldError]:
    if spec.model.attention_implementation == "flash_attention_2" and spec.resources.gpus_per_node == 0:
        return [
            FieldError(
                "spec.model.attentionImplementation",
                "flash_attention_2 runs on CUDA GPUs only (resources.gpusPerNode is 0); use sdpa",
            )
        ]
    return []


def _check_label_key(path: str, key: str) -> list[FieldError]:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not LABEL_PREFIX.match(prefix))) or not LABEL_NAME.match(name):
        return [FieldError(path, f"{key!r} is not a valid label key")]
    return []


def _check_toleration(path: str, toleration: Toleration) -> list[FieldError]:
    errors: list[FieldError] = []
    if toleration.operator == "Exists" and toleration.value:
        errors.append(FieldError(f"{path}.value", "must be empty when operator is Exists"))
    if toleration.operator == "Equal" and not toleration.key:
        errors.append(FieldError(f"{path}.key", "required when operator is Equal (use Exists to match every key)"))
    if toleration.toleration_seconds is not None and toleration.effect != "NoExecute":
        errors.append(FieldError(f"{path}.tolerationSeconds", "only allowed with effect NoExecute"))
    return errors


def parse_quantity(text: int | str) -> Decimal:
    """A Kubernetes quantity ("500m", "64Gi", "1e3", 8) as a number; ValueError when it is none."""
    match = _QUANTITY_PARTS.match(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    sign, number, suffix = match.groups()
    value = Decimal(number)
    if suffix in _BINARY:
        value *= Decimal(1024) ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        value *= Decimal(10) ** _DECIMAL[suffix]
    elif re.fullmatch(r"[eE][+-]?[0-9]+", suffix):
        value *= Decimal(10) ** int(suffix[1:])
    else:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (unknown suffix {suffix!r})")
    return -value if sign == "-" else value


def check_quantities(path: str, limits: Mapping[str, int | str], requests: Mapping[str, int | str]) -> list[FieldError]:
    """No negative quantity, and no request above its limit (the API server would refuse the pods)."""
    errors: list[FieldError] = []
    parsed: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
    for kind, values in (("limits", limits), ("requests", requests)):
        for name, quantity in values.items():
            try:
                value = parse_quantity(quantity)
            except ValueError as error:
                errors.append(FieldError(f'{path}.{kind}["{name}"]', str(error)))
                continue
            if value < 0:
                errors.append(FieldError(f'{path}.{kind}["{name}"]', f"{quantity} is negative"))
            parsed[kind][name] = value
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if limit is not None and request > limit:
            errors.append(
                FieldError(
                    f'{path}.requests["{name}"]',
                    f'{requests[name]} is above its limit {limits[name]} ({path}.limits["{name}"])',
                )
            )
    return errors


def _check_positive(path: str, quantity: int | str) -> list[FieldError]:
    try:
        if parse_quantity(quantity) <= 0:
            return [FieldError(path, f"{quantity} must be positive")]
    except ValueError as error:
        return [FieldError(path, str(error))]
    return []


def check_image(path: str, image: str) -> list[FieldError]:
    if any(character.isspace() for character in image):
        return [FieldError(path, f"{image!r} contains whitespace: not an image reference")]
    if not IMAGE_REFERENCE.match(image):
        return [
            FieldError(
                path,
                f"{image!r} is not an image reference ([registry[:port]/]name[:tag][@sha256:digest], lower-case name)",
            )
        ]
    return []


def check_scheduling(spec: ForgeJobSpec) -> list[FieldError]:
    scheduling = spec.scheduling
    errors: list[FieldError] = []
    if scheduling.workload_priority_class and not scheduling.queue_name:
        errors.append(
            FieldError(
                "spec.scheduling.workloadPriorityClass",
                "needs spec.scheduling.queueName: a Kueue priority applies only to a queued run",
            )
        )
    gang = scheduling.gang
    if gang is not None and gang.min_available is not None and gang.min_available > spec.resources.nodes:
        errors.append(
            FieldError(
                "spec.scheduling.gang.minAvailable",
                f"{gang.min_available} exceeds spec.resources.nodes {spec.resources.nodes}: the gang could never be "
                "placed",
            )
        )
    return errors


def check_resources(spec: ForgeJobSpec, default_image: str | None) -> list[FieldError]:
    resources = spec.resources
    errors: list[FieldError] = []
    if not resources.image and not default_image:
        errors.append(FieldError("spec.resources.image", "required: the operator has no default trainer image"))
    if resources.image:
        errors += check_image("spec.resources.image", resources.image)
    errors += check_quantities("spec.resources.resources", resources.resources.limits, resources.resources.requests)
    for kind in ("limits", "requests"):
        for gpu in sorted({GPU_RESOURCE, resources.gpu_resource} & set(getattr(resources.resources, kind))):
            errors.append(
                FieldError(
                    f'spec.resources.resources.{kind}["{gpu}"]',
                    "set GPUs with spec.resources.gpusPerNode (and gpuResource), not here",
                )
            )
    for field, limit in (
        ("scratchSizeLimit", resources.scratch_size_limit),
        ("shmSizeLimit", resources.shm_size_limit),
    ):
        if limit is not None:
            errors += _check_positive(f"spec.resources.{field}", limit)
    for key, value in resources.node_selector.items():
        errors += _check_label_key(f'spec.resources.nodeSelector["{key}"]', key)
        if not LABEL_VALUE.match(value):
            errors.append(FieldError(f'spec.resources.nodeSelector["{key}"]', f"{value!r} is not a valid label value"))
    for index, toleration in enumerate(resources.tolerations):
        errors += _check_toleration(f"spec.resources.tolerations[{index}]", toleration)
    errors += check_affinity("spec.resources.affinity", resources.affinity)
    errors += check_volumes(spec)
    return errors


def _check_label_map(path: str, values: Mapping[str, str]) -> list[FieldError]:
    errors: list[FieldError] = []
    for key, value in values.items():
        errors += _check_label_key(f'{path}["{key}"]', key)
        if not LABEL_VALUE.match(value):
            errors.append(FieldError(f'{path}["{key}"]', f"{value!r} is not a valid label value"))
    return errors


def _check_requirement(path: str, operator: str, values: Sequence[str]) -> list[FieldError]:
    if operator in ("In", "NotIn") and not values:
        return [FieldError(f"{path}.values", f"required (at least one) with operator {operator}")]
    if operator in ("Exists", "DoesNotExist") and values:
        return [FieldError(f"{path}.values", f"must be empty with operator {operator}")]
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0])):
        return [FieldError(f"{path}.values", f"exactly one integer with operator {operator}, got {list(values)}")]
    errors: list[FieldError] = []
    for index, value in enumerate(values):
        if not LABEL_VALUE.match(value):
            errors.append(FieldError(f"{path}.values[{index}]", f"{value!r} is not a valid label value"))
    return errors


def _check_node_term(path: str, term: NodeSelectorTerm) -> list[FieldError]:
    errors: list[FieldError] = []
    for index, requirement in enumerate(term.match_expressions):
        where = f"{path}.matchExpressions[{index}]"
        errors += _check_label_key(f"{where}.key", requirement.key)
        errors += _check_requirement(where, requirement.operator, requirement.values)
    return errors


def _check_selector(path: str, selector: LabelSelector) -> list[FieldError]:
    errors = _check_label_map(f"{path}.matchLabels", selector.match_labels)
    for index, requirement in enumerate(selector.match_expressions):
        where = f"{path}.matchExpressions[{index}]"
        errors += _check_label_key(f"{where}.key", requirement.key)
        errors += _check_requirement(where, requirement.operator, requirement.values)
    if not selector.match_labels and not selector.match_expressions:
        errors.append(FieldError(path, "selects no pods: set matchLabels or matchExpressions"))
    return errors


def _check_pod_term(path: str, term: PodAffinityTerm) -> list[FieldError]:
    return _check_selector(f"{path}.labelSelector", term.label_selector) + _check_label_key(
        f"{path}.topologyKey", term.topology_key
    )


def _check_pod_affinity(path: str, affinity: PodAffinity) -> list[FieldError]:
    errors: list[FieldError] = []
    for index, term in enumerate(affinity.required_during_scheduling_ignored_during_execution):
        errors += _check_pod_term(f"{path}.requiredDuringSchedulingIgnoredDuringExecution[{index}]", term)
    for index, weighted in enumerate(affinity.preferred_during_scheduling_ignored_during_execution):
        where = f"{path}.preferredDuringSchedulingIgnoredDuringExecution[{index}].podAffinityTerm"
        errors += _check_pod_term(where, weighted.pod_affinity_term)
    return errors


def check_affinity(path: str, affinity: Affinity | None) -> list[FieldError]:
    """Operators and their values, label keys and values, selectors that select something."""
    if affinity is None:
        return []
    errors: list[FieldError] = []
    node = affinity.node_affinity
    if node is not None:
        required = node.required_during_scheduling_ignored_during_execution
        if required is not None:
            for index, term in enumerate(required.node_selector_terms):
                where = f"{path}.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{index}]"
                errors += _check_node_term(where, term)
        for index, preferred in enumerate(node.preferred_during_scheduling_ignored_during_execution):
            where = f"{path}.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[{index}].preference"
            errors += _check_node_term(where, preferred.preference)
    if affinity.pod_affinity is not None:
        errors += _check_pod_affinity(f"{path}.podAffinity", affinity.pod_affinity)
    if affinity.pod_anti_affinity is not None:
        errors += _check_pod_affinity(f"{path}.podAntiAffinity", affinity.pod_anti_affinity)
    return errors


def _overlaps(path: str, reserved: str) -> bool:
    """Whether a mount at ``path`` would hide or replace the reserved mount (same path, or a parent of it)."""
    return path == reserved or path == "/" or reserved.startswith(path.rstrip("/") + "/")


def check_volumes(spec: ForgeJobSpec) -> list[FieldError]:
    """Unique names clear of Forge's, exactly one source each, every volume mounted, mounts clear of Forge's."""
    resources = spec.resources
    errors: list[FieldError] = []
    names: dict[str, int] = {}
    for index, volume in enumerate(resources.volumes):
        path = f"spec.resources.volumes[{index}]"
        if volume.name in RESERVED_VOLUMES:
            errors.append(FieldError(f"{path}.name", f"{volume.name} is one of Forge's own volumes; pick another name"))
        if volume.name in names:
            errors.append(
                FieldError(f"{path}.name", f"{volume.name} repeats spec.resources.volumes[{names[volume.name]}]")
            )
        names.setdefault(volume.name, index)
        sources = [
            key
            for key, value in (
                ("persistentVolumeClaim", volume.persistent_volume_claim),
                ("configMap", volume.config_map),
                ("secret", volume.secret),
                ("emptyDir", volume.empty_dir),
            )
            if value is not None
        ]
        if len(sources) != 1:
            errors.append(
                FieldError(
                    path,
                    "exactly one of persistentVolumeClaim, configMap, secret, emptyDir is needed, got "
                    f"{', '.join(sources) or 'none'}",
                )
            )
        if volume.empty_dir is not None and volume.empty_dir.size_limit is not None:
            errors += _check_positive(f"{path}.emptyDir.sizeLimit", volume.empty_dir.size_limit)
    mounted: set[str] = set()
    paths: dict[str, int] = {}
    for index, mount in enumerate(resources.volume_mounts):
        path = f"spec.resources.volumeMounts[{index}]"
        mounted.add(mount.name)
        if mount.name not in names:
            declared = ", ".join(names) or "none"
            errors.append(
                FieldError(f"{path}.name", f"{mount.name} is not in spec.resources.volumes (declared: {declared})")
            )
        mount_path = posixpath.normpath(mount.mount_path)
        for reserved in RESERVED_MOUNT_PATHS:
            if _overlaps(mount_path, reserved):
                errors.append(FieldError(f"{path}.mountPath", f"{mount.mount_path} would hide Forge's {reserved}"))
                break
        if mount_path in paths:
            errors.append(
                FieldError(
                    f"{path}.mountPath", f"{mount.mount_path} repeats spec.resources.volumeMounts[{paths[mount_path]}]"
                )
            )
        paths.setdefault(mount_path, index)
        if mount.sub_path is not None and ".." in mount.sub_path.split("/"):
            errors.append(FieldError(f"{path}.subPath", f"{mount.sub_path!r} may not contain '..'"))
    for name, index in names.items():
        if name not in mounted:
            errors.append(
                FieldError(
                    f"spec.resources.volumes[{index}]",
                    f"{name} is not mounted by any spec.resources.volumeMounts entry",
                )
            )
    return errors


def metadata_key_allowed(key: str, allowed: Sequence[str]) -> bool:
    """Whether a pod label or annotation key matches the allow-list ("*", "prefix/*" or an exact key)."""
    prefix, _, _ = key.rpartition("/")
    for pattern in allowed:
        if pattern == key or (pattern == "*" and not prefix):
            return True
        if pattern.endswith("/*") and prefix == pattern[:-2]:
            return True
    return False


def metadata_key_reserved(key: str) -> bool:
    prefix, _, _ = key.rpartition("/")
    return any(prefix == owner or prefix.endswith(f".{owner}") for owner in RESERVED_METADATA_PREFIXES)


def check_pod_metadata(spec: ForgeJobSpec, allowed: Sequence[str]) -> list[FieldError]:
    """Pod labels and annotations: valid keys (and label values), never a reserved key, only allowed keys."""
    resources = spec.resources
    errors = _check_label_map("spec.resources.podLabels", resources.pod_labels)
    for key in resources.pod_annotations:
        errors += _check_label_key(f'spec.resources.podAnnotations["{key}"]', key)
    for field, values in (("podLabels", resources.pod_labels), ("podAnnotations", resources.pod_annotations)):
        for key in values:
            where = f'spec.resources.{field}["{key}"]'
            if metadata_key_reserved(key):
                errors.append(
                    FieldError(
                        where,
                        "this key belongs to Forge, the training operator, Kueue or a gang scheduler; use "
                        "spec.scheduling for queues and gangs",
                    )
                )
            elif not metadata_key_allowed(key, allowed):
                errors.append(
                    FieldError(
                        where,
                        f"not in the operator's allow-list ({', '.join(allowed) or 'empty'}); ask the cluster's "
                        "administrator to add it to FORGE_POD_METADATA_ALLOWED_KEYS",
                    )
                )
    return errors


def check_env_from(spec: ForgeJobSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    for index, source in enumerate(spec.env_from):
        path = f"spec.envFrom[{index}]"
        chosen = [
            name for name, ref in (("secretRef", source.secret_ref), ("configMapRef", source.config_map_ref)) if ref
        ]
        if len(chosen) != 1:
            errors.append(FieldError(path, f"exactly one of secretRef, configMapRef is needed, got {chosen or 'none'}"))
        if source.prefix and source.prefix.startswith(RESERVED_ENV_PREFIXES):
            errors.append(FieldError(f"{path}.prefix", f"{source.prefix} is the training operator's prefix"))
    return errors


def _check_env_var(path: str, var: EnvVar) -> list[FieldError]:
    errors: list[FieldError] = []
    if var.name in RESERVED_ENV or var.name.startswith(RESERVED_ENV_PREFIXES):
        errors.append(
            FieldError(f"{path}.name", f"{var.name} is set by the training operator and cannot be overridden")
        )
    if var.value is not None and var.value_from is not None:
        errors.append(FieldError(path, "set value or valueFrom, not both"))
    if var.value_from is not None:
        chosen = [
            name
            for name, ref in (
                ("secretKeyRef", var.value_from.secret_key_ref),
                ("configMapKeyRef", var.value_from.config_map_key_ref),
                ("fieldRef", var.value_from.field_ref),
            )
            if ref is not None
        ]
        if len(chosen) != 1:
            errors.append(FieldError(f"{path}.valueFrom", f"exactly one source is needed, got {chosen or 'none'}"))
    return errors


def check_env(spec: ForgeJobSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    seen: set[str] = set()
    for index, var in enumerate(spec.env):
        path = f"spec.env[{index}]"
        errors += _check_env_var(path, var)
        if var.name in seen:
            errors.append(FieldError(f"{path}.name", f"{var.name} appears more than once"))
        seen.add(var.name)
    return errors


# (A TrainJob's pods are '<name>-node-0-<i>' (JobSet): MAX_NAME_LENGTH already keeps them valid host names.)
TRAINJOB_REFUSED = "a Kubeflow Trainer v2.3.0 TrainJob cannot carry it"


def check_backend(
    name: str, spec: ForgeJobSpec, default_backend: BackendName, backends: Sequence[BackendName]
) -> list[FieldError]:
    """The chosen backend is enabled, and the spec uses only what that backend's child job can carry."""
    backend = spec.backend or default_backend
    if backend not in backends:
        return [
            FieldError(
                "spec.backend",
                f"{backend} is not enabled in this operator (FORGE_BACKENDS={','.join(backends)})",
            )
        ]
    if backend == "pytorchjob":
        if spec.training_runtime is not None:
            return [FieldError("spec.trainingRuntime", "only with backend trainjob (a PyTorchJob has no runtime)")]
        return []
    errors: list[FieldError] = []
    unsupported = [
        ("spec.envFrom", bool(spec.env_from), "list the variables in spec.env (valueFrom a Secret or ConfigMap key)"),
        (
            "spec.resources.imagePullPolicy",
            spec.resources.image_pull_policy is not None,
            "the node's default applies (Always for :latest, else IfNotPresent)",
        ),
        (
            "spec.scheduling.priorityClassName",
            spec.scheduling.priority_class_name is not None,
            "set it in the ClusterTrainingRuntime, or use scheduling.workloadPriorityClass with Kueue",
        ),
        (
            "spec.scheduling.schedulerName",
            spec.scheduling.scheduler_name is not None,
            "set it in the ClusterTrainingRuntime",
        ),
        ("spec.scheduling.gang", spec.scheduling.gang is not None, "use the runtime's podGroupPolicy"),
        (
            "spec.runPolicy.ttlSecondsAfterFinished",
            spec.run_policy.ttl_seconds_after_finished is not None,
            "set the JobSet's ttlSecondsAfterFinished in the ClusterTrainingRuntime",
        ),
        (
            "spec.runPolicy.restartPolicy",
            spec.run_policy.restart_policy != "ExitCode",
            "restarts come from the ClusterTrainingRuntime (the JobSet's failurePolicy)",
        ),
        (
            "spec.runPolicy.backoffLimit",
            spec.run_policy.backoff_limit != 3,
            "restarts come from the ClusterTrainingRuntime (the JobSet's failurePolicy.maxRestarts)",
        ),
    ]
    errors += [
        FieldError(path, f"not supported with backend trainjob: {TRAINJOB_REFUSED}; {instead}")
        for path, used, instead in unsupported
        if used
    ]
    return errors


def validate(
    name: str,
    spec: ForgeJobSpec,
    default_image: str | None,
    pod_metadata_allowed_keys: Sequence[str] = DEFAULT_POD_METADATA_ALLOWED_KEYS,
    *,
    default_backend: BackendName = "pytorchjob",
    backends: Sequence[BackendName] = BACKENDS,
) -> list[FieldError]:
    """Every semantic problem of a ForgeJob; empty when it can run."""
    return [
        *check_backend(name, spec, default_backend, backends),
        *check_name(name),
        *check_technique(spec),
        *check_attention(spec),
        *check_uris(spec),
        *check_data(spec),
        *check_training(spec),
        *check_learning_rate_probe(spec),
        *check_checkpoints(spec),
        *check_resources(spec, default_image),
        *check_scheduling(spec),
        *check_pod_metadata(spec, pod_metadata_allowed_keys),
        *check_env(spec),
        *check_env_from(spec),
    ]
