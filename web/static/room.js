// Konsilium council room: signalling over one WebSocket (docs/protocol.md),
// media over two peer connections (publish: we offer; subscribe: the server offers).
// Plain ES2020 module, no build step, no dependencies, nothing fetched at runtime.
//
// The access token is read from the URL fragment (#t=<jwt>). Fragments are never sent
// to the server by the browser; the token only travels inside the `join` message and
// is never logged.

const PROTOCOL_VERSION = 1;
const ICE_GATHER_TIMEOUT_MS = 5000; // the server does not do trickle ICE
const PING_INTERVAL_MS = 10000;
const PONG_TIMEOUT_MS = 30000;
const PC_DISCONNECTED_GRACE_MS = 20000;
const RETRY_DELAYS_S = [1, 2, 4, 8, 15];
const NO_RETRY_CLOSE_CODES = new Set([4400, 4401, 4403, 4409]);
// after these, joining again with the same link cannot work: no "join again" button
const HOPELESS_ERRORS = new Set(["invalid_token", "token_expired", "wrong_room", "forbidden"]);
const VIDEO_CONSTRAINTS = { width: 640, height: 360, frameRate: 30 };
const TILE_GAP_PX = 12; // keep in sync with .tiles gap in room.css
const TILE_CAPTION_PX = 52; // keep in sync with .tile figcaption height
const TILE_MIN_WIDTH_PX = 240;
const ERROR_CODES = new Set([
  "bad_message", "unsupported_version", "not_joined", "join_timeout", "invalid_token",
  "token_expired", "token_not_yet_valid", "wrong_room", "forbidden", "bad_sdp",
  "replaced", "internal", "recording_active", "not_recording", "recording_failed", "disk_full",
  "recording_unavailable", "room_not_live",
]);
const RECORDING_REFS = new Set(["recording_start", "recording_stop", "consent"]);
const RECORDING_STOP_REASONS = new Set(["stopped", "disk_full", "room_empty", "shutdown", "error"]);
const RECORDING_PENDING_TIMEOUT_MS = 15000; // no answer to start/stop: enable the button again
const RECORDING_NOTICE_MS = 15000;
const ADMIN_ACTOR = "admin-api"; // recording_started.started_by for the REST API

const $ = (id) => document.getElementById(id);
const T = JSON.parse($("i18n").textContent);
const CONFIG = JSON.parse($("config").textContent);

function t(key, vars) {
  let text = Object.prototype.hasOwnProperty.call(T, key) ? T[key] : key;
  if (vars) {
    for (const [name, value] of Object.entries(vars)) {
      text = text.split(`{${name}}`).join(String(value));
    }
  }
  return text;
}

// ---------------------------------------------------------------- state

const S = {
  token: null,
  gen: 0, // bumped on every (re)connection; async work of an older one stops
  ws: null,
  joined: false,
  everJoined: false,
  left: false,
  fatal: false,
  retries: 0,
  retryTimer: null,
  retryIn: 0,
  self: null,
  iceServers: [],
  participants: new Map(), // id -> participant (others)
  tiles: new Map(), // id -> {root, media, elements: Map(key -> HTMLMediaElement)}
  tracks: new Map(), // mid -> track (subscribe connection mapping)
  localStream: null,
  mediaTried: false,
  muted: { camera: false, microphone: false },
  pubPc: null,
  publishState: "none", // none | preparing | offering | <RTCPeerConnectionState>
  pendingPublishAnswer: null,
  subPc: null,
  queue: Promise.resolve(), // server messages are handled one after another
  pingTimer: null,
  lastPong: 0,
  disconnectTimer: null,
  lastError: null,
  soundBlocked: new Set(),
  // video_quality: `${participant_id}:${source}` -> {participantId, source, layer, reason}
  quality: new Map(),
  // the room's recording: {id, startedBy, consentRequired, capturing, consent: {id: state}}
  recording: null,
  speaker: null, // the active speaker's participant id (server's active_speaker)
  recordingStale: false, // rejoined: is the recording still on? the next message tells
  recordingPending: null, // "recording_start" | "recording_stop" sent, not yet answered
  recordingPendingTimer: null,
  consentAskedFor: null, // recording id the dialog was opened for (once per recording)
  answers: new Map(), // recording id -> our answer; re-sent after a reconnect
};

// ---------------------------------------------------------------- notices

function notice(key, text, level = "info", { timeoutMs = 0, dismissible = true } = {}) {
  const box = $("notices");
  let el = key ? box.querySelector(`[data-key="${CSS.escape(key)}"]`) : null;
  if (!el) {
    el = document.createElement("div");
    el.className = "notice";
    if (key) el.dataset.key = key;
    const span = document.createElement("span");
    span.className = "text";
    el.append(span);
    if (dismissible) {
      const close = document.createElement("button");
      close.type = "button";
      close.textContent = "×";
      close.setAttribute("aria-label", t("dismiss"));
      close.title = t("dismiss");
      close.addEventListener("click", () => el.remove());
      el.append(close);
    }
    box.append(el);
  }
  el.classList.remove("info", "warn", "error");
  el.classList.add(level);
  el.setAttribute("role", level === "error" ? "alert" : "status");
  el.querySelector(".text").textContent = text;
  if (timeoutMs > 0) {
    clearTimeout(el._timer);
    el._timer = setTimeout(() => el.remove(), timeoutMs);
  }
  return el;
}

function clearNotice(key) {
  const el = $("notices").querySelector(`[data-key="${CSS.escape(key)}"]`);
  if (el) el.remove();
}

function errorText(code, message) {
  if (ERROR_CODES.has(code)) return t(`error_${code}`);
  return t("error_unknown", { message: message || code || "?" });
}

// ---------------------------------------------------------------- connection indicator

function overallState() {
  if (S.left) return "disconnected";
  if (S.fatal) return "failed";
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN || !S.joined) {
    return S.everJoined ? "reconnecting" : "connecting";
  }
  const states = [S.pubPc, S.subPc].filter(Boolean).map((pc) => pc.connectionState);
  if (states.includes("failed") || states.includes("disconnected")) return "reconnecting";
  if (states.some((s) => s === "new" || s === "connecting")) return "connecting";
  if (S.publishState === "preparing" || S.publishState === "offering") return "connecting";
  if (S.publishState === "failed") return "failed";
  return "connected";
}

function renderState() {
  const state = overallState();
  const conn = $("conn");
  conn.dataset.state = state;
  let text = t(`state_${state}`);
  if (state === "reconnecting" && S.retryTimer && S.retryIn > 0) {
    text = t("reconnect_in", { s: S.retryIn });
  }
  $("conn-text").textContent = text;
  const others = S.participants.size;
  $("participant-count").textContent = S.joined ? t("participants_count", { n: others + 1 }) : "";
  $("waiting").hidden = !(S.joined && others === 0) || S.left || S.fatal;
  scheduleLayout();
}

// ---------------------------------------------------------------- layout

// Pick the column count that gives the largest 16:9 tiles in the space left.
function layoutTiles() {
  layoutPending = false;
  const box = $("tiles");
  const tiles = [...box.children].filter((el) => !el.hidden);
  const n = tiles.length;
  const width = box.clientWidth;
  const height = box.clientHeight;
  if (n === 0 || width === 0) return;
  let best = { cols: 1, w: 0 };
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const byWidth = (width - TILE_GAP_PX * (cols - 1)) / cols;
    const byHeight = (((height - TILE_GAP_PX * (rows - 1)) / rows - TILE_CAPTION_PX) * 16) / 9;
    const w = Math.min(byWidth, byHeight);
    if (w > best.w + 1) best = { cols, w };
  }
  const scrolling = best.w < TILE_MIN_WIDTH_PX;
  box.classList.toggle("scrolling", scrolling);
  if (scrolling) {
    // too small to fit: keep tiles readable and let the grid scroll
    best.cols = Math.max(1, Math.floor((width + TILE_GAP_PX) / (TILE_MIN_WIDTH_PX + TILE_GAP_PX)));
    best.w = (width - TILE_GAP_PX * (best.cols - 1)) / best.cols;
  }
  box.style.setProperty("--cols", String(best.cols));
  box.style.setProperty("--tile-w", `${Math.floor(best.w)}px`);
  box.classList.add("laid-out");
}

let layoutPending = false;
function scheduleLayout() {
  if (layoutPending) return;
  layoutPending = true;
  requestAnimationFrame(layoutTiles);
}

// ---------------------------------------------------------------- WebSocket

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${CONFIG.ws_path || "/ws"}`;
}

function send(msg) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) {
    S.ws.send(JSON.stringify(msg));
    return true;
  }
  return false;
}

function connect() {
  S.retryTimer = null;
  S.retryIn = 0;
  const gen = ++S.gen;
  const ws = new WebSocket(wsUrl());
  S.ws = ws;
  S.lastError = null;
  ws.onopen = () => {
    if (gen !== S.gen) return;
    ws.send(JSON.stringify({ type: "join", v: PROTOCOL_VERSION, room: CONFIG.room, token: S.token }));
    renderState();
  };
  ws.onmessage = (ev) => {
    if (gen !== S.gen) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!msg || typeof msg.type !== "string") return;
    // noted at once, not behind a queued negotiation: a close may follow right away
    if (msg.type === "error") S.lastError = { code: msg.code, message: msg.message };
    if (msg.type === "pong") S.lastPong = Date.now();
    S.queue = S.queue
      .then(() => (gen === S.gen ? handle(msg, gen) : undefined))
      .catch((err) => console.warn("konsilium: handling", msg.type, "failed:", err && err.name));
  };
  ws.onclose = (ev) => {
    if (gen !== S.gen) return;
    onSocketClosed(ev.code, ev.reason);
  };
  renderState();
}

function onSocketClosed(code, reason) {
  S.gen += 1; // async work of the closed session stops
  const fatal = NO_RETRY_CLOSE_CODES.has(code);
  teardownSession({ keepTiles: !fatal && !S.left });
  if (S.left) {
    renderState();
    return;
  }
  if (fatal) {
    S.fatal = true;
    let text;
    if (S.lastError) {
      text = errorText(S.lastError.code, S.lastError.message);
      clearNotice(`error-${S.lastError.code}`);
    }
    else if (code === 4401) text = t("close_unauthorized");
    else if (code === 4403) text = t("close_forbidden");
    else if (code === 4409) text = t("error_replaced");
    else text = t("error_bad_message");
    if (!S.lastError && reason) text = `${text} (${reason})`;
    notice("fatal", text, "error", { dismissible: false });
    stopLocalMedia();
    showEndedControls();
    const hopeless = S.lastError ? HOPELESS_ERRORS.has(S.lastError.code) : code !== 4409;
    $("btn-rejoin").hidden = hopeless;
    renderState();
    return;
  }
  scheduleReconnect();
}

function scheduleReconnect() {
  if (S.retryTimer || S.left || S.fatal) return;
  const base = RETRY_DELAYS_S[Math.min(S.retries, RETRY_DELAYS_S.length - 1)];
  S.retries += 1;
  S.retryIn = base;
  const jitterMs = Math.floor(Math.random() * 500);
  S.retryTimer = setTimeout(connect, base * 1000 + jitterMs);
  renderState();
}

// Reconnect means new peer connections for the same identity (aiortc has no ICE restart).
function restartSession() {
  if (S.left || S.fatal) return;
  const ws = S.ws;
  S.gen += 1; // ignore everything from the old socket
  if (ws) {
    ws.onclose = null;
    try {
      ws.close(1000);
    } catch {
      /* already closed */
    }
  }
  teardownSession({ keepTiles: true });
  scheduleReconnect();
}

function startPing(gen) {
  stopPing();
  S.lastPong = Date.now();
  S.pingTimer = setInterval(() => {
    if (gen !== S.gen) return stopPing();
    if (Date.now() - S.lastPong > PONG_TIMEOUT_MS) {
      restartSession();
      return;
    }
    send({ type: "ping", ts: Date.now() });
  }, PING_INTERVAL_MS);
}

function stopPing() {
  if (S.pingTimer) clearInterval(S.pingTimer);
  S.pingTimer = null;
}

// Closes the peer connections; keeps the local camera. With keepTiles (reconnecting)
// the others' tiles stay, greyed, until the next `joined` says who is still there.
function teardownSession({ keepTiles = false } = {}) {
  stopPing();
  clearTimeout(S.disconnectTimer);
  S.disconnectTimer = null;
  S.joined = false;
  for (const pc of [S.pubPc, S.subPc]) {
    if (pc) {
      try {
        pc.close();
      } catch {
        /* ignore */
      }
    }
  }
  S.pubPc = null;
  S.subPc = null;
  S.publishState = "none";
  if (S.pendingPublishAnswer) S.pendingPublishAnswer.reject(new Error("closed"));
  S.pendingPublishAnswer = null;
  S.tracks.clear();
  S.quality.clear(); // a new subscribe connection starts at the original quality
  setRecordingPending(null);
  if (!keepTiles) {
    S.recording = null; // we are no longer in the room
    S.recordingStale = false;
    closeConsent();
  }
  if (keepTiles) {
    syncMedia(); // detaches the media of the closed connection
    for (const tile of S.tiles.values()) tile.root.classList.add("stale");
  } else {
    for (const id of [...S.tiles.keys()]) removeTile(id);
    S.participants.clear();
  }
  S.queue = Promise.resolve();
  renderRecording();
  renderState();
}

// ---------------------------------------------------------------- messages

async function handle(msg, gen) {
  if (S.recordingStale && msg.type !== "joined" && msg.type !== "recording_started") {
    // after a rejoin the server sends recording_started first if the room is still recorded
    S.recordingStale = false;
    if (S.recording) recordingEnded(t("recording_stopped_away"), "info");
  }
  switch (msg.type) {
    case "joined":
      return onJoined(msg, gen);
    case "publish_answer":
      return onPublishAnswer(msg);
    case "subscribe_offer":
      return onSubscribeOffer(msg, gen).catch((err) => {
        if (gen !== S.gen) return;
        console.warn("konsilium: subscribe failed:", err && err.name);
        notice("subscribe", t("subscribe_failed"), "warn", { timeoutMs: 10000 });
        restartSession();
      });
    case "track_published":
      if (msg.track && msg.track.mid != null) S.tracks.set(String(msg.track.mid), msg.track);
      return syncMedia();
    case "track_unpublished":
      if (msg.track && msg.track.mid != null) {
        const info = S.tracks.get(String(msg.track.mid)) || msg.track;
        S.quality.delete(`${info.participant_id}:${info.source}`);
        S.tracks.delete(String(msg.track.mid));
      }
      return syncMedia();
    case "video_quality":
      return onVideoQuality(msg);
    case "active_speaker":
      return onActiveSpeaker(msg.participant_id);
    case "recording_started":
      return onRecording(msg, true);
    case "recording_status":
      return onRecording(msg, false);
    case "recording_stopped":
      return onRecordingStopped(msg);
    case "participant_joined":
      return onParticipantJoined(msg.participant);
    case "participant_updated":
      return onParticipantUpdated(msg.participant);
    case "participant_left":
      return onParticipantLeft(msg.participant_id, msg.reason);
    case "pong":
      return undefined;
    case "error":
      return onError(msg);
    default:
      return undefined; // newer server: ignore unknown messages
  }
}

// The server's active speaker (from the audio levels it receives): outline the tile.
function onActiveSpeaker(pid) {
  S.speaker = pid || null;
  for (const [id, tile] of S.tiles) tile.root.classList.toggle("speaking", id === S.speaker);
}

function onJoined(msg, gen) {
  S.joined = true;
  S.everJoined = true;
  S.retries = 0;
  S.self = msg.participant;
  S.recordingStale = Boolean(S.recording);
  S.iceServers = Array.isArray(msg.ice_servers) ? msg.ice_servers : [];
  clearNotice("fatal");
  clearNotice("connection");
  updateSelfTile();
  const others = ((msg.room && msg.room.participants) || []).filter((p) => p && p.id !== S.self.id);
  const present = new Set(others.map((p) => p.id));
  for (const id of [...S.participants.keys()]) {
    if (!present.has(id)) {
      S.participants.delete(id);
      removeTile(id);
    }
  }
  for (const tile of S.tiles.values()) tile.root.classList.remove("stale");
  for (const p of others) upsertParticipant(p);
  startPing(gen);
  const grants = S.self.grants || [];
  const canPublish = grants.includes("publish");
  $("btn-mic").hidden = !canPublish;
  $("btn-camera").hidden = !canPublish;
  if (canPublish) {
    // a fresh session on the server: tell it what we have muted
    for (const source of ["camera", "microphone"]) {
      if (S.muted[source]) send({ type: "mute", source, muted: true });
    }
    publish(gen).catch((err) => {
      if (gen !== S.gen) return;
      console.warn("konsilium: publish failed:", err && (err.name || err.message));
      if (S.pubPc) S.pubPc.close();
      S.pubPc = null;
      S.publishState = "failed";
      notice("publish", t("publish_failed"), "error");
      renderState();
    });
  } else {
    notice("observer", t("observer_notice"), "info");
  }
  $("tile-local").hidden = !canPublish;
  renderRecording();
  renderState();
}

function onError(msg) {
  if (msg.ref === "publish_offer" && S.pendingPublishAnswer) {
    S.pendingPublishAnswer.reject(new Error(msg.code)); // publish() shows the notice
    S.pendingPublishAnswer = null;
    return;
  }
  if (RECORDING_REFS.has(msg.ref)) {
    onRecordingError(msg);
    return;
  }
  const level = msg.code === "bad_message" || msg.code === "internal" ? "warn" : "error";
  notice(`error-${msg.code}`, errorText(msg.code, msg.message), level, {
    timeoutMs: level === "warn" ? 10000 : 0,
  });
}

// ---------------------------------------------------------------- publish

function waitIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function newPeerConnection(role) {
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: S.iceServers });
  pc.addEventListener("connectionstatechange", () => onPcState(pc, role));
  return pc;
}

function onPcState(pc, role) {
  if (pc !== S.pubPc && pc !== S.subPc) return;
  if (role === "publish") S.publishState = pc.connectionState;
  const state = pc.connectionState;
  if (state === "failed") {
    notice("connection", t("media_connection_lost"), "warn", { timeoutMs: 10000 });
    restartSession();
    return;
  }
  if (state === "disconnected") {
    if (!S.disconnectTimer) {
      S.disconnectTimer = setTimeout(() => {
        S.disconnectTimer = null;
        const pcs = [S.pubPc, S.subPc].filter(Boolean);
        if (pcs.some((p) => p.connectionState === "disconnected")) {
          notice("connection", t("media_connection_lost"), "warn", { timeoutMs: 10000 });
          restartSession();
        }
      }, PC_DISCONNECTED_GRACE_MS);
    }
  } else if (state === "connected") {
    const pcs = [S.pubPc, S.subPc].filter(Boolean);
    if (!pcs.some((p) => p.connectionState === "disconnected")) {
      clearTimeout(S.disconnectTimer);
      S.disconnectTimer = null;
    }
  }
  renderState();
}

async function acquireMedia() {
  if (S.localStream) return S.localStream;
  if (S.mediaTried) return null;
  S.mediaTried = true;
  const md = navigator.mediaDevices;
  if (!md || !md.getUserMedia) {
    // browsers hide the camera from pages served over plain http (except localhost)
    const why = window.isSecureContext ? t("media_unavailable") : t("insecure_context");
    notice("media", why, "error");
    return null;
  }
  try {
    S.localStream = await md.getUserMedia({ video: VIDEO_CONSTRAINTS, audio: true });
  } catch (err) {
    console.warn("konsilium: camera+microphone unavailable:", err && err.name);
    try {
      S.localStream = await md.getUserMedia({ audio: true });
      notice("media", t("camera_unavailable"), "warn");
    } catch (err2) {
      console.warn("konsilium: microphone unavailable:", err2 && err2.name);
      notice("media", t("media_unavailable"), "error");
      return null;
    }
  }
  for (const track of S.localStream.getTracks()) {
    const source = track.kind === "video" ? "camera" : "microphone";
    track.enabled = !S.muted[source];
    track.addEventListener("ended", () => updateControls());
  }
  showLocalPreview();
  updateControls();
  return S.localStream;
}

async function publish(gen) {
  S.publishState = "preparing";
  renderState();
  const stream = await acquireMedia();
  if (gen !== S.gen) return;
  const tracks = stream ? stream.getTracks().filter((tr) => tr.readyState === "live") : [];
  if (tracks.length === 0) {
    S.publishState = "none";
    renderState();
    return;
  }
  const pc = newPeerConnection("publish");
  S.pubPc = pc;
  const sent = [];
  // audio first: it is what must never drop
  tracks.sort((a, b) => (a.kind === "audio" ? -1 : 1) - (b.kind === "audio" ? -1 : 1));
  for (const track of tracks) {
    const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    const source = track.kind === "video" ? "camera" : "microphone";
    sent.push({ transceiver, source });
  }
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  await waitIceGathering(pc);
  if (gen !== S.gen || pc !== S.pubPc) return;
  const answer = new Promise((resolve, reject) => {
    S.pendingPublishAnswer = { resolve, reject };
  });
  S.publishState = "offering";
  send({
    type: "publish_offer",
    sdp: pc.localDescription.sdp,
    tracks: sent.map(({ transceiver, source }) => ({ mid: transceiver.mid, source })),
  });
  renderState();
  await answer; // applied by onPublishAnswer; rejects on an error about the offer
  await prioritiseAudio(pc);
}

function onPublishAnswer(msg) {
  const pending = S.pendingPublishAnswer;
  const pc = S.pubPc;
  if (!pc) return undefined;
  S.pendingPublishAnswer = null;
  return pc
    .setRemoteDescription({ type: "answer", sdp: msg.sdp })
    .then(() => {
      S.publishState = pc.connectionState;
      renderState();
      if (pending) pending.resolve();
    })
    .catch((err) => {
      if (pending) pending.reject(err);
    });
}

// Weak links: ask the browser to send audio before video.
async function prioritiseAudio(pc) {
  for (const sender of pc.getSenders()) {
    if (!sender.track || sender.track.kind !== "audio") continue;
    try {
      const params = sender.getParameters();
      if (!params.encodings || params.encodings.length === 0) continue;
      for (const enc of params.encodings) {
        enc.priority = "high";
        enc.networkPriority = "high";
      }
      await sender.setParameters(params);
    } catch {
      /* optional */
    }
  }
}

// ---------------------------------------------------------------- subscribe

async function onSubscribeOffer(msg, gen) {
  if (!S.subPc) {
    S.subPc = newPeerConnection("subscribe");
    S.subPc.addEventListener("track", () => syncMedia());
  }
  const pc = S.subPc;
  await pc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
  S.tracks.clear();
  for (const track of msg.tracks || []) {
    if (track && track.mid != null) S.tracks.set(String(track.mid), track);
  }
  syncMedia();
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  await waitIceGathering(pc);
  if (gen !== S.gen || pc !== S.subPc) return;
  send({ type: "subscribe_answer", sdp: pc.localDescription.sdp });
  renderState();
}

function receiverTrack(mid) {
  if (!S.subPc) return null;
  const tr = S.subPc.getTransceivers().find((x) => x.mid === mid);
  return tr && tr.receiver ? tr.receiver.track : null;
}

// Attach every mapped receiver track to its participant's tile; a transceiver may
// carry another participant's track later (track_published), so rebind each time.
function syncMedia() {
  const wanted = new Map(); // participant id -> [{key, kind, source, track}]
  for (const [mid, info] of S.tracks) {
    const track = receiverTrack(mid);
    if (!track) continue;
    const list = wanted.get(info.participant_id) || [];
    list.push({ key: `${info.source}:${info.kind}`, kind: info.kind, source: info.source, track });
    wanted.set(info.participant_id, list);
  }
  for (const [pid, tile] of S.tiles) {
    const items = wanted.get(pid) || [];
    const keys = new Set(items.map((it) => it.key));
    for (const [key, el] of tile.elements) {
      if (!keys.has(key)) {
        el.srcObject = null;
        el.remove();
        tile.elements.delete(key);
      }
    }
    for (const it of items) {
      let el = tile.elements.get(it.key);
      if (!el) {
        el = createMediaElement(it.kind, it.source);
        tile.media.append(el);
        tile.elements.set(it.key, el);
      }
      const current = el.srcObject ? el.srcObject.getTracks()[0] : null;
      if (current !== it.track) {
        if (it.kind === "video") el.classList.add("pending");
        el.srcObject = new MediaStream([it.track]);
        playElement(el);
      }
    }
    renderTileMedia(pid);
  }
}

function createMediaElement(kind, source) {
  if (kind === "audio") {
    const audio = document.createElement("audio");
    audio.autoplay = true; // no `muted`: this is the participant's voice
    return audio;
  }
  const video = document.createElement("video");
  video.autoplay = true;
  video.playsInline = true;
  video.muted = true; // carries video only; the sound plays in the <audio> element
  video.className = `video pending ${source === "screen" ? "screen" : "camera"}`;
  const shown = () => {
    if (video.videoWidth > 0) video.classList.remove("pending");
  };
  video.addEventListener("loadeddata", shown);
  video.addEventListener("resize", shown);
  return video;
}

function playElement(el) {
  const p = el.play();
  if (p && p.catch) {
    p.catch((err) => {
      if (err && err.name === "NotAllowedError" && el.tagName === "AUDIO") {
        S.soundBlocked.add(el);
        $("btn-sound").hidden = false;
      }
    });
  }
}

function enableSound() {
  for (const el of S.soundBlocked) {
    if (el.isConnected) el.play().catch(() => {});
  }
  S.soundBlocked.clear();
  $("btn-sound").hidden = true;
}

// ---------------------------------------------------------------- participants and tiles

function initials(name) {
  const words = String(name || "").trim().split(/\s+/).filter(Boolean);
  return words.slice(0, 2).map((w) => w[0].toUpperCase()).join("") || "?";
}

function fillCaption(root, p, isSelf) {
  root.querySelector(".name").textContent = isSelf ? `${p.name || t("you")} ${t("you_suffix")}` : p.name || "";
  const clinic = root.querySelector(".clinic");
  clinic.textContent = p.clinic || "";
  clinic.title = p.clinic || "";
  root.querySelector(".name").title = p.name || "";
  root.querySelector(".avatar").textContent = initials(p.name);
  const badges = root.querySelector(".badges");
  badges.replaceChildren();
  if (p.tier) {
    const b = document.createElement("span");
    b.className = `badge tier tier-${p.tier}`;
    b.textContent = t(`tier_${p.tier}`);
    badges.append(b);
  }
  if (p.role) {
    const b = document.createElement("span");
    b.className = `badge role role-${p.role}`;
    b.textContent = t(`role_${p.role}`);
    badges.append(b);
  }
  const muted = p.muted || {};
  root.querySelector(".mi-mic").hidden = !muted.microphone;
  root.querySelector(".mi-camera").hidden = !muted.camera;
  const labels = [p.name, p.clinic, p.tier && t(`tier_${p.tier}`), p.role && t(`role_${p.role}`)];
  root.setAttribute("aria-label", labels.filter(Boolean).join(", "));
}

function upsertParticipant(p) {
  if (!p || !p.id) return;
  S.participants.set(p.id, p);
  let tile = S.tiles.get(p.id);
  if (!tile) {
    const root = $("tile-template").content.firstElementChild.cloneNode(true);
    root.dataset.participant = p.id;
    tile = { root, media: root.querySelector(".media"), elements: new Map() };
    S.tiles.set(p.id, tile);
    $("tiles").append(root);
  }
  fillCaption(tile.root, p, false);
  // a participant whose link dropped keeps its tile, dimmed, until it is back or gone
  const reconnecting = p.state === "reconnecting";
  tile.root.classList.toggle("reconnecting", reconnecting);
  tile.root.classList.toggle("speaking", p.id === S.speaker);
  tile.media.dataset.note = reconnecting ? t("state_reconnecting") : "";
  syncMedia();
  renderState();
}

// Muted icons: announced mute, or (for a publisher) no such track at all.
function renderTileMedia(pid) {
  const tile = S.tiles.get(pid);
  const p = S.participants.get(pid);
  if (!tile || !p) return;
  const muted = p.muted || {};
  const publishes = p.role !== "observer";
  const has = (key) => tile.elements.has(key);
  const cameraOff = Boolean(muted.camera) || (publishes && S.subPc !== null && !has("camera:video"));
  const micOff = Boolean(muted.microphone) || (publishes && S.subPc !== null && !has("microphone:audio"));
  tile.root.querySelector(".mi-camera").hidden = !cameraOff;
  tile.root.querySelector(".mi-mic").hidden = !micOff;
  const cam = tile.elements.get("camera:video");
  if (cam) cam.hidden = Boolean(muted.camera);
  renderQuality(pid);
}

function removeTile(id) {
  const tile = S.tiles.get(id);
  if (!tile) return;
  for (const el of tile.elements.values()) {
    el.srcObject = null;
    S.soundBlocked.delete(el);
  }
  tile.root.remove();
  S.tiles.delete(id);
}

function onParticipantJoined(p) {
  if (!p || (S.self && p.id === S.self.id)) return;
  const known = S.participants.has(p.id);
  upsertParticipant(p);
  if (!known) notice(`p-${p.id}`, t("participant_joined", { name: p.name || p.id }), "info", { timeoutMs: 6000 });
}

function onParticipantUpdated(p) {
  if (!p) return;
  if (S.self && p.id === S.self.id) {
    S.self = p;
    // the chair may have muted us; never unmute remotely
    const muted = p.muted || {};
    for (const source of ["camera", "microphone"]) {
      if (muted[source] && !S.muted[source]) setMuted(source, true, false);
    }
    updateSelfTile();
    return;
  }
  upsertParticipant(p);
  renderTileMedia(p.id);
}

function onParticipantLeft(id, reason) {
  const p = S.participants.get(id);
  S.participants.delete(id);
  removeTile(id);
  for (const [mid, info] of S.tracks) {
    if (info.participant_id === id) S.tracks.delete(mid);
  }
  for (const [key, q] of S.quality) {
    if (q.participantId === id) S.quality.delete(key);
  }
  if (p && reason !== "replaced") {
    const key = reason === "disconnected" ? "participant_disconnected" : "participant_left";
    notice(`p-${id}`, t(key, { name: p.name || id }), "info", { timeoutMs: 6000 });
  }
  renderState();
}

// ---------------------------------------------------------------- video quality

// What the server's per-viewer adaptation sends us for each video (video_quality):
// "original", a ladder rung ("240p", ...) or "paused" (audio only, keep the last frame).
function onVideoQuality(msg) {
  const track = msg.track && typeof msg.track === "object" ? msg.track : {};
  const mapped = track.mid != null ? S.tracks.get(String(track.mid)) : null;
  const pid = track.participant_id || (mapped && mapped.participant_id);
  const source = track.source || (mapped && mapped.source) || "camera";
  if (!pid || typeof msg.layer !== "string" || !msg.layer) return;
  const reason = typeof msg.reason === "string" ? msg.reason : "";
  S.quality.set(`${pid}:${source}`, { participantId: pid, source, layer: msg.layer, reason });
  renderQuality(pid);
}

// The participant's camera quality, else its screen's.
function videoQuality(pid) {
  return S.quality.get(`${pid}:camera`) || S.quality.get(`${pid}:screen`) || null;
}

function qualitySnapshot() {
  const out = {};
  for (const q of S.quality.values()) {
    if (!(q.participantId in out) || q.source === "camera") out[q.participantId] = q.layer;
  }
  return out;
}

function renderQuality(pid) {
  const tile = S.tiles.get(pid);
  if (!tile) return;
  const badge = tile.root.querySelector(".quality");
  const note = tile.root.querySelector(".paused-note");
  if (!badge || !note) return;
  let pausedShown = false;
  for (const [key, el] of tile.elements) {
    if (el.tagName !== "VIDEO") continue;
    const q = S.quality.get(`${pid}:${key.split(":")[0]}`);
    const paused = Boolean(q) && q.layer === "paused";
    el.classList.toggle("paused", paused); // the last frame stays, dimmed by the note
    if (paused && !el.hidden) pausedShown = true;
  }
  const q = videoQuality(pid);
  const el = q ? tile.elements.get(`${q.source}:video`) : null;
  const reduced = Boolean(q && el && !el.hidden) && q.layer !== "original" && q.layer !== "paused";
  badge.hidden = !reduced;
  if (reduced) {
    badge.textContent = q.reason === "bandwidth" ? t("quality_reduced", { layer: q.layer }) : q.layer;
  }
  note.hidden = !pausedShown;
  tile.root.classList.toggle("video-paused", pausedShown);
}

// ---------------------------------------------------------------- recording and consent

function selfConsent() {
  if (!S.recording) return null;
  const mine = S.self ? S.recording.consent[S.self.id] : undefined;
  return mine === "granted" || mine === "declined" ? mine : "pending";
}

// recording_started (started: true) and recording_status carry the same fields.
function onRecording(msg, started) {
  if (typeof msg.recording_id !== "string" || !msg.recording_id) return;
  const known = Boolean(S.recording) && S.recording.id === msg.recording_id;
  S.recordingStale = false;
  S.recording = {
    id: msg.recording_id,
    startedBy: typeof msg.started_by === "string" ? msg.started_by : "",
    consentRequired: msg.consent_required === true,
    capturing: msg.capturing !== false,
    consent: msg.consent && typeof msg.consent === "object" ? { ...msg.consent } : {},
  };
  if (S.recordingPending === "recording_start") setRecordingPending(null);
  if (!known) clearNotice("recording-stopped");
  if (selfConsent() === "pending") {
    const answer = S.answers.get(msg.recording_id);
    if (started && answer !== undefined) {
      // we rejoined and the server asks again: the answer given on this page stands
      send({ type: "consent", granted: answer });
    } else if (S.consentAskedFor !== msg.recording_id) {
      S.consentAskedFor = msg.recording_id;
      openConsent();
    }
  }
  if ($("consent-dialog").open) fillConsentText();
  renderRecording();
}

function onRecordingStopped(msg) {
  S.recordingStale = false;
  if (S.recordingPending === "recording_stop") setRecordingPending(null);
  const reason = typeof msg.reason === "string" ? msg.reason : "";
  const text = RECORDING_STOP_REASONS.has(reason)
    ? t(`recording_stopped_${reason}`)
    : t("recording_stopped_other", { reason: reason || "?" });
  recordingEnded(text, reason === "stopped" || reason === "room_empty" ? "info" : "warn");
}

function recordingEnded(text, level) {
  S.recording = null;
  closeConsent();
  notice("recording-stopped", text, level, { timeoutMs: RECORDING_NOTICE_MS });
  renderRecording();
}

function onRecordingError(msg) {
  if (msg.ref === S.recordingPending) setRecordingPending(null);
  if (msg.code === "not_recording") {
    if (msg.ref === "consent") return; // answered as it stopped: recording_stopped says so
    S.recording = null; // we missed the stop
    closeConsent();
  }
  const text = msg.code === "forbidden" ? t("error_forbidden_record") : errorText(msg.code, msg.message);
  const serious = msg.code === "disk_full" || msg.code === "recording_failed" || msg.code === "internal";
  notice("recording-error", text, serious ? "error" : "warn", {
    timeoutMs: serious ? 0 : RECORDING_NOTICE_MS,
  });
  renderRecording();
}

function setRecordingPending(type) {
  clearTimeout(S.recordingPendingTimer);
  S.recordingPendingTimer = null;
  S.recordingPending = type;
  if (type) {
    S.recordingPendingTimer = setTimeout(() => {
      S.recordingPending = null;
      S.recordingPendingTimer = null;
      renderRecording();
    }, RECORDING_PENDING_TIMEOUT_MS);
  }
}

function toggleRecording() {
  if (S.recordingPending || !S.joined) return; // aria-disabled: the button keeps its focus
  const type = S.recording ? "recording_stop" : "recording_start";
  if (!send({ type })) return;
  clearNotice("recording-error");
  setRecordingPending(type);
  renderRecording();
}

function renderRecording() {
  const rec = S.left || S.fatal ? null : S.recording;
  const indicator = $("rec");
  indicator.hidden = !rec;
  if (rec) {
    const ids = Object.keys(rec.consent);
    const granted = ids.filter((id) => rec.consent[id] === "granted").length;
    indicator.classList.toggle("waiting", !rec.capturing);
    $("rec-text").textContent = rec.capturing
      ? t("recording_on")
      : t("recording_waiting", { n: granted, total: ids.length });
  }
  const consentBtn = $("rec-consent");
  consentBtn.hidden = !rec || !S.self;
  if (rec) {
    const mine = selfConsent();
    consentBtn.dataset.consent = mine;
    $("rec-consent-text").textContent = t(`consent_state_${mine}`);
  }
  const grants = (S.self && S.self.grants) || [];
  const btn = $("btn-record");
  btn.hidden = !grants.includes("record") || S.left || S.fatal;
  btn.classList.toggle("recording", Boolean(rec));
  const label = t(rec ? "recording_stop" : "recording_start");
  btn.setAttribute("aria-label", label);
  btn.title = label;
  btn.querySelector(".ctl-label").textContent = label;
  const busy = Boolean(S.recordingPending) || !S.joined;
  btn.setAttribute("aria-disabled", String(busy));
}

function participantName(id) {
  if (S.self && id === S.self.id) return S.self.name || id;
  const p = S.participants.get(id);
  return (p && p.name) || id;
}

function paragraphs(texts) {
  return texts.filter(Boolean).map((text) => {
    const p = document.createElement("p");
    p.textContent = text;
    return p;
  });
}

function fillConsentText() {
  const rec = S.recording;
  if (!rec) return;
  let by = "";
  if (rec.startedBy === ADMIN_ACTOR) by = t("consent_started_by_system");
  else if (rec.startedBy) by = t("consent_started_by", { name: participantName(rec.startedBy) });
  $("consent-by").textContent = by;
  $("consent-by").hidden = !by;
  $("consent-mode").textContent = t(rec.consentRequired ? "consent_mode_required" : "consent_mode_default");
  $("declined-text").replaceChildren(
    ...paragraphs([
      t(rec.consentRequired ? "consent_declined_required" : "consent_declined_default"),
      rec.consentRequired && !rec.capturing ? t("consent_declined_blocks") : "",
    ]),
  );
}

function showConsentView(declined) {
  const dialog = $("consent-dialog");
  $("consent-ask").hidden = declined;
  $("consent-declined").hidden = !declined;
  dialog.setAttribute("aria-labelledby", declined ? "declined-title" : "consent-title");
  dialog.setAttribute("aria-describedby", declined ? "declined-text" : "consent-text");
  // the heading first: the question is read out, and no answer is preselected
  $(declined ? "declined-title" : "consent-title").focus();
}

// Modal (native <dialog>: focus stays inside, Esc closes it and leaves the answer
// pending; the header button opens it again).
function openConsent() {
  if (!S.recording || S.left || S.fatal) return;
  const dialog = $("consent-dialog");
  fillConsentText();
  if (!dialog.open) {
    if (typeof dialog.showModal === "function") dialog.showModal();
    else dialog.setAttribute("open", "");
  }
  showConsentView(false);
}

function closeConsent() {
  const dialog = $("consent-dialog");
  if (!dialog.open) return;
  if (typeof dialog.close === "function") dialog.close();
  else dialog.removeAttribute("open");
}

function answerConsent(granted) {
  const rec = S.recording;
  if (!rec) {
    closeConsent();
    return;
  }
  S.answers.set(rec.id, granted);
  send({ type: "consent", granted }); // socket down: sent after the rejoin (onRecording)
  if (granted) {
    closeConsent();
  } else {
    fillConsentText();
    showConsentView(true);
  }
}

// ---------------------------------------------------------------- local media and controls

function localTrack(kind) {
  if (!S.localStream) return null;
  return S.localStream.getTracks().find((tr) => tr.kind === kind && tr.readyState === "live") || null;
}

function showLocalPreview() {
  const video = $("local-video");
  const track = localTrack("video");
  if (track) {
    video.srcObject = new MediaStream([track]);
    video.play().catch(() => {});
  }
  updateSelfTile();
}

function updateSelfTile() {
  const root = $("tile-local");
  const self = S.self || { name: "", muted: {} };
  const p = { ...self, muted: { camera: S.muted.camera, microphone: S.muted.microphone } };
  fillCaption(root, p, true);
  if (!self.name) root.querySelector(".name").textContent = t("you");
  const hasVideo = Boolean(localTrack("video"));
  const hasAudio = Boolean(localTrack("audio"));
  const tried = S.mediaTried && !S.left; // asked for devices: a missing one is "off"
  root.querySelector(".mi-mic").hidden = !(S.muted.microphone || (tried && !hasAudio));
  root.querySelector(".mi-camera").hidden = !(S.muted.camera || (tried && !hasVideo));
  $("local-video").hidden = !hasVideo || S.muted.camera;
}

function setButton(btn, hasTrack, muted, muteKey, unmuteKey) {
  btn.disabled = !hasTrack || S.left || S.fatal;
  btn.classList.toggle("off", hasTrack && muted);
  const label = t(muted ? unmuteKey : muteKey);
  btn.setAttribute("aria-label", label);
  btn.title = label;
  btn.querySelector(".ctl-label").textContent = label;
}

function updateControls() {
  setButton($("btn-camera"), Boolean(localTrack("video")), S.muted.camera, "camera_mute", "camera_unmute");
  setButton($("btn-mic"), Boolean(localTrack("audio")), S.muted.microphone, "microphone_mute", "microphone_unmute");
  updateSelfTile();
}

function setMuted(source, muted, announce = true) {
  const track = localTrack(source === "camera" ? "video" : "audio");
  if (!track) return;
  S.muted[source] = muted;
  track.enabled = !muted;
  if (announce && S.joined) send({ type: "mute", source, muted });
  updateControls();
}

function stopLocalMedia() {
  if (S.localStream) {
    for (const track of S.localStream.getTracks()) track.stop();
  }
  S.localStream = null;
  $("local-video").srcObject = null;
  $("local-video").hidden = true;
}

function showEndedControls() {
  $("tiles").hidden = true;
  $("waiting").hidden = true;
  for (const id of ["btn-camera", "btn-mic", "btn-leave", "btn-sound", "btn-record"]) $(id).hidden = true;
  $("btn-rejoin").hidden = false;
}

function leave() {
  if (S.left) return;
  send({ type: "leave" });
  S.left = true;
  clearTimeout(S.retryTimer);
  S.retryTimer = null;
  const ws = S.ws;
  S.gen += 1;
  teardownSession();
  if (ws) {
    ws.onclose = null;
    try {
      ws.close(1000);
    } catch {
      /* ignore */
    }
  }
  stopLocalMedia();
  for (const el of $("notices").querySelectorAll(".notice")) el.remove();
  notice("left", t("you_left"), "info", { dismissible: false });
  showEndedControls();
  updateControls();
  renderState();
  $("btn-rejoin").focus();
}

// ---------------------------------------------------------------- language switch

function wireLanguageSwitch() {
  for (const a of document.querySelectorAll(".lang-switch a[data-lang]")) {
    a.addEventListener("click", (ev) => {
      ev.preventDefault();
      const url = new URL(location.href); // keeps the #t= fragment
      url.searchParams.set("lang", a.dataset.lang);
      location.assign(url.toString());
    });
  }
}

// ---------------------------------------------------------------- test hooks

function stateSnapshot() {
  return {
    joined: S.joined,
    selfId: S.self ? S.self.id : null,
    participants: [...S.participants.keys()],
    wsState: S.ws ? ["connecting", "open", "closing", "closed"][S.ws.readyState] : "closed",
    publishState: S.pubPc ? S.pubPc.connectionState : S.publishState,
    subscribeState: S.subPc ? S.subPc.connectionState : "none",
    connection: overallState(),
    tracks: [...S.tracks.values()].map((tr) => ({ ...tr })),
    quality: qualitySnapshot(),
    recording: {
      active: Boolean(S.recording),
      id: S.recording ? S.recording.id : null,
      capturing: S.recording ? S.recording.capturing : false,
      consentRequired: S.recording ? S.recording.consentRequired : false,
      consent: selfConsent(),
      pending: S.recordingPending,
    },
  };
}

async function videoStats() {
  const pc = S.subPc;
  if (!pc) return [];
  const report = await pc.getStats();
  const midByTrackId = new Map();
  for (const tr of pc.getTransceivers()) {
    if (tr.receiver && tr.receiver.track) midByTrackId.set(tr.receiver.track.id, tr.mid);
  }
  const byMid = new Map();
  report.forEach((r) => {
    if (r.type !== "inbound-rtp" || r.kind !== "video") return;
    const mid = r.mid != null ? String(r.mid) : midByTrackId.get(r.trackIdentifier);
    if (mid != null) byMid.set(mid, r);
  });
  const out = [];
  for (const [mid, info] of S.tracks) {
    if (info.kind !== "video") continue;
    const r = byMid.get(mid) || {};
    out.push({
      participant_id: info.participant_id,
      mid,
      framesDecoded: r.framesDecoded || 0,
      frameWidth: r.frameWidth || 0,
      frameHeight: r.frameHeight || 0,
      bytesReceived: r.bytesReceived || 0,
    });
  }
  return out;
}

async function publishStats() {
  const pc = S.pubPc;
  if (!pc) return [];
  const report = await pc.getStats();
  const out = [];
  report.forEach((r) => {
    if (r.type !== "outbound-rtp" || r.kind !== "video") return;
    out.push({
      mid: r.mid != null ? String(r.mid) : null,
      framesEncoded: r.framesEncoded || 0,
      bytesSent: r.bytesSent || 0,
      frameWidth: r.frameWidth || 0,
      frameHeight: r.frameHeight || 0,
    });
  });
  return out;
}

window.konsilium = { state: stateSnapshot, videoStats, publishStats };

// ---------------------------------------------------------------- start

function readToken() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("t");
  return token && token.length <= 4096 ? token : null;
}

function start() {
  wireLanguageSwitch();
  $("btn-camera").addEventListener("click", () => setMuted("camera", !S.muted.camera));
  $("btn-mic").addEventListener("click", () => setMuted("microphone", !S.muted.microphone));
  $("btn-leave").addEventListener("click", leave);
  $("btn-sound").addEventListener("click", enableSound);
  $("btn-rejoin").addEventListener("click", () => location.reload());
  $("btn-record").addEventListener("click", toggleRecording);
  $("rec-consent").addEventListener("click", () => openConsent());
  $("btn-consent-yes").addEventListener("click", () => answerConsent(true));
  $("btn-consent-no").addEventListener("click", () => answerConsent(false));
  $("btn-declined-leave").addEventListener("click", () => {
    closeConsent();
    leave();
  });
  $("btn-declined-stay").addEventListener("click", () => closeConsent());
  window.addEventListener("pagehide", () => {
    if (S.joined) send({ type: "leave" });
  });
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(scheduleLayout).observe($("tiles"));
  else window.addEventListener("resize", scheduleLayout);
  updateSelfTile();
  updateControls();
  renderState();

  S.token = readToken();
  if (!S.token) {
    S.fatal = true;
    notice("fatal", t("no_token"), "error", { dismissible: false });
    showEndedControls();
    $("btn-rejoin").hidden = true;
    renderState();
    return;
  }
  if (typeof RTCPeerConnection === "undefined" || typeof WebSocket === "undefined") {
    S.fatal = true;
    notice("fatal", t("webrtc_unsupported"), "error", { dismissible: false });
    showEndedControls();
    $("btn-rejoin").hidden = true;
    renderState();
    return;
  }
  connect();
}

start();
