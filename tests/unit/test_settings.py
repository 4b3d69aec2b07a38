"""Settings: defaults < TOML file < KONSILIUM_* environment < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from signalling.settings import Settings, SettingsError, load_settings


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "konsilium.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_embedded_setup() -> None:
    s = load_settings({}, {}, None)
    assert s == Settings()
    assert (s.host, s.port, s.data_dir) == ("127.0.0.1", 8080, Path("konsilium-data"))
    assert s.public_url is None and s.redis_url is None and s.admin_api_key is None
    assert s.token_ttl == 14400
    assert s.media_mode == "forward"
    assert s.ice_servers == ()
    assert s.log_level == "INFO"
    assert s.dev is False
    assert s.token_key_file is None
    assert s.base_url == "http://127.0.0.1:8080"


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        'host = "10.0.0.1"\nport = 9000\nmedia_mode = "reencode"\nlog_level = "debug"\n',
    )
    env = {"KONSILIUM_PORT": "9100", "KONSILIUM_MEDIA_MODE": "forward"}
    cli: dict[str, object] = {"port": 9200, "host": None, "log_level": None}
    s = load_settings(cli, env, config)
    assert s.host == "10.0.0.1"  # TOML beats the default; CLI None does not override
    assert s.log_level == "DEBUG"  # TOML, normalised
    assert s.media_mode == "forward"  # env beats TOML
    assert s.port == 9200  # CLI beats env
    assert load_settings({}, env, config).port == 9100
    assert load_settings({}, {}, config).port == 9000


def test_every_setting_has_an_environment_variable(tmp_path: Path) -> None:
    env = {
        "KONSILIUM_HOST": "0.0.0.0",
        "KONSILIUM_PORT": "8443",
        "KONSILIUM_DATA_DIR": str(tmp_path / "d"),
        "KONSILIUM_PUBLIC_URL": "https://council.example.org/",
        "KONSILIUM_REDIS_URL": "redis://127.0.0.1:6379/0",
        "KONSILIUM_ADMIN_API_KEY": "s3cret-admin-key",
        "KONSILIUM_TOKEN_TTL": "3600",
        "KONSILIUM_MEDIA_MODE": "reencode",
        "KONSILIUM_ICE_SERVERS": "stun:stun.example.org:3478, turn:turn.example.org ,",
        "KONSILIUM_LOG_LEVEL": "warning",
        "KONSILIUM_DEV": "yes",
        "KONSILIUM_TOKEN_KEY_FILE": str(tmp_path / "k.pem"),
    }
    s = load_settings({}, env, None)
    assert s == Settings(
        host="0.0.0.0",
        port=8443,
        data_dir=tmp_path / "d",
        public_url="https://council.example.org/",
        redis_url="redis://127.0.0.1:6379/0",
        admin_api_key="s3cret-admin-key",
        token_ttl=3600,
        media_mode="reencode",
        ice_servers=("stun:stun.example.org:3478", "turn:turn.example.org"),
        log_level="WARNING",
        dev=True,
        token_key_file=tmp_path / "k.pem",
    )
    assert s.base_url == "https://council.example.org"


def test_empty_environment_value_clears_an_optional_setting(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'redis_url = "redis://db:6379"\nice_servers = ["stun:a"]\n')
    s = load_settings({}, {"KONSILIUM_REDIS_URL": "", "KONSILIUM_ICE_SERVERS": ""}, config)
    assert s.redis_url is None
    assert s.ice_servers == ()


def test_unrelated_environment_is_ignored() -> None:
    s = load_settings({}, {"KONSILIUM_SOMETHING_ELSE": "x", "PORT": "1", "HOST": "h"}, None)
    assert s == Settings()


def test_toml_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
        port = 8081
        dev = true
        data_dir = "data"
        token_key_file = "/etc/konsilium/key.pem"
        ice_servers = ["stun:stun.example.org", "turns:turn.example.org:5349"]
        public_url = "https://k.example.org"
        """.replace("        ", ""),
    )
    s = load_settings({}, {}, config)
    assert s.port == 8081 and s.dev is True
    assert s.data_dir == tmp_path / "data"  # relative to the file, not the working directory
    assert s.token_key_file == Path("/etc/konsilium/key.pem")
    assert s.ice_servers == ("stun:stun.example.org", "turns:turn.example.org:5349")
    assert s.base_url == "https://k.example.org"


def test_konsilium_config_names_the_file_unless_given(tmp_path: Path) -> None:
    from_env = write_toml(tmp_path, "port = 7001\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("port = 7002\n")
    env = {"KONSILIUM_CONFIG": str(from_env)}
    assert load_settings({}, env, None).port == 7001
    assert load_settings({}, env, explicit).port == 7002


def test_cli_values_take_their_natural_types(tmp_path: Path) -> None:
    cli: dict[str, object] = {
        "data_dir": tmp_path,
        "ice_servers": ["stun:one", "turn:two"],
        "dev": True,
        "token_ttl": 120,
    }
    s = load_settings(cli, {"KONSILIUM_ICE_SERVERS": "stun:env"}, None)
    assert s.data_dir == tmp_path
    assert s.ice_servers == ("stun:one", "turn:two")
    assert s.dev is True
    assert s.token_ttl == 120


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
        ("0.0.0.0", 80, "http://127.0.0.1:80"),
        ("konsilium.local", 8000, "http://konsilium.local:8000"),
        ("::", 8080, "http://[::1]:8080"),
        ("fe80::1", 8080, "http://[fe80::1]:8080"),
    ],
)
def test_base_url_is_derived_from_host_and_port(host: str, port: int, expected: str) -> None:
    assert Settings(host=host, port=port).base_url == expected


# -- errors ------------------------------------------------------------------------


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'data-dir = "x"\n')
    with pytest.raises(SettingsError, match="'data-dir' is not a setting") as info:
        load_settings({}, {}, config)
    assert str(config) in str(info.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('port = "8080"', "port"),
        ("port = 70000", "port"),
        ("port = true", "port"),
        ('media_mode = "transcode"', "media_mode"),
        ('ice_servers = "stun:x"', "ice_servers"),
        ('ice_servers = ["http://x"]', "ice_servers"),
        ("token_ttl = 5", "token_ttl"),
        ('log_level = "LOUD"', "log_level"),
        ('dev = "yes"', "dev"),
        ('public_url = "council.example.org"', "public_url"),
        ('redis_url = "http://db"', "redis_url"),
        ('host = ""', "host"),
        ("[data_dir]\npath = 'x'", "data_dir"),
    ],
)
def test_bad_toml_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    config = write_toml(tmp_path, toml + "\n")
    with pytest.raises(SettingsError, match=f"key '{key}'"):
        load_settings({}, {}, config)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KONSILIUM_PORT", "eighty"),
        ("KONSILIUM_PORT", "-1"),
        ("KONSILIUM_TOKEN_TTL", "1e3"),
        ("KONSILIUM_DEV", "maybe"),
        ("KONSILIUM_MEDIA_MODE", "mix"),
        ("KONSILIUM_ICE_SERVERS", "stun:ok,turn"),
        ("KONSILIUM_DATA_DIR", ""),
    ],
)
def test_bad_environment_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"environment variable {name}:"):
        load_settings({}, {name: value}, None)


def test_bad_cli_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--media-mode: expected one of forward, reencode"):
        load_settings({"media_mode": "both"}, {}, None)
    with pytest.raises(SettingsError, match="--nope"):
        load_settings({"nope": 1}, {}, None)


def test_the_admin_key_is_never_echoed(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "admin_api_key = 987654321\n")
    with pytest.raises(SettingsError, match="key 'admin_api_key'") as info:
        load_settings({}, {}, config)
    assert "987654321" not in str(info.value)
    with pytest.raises(SettingsError, match="--admin-api-key"):
        load_settings({"admin_api_key": "   "}, {}, None)
    assert "hunter2" not in repr(Settings(admin_api_key="hunter2-hunter2"))


def test_missing_or_broken_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        load_settings({}, {}, tmp_path / "missing.toml")
    broken = write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({}, {}, broken)
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        load_settings({}, {"KONSILIUM_CONFIG": str(tmp_path / "missing.toml")}, None)


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(SettingsError, match="media_mode"):
        Settings(media_mode="nope")
    with pytest.raises(SettingsError, match="port"):
        Settings(port=-5)
