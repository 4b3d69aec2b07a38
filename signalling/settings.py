"""Server settings: defaults < TOML file < environment < command line.

One name per setting everywhere: TOML key ``data_dir``, environment variable
``KONSILIUM_DATA_DIR``, flag ``--data-dir``. ``KONSILIUM_CONFIG`` names the
TOML file when ``--config`` is not given. In the environment, lists are
comma-separated and booleans are ``1/true/yes/on`` or ``0/false/no/off``; an
empty value for an optional setting means "none". Relative paths in a TOML
file are relative to that file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ENV_PREFIX = "KONSILIUM_"
CONFIG_ENV = "KONSILIUM_CONFIG"
MEDIA_MODES = ("forward", "reencode")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")
TOKEN_TTL_RANGE = (60, 86400)


class SettingsError(Exception):
    """A setting has an unknown name or a bad value; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("konsilium-data")
    public_url: str | None = None
    redis_url: str | None = None
    admin_api_key: str | None = field(default=None, repr=False)
    token_ttl: int = 14400
    media_mode: str = "forward"
    adaptation: bool = True  # per-viewer bandwidth adaptation (off: original streams only)
    reconnect_grace: int = 30  # seconds a dropped participant keeps its place (0: none)
    retention_days: int = 0  # days a finished recording is kept (0: forever); rooms may override
    ice_servers: tuple[str, ...] = ()
    log_level: str = "INFO"
    dev: bool = False
    token_key_file: Path | None = None
    recording_key_file: Path | None = None  # AES-256 keys: recordings encrypted at rest

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                _CHECKS[f.name](getattr(self, f.name))
            except ValueError as exc:
                raise SettingsError(f"{f.name}: {exc}") from None

    @property
    def base_url(self) -> str:
        """The URL printed in links: ``public_url``, else ``http://host:port``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Settings))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_settings(
    cli: Mapping[str, object], env: Mapping[str, str], config_file: Path | None
) -> Settings:
    """Merge defaults, the TOML file, ``KONSILIUM_*`` variables and CLI values (None = unset).

    ``config_file`` falls back to ``$KONSILIUM_CONFIG``. Raises :class:`SettingsError`.
    """
    values: dict[str, object] = {}
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    if config_file is not None:
        values.update(_from_toml(config_file))
    values.update(_from_env(env))
    values.update(_from_cli(cli))
    return Settings(**values)  # type: ignore[arg-type]  # each value was checked by _parse


# -- sources ---------------------------------------------------------------------


def _from_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: not valid TOML: {exc}") from None
    out: dict[str, object] = {}
    for key, value in raw.items():
        label = f"config file {path}: key {key!r}"
        if key not in FIELD_NAMES:
            raise SettingsError(f"{label} is not a setting (known: {', '.join(FIELD_NAMES)})")
        parsed = _parse(label, key, value, text=False)
        if isinstance(parsed, Path) and not parsed.is_absolute():
            parsed = path.parent / parsed
        out[key] = parsed
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in FIELD_NAMES:
        name = env_name(key)
        if name in env:
            out[key] = _parse(f"environment variable {name}", key, env[name], text=True)
    return out


def _from_cli(cli: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in cli.items():
        if value is None:
            continue
        label = flag_name(key)
        if key not in FIELD_NAMES:
            raise SettingsError(f"{label} is not a setting")
        out[key] = _parse(label, key, value, text=False)
    return out


def _parse(label: str, key: str, value: object, *, text: bool) -> object:
    """Convert one raw value (a string if ``text``) and check it; errors name ``label``."""
    try:
        parsed = _CONVERTERS[key](value, text)
        _CHECKS[key](parsed)
    except ValueError as exc:
        raise SettingsError(f"{label}: {exc}") from None
    return parsed


# -- converters: raw value -> typed value ----------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


def _to_str(value: object, text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value.strip() if text else value


def _to_opt_str(value: object, text: bool) -> str | None:
    s = _to_str(value, text)
    return None if text and not s else s


def _to_int(value: object, text: bool) -> int:
    if text and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    return value


def _to_bool(value: object, text: bool) -> bool:
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value[:40]!r}")
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _to_path(value: object, text: bool) -> Path:
    if isinstance(value, Path):
        return value
    s = _to_str(value, text)
    if not s:
        raise ValueError("expected a path, got an empty string")
    return Path(s).expanduser()


def _to_opt_path(value: object, text: bool) -> Path | None:
    if text and isinstance(value, str) and not value.strip():
        return None
    return _to_path(value, text)


def _to_str_tuple(value: object, text: bool) -> tuple[str, ...]:
    if text and isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {_type_name(value)}")
    return tuple(value)


def _to_upper(value: object, text: bool) -> str:
    return _to_str(value, text).upper()


_CONVERTERS: dict[str, Callable[[object, bool], object]] = {
    "host": _to_str,
    "port": _to_int,
    "data_dir": _to_path,
    "public_url": _to_opt_str,
    "redis_url": _to_opt_str,
    "admin_api_key": _to_opt_str,
    "token_ttl": _to_int,
    "media_mode": _to_str,
    "adaptation": _to_bool,
    "reconnect_grace": _to_int,
    "retention_days": _to_int,
    "ice_servers": _to_str_tuple,
    "log_level": _to_upper,
    "dev": _to_bool,
    "token_key_file": _to_opt_path,
    "recording_key_file": _to_opt_path,
}


# -- checks: typed value -> ValueError if bad -------------------------------------


def _check_host(value: object) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or address without spaces")


def _check_port(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {value!r}")


def _check_path(value: object) -> None:
    if not isinstance(value, Path):
        raise ValueError(f"expected a path, got {_type_name(value)}")


def _check_opt_path(value: object) -> None:
    if value is not None:
        _check_path(value)


def _check_url(schemes: tuple[str, ...]) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise ValueError(f"expected a URL, got {_type_name(value)}")
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.path):
            raise ValueError(f"expected a {' or '.join(schemes)} URL, got {value[:80]!r}")
        if parts.scheme in ("http", "https") and not parts.netloc:
            raise ValueError(f"expected a URL with a host, got {value[:80]!r}")

    return check


def _check_secret(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")  # never echo a secret


def _check_ttl(value: object) -> None:
    low, high = TOKEN_TTL_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"expected seconds between {low} and {high}, got {value!r}")


def _check_grace(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 600:
        raise ValueError(f"expected seconds between 0 and 600, got {value!r}")


def _check_retention(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 36500:
        raise ValueError(f"expected days between 0 (keep forever) and 36500, got {value!r}")


def _check_choice(choices: tuple[str, ...]) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")

    return check


def _check_ice_servers(value: object) -> None:
    if not isinstance(value, tuple):
        raise ValueError(f"expected a list of URLs, got {_type_name(value)}")
    for url in value:
        scheme, _, rest = url.partition(":") if isinstance(url, str) else ("", "", "")
        if scheme.lower() not in ICE_SCHEMES or not rest or any(c.isspace() for c in rest):
            raise ValueError(f"expected stun:, stuns:, turn: or turns: URLs, got {url!r}")


def _check_bool(value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")


_CHECKS: dict[str, Callable[[object], None]] = {
    "host": _check_host,
    "port": _check_port,
    "data_dir": _check_path,
    "public_url": _check_url(("http", "https")),
    "redis_url": _check_url(("redis", "rediss", "unix")),
    "admin_api_key": _check_secret,
    "token_ttl": _check_ttl,
    "media_mode": _check_choice(MEDIA_MODES),
    "adaptation": _check_bool,
    "reconnect_grace": _check_grace,
    "retention_days": _check_retention,
    "ice_servers": _check_ice_servers,
    "log_level": _check_choice(LOG_LEVELS),
    "dev": _check_bool,
    "token_key_file": _check_opt_path,
    "recording_key_file": _check_opt_path,
}
