"""User-visible strings of the browser pages, Russian (default) and English.

Every key exists in every language; the tests check it. Strings with ``{name}``
placeholders are formatted in the browser (room.js), never in Python.
"""

from __future__ import annotations

DEFAULT_LANGUAGE = "ru"

MESSAGES: dict[str, dict[str, str]] = {
    "ru": {
        # product and pages
        "app_name": "Консилиум",
        "app_tagline": "Телемедицинские консилиумы по видеосвязи",
        "index_title": "Консилиум — видеосвязь для врачебных консилиумов",
        "index_join_heading": "Как подключиться",
        "index_join_text": (
            "Председатель консилиума присылает каждому участнику личную ссылку. "
            "Откройте её в браузере Chromium, Chrome, Яндекс Браузере или Firefox "
            "и разрешите доступ к камере и микрофону."
        ),
        "index_weak_link_text": (
            "Связь рассчитана и на слабые каналы (спутник, 3G): при нехватке скорости "
            "видео становится проще, а звук сохраняется."
        ),
        "index_privacy_text": (
            "Ссылка личная: не пересылайте её другим. Ключ доступа остаётся в браузере "
            "и не передаётся в адресе запроса."
        ),
        "lang_label": "Язык",
        "lang_ru": "Русский",
        "lang_en": "English",
        "not_found_title": "Страница не найдена",
        "not_found_text": "Такой комнаты нет. Проверьте ссылку, присланную председателем.",
        "back_home": "На главную",
        "skip_to_content": "Перейти к содержимому",
        # room page
        "room_title": "Консилиум",
        "room_label": "Комната",
        "participants_label": "Участники",
        "participants_count": "Участников: {n}",
        "waiting_for_others": "Ожидаем других участников…",
        "you": "Вы",
        "you_suffix": "(вы)",
        "local_preview": "Ваша камера",
        "controls_label": "Управление",
        "notices_label": "Сообщения",
        "connection_label": "Состояние связи",
        "camera_mute": "Выключить камеру",
        "camera_unmute": "Включить камеру",
        "microphone_mute": "Выключить микрофон",
        "microphone_unmute": "Включить микрофон",
        "leave": "Покинуть консилиум",
        "rejoin": "Войти снова",
        "enable_sound": "Включить звук",
        "dismiss": "Закрыть",
        "camera_muted": "Камера выключена",
        "microphone_muted": "Микрофон выключен",
        "screen_share": "Показ экрана",
        "no_video": "Нет видео",
        # connection states
        "state_connecting": "Подключение…",
        "state_connected": "Подключено",
        "state_reconnecting": "Переподключение…",
        "state_disconnected": "Отключено",
        "state_failed": "Нет связи",
        "reconnect_in": "Повторное подключение через {s} с",
        # tiers and roles
        "tier_district": "Районная больница",
        "tier_regional": "Региональный центр",
        "tier_federal": "Федеральный центр",
        "role_chair": "Председатель",
        "role_consultant": "Консультант",
        "role_observer": "Наблюдатель",
        # notices
        "no_token": (
            "В ссылке нет ключа доступа. Откройте полную ссылку, "
            "которую прислал председатель консилиума."
        ),
        "media_unavailable": (
            "Камера и микрофон недоступны: другие участники вас не видят и не слышат. "
            "Проверьте разрешения браузера и подключение устройств."
        ),
        "insecure_context": (
            "Камера и микрофон работают только на защищённой странице: откройте ссылку "
            "с https:// (или попросите администратора настроить HTTPS)."
        ),
        "camera_unavailable": "Камера недоступна: вы участвуете только со звуком.",
        "webrtc_unsupported": (
            "Этот браузер не поддерживает видеосвязь (WebRTC). "
            "Используйте Chromium, Chrome, Яндекс Браузер или Firefox."
        ),
        "observer_notice": "Вы наблюдатель: другие участники вас не видят и не слышат.",
        "you_left": "Вы покинули консилиум.",
        "participant_joined": "{name} подключается к консилиуму",
        "participant_left": "{name} покидает консилиум",
        "participant_disconnected": "{name}: связь потеряна",
        "publish_failed": "Не удалось передать ваше видео и звук. Обновите страницу.",
        "subscribe_failed": "Не удалось принять видео участников. Пробуем снова…",
        "media_connection_lost": "Потеряна связь для видео и звука. Переподключаемся…",
        # protocol error codes (docs/protocol.md)
        "error_bad_message": "Сервер отклонил сообщение страницы.",
        "error_unsupported_version": (
            "Версия страницы не поддерживается сервером. Обновите страницу."
        ),
        "error_not_joined": "Сеанс не начат. Обновите страницу.",
        "error_join_timeout": "Сервер не дождался входа в консилиум.",
        "error_invalid_token": (
            "Ключ доступа в ссылке недействителен. Запросите новую ссылку у председателя."
        ),
        "error_token_expired": "Срок действия ссылки истёк. Запросите новую ссылку у председателя.",
        "error_token_not_yet_valid": "Ссылка ещё не действует: консилиум пока не начался.",
        "error_wrong_room": "Эта ссылка выдана для другого консилиума.",
        "error_forbidden": "Недостаточно прав для этого действия.",
        "error_bad_sdp": "Не удалось согласовать параметры видеосвязи.",
        "error_replaced": "Вы подключились к консилиуму в другом окне или на другом устройстве.",
        "error_internal": "Внутренняя ошибка сервера.",
        "error_unknown": "Ошибка: {message}",
        "close_unauthorized": "Доступ не подтверждён.",
        "close_forbidden": "Доступ запрещён.",
        "error_recording_active": "Консилиум уже записывается.",
        "error_not_recording": "Запись сейчас не ведётся.",
        "error_recording_failed": "Сервер не смог начать запись.",
        "error_disk_full": "Сервер не смог начать запись: на диске нет места.",
        "error_recording_unavailable": "Запись на этом сервере недоступна.",
        "error_room_not_live": "В консилиуме нет участников: запись не начата.",
        "error_forbidden_record": "У вас нет права вести запись консилиума.",
        # video quality (per-viewer adaptation)
        "quality_reduced": "{layer} · слабый канал",
        "quality_title": "Качество видео снижено под скорость вашего канала",
        "video_paused": "Видео приостановлено: слабый канал — идёт только звук",
        # recording and consent
        "recording_on": "Идёт запись",
        "recording_waiting": "Запись ждёт согласия: {n} из {total}",
        "recording_start": "Начать запись",
        "recording_stop": "Остановить запись",
        "recording_stopped_stopped": "Запись консилиума остановлена.",
        "recording_stopped_disk_full": (
            "Запись остановлена: на сервере закончилось место. "
            "Записанное до этого момента сохранено."
        ),
        "recording_stopped_room_empty": "Запись остановлена: в консилиуме не осталось участников.",
        "recording_stopped_shutdown": (
            "Запись остановлена: сервер выключается. Записанное сохранено."
        ),
        "recording_stopped_error": "Запись остановлена из-за ошибки на сервере.",
        "recording_stopped_other": "Запись остановлена ({reason}).",
        "recording_stopped_away": "Запись была остановлена, пока не было связи.",
        "consent_title": "Согласие на запись консилиума",
        "consent_text": (
            "Консилиум записывается для медицинской документации: видео, звук и список "
            "участников сохраняются в защищённом архиве. "
            "Вы согласны на запись с вашим участием?"
        ),
        "consent_started_by": "Запись начал(а): {name}",
        "consent_started_by_system": "Запись начата медицинской информационной системой.",
        "consent_mode_required": "Пока вы не согласитесь, ваши видео и звук не записываются.",
        "consent_mode_default": (
            "Запись уже идёт. Ваш ответ вносится в протокол записи; ответ можно изменить позже."
        ),
        "consent_agree": "Согласен(на)",
        "consent_decline": "Не согласен(на)",
        "consent_declined_title": "Вы не дали согласия на запись",
        "consent_declined_default": (
            "Ваш отказ внесён в протокол записи. Запись консилиума продолжается, "
            "и ваши видео и звук в неё попадают. Если вы не хотите, чтобы вас записывали, "
            "покиньте консилиум."
        ),
        "consent_declined_required": (
            "Ваш отказ внесён в протокол записи. Ваши видео и звук не записываются. "
            "Вы можете покинуть консилиум или остаться."
        ),
        "consent_declined_blocks": (
            "Пока вы в консилиуме, запись остальных участников не начнётся."
        ),
        "consent_stay": "Остаться в консилиуме",
        "consent_state_pending": "Согласие на запись: нет ответа",
        "consent_state_granted": "Вы согласны на запись",
        "consent_state_declined": "Вы не согласны на запись",
        "consent_change": "изменить ответ",
        # recording playback page (web/playback.py)
        "playback_title": "Запись консилиума",
        "playback_consultation": "Консультация",
        "playback_patient": "Пациент",
        "playback_started": "Начало",
        "playback_stopped": "Окончание",
        "playback_sealed": "Подписана сервером: целостность проверяема",
        "playback_not_sealed": "Не подписана: запись прервалась (сбой сервера)",
        "playback_encrypted": "Хранится в зашифрованном виде",
        "playback_audit_note": (
            "Каждый просмотр и каждая загрузка видео записываются в журнал доступа."
        ),
        "playback_composite": "Общая запись (сетка участников)",
        "playback_tracks": "Дорожки участников",
        "playback_no_composite": (
            "Общая запись ещё не подготовлена: ниже — камера и микрофон каждого участника."
        ),
        "playback_in_progress": (
            "Запись ещё идёт: воспроизведение будет доступно после её остановки."
        ),
        "playback_offset": "С отметки",
        "playback_col_name": "Участник",
        "playback_col_clinic": "Учреждение",
        "playback_col_tier": "Уровень",
        "playback_col_role": "Роль",
        "playback_col_consent": "Согласие на запись",
        "playback_consent_granted": "дано",
        "playback_consent_declined": "отказ",
        "playback_consent_pending": "нет ответа",
        "playback_timeline": "Хронология",
        "playback_seek_hint": "Нажмите на время, чтобы перейти к этому месту записи.",
        "playback_ev_recording_started": "Запись начата",
        "playback_ev_recording_stopped": "Запись остановлена",
        "playback_ev_join": "Подключился(-ась)",
        "playback_ev_leave": "Вышел(-ла)",
        "playback_ev_mute": "Выключил(а)",
        "playback_ev_unmute": "Включил(а)",
        "playback_ev_consent_granted": "Дал(а) согласие на запись",
        "playback_ev_consent_declined": "Отказался(-ась) от записи",
        "playback_ev_capture_started": "Все присутствующие согласились: запись идёт",
        "playback_ev_consent_pending": "Не ответили о согласии",
        "playback_ev_recovered": "Журнал восстановлен после сбоя",
        "playback_src_camera": "камера",
        "playback_src_microphone": "микрофон",
        "playback_src_screen": "показ экрана",
        "playback_access_title": "Доступ к записи",
        "playback_access_text": (
            "Откройте персональную ссылку на эту запись: доступ проверяется по ключу из ссылки."
        ),
        "playback_checking": "Проверка доступа…",
        "playback_denied": "Ссылка недействительна или её срок истёк. Запросите новую.",
        "playback_forbidden": "Ваша ссылка не даёт права просматривать записи этой комнаты.",
        "playback_not_found": "Такой записи нет.",
        "playback_key_missing": "Запись зашифрована ключом, которого нет на этом сервере.",
    },
    "en": {
        # product and pages
        "app_name": "Konsilium",
        "app_tagline": "Telemedicine video councils",
        "index_title": "Konsilium — video for medical councils",
        "index_join_heading": "How to join",
        "index_join_text": (
            "The council chair sends every participant a personal link. "
            "Open it in Chromium, Chrome, Yandex Browser or Firefox "
            "and allow access to the camera and microphone."
        ),
        "index_weak_link_text": (
            "Weak links (satellite, 3G) are supported: when bandwidth is short, "
            "video gets simpler while audio keeps going."
        ),
        "index_privacy_text": (
            "The link is personal: do not forward it. Its access key stays in the browser "
            "and is never sent in a request address."
        ),
        "lang_label": "Language",
        "lang_ru": "Русский",
        "lang_en": "English",
        "not_found_title": "Page not found",
        "not_found_text": "There is no such room. Check the link the chair sent you.",
        "back_home": "Home",
        "skip_to_content": "Skip to content",
        # room page
        "room_title": "Konsilium",
        "room_label": "Room",
        "participants_label": "Participants",
        "participants_count": "Participants: {n}",
        "waiting_for_others": "Waiting for other participants…",
        "you": "You",
        "you_suffix": "(you)",
        "local_preview": "Your camera",
        "controls_label": "Controls",
        "notices_label": "Messages",
        "connection_label": "Connection status",
        "camera_mute": "Turn camera off",
        "camera_unmute": "Turn camera on",
        "microphone_mute": "Mute microphone",
        "microphone_unmute": "Unmute microphone",
        "leave": "Leave the council",
        "rejoin": "Join again",
        "enable_sound": "Turn sound on",
        "dismiss": "Dismiss",
        "camera_muted": "Camera off",
        "microphone_muted": "Microphone muted",
        "screen_share": "Screen share",
        "no_video": "No video",
        # connection states
        "state_connecting": "Connecting…",
        "state_connected": "Connected",
        "state_reconnecting": "Reconnecting…",
        "state_disconnected": "Disconnected",
        "state_failed": "Connection failed",
        "reconnect_in": "Reconnecting in {s} s",
        # tiers and roles
        "tier_district": "District hospital",
        "tier_regional": "Regional centre",
        "tier_federal": "Federal centre",
        "role_chair": "Chair",
        "role_consultant": "Consultant",
        "role_observer": "Observer",
        # notices
        "no_token": "The link has no access key. Open the full link the council chair sent you.",
        "media_unavailable": (
            "Camera and microphone are unavailable: the others cannot see or hear you. "
            "Check the browser permissions and that the devices are connected."
        ),
        "insecure_context": (
            "The camera and microphone only work on a secure page: open the link with "
            "https:// (or ask the administrator to set up HTTPS)."
        ),
        "camera_unavailable": "The camera is unavailable: you take part with audio only.",
        "webrtc_unsupported": (
            "This browser does not support video calls (WebRTC). "
            "Use Chromium, Chrome, Yandex Browser or Firefox."
        ),
        "observer_notice": "You are an observer: the others cannot see or hear you.",
        "you_left": "You left the council.",
        "participant_joined": "{name} is joining the council",
        "participant_left": "{name} left the council",
        "participant_disconnected": "{name}: connection lost",
        "publish_failed": "Could not send your video and audio. Reload the page.",
        "subscribe_failed": "Could not receive the participants' video. Retrying…",
        "media_connection_lost": "The media connection was lost. Reconnecting…",
        # protocol error codes (docs/protocol.md)
        "error_bad_message": "The server rejected a message from this page.",
        "error_unsupported_version": (
            "The server does not support this page version. Reload the page."
        ),
        "error_not_joined": "The session has not started. Reload the page.",
        "error_join_timeout": "The server stopped waiting for the join.",
        "error_invalid_token": "The link's access key is not valid. Ask the chair for a new link.",
        "error_token_expired": "The link has expired. Ask the chair for a new link.",
        "error_token_not_yet_valid": "The link is not valid yet: the council has not started.",
        "error_wrong_room": "This link was issued for another council.",
        "error_forbidden": "You are not allowed to do this.",
        "error_bad_sdp": "Could not negotiate the video call parameters.",
        "error_replaced": "You joined this council from another window or device.",
        "error_internal": "Internal server error.",
        "error_unknown": "Error: {message}",
        "close_unauthorized": "Access was not confirmed.",
        "close_forbidden": "Access denied.",
        "error_recording_active": "The council is already being recorded.",
        "error_not_recording": "The council is not being recorded.",
        "error_recording_failed": "The server could not start the recording.",
        "error_disk_full": "The server could not start the recording: its disk is full.",
        "error_recording_unavailable": "Recording is not available on this server.",
        "error_room_not_live": "Nobody is in the council: the recording was not started.",
        "error_forbidden_record": "You are not allowed to record the council.",
        # video quality (per-viewer adaptation)
        "quality_reduced": "{layer} · weak link",
        "quality_title": "Video quality lowered to fit your link",
        "video_paused": "Video paused: weak link — audio only",
        # recording and consent
        "recording_on": "Recording",
        "recording_waiting": "Recording waits for consent: {n} of {total}",
        "recording_start": "Start recording",
        "recording_stop": "Stop recording",
        "recording_stopped_stopped": "The council recording was stopped.",
        "recording_stopped_disk_full": (
            "The recording stopped: the server ran out of disk space. "
            "What was recorded until then is kept."
        ),
        "recording_stopped_room_empty": "The recording stopped: everyone left the council.",
        "recording_stopped_shutdown": (
            "The recording stopped: the server is shutting down. What was recorded is kept."
        ),
        "recording_stopped_error": "The recording stopped because of a server error.",
        "recording_stopped_other": "The recording stopped ({reason}).",
        "recording_stopped_away": "The recording was stopped while you were disconnected.",
        "consent_title": "Consent to recording the council",
        "consent_text": (
            "The council is being recorded for the medical record: video, audio and the list "
            "of participants are kept in a protected archive. "
            "Do you agree to being recorded?"
        ),
        "consent_started_by": "Recording started by {name}",
        "consent_started_by_system": "Recording started by the medical information system.",
        "consent_mode_required": "Until you agree, your video and audio are not recorded.",
        "consent_mode_default": (
            "Recording is already under way. Your answer goes into the recording's log; "
            "you can change it later."
        ),
        "consent_agree": "I agree",
        "consent_decline": "I do not agree",
        "consent_declined_title": "You did not consent to the recording",
        "consent_declined_default": (
            "Your refusal is in the recording's log. The council recording continues "
            "and includes your video and audio. If you do not want to be recorded, "
            "leave the council."
        ),
        "consent_declined_required": (
            "Your refusal is in the recording's log. Your video and audio are not recorded. "
            "You may leave the council or stay."
        ),
        "consent_declined_blocks": (
            "While you are in the council, the others' recording will not start."
        ),
        "consent_stay": "Stay in the council",
        "consent_state_pending": "Recording consent: no answer",
        "consent_state_granted": "You agreed to the recording",
        "consent_state_declined": "You declined the recording",
        "consent_change": "change your answer",
        # recording playback page (web/playback.py)
        "playback_title": "Council recording",
        "playback_consultation": "Consultation",
        "playback_patient": "Patient",
        "playback_started": "Started",
        "playback_stopped": "Ended",
        "playback_sealed": "Sealed by the server: its integrity can be verified",
        "playback_not_sealed": "Not sealed: the recording was interrupted (server failure)",
        "playback_encrypted": "Stored encrypted",
        "playback_audit_note": (
            "Every viewing and every media download is written to the access log."
        ),
        "playback_composite": "Composite (grid of participants)",
        "playback_tracks": "Participants' tracks",
        "playback_no_composite": (
            "The composite has not been rendered: "
            "below are each participant's camera and microphone."
        ),
        "playback_in_progress": "Still recording: playback is available once it stops.",
        "playback_offset": "From",
        "playback_col_name": "Participant",
        "playback_col_clinic": "Clinic",
        "playback_col_tier": "Tier",
        "playback_col_role": "Role",
        "playback_col_consent": "Recording consent",
        "playback_consent_granted": "given",
        "playback_consent_declined": "declined",
        "playback_consent_pending": "no answer",
        "playback_timeline": "Timeline",
        "playback_seek_hint": "Click a time to jump to that point of the recording.",
        "playback_ev_recording_started": "Recording started",
        "playback_ev_recording_stopped": "Recording stopped",
        "playback_ev_join": "Joined",
        "playback_ev_leave": "Left",
        "playback_ev_mute": "Turned off",
        "playback_ev_unmute": "Turned on",
        "playback_ev_consent_granted": "Consented to the recording",
        "playback_ev_consent_declined": "Declined the recording",
        "playback_ev_capture_started": "Everyone present consented: capture started",
        "playback_ev_consent_pending": "No consent answer",
        "playback_ev_recovered": "Journal recovered after a crash",
        "playback_src_camera": "camera",
        "playback_src_microphone": "microphone",
        "playback_src_screen": "screen share",
        "playback_access_title": "Access to the recording",
        "playback_access_text": (
            "Open your personal link to this recording: access is checked with the key in the link."
        ),
        "playback_checking": "Checking access…",
        "playback_denied": "The link is invalid or has expired. Ask for a new one.",
        "playback_forbidden": "Your link does not allow viewing this room's recordings.",
        "playback_not_found": "There is no such recording.",
        "playback_key_missing": "The recording is encrypted with a key this server does not have.",
    },
}

SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(MESSAGES)


def _normalise(tag: str) -> str | None:
    """``en-GB`` -> ``en`` when supported, else None."""
    primary = tag.strip().lower().split("-", 1)[0].split("_", 1)[0]
    return primary if primary in MESSAGES else None


def _parse_accept_language(header: str) -> str | None:
    """Best supported language of an Accept-Language header (RFC 9110 q-values)."""
    best: tuple[float, int, str] | None = None
    for index, item in enumerate(header.split(",")):
        parts = item.strip().split(";")
        tag = parts[0].strip()
        if not tag or tag == "*":
            continue
        quality = 1.0
        for param in parts[1:]:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        lang = _normalise(tag)
        if lang is None or quality <= 0:
            continue
        # higher quality first, then the earlier entry
        key = (quality, -index, lang)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def pick_language(query_lang: str | None, accept_language: str | None) -> str:
    """``?lang=`` wins, then the Accept-Language header, then Russian."""
    if query_lang:
        lang = _normalise(query_lang)
        if lang is not None:
            return lang
    if accept_language:
        lang = _parse_accept_language(accept_language)
        if lang is not None:
            return lang
    return DEFAULT_LANGUAGE


def translations(lang: str) -> dict[str, str]:
    """All strings for ``lang`` (Russian for an unknown language); a copy."""
    return dict(MESSAGES.get(lang, MESSAGES[DEFAULT_LANGUAGE]))
