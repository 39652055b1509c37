"""Semantic checks: each problem is reported with the path of the field to change."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from forge_operator.api import ForgeJobSpec
from forge_operator.validation import FieldError, format_errors, parse_spec, validate

VALID: dict[str, Any] = {
    "model": {"base": "s3://models/llama-3.2-1b/"},
    "technique": "sft",
    "data": {
        "domainPercent": 80,
        "domain": [{"uri": "s3://acme/tickets/"}],
        "general": [{"uri": "/data/general.jsonl"}],
        "seqLength": 2048,
    },
    "eval": {"everySteps": 100},
    "training": {"maxSteps": 1000},
    "checkpoints": {"output": "s3://acme/out/"},
    "resources": {"nodes": 2, "gpusPerNode": 8},
}


def with_changes(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def errors_of(raw: dict[str, Any], name: str = "job", image: str | None = "img:1") -> list[FieldError]:
    parsed = parse_spec(raw)
    assert isinstance(parsed, ForgeJobSpec), parsed
    return validate(name, parsed, image)


def test_a_valid_spec_has_no_errors() -> None:
    assert errors_of(VALID) == []


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no general data below 100%", {"data__general": []}, "spec.data.general", "required when"),
    (
        "domain only, no eval general",
        {"data__general": [], "data__domainPercent": 100},
        "spec.eval.general",
        "forgetting",
    ),
    ("http model", {"model__base": "http://hub/model"}, "spec.model.base", "s3://bucket/prefix"),
    ("relative output", {"checkpoints__output": "out/"}, "spec.checkpoints.output", "absolute path"),
    ("bad bucket", {"data__domain": [{"uri": "s3://A_B/x"}]}, "spec.data.domain[0].uri", "s3://"),
    ("space in path", {"eval__domain": [{"uri": "/data/my file"}]}, "spec.eval.domain[0].uri", "absolute path"),
    (
        "duplicate general",
        {"data__general": [{"uri": "s3://gen/a"}, {"uri": "s3://gen/a"}]},
        "spec.data.general[1].uri",
        "repeats spec.data.general[0]",
    ),
    (
        "unseen general is replayed",
        {"eval__unseenGeneral": [{"uri": "s3://other/wiki/"}, {"uri": "/data/general.jsonl"}]},
        "spec.eval.unseenGeneral[1].uri",
        "is also spec.data.general[0]",
    ),
    (
        "unseen general is trained on",
        {"eval__unseenGeneral": [{"uri": "s3://acme/tickets/"}]},
        "spec.eval.unseenGeneral[0].uri",
        "is also spec.data.domain[0]",
    ),
    ("lr too high", {"training__learningRate": "0.5"}, "spec.training.learningRate", "outside"),
    ("lr zero", {"training__learningRate": "0"}, "spec.training.learningRate", "outside"),
    ("clipping", {"training__gradientClipping": "1000"}, "spec.training.gradientClipping", "exceeds"),
    ("weight decay", {"training__weightDecay": "2"}, "spec.training.weightDecay", "exceeds"),
    (
        "chunked loss under ZeRO-3",
        {"training__zeroStage": 3, "training__lossChunkTokens": 512},
        "spec.training.lossChunkTokens",
        "zeroStage 0-2",
    ),
    ("eval after the end", {"eval__everySteps": 5000}, "spec.eval.everySteps", "never"),
    ("eval below a sequence", {"eval__maxTokens": 1000}, "spec.eval.maxTokens", "one sequence"),
    (
        "batch below one micro-batch",
        {"training__globalBatchTokens": 65536},
        "spec.training.globalBatchTokens",
        "below one micro-batch",
    ),
    (
        "repeated interpolation alpha",
        {"checkpoints__candidates": {"interpolationAlphaPercents": [50, 25, 50]}},
        "spec.checkpoints.candidates.interpolationAlphaPercents",
        "distinct",
    ),
    (
        "probe longer than the run",
        {"training__learningRateProbe": {"steps": 2000}},
        "spec.training.learningRateProbe.steps",
        "longer than the run",
    ),
    (
        "more probe evaluations than steps",
        {"training__learningRateProbe": {"steps": 10, "evaluations": 11}},
        "spec.training.learningRateProbe.evaluations",
        "exceeds steps 10",
    ),
    (
        "repeated probe multiple",
        {"training__learningRateProbe": {"multiplierPercents": [100, 50, 100]}},
        "spec.training.learningRateProbe.multiplierPercents",
        "distinct",
    ),
    ("lora with sft", {"lora": {"rank": 4}}, "spec.lora", "only allowed with technique lora"),
    (
        "negative cpu request",
        {"resources__resources": {"requests": {"cpu": "-1"}}},
        'spec.resources.resources.requests["cpu"]',
        "-1 is negative",
    ),
    (
        "negative memory limit",
        {"resources__resources": {"limits": {"memory": "-64Gi"}}},
        'spec.resources.resources.limits["memory"]',
        "negative",
    ),
    (
        "request above limit",
        {"resources__resources": {"requests": {"memory": "100Gi"}, "limits": {"memory": "64000Mi"}}},
        'spec.resources.resources.requests["memory"]',
        "above its limit 64000Mi",
    ),
    (
        "cpu request above limit in other units",
        {"resources__resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}},
        'spec.resources.resources.requests["cpu"]',
        "above its limit",
    ),
    (
        "gpu of the chosen type in requests",
        {"resources__gpuResource": "amd.com/gpu", "resources__resources": {"requests": {"amd.com/gpu": 1}}},
        'spec.resources.resources.requests["amd.com/gpu"]',
        "gpusPerNode",
    ),
    ("zero scratch limit", {"resources__scratchSizeLimit": "0"}, "spec.resources.scratchSizeLimit", "must be positive"),
    ("image with a space", {"resources__image": "registry/forge trainer:1"}, "spec.resources.image", "whitespace"),
    ("image with a newline", {"resources__image": "registry/forge:1\n"}, "spec.resources.image", "whitespace"),
    ("image upper case", {"resources__image": "registry/Forge:1"}, "spec.resources.image", "not an image reference"),
    (
        "kueue priority without a queue",
        {"scheduling": {"workloadPriorityClass": "high"}},
        "spec.scheduling.workloadPriorityClass",
        "needs spec.scheduling.queueName",
    ),
    (
        "gpu limits",
        {"resources__resources": {"limits": {"nvidia.com/gpu": 8}}},
        'spec.resources.resources.limits["nvidia.com/gpu"]',
        "gpusPerNode",
    ),
    (
        "bad node selector",
        {"resources__nodeSelector": {"pool": "gpu pool"}},
        'spec.resources.nodeSelector["pool"]',
        "label value",
    ),
    ("bad selector key", {"resources__nodeSelector": {"-x/": "a"}}, 'spec.resources.nodeSelector["-x/"]', "label key"),
    (
        "toleration Exists with value",
        {"resources__tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]},
        "spec.resources.tolerations[0].value",
        "Exists",
    ),
    (
        "toleration Equal without key",
        {"resources__tolerations": [{"operator": "Equal", "value": "b"}]},
        "spec.resources.tolerations[0].key",
        "required",
    ),
    (
        "tolerationSeconds without NoExecute",
        {"resources__tolerations": [{"key": "a", "value": "b", "tolerationSeconds": 5}]},
        "spec.resources.tolerations[0].tolerationSeconds",
        "NoExecute",
    ),
    ("reserved env", {"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "spec.env[0].name", "training operator"),
    ("PET_ env", {"env": [{"name": "PET_NNODES", "value": "2"}]}, "spec.env[0].name", "training operator"),
    (
        "value and valueFrom",
        {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        "spec.env[0]",
        "not both",
    ),
    ("empty valueFrom", {"env": [{"name": "A", "valueFrom": {}}]}, "spec.env[0].valueFrom", "exactly one"),
    ("duplicate env", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "spec.env[1].name", "more"),
]


@pytest.mark.parametrize(("case", "changes", "path", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_problem_names_its_field(case: str, changes: dict[str, Any], path: str, words: str) -> None:
    errors = errors_of(with_changes(**changes))
    assert [e.path for e in errors] == [path], f"{case}: {errors}"
    assert words in errors[0].message, f"{case}: {errors[0].message}"


@pytest.mark.parametrize(
    ("name", "words"),
    [("My.Job", "DNS-1035"), ("1job", "DNS-1035"), ("a" * 52, "at most 51"), ("job-", "DNS-1035")],
)
def test_names_must_fit_kubeflow_service_names(name: str, words: str) -> None:
    (error,) = errors_of(VALID, name=name)
    assert error.path == "metadata.name" and words in error.message


def test_image_is_required_without_an_operator_default() -> None:
    assert [e.path for e in errors_of(VALID, image=None)] == ["spec.resources.image"]
    assert errors_of(with_changes(resources__image="repo/trainer:1"), image=None) == []


def test_unseen_general_text_from_neither_training_set_is_accepted() -> None:
    assert (
        errors_of(with_changes(eval__unseenGeneral=[{"uri": "s3://other/wiki/"}, {"uri": "/data/books.jsonl"}])) == []
    )


def test_domain_only_with_unseen_general_text_needs_no_eval_general() -> None:
    changes = {"data__general": [], "data__domainPercent": 100, "eval__general": []}
    assert errors_of(with_changes(**changes, eval__unseenGeneral=[{"uri": "s3://other/wiki/"}])) == []
    assert [e.path for e in errors_of(with_changes(**changes))] == ["spec.eval.general"]


def test_several_problems_are_all_reported_in_order() -> None:
    errors = errors_of(with_changes(model__base="gs://x/y", training__learningRate="1"))
    assert [e.path for e in errors] == ["spec.model.base", "spec.training.learningRate"]
    assert format_errors(errors).startswith("spec.model.base: ") and "; spec.training.learningRate: " in format_errors(
        errors
    )


def test_schema_errors_become_field_errors() -> None:
    parsed = parse_spec(with_changes(data__domainPercent=0, technique="dpo"))
    assert isinstance(parsed, list)
    assert {e.path for e in parsed} == {"spec.data.domainPercent", "spec.technique"}


def test_repeated_alphas_are_named_and_distinct_ones_accepted() -> None:
    (error,) = errors_of(with_changes(checkpoints__candidates={"interpolationAlphaPercents": [50, 25, 50, 25, 75]}))
    assert str(error).startswith("spec.checkpoints.candidates.interpolationAlphaPercents: ")
    assert "25, 50 repeated" in error.message
    assert errors_of(with_changes(checkpoints__candidates={"interpolationAlphaPercents": [10, 90]})) == []
    assert errors_of(with_changes(checkpoints__candidates={"interpolationAlphaPercents": []})) == []


def test_guard_and_candidate_bounds_are_schema_errors() -> None:
    parsed = parse_spec(
        with_changes(
            forgetting={"gracePercent": 101, "divergenceFactor": 1},
            checkpoints__candidates={"interpolationAlphaPercents": [0, 100]},
        )
    )
    assert isinstance(parsed, list)
    assert {e.path for e in parsed} == {
        "spec.forgetting.gracePercent",
        "spec.forgetting.divergenceFactor",
        "spec.checkpoints.candidates.interpolationAlphaPercents[0]",
        "spec.checkpoints.candidates.interpolationAlphaPercents[1]",
    }


def test_learning_rate_probe_bounds_are_schema_errors_and_an_empty_block_is_valid() -> None:
    parsed = parse_spec(
        with_changes(training__learningRateProbe={"multiplierPercents": [0, 10_001], "steps": 1, "evaluations": 0})
    )
    assert isinstance(parsed, list)
    assert {e.path for e in parsed} == {
        "spec.training.learningRateProbe.multiplierPercents[0]",
        "spec.training.learningRateProbe.multiplierPercents[1]",
        "spec.training.learningRateProbe.steps",
        "spec.training.learningRateProbe.evaluations",
    }
    too_many = parse_spec(with_changes(training__learningRateProbe={"multiplierPercents": list(range(1, 10))}))
    assert isinstance(too_many, list) and [e.path for e in too_many] == [
        "spec.training.learningRateProbe.multiplierPercents"
    ]
    assert errors_of(with_changes(training__learningRateProbe={})) == []


def test_local_paths_and_s3_prefixes_are_accepted() -> None:
    raw = with_changes(
        model__base="/mnt/models/llama",
        data__domain=[{"uri": "s3://acme-data.v2/tickets/2024/"}, {"uri": "/data/x.txt", "weight": 3}],
        checkpoints__output="s3://acme/forge/",
    )
    assert errors_of(raw) == []


@pytest.mark.parametrize(
    "image",
    [
        "img:1",
        "registry.example/forge-trainer:test",
        "localhost:5000/team/forge_trainer:v1.2-rc.1",
        "ghcr.io/acme/forge@sha256:" + "a" * 64,
    ],
)
def test_ordinary_image_references_are_accepted(image: str) -> None:
    assert errors_of(with_changes(resources__image=image)) == []


def test_requests_within_limits_in_other_units_are_accepted() -> None:
    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "1073741824"}}
    assert errors_of(with_changes(resources__resources=resources)) == []


POD_TEMPLATE_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "In without values",
        {
            "resources__affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]
                    }
                }
            }
        },
        "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0].values",
        "required",
    ),
    (
        "Gt with a word",
        {
            "resources__affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "preference": {"matchExpressions": [{"key": "n", "operator": "Gt", "values": ["x"]}]},
                        }
                    ]
                }
            }
        },
        "spec.resources.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"
        ".matchExpressions[0].values",
        "one integer",
    ),
    (
        "Exists with values",
        {
            "resources__affinity": {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "labelSelector": {
                                "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]
                            },
                            "topologyKey": "kubernetes.io/hostname",
                        }
                    ]
                }
            }
        },
        "spec.resources.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector"
        ".matchExpressions[0].values",
        "must be empty",
    ),
    (
        "empty pod selector",
        {
            "resources__affinity": {
                "podAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {}, "topologyKey": "kubernetes.io/hostname"}
                    ]
                }
            }
        },
        "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector",
        "selects no pods",
    ),
    (
        "volume with two sources",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}, "secret": {"secretName": "s"}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/d"}],
        },
        "spec.resources.volumes[0]",
        "exactly one of",
    ),
    (
        "volume taking Forge's name",
        {
            "resources__volumes": [{"name": "scratch", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "scratch", "mountPath": "/d"}],
        },
        "spec.resources.volumes[0].name",
        "Forge's own volumes",
    ),
    (
        "repeated volume name",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}}, {"name": "d", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/d"}],
        },
        "spec.resources.volumes[1].name",
        "repeats spec.resources.volumes[0]",
    ),
    (
        "volume never mounted",
        {"resources__volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "c"}}]},
        "spec.resources.volumes[0]",
        "not mounted",
    ),
    (
        "mount of an unknown volume",
        {"resources__volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        "spec.resources.volumeMounts[0].name",
        "not in spec.resources.volumes",
    ),
    (
        "mount hiding the config",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/etc"}],
        },
        "spec.resources.volumeMounts[0].mountPath",
        "hide Forge's /etc/forge",
    ),
    (
        "mount on the scratch folder",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/tmp/forge/"}],
        },
        "spec.resources.volumeMounts[0].mountPath",
        "hide Forge's /tmp/forge",
    ),
    (
        "two mounts on one path",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}}, {"name": "e", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/x"}, {"name": "e", "mountPath": "/x/"}],
        },
        "spec.resources.volumeMounts[1].mountPath",
        "repeats",
    ),
    (
        "subPath escaping the volume",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/x", "subPath": "a/../../b"}],
        },
        "spec.resources.volumeMounts[0].subPath",
        "'..'",
    ),
    (
        "zero emptyDir size",
        {
            "resources__volumes": [{"name": "d", "emptyDir": {"sizeLimit": "0"}}],
            "resources__volumeMounts": [{"name": "d", "mountPath": "/x"}],
        },
        "spec.resources.volumes[0].emptyDir.sizeLimit",
        "must be positive",
    ),
    (
        "Forge's label key",
        {"resources__podLabels": {"forge.dev/forgejob": "other"}},
        'spec.resources.podLabels["forge.dev/forgejob"]',
        "belongs to Forge",
    ),
    (
        "Kueue's label key",
        {"resources__podLabels": {"kueue.x-k8s.io/queue-name": "q"}},
        'spec.resources.podLabels["kueue.x-k8s.io/queue-name"]',
        "spec.scheduling",
    ),
    (
        "Volcano annotation",
        {"resources__podAnnotations": {"scheduling.volcano.sh/queue-name": "q"}},
        'spec.resources.podAnnotations["scheduling.volcano.sh/queue-name"]',
        "gang scheduler",
    ),
    (
        "annotation outside the allow-list",
        {"resources__podAnnotations": {"example.com/owner": "me"}},
        'spec.resources.podAnnotations["example.com/owner"]',
        "FORGE_POD_METADATA_ALLOWED_KEYS",
    ),
    (
        "bad label value",
        {"resources__podLabels": {"team": "has space"}},
        'spec.resources.podLabels["team"]',
        "not a valid label value",
    ),
    (
        "envFrom with both refs",
        {"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]},
        "spec.envFrom[0]",
        "exactly one of secretRef, configMapRef",
    ),
    ("envFrom with no ref", {"envFrom": [{"prefix": "X_"}]}, "spec.envFrom[0]", "got none"),
    (
        "envFrom with the training operator's prefix",
        {"envFrom": [{"prefix": "PET_", "secretRef": {"name": "a"}}]},
        "spec.envFrom[0].prefix",
        "training operator",
    ),
    (
        "gang larger than the run",
        {"scheduling": {"gang": {"minAvailable": 3}}},
        "spec.scheduling.gang.minAvailable",
        "exceeds spec.resources.nodes 2",
    ),
]


@pytest.mark.parametrize(
    ("case", "changes", "path", "words"), POD_TEMPLATE_CASES, ids=[c[0] for c in POD_TEMPLATE_CASES]
)
def test_pod_template_and_gang_problems_name_their_field(
    case: str, changes: dict[str, Any], path: str, words: str
) -> None:
    errors = errors_of(with_changes(**changes))
    assert [e.path for e in errors] == [path], format_errors(errors)
    assert words in errors[0].message


def test_the_full_pod_template_and_gang_example_is_valid() -> None:
    from tests.operator.helpers import GANG_SCHEDULING, POD_TEMPLATE_ENV_FROM, POD_TEMPLATE_RESOURCES

    raw = with_changes(envFrom=POD_TEMPLATE_ENV_FROM, scheduling=GANG_SCHEDULING)
    raw["resources"].update(POD_TEMPLATE_RESOURCES)
    assert errors_of(raw) == []


@pytest.mark.parametrize(
    ("key", "allowed", "ok"),
    [
        ("team", ("*",), True),
        ("example.com/owner", ("*",), False),
        ("example.com/owner", ("example.com/*",), True),
        ("sub.example.com/owner", ("example.com/*",), False),
        ("example.com/owner", ("example.com/owner",), True),
        ("team", (), False),
    ],
)
def test_pod_metadata_allow_list(key: str, allowed: tuple[str, ...], ok: bool) -> None:
    from forge_operator.validation import metadata_key_allowed

    assert metadata_key_allowed(key, allowed) is ok
    raw = with_changes(resources__podAnnotations={key: "v"})
    parsed = parse_spec(raw)
    assert isinstance(parsed, ForgeJobSpec)
    assert (validate("job", parsed, "img:1", allowed) == []) is ok


def test_bad_label_keys_and_mount_paths_are_schema_errors() -> None:
    for raw, path in (
        (with_changes(resources__podLabels={"Bad Key": "v"}), 'spec.resources.podLabels["Bad Key"]'),
        (
            with_changes(resources__volumeMounts=[{"name": "d", "mountPath": "relative"}]),
            "spec.resources.volumeMounts[0].mountPath",
        ),
        (with_changes(scheduling={"gang": {"minAvailable": 0}}), "spec.scheduling.gang.minAvailable"),
        (with_changes(scheduling={"schedulerName": "Volcano"}), "spec.scheduling.schedulerName"),
    ):
        errors = errors_of(raw) if isinstance(parse_spec(raw), ForgeJobSpec) else parse_spec(raw)
        assert isinstance(errors, list) and errors, raw
        assert any(e.path == path for e in errors), format_errors(errors)
