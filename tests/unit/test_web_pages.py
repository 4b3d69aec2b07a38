"""Browser pages: language choice, the room page's headers and embedded data, static files."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from web.i18n import MESSAGES, pick_language, translations
from web.pages import setup_web

ERROR_CODES = (
    "bad_message",
    "unsupported_version",
    "not_joined",
    "join_timeout",
    "invalid_token",
    "token_expired",
    "token_not_yet_valid",
    "wrong_room",
    "forbidden",
    "bad_sdp",
    "replaced",
    "internal",
    "recording_active",
    "not_recording",
    "recording_failed",
    "disk_full",
    "recording_unavailable",
    "room_not_live",
)
RECORDING_STOP_REASONS = ("stopped", "disk_full", "room_empty", "shutdown", "error")
CONSENT_STATES = ("pending", "granted", "declined")


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    setup_web(app)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _embedded_json(html: str, element_id: str) -> dict[str, str]:
    match = re.search(
        rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S
    )
    assert match, f"no #{element_id} script"
    data = json.loads(match.group(1))
    assert isinstance(data, dict)
    return data


async def test_index_is_russian_by_default(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    html = await resp.text()
    assert '<html lang="ru">' in html
    assert MESSAGES["ru"]["app_name"] in html
    assert MESSAGES["ru"]["index_join_heading"] in html
    assert 'href="?lang=en"' in html  # the language switch


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/?lang=en", {}), ("/", {"Accept-Language": "en-GB,en;q=0.9,ru;q=0.5"})],
)
async def test_index_in_english(
    client: TestClient[web.Request, web.Application], path: str, headers: dict[str, str]
) -> None:
    resp = await client.get(path, headers=headers)
    assert resp.status == 200
    html = await resp.text()
    assert '<html lang="en">' in html
    assert MESSAGES["en"]["index_join_heading"] in html
    assert MESSAGES["ru"]["index_join_heading"] not in html


async def test_query_language_wins_over_header(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/?lang=ru", headers={"Accept-Language": "en"})
    assert '<html lang="ru">' in await resp.text()


async def test_room_page(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/r/room-1")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    assert _embedded_json(html, "i18n") == MESSAGES["ru"]
    config = _embedded_json(html, "config")
    assert config["room"] == "room-1"
    assert config["lang"] == "ru"
    assert re.search(r'<script type="module" src="/static/room\.js\?v=[0-9a-f]+"></script>', html)
    for button in ("btn-camera", "btn-mic", "btn-leave", "btn-record"):
        assert re.search(rf'<button id="{button}"[^>]* aria-label="[^"]+"', html)
    # the recording indicator, the consent dialog and the quality overlays are in the page
    assert re.search(r'<span id="rec" class="rec" role="status" hidden>', html)
    assert MESSAGES["ru"]["recording_on"] in html
    dialog = re.search(r'<dialog id="consent-dialog"[^>]*>', html)
    assert dialog and 'aria-labelledby="consent-title"' in dialog.group(0)
    assert MESSAGES["ru"]["consent_agree"] in html and MESSAGES["ru"]["consent_decline"] in html
    assert MESSAGES["ru"]["video_paused"] in html


async def test_room_page_english(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/r/room-1?lang=en")
    assert _embedded_json(await resp.text(), "i18n") == MESSAGES["en"]


async def test_room_name_is_escaped_in_json(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/r/a.b_c-1")
    html = await resp.text()
    assert _embedded_json(html, "config")["room"] == "a.b_c-1"
    assert "</script><" not in html.split('id="config"', 1)[1].split("</script>", 1)[0]


@pytest.mark.parametrize("path", ["/r/bad%20room!", "/r/" + "x" * 129, "/r/%3Cscript%3E"])
async def test_bad_room_is_404(client: TestClient[web.Request, web.Application], path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 404
    html = await resp.text()
    assert MESSAGES["ru"]["not_found_title"] in html
    assert "<script>" not in html


async def test_static_files_are_served(client: TestClient[web.Request, web.Application]) -> None:
    js = await client.get("/static/room.js")
    assert js.status == 200
    assert "javascript" in js.headers["Content-Type"]
    body = await js.text()
    assert "window.konsilium" in body
    css = await client.get("/static/room.css")
    assert css.status == 200
    assert "text/css" in css.headers["Content-Type"]


def test_every_key_in_both_languages() -> None:
    assert set(MESSAGES) == {"ru", "en"}
    assert set(MESSAGES["ru"]) == set(MESSAGES["en"])
    for lang, messages in MESSAGES.items():
        for key, text in messages.items():
            assert text.strip(), f"{lang}.{key} is empty"


def test_protocol_errors_tiers_roles_and_states_are_translated() -> None:
    keys = (
        [f"error_{code}" for code in ERROR_CODES]
        + [f"tier_{tier}" for tier in ("district", "regional", "federal")]
        + [f"role_{role}" for role in ("chair", "consultant", "observer")]
        + [
            f"state_{state}"
            for state in ("connecting", "connected", "reconnecting", "disconnected", "failed")
        ]
        + ["no_token", "media_unavailable", "you_left", "lang_label", "leave"]
        # built in room.js from protocol values: t(`recording_stopped_${reason}`) ...
        + [f"recording_stopped_{reason}" for reason in RECORDING_STOP_REASONS]
        + [f"consent_state_{state}" for state in CONSENT_STATES]
    )
    for lang in MESSAGES:
        for key in keys:
            assert key in MESSAGES[lang], f"{lang}.{key} missing"


def test_placeholders_match_between_languages() -> None:
    for key, ru in MESSAGES["ru"].items():
        en = MESSAGES["en"][key]
        assert set(re.findall(r"\{(\w+)\}", ru)) == set(re.findall(r"\{(\w+)\}", en)), key


def test_js_uses_only_known_keys() -> None:
    from web.pages import STATIC_DIR

    js = (STATIC_DIR / "room.js").read_text(encoding="utf-8")
    used = set(re.findall(r'\bt\("([a-z_]+)"', js))
    assert used, "no t(...) calls found"
    assert used <= set(MESSAGES["ru"]), used - set(MESSAGES["ru"])
    # keys built from a prefix: every prefix used has its keys (see the test above)
    prefixes = set(re.findall(r"\bt\(`([a-z_]+)\$\{", js))
    assert prefixes == {
        "error_",
        "tier_",
        "role_",
        "state_",
        "recording_stopped_",
        "consent_state_",
    }
    # the error codes room.js translates are the ones tested above
    match = re.search(r"const ERROR_CODES = new Set\(\[(.*?)\]\)", js, re.S)
    assert match
    assert set(re.findall(r'"([a-z_]+)"', match.group(1))) == set(ERROR_CODES)


def test_quality_and_recording_strings() -> None:
    assert MESSAGES["ru"]["quality_reduced"].format(layer="240p") == "240p · слабый канал"
    assert MESSAGES["ru"]["video_paused"] == (
        "Видео приостановлено: слабый канал — идёт только звук"
    )
    assert MESSAGES["ru"]["recording_on"] == "Идёт запись"
    assert MESSAGES["ru"]["consent_agree"] == "Согласен(на)"
    assert MESSAGES["ru"]["consent_decline"] == "Не согласен(на)"
    assert MESSAGES["ru"]["recording_start"] == "Начать запись"
    assert MESSAGES["ru"]["recording_stop"] == "Остановить запись"
    assert MESSAGES["en"]["quality_reduced"].format(layer="240p") == "240p · weak link"


@pytest.mark.parametrize(
    ("query", "header", "expected"),
    [
        (None, None, "ru"),
        ("en", "ru", "en"),
        ("EN", None, "en"),
        ("de", "en-US,en;q=0.9", "en"),
        (None, "de-DE,de;q=0.9,en;q=0.8,ru;q=0.7", "en"),
        (None, "en;q=0.5,ru;q=0.8", "ru"),
        (None, "en;q=0", "ru"),
        (None, "fr, *", "ru"),
        (None, "ru-RU", "ru"),
        ("", "garbage;;q=x", "ru"),
    ],
)
def test_pick_language(query: str | None, header: str | None, expected: str) -> None:
    assert pick_language(query, header) == expected


def test_translations_returns_a_copy_and_falls_back_to_russian() -> None:
    copy = translations("en")
    copy["app_name"] = "changed"
    assert MESSAGES["en"]["app_name"] == "Konsilium"
    assert translations("xx") == MESSAGES["ru"]
