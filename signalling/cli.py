"""The ``konsilium`` command: ``serve``, ``token``, ``bot``, ``recordings``.

Every ``serve`` flag defaults to None so that an unset flag leaves the value
from the environment or the config file in place (see ``signalling.settings``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from signalling.auth import ROOM_ID_RE, Grant, KeyFileError, Tier, TokenAuthority
from signalling.settings import LOG_LEVELS, MEDIA_MODES, SettingsError, load_settings

Handler = Callable[[argparse.Namespace], int]

DEFAULT_GRANTS = (Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE)
SERVE_SETTINGS = (
    "host",
    "port",
    "data_dir",
    "public_url",
    "redis_url",
    "admin_api_key",
    "token_ttl",
    "media_mode",
    "adaptation",
    "reconnect_grace",
    "retention_days",
    "ice_servers",
    "log_level",
    "dev",
    "recording_key_file",
)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, bot_parser = build_parser()
    if args_list[:1] == ["bot"]:
        problem = _attach_bot(bot_parser)
        if problem is not None:
            print(f"konsilium bot: {problem}", file=sys.stderr)
            return 1
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Handler = args.handler
    try:
        return handler(args)
    except SettingsError as exc:
        print(f"konsilium: {exc}", file=sys.stderr)
        return 2


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser, and the ``bot`` sub-parser (filled in only when it is used)."""
    parser = argparse.ArgumentParser(
        prog="konsilium", description="Telemedicine video council server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_token(commands)
    _add_recordings(commands)
    bot = commands.add_parser(
        "bot", help="run a media bot (camera ingest, load test)", add_help=False
    )
    bot.set_defaults(handler=_bot_unavailable)
    return parser, bot


# -- serve -----------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every option can also come from the config file "
        "(same name, e.g. data_dir) or from KONSILIUM_<NAME> (e.g. KONSILIUM_DATA_DIR).",
    )
    _add_config(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    _add_data_dir(p)
    p.add_argument("--public-url", help="base URL used in printed links")
    p.add_argument("--redis-url", help="redis:// URL: share rooms between several nodes")
    p.add_argument(
        "--admin-api-key",
        help="enables POST /api/tokens; prefer KONSILIUM_ADMIN_API_KEY "
        "(a command line is visible to other local users)",
    )
    p.add_argument("--token-ttl", type=int, help="default token lifetime, seconds")
    p.add_argument(
        "--reconnect-grace",
        type=int,
        help="seconds a participant whose link dropped keeps its place (default 30, 0: none)",
    )
    p.add_argument(
        "--retention-days",
        type=int,
        help="days a finished recording is kept before it is deleted "
        "(default 0: forever; a room's retention_days setting overrides it)",
    )
    p.add_argument(
        "--recording-key-file",
        type=Path,
        help="AES-256 keys (base64, one a line, the last one encrypts): recordings are "
        "encrypted at rest (default: none, recordings are stored in the clear)",
    )
    p.add_argument("--media-mode", help=f"one of {', '.join(MEDIA_MODES)} (default forward)")
    p.add_argument(
        "--adaptation",
        type=_on_off,
        metavar="on|off",
        help="per-viewer bandwidth adaptation (default on; off: every viewer gets the originals)",
    )
    p.add_argument(
        "--ice-server",
        dest="ice_servers",
        action="append",
        metavar="URL",
        help="stun:/turn: URL given to clients; repeatable (default: none)",
    )
    p.add_argument("--log-level", help=f"one of {', '.join(LOG_LEVELS)} (default INFO)")
    p.add_argument("--dev", action="store_const", const=True, default=None, help="development mode")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        {name: getattr(args, name) for name in SERVE_SETTINGS}, os.environ, args.config
    )
    from signalling.server import serve

    code: int = serve(settings)
    return code


# -- token -----------------------------------------------------------------------


def _add_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "token",
        help="print a room token signed with this server's key",
        description="Print a room token signed with the key in the data directory "
        "(created there on first use).",
    )
    p.add_argument("--room", required=True, type=_room_arg, help="room id")
    p.add_argument("--sub", required=True, help="participant id (stable per person)")
    p.add_argument("--name", help="display name (default: --sub)")
    p.add_argument("--clinic", default="", help="clinic or hospital")
    p.add_argument("--tier", default=Tier.REGIONAL.value, choices=[t.value for t in Tier])
    p.add_argument(
        "--grant",
        dest="grants",
        action="append",
        choices=[g.value for g in Grant],
        help="repeatable (default: join, publish, subscribe)",
    )
    p.add_argument("--ttl", "--token-ttl", dest="token_ttl", type=int, help="lifetime in seconds")
    _add_data_dir(p)
    _add_config(p)
    p.set_defaults(handler=_token)


def _token(args: argparse.Namespace) -> int:
    settings = load_settings(
        {"data_dir": args.data_dir, "token_ttl": args.token_ttl}, os.environ, args.config
    )
    key_path = TokenAuthority.key_path(settings.data_dir, settings.token_key_file)
    existed = key_path.exists()
    try:
        authority = TokenAuthority.load_or_create(settings.data_dir, settings.token_key_file)
    except (KeyFileError, OSError) as exc:
        print(f"konsilium token: {exc}", file=sys.stderr)
        return 1
    if not existed:
        print(f"konsilium token: created a new signing key at {key_path}", file=sys.stderr)
    try:
        token = authority.mint(
            sub=args.sub,
            name=args.name if args.name is not None else args.sub,
            clinic=args.clinic,
            tier=Tier(args.tier),
            room=args.room,
            grants=[Grant(g) for g in (args.grants or DEFAULT_GRANTS)],
            ttl_s=settings.token_ttl,
        )
    except ValueError as exc:
        print(f"konsilium token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _on_off(value: str) -> bool:
    word = value.strip().lower()
    if word not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return word == "on"


def _room_arg(value: str) -> str:
    if not ROOM_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError("a room id is 1-128 characters of A-Z a-z 0-9 _ . -")
    return value


# -- recordings ------------------------------------------------------------------


def _add_recordings(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from recording.cli import add_recordings_parser

    def add_common(p: argparse.ArgumentParser) -> None:
        _add_data_dir(p)
        _add_config(p)

    add_recordings_parser(commands, add_common)


# -- bot -------------------------------------------------------------------------


def _attach_bot(bot_parser: argparse.ArgumentParser) -> str | None:
    """Add ``media_server.bot``'s arguments; a reason on failure."""
    try:
        from media_server.bot import (  # type: ignore[import-not-found, unused-ignore]
            add_bot_arguments,
            run_bot,
        )
    except ImportError as exc:
        return f"the media bot is not available ({exc})"
    bot_parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    add_bot_arguments(bot_parser)
    bot_parser.set_defaults(handler=run_bot)
    return None


def _bot_unavailable(args: argparse.Namespace) -> int:  # pragma: no cover - main() attaches
    print("konsilium bot: the media bot is not available", file=sys.stderr)
    return 1


# -- shared options --------------------------------------------------------------


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (default: $KONSILIUM_CONFIG)")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, help="keys, recordings and documents (default konsilium-data)"
    )


if __name__ == "__main__":
    sys.exit(main())
