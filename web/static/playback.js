// Recording playback page (web/playback.py). Plain script, no build step.
//
// Access page: the link is /recordings/<id>#t=<token>. The fragment never reaches
// the server; it is sent once, in an Authorization header, to the session endpoint,
// which sets an HttpOnly cookie for this recording; then the page reloads without it.
// Player page: a click on a time in the timeline seeks the player(s) there.
"use strict";

(function () {
  const root = document.getElementById("playback");
  if (!root) return;

  function accessPage() {
    const status = document.getElementById("access-status");
    const match = /(?:^|[#&])t=([^&]+)/.exec(window.location.hash);
    // the token must not stay in the address bar or in the history
    if (window.location.hash) {
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    if (!match) return;
    status.textContent = root.dataset.msgChecking;
    const token = decodeURIComponent(match[1]);
    fetch(root.dataset.session, {
      method: "POST",
      headers: { Authorization: "Bearer " + token },
      credentials: "same-origin",
      cache: "no-store",
    }).then(function (resp) {
      if (resp.ok) {
        window.location.reload();
        return;
      }
      const messages = {
        403: root.dataset.msgForbidden,
        404: root.dataset.msgNotFound,
        503: root.dataset.msgKeyMissing,
      };
      status.textContent = messages[resp.status] || root.dataset.msgDenied;
      status.dataset.denied = "true";
    }).catch(function () {
      status.textContent = root.dataset.msgDenied;
      status.dataset.denied = "true";
    });
  }

  function playerPage() {
    const players = Array.from(root.querySelectorAll(".player"));
    root.addEventListener("click", function (event) {
      const button = event.target.closest("button[data-seek]");
      if (!button) return;
      const at = Number(button.dataset.seek);
      players.forEach(function (player) {
        const offset = Number(player.dataset.offset || 0);
        player.currentTime = Math.max(0, at - offset);
      });
      if (players.length === 1) {
        players[0].play().catch(function () {});
        players[0].focus();
      }
    });
  }

  if (root.dataset.mode === "access") accessPage();
  else playerPage();
})();
