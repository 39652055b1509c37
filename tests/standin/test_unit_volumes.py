"""Pure helpers: volumes as local folders and the mount-path rewriting rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_dev.standin.references import ReplicaStartError, StaticObjectSource
from forge_dev.standin.spec import Container, PodSpec
from forge_dev.standin.volumes import MountMapping, PathRewriter, VolumeLayout, materialise_mounts

pytestmark = pytest.mark.timeout(30)

SOURCE = StaticObjectSource(
    config_maps={"cfg": {"config.json": b'{"a": 1}', "extra.txt": b"extra"}},
    secrets={"creds": {"token": b"s3cret"}},
)


def test_rewriter_matches_whole_path_prefixes_only() -> None:
    rewrite = PathRewriter([MountMapping("/data", Path("/w/data")), MountMapping("/data/sub", Path("/w/sub"))])
    assert rewrite("/data") == "/w/data"
    assert rewrite("/data/x.txt") == "/w/data/x.txt"
    assert rewrite("/data/sub/y") == "/w/sub/y"  # the longest mount path wins
    assert rewrite("--out=/data/x:/data") == "--out=/w/data/x:/w/data"
    assert rewrite("/database /srv/data /data.bak data") == "/database /srv/data /data.bak data"


def test_rewriter_does_not_rescan_its_own_output() -> None:
    rewrite = PathRewriter([MountMapping("/w", Path("/w/w"))])
    assert rewrite("/w/a") == "/w/w/a"


def test_rewriter_without_mounts_is_identity() -> None:
    assert PathRewriter([])("/anything") == "/anything"


def _pod_and_container(volumes: list[dict[str, object]], mounts: list[dict[str, object]]) -> tuple[PodSpec, Container]:
    container = Container.model_validate({"name": "pytorch", "command": ["x"], "volumeMounts": mounts})
    return PodSpec.model_validate({"containers": [], "volumes": volumes}), container


def test_materialise_config_map_secret_subpath_empty_dir_claim_host_path(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    pod, container = _pod_and_container(
        volumes=[
            {
                "name": "cfg",
                "configMap": {"name": "cfg", "items": [{"key": "config.json", "path": "conf/c.json", "mode": 0o600}]},
            },
            {"name": "all", "configMap": {"name": "cfg"}},
            {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "claim", "persistentVolumeClaim": {"claimName": "ckpt"}},
            {"name": "host", "hostPath": {"path": str(host)}},
        ],
        mounts=[
            {"name": "cfg", "mountPath": "/etc/forge/"},
            {"name": "all", "mountPath": "/etc/extra.txt", "subPath": "extra.txt"},
            {"name": "creds", "mountPath": "/var/secrets"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "claim", "mountPath": "/ckpt"},
            {"name": "host", "mountPath": "/host"},
        ],
    )
    layout = VolumeLayout(replica_dir=tmp_path / "r", claims_dir=tmp_path / "pvc")
    mappings = {m.mount_path: m.local_path for m in materialise_mounts(pod, container, layout, SOURCE, fresh=True)}

    assert mappings == {
        "/etc/forge": tmp_path / "r/volumes/cfg",
        "/etc/extra.txt": tmp_path / "r/volumes/all/extra.txt",
        "/var/secrets": tmp_path / "r/volumes/creds",
        "/scratch": tmp_path / "r/volumes/scratch",
        "/ckpt": tmp_path / "pvc/ckpt",
        "/host": host,
    }
    config = tmp_path / "r/volumes/cfg/conf/c.json"
    assert config.read_text() == '{"a": 1}'
    assert config.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "r/volumes/cfg").iterdir()) == ["conf"]  # items: only the listed key
    assert mappings["/etc/extra.txt"].read_text() == "extra"
    token = tmp_path / "r/volumes/creds/token"
    assert token.read_bytes() == b"s3cret"
    assert token.stat().st_mode & 0o777 == 0o400
    assert mappings["/scratch"].is_dir()
    assert mappings["/ckpt"].is_dir()


def test_empty_dir_survives_restarts_but_not_a_fresh_start(tmp_path: Path) -> None:
    pod, container = _pod_and_container([{"name": "s", "emptyDir": {}}], [{"name": "s", "mountPath": "/s"}])
    layout = VolumeLayout(replica_dir=tmp_path, claims_dir=tmp_path / "pvc")
    (local,) = materialise_mounts(pod, container, layout, SOURCE, fresh=True)
    (local.local_path / "kept").write_text("x")
    materialise_mounts(pod, container, layout, SOURCE, fresh=False)
    assert (local.local_path / "kept").exists()
    materialise_mounts(pod, container, layout, SOURCE, fresh=True)
    assert not (local.local_path / "kept").exists()


def test_config_map_volume_is_rewritten_at_every_start(tmp_path: Path) -> None:
    pod, container = _pod_and_container(
        [{"name": "c", "configMap": {"name": "cfg"}}], [{"name": "c", "mountPath": "/c"}]
    )
    layout = VolumeLayout(replica_dir=tmp_path, claims_dir=tmp_path / "pvc")
    (mapping,) = materialise_mounts(pod, container, layout, SOURCE, fresh=True)
    (mapping.local_path / "stale").write_text("x")
    materialise_mounts(pod, container, layout, SOURCE, fresh=False)
    assert sorted(p.name for p in mapping.local_path.iterdir()) == ["config.json", "extra.txt"]


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ({"name": "v", "configMap": {"name": "absent"}}, 'configmap "absent" not found'),
        ({"name": "v", "secret": {"secretName": "creds", "items": [{"key": "nope", "path": "p"}]}}, "non-existent key"),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "config.json", "path": "../up"}]}},
            "must be relative",
        ),
        ({"name": "v", "nfs": {"server": "s", "path": "/"}}, "not supported"),
        ({"name": "other", "emptyDir": {}}, "names no volume"),
    ],
)
def test_volume_errors_keep_the_replica_waiting(tmp_path: Path, volume: dict[str, object], message: str) -> None:
    pod, container = _pod_and_container([volume], [{"name": "v", "mountPath": "/v"}])
    layout = VolumeLayout(replica_dir=tmp_path, claims_dir=tmp_path / "pvc")
    with pytest.raises(ReplicaStartError, match=message):
        materialise_mounts(pod, container, layout, SOURCE, fresh=True)


def test_optional_missing_config_map_gives_an_empty_folder(tmp_path: Path) -> None:
    pod, container = _pod_and_container(
        [{"name": "v", "configMap": {"name": "absent", "optional": True}}], [{"name": "v", "mountPath": "/v"}]
    )
    layout = VolumeLayout(replica_dir=tmp_path, claims_dir=tmp_path / "pvc")
    (mapping,) = materialise_mounts(pod, container, layout, SOURCE, fresh=True)
    assert mapping.local_path.is_dir() and not list(mapping.local_path.iterdir())
