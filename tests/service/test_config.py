import subprocess
import sys

import pytest

from service.app.config import load_settings, redacted
from service.errors import ConfigError


def test_defaults_load_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.kafka.topic == "eddy.events"
    assert s.serving.grpc_port == 50051


def test_toml_then_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ntopic = "from-file"\n[serving]\ngrpc_port = 6000\n')
    monkeypatch.setenv("EDDY_SERVING__GRPC_PORT", "7000")
    s = load_settings(cfg)
    assert s.kafka.topic == "from-file"
    assert s.serving.grpc_port == 7000


def test_invalid_values_name_key_value_and_expectation(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[head]\nkind = "svm"\n[kafka]\nmax_event_bytes = -1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    lines = str(err.value).splitlines()
    assert any(line.startswith("head.kind: got 'svm'") for line in lines)
    assert any(line.startswith("kafka.max_event_bytes: got -1") for line in lines)


def test_unknown_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kafka]\ntopik = 'x'\n")
    with pytest.raises(ConfigError, match=r"kafka\.topik"):
        load_settings(cfg)


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("EDDY_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("EDDY_SERVING__ADMIN_TOKEN", "s3cret")
    dumped = str(redacted(load_settings()))
    assert "hunter2" not in dumped and "s3cret" not in dumped


def test_cli_config_exits_2_naming_the_key(tmp_path):
    env = {"EDDY_SERVING__GRPC_PORT": "abc", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "service.app.cli", "config"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "serving.grpc_port" in proc.stderr
    assert "abc" in proc.stderr


def test_backbone_dim_follows_the_chosen_encoders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings().backbone.dim == 384
    two = load_settings(backbone={"name": ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2"], "precision": "int8"})
    assert two.backbone.dim == 768 and two.backbone.name == ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2"]
    assert load_settings(backbone={"dim": 64}).backbone.dim == 64  # a features-only stream of that width
    with pytest.raises(ConfigError, match="eddy models install all-mpnet-base-v2"):
        load_settings(backbone={"name": "all-mpnet-base-v2", "models_dir": str(tmp_path)})
    # Given its dim, a daemon may start before the model is installed (feature streams still work).
    assert load_settings(backbone={"name": "all-mpnet-base-v2", "models_dir": str(tmp_path), "dim": 768})
