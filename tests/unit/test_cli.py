"""The ``konsilium`` command line: token printing, settings errors, dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from signalling import cli
from signalling.auth import AuthError, Grant, Tier, TokenAuthority
from signalling.settings import Settings


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KONSILIUM_CONFIG", "KONSILIUM_DATA_DIR", "KONSILIUM_TOKEN_TTL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_token_prints_a_token_signed_with_the_data_dir_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    code, out, err = run(
        capsys,
        *("token", "--room", "council-3", "--sub", "u-9", "--name", "Сидоров"),
        *("--clinic", "ОКБ", "--tier", "federal", "--grant", "join", "--grant", "chair"),
        *("--ttl", "600", "--data-dir", str(data_dir)),
    )
    assert code == 0, err
    token = out.strip()
    assert out.count("\n") == 1 and token  # only the token on stdout, for $(konsilium token …)
    assert "created a new signing key" in err

    claims = TokenAuthority.load_or_create(data_dir).verify(
        token, room="council-3", require=Grant.CHAIR
    )
    assert claims.sub == "u-9" and claims.name == "Сидоров" and claims.clinic == "ОКБ"
    assert claims.tier is Tier.FEDERAL
    assert claims.grants == {Grant.JOIN, Grant.CHAIR}
    assert claims.exp - claims.iat == 600

    other = TokenAuthority.load_or_create(tmp_path / "another-data-dir")
    with pytest.raises(AuthError):
        other.verify(token)


def test_token_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    TokenAuthority.load_or_create(data_dir)  # the key already exists: nothing said about it
    code, out, err = run(
        capsys, "token", "--room", "r1", "--sub", "u-1", "--data-dir", str(data_dir)
    )
    assert code == 0
    assert err == ""
    claims = TokenAuthority.load_or_create(data_dir).verify(out.strip())
    assert claims.tier is Tier.REGIONAL
    assert claims.grants == {Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE}
    assert claims.name == "u-1" and claims.clinic == ""
    assert claims.exp - claims.iat == Settings().token_ttl


def test_token_reads_data_dir_and_ttl_from_config_and_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "k.toml"
    config.write_text('data_dir = "from-config"\ntoken_ttl = 7200\n')
    monkeypatch.setenv("KONSILIUM_CONFIG", str(config))
    code, out, _ = run(capsys, "token", "--room", "r1", "--sub", "u-1")
    assert code == 0
    claims = TokenAuthority.load_or_create(tmp_path / "from-config").verify(out.strip())
    assert claims.exp - claims.iat == 7200

    monkeypatch.setenv("KONSILIUM_TOKEN_TTL", "120")
    code, out, _ = run(capsys, "token", "--room", "r1", "--sub", "u-1")
    claims = TokenAuthority.load_or_create(tmp_path / "from-config").verify(out.strip())
    assert claims.exp - claims.iat == 120


@pytest.mark.parametrize(
    "args",
    [
        ["--tier", "provincial"],
        ["--grant", "root"],
        ["--room", "bad room"],
        ["--ttl", "soon"],
    ],
)
def test_token_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    base = ["token", "--room", "r1", "--sub", "u-1", "--data-dir", str(tmp_path / "d")]
    code, out, err = run(capsys, *base, *args)
    assert code == 2
    assert out == ""
    assert args[0] in err
    assert not (tmp_path / "d").exists()  # nothing created for a refused command


def test_settings_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "--room", "r1", "--sub", "u-1", "--ttl", "5")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("konsilium: --token-ttl: expected seconds between 60 and 86400")


def test_serve_builds_settings_from_flags_and_calls_the_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Settings] = []
    fake = types.ModuleType("signalling.server")

    def serve(settings: Settings) -> int:
        seen.append(settings)
        return 7

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "signalling.server", fake)
    monkeypatch.setenv("KONSILIUM_PORT", "9001")
    monkeypatch.setenv("KONSILIUM_HOST", "10.1.1.1")
    code, _, err = run(
        capsys,
        *("serve", "--port", "9002", "--data-dir", str(tmp_path / "d"), "--dev"),
        *("--ice-server", "stun:a.example.org", "--ice-server", "turn:b.example.org"),
        *("--media-mode", "reencode", "--log-level", "warning"),
    )
    assert code == 7, err
    (settings,) = seen
    assert settings.port == 9002  # flag beats environment
    assert settings.host == "10.1.1.1"  # unset flag leaves the environment's value
    assert settings.data_dir == tmp_path / "d"
    assert settings.dev is True
    assert settings.ice_servers == ("stun:a.example.org", "turn:b.example.org")
    assert settings.media_mode == "reencode"
    assert settings.log_level == "WARNING"


def test_serve_with_a_bad_flag_value_does_not_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[Any] = []
    fake = types.ModuleType("signalling.server")
    fake.serve = called.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "signalling.server", fake)
    code, _, err = run(capsys, "serve", "--ice-server", "http://stun.example.org")
    assert code == 2
    assert called == []
    assert "--ice-servers" in err


def test_help_works_and_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("serve", "token", "bot"):
        assert command in out
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_bot_dispatches_to_media_server_bot(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("media_server.bot")
    received: list[Any] = []

    def add_bot_arguments(parser: Any) -> None:
        parser.add_argument("--url", required=True)

    def run_bot(args: Any) -> int:
        received.append(args.url)
        return 3

    fake.add_bot_arguments = add_bot_arguments  # type: ignore[attr-defined]
    fake.run_bot = run_bot  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "media_server.bot", fake)
    code, _, _ = run(capsys, "bot", "--url", "ws://x")
    assert (code, received) == (3, ["ws://x"])


def test_bot_without_the_media_bot_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "media_server.bot", None)  # import fails
    code, out, err = run(capsys, "bot", "--anything")
    assert code == 1
    assert out == ""
    assert err.startswith("konsilium bot: the media bot is not available")


def test_serve_with_a_bad_recording_key_file_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("not a key\n")
    key_file.chmod(0o600)
    code = cli.main(
        ["serve", "--data-dir", str(tmp_path / "data"), "--recording-key-file", str(key_file)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("konsilium: ") and err.count("\n") == 1
    assert "Traceback" not in err
