import subprocess
import sys
from pathlib import Path

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


TOKEN = "tok-3f9a-never-print-me"


@pytest.mark.parametrize(("name", "value"), [
    ("EDDY_SERVING", f'["{TOKEN}"]'),                       # the whole section as a JSON list
    ("EDDY_SERVING", f'"{TOKEN}"'),                         # ... as a JSON string
    ("EDDY_SERVING", f'{{"admin_token": ["{TOKEN}"]}}'),    # the secret key, malformed
    ("EDDY_SERVING", f'{{"admin_tokn": "{TOKEN}"}}'),       # a misspelt secret key
    ("EDDY_SERVING", f'[not json {TOKEN}'),                 # not JSON at all
    ("EDDY_SERVING__ADMIN_TOKEN", f'["{TOKEN}"]'),
    ("EDDY_SERVING__PREDICT_TOKEN", f'{{"a": "{TOKEN}"}}'),
    ("EDDY_KAFKA", f'{{"sasl_password": 7, "sasl_pasword": "{TOKEN}"}}'),
    ("EDDY_SERVNG", f'{{"admin_token": "{TOKEN}"}}'),       # a misspelt section is ignored, not echoed
])
def test_config_errors_never_echo_a_secret_from_the_environment(monkeypatch, tmp_path, name, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    try:
        load_settings()
    except ConfigError as exc:
        assert TOKEN not in str(exc)
        assert str(exc).split(":", 1)[0].startswith(("serving", "kafka", "error parsing"))


@pytest.mark.parametrize("body", [
    f'serving = ["{TOKEN}"]\n',
    f'serving = "{TOKEN}"\n',
    f'[serving]\nadmin_token = ["{TOKEN}"]\n',
    f'[serving]\nadmin_tokn = "{TOKEN}"\n',
    f'[kafka]\nsasl_password = {{ value = "{TOKEN}" }}\n',
    f'servng = "{TOKEN}"\n',
])
def test_config_errors_never_echo_a_secret_from_the_file(tmp_path, body):
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert TOKEN not in str(err.value)


def test_cli_config_error_does_not_print_a_secret_given_as_a_section(tmp_path):
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's code, not an installed copy
    env = {"EDDY_SERVING": f'["{TOKEN}"]', "PATH": "/usr/bin:/bin", "PYTHONPATH": repo}
    proc = subprocess.run([sys.executable, "-m", "service.app.cli", "config"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "serving" in proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout


def test_limits_are_validated():
    with pytest.raises(ConfigError, match=r"head\.max_classes: got 0"):
        load_settings(head={"max_classes": 0})
    with pytest.raises(ConfigError, match=r"serving\.max_top_k: got 0"):
        load_settings(serving={"max_top_k": 0})
    s = load_settings(serving={"max_connections": 3, "max_request_chars": 100})
    assert (s.serving.max_connections, s.serving.max_request_chars) == (3, 100)


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
