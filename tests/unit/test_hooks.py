"""The aiortc internals the SFU relies on are still there (fails loudly if not)."""

from __future__ import annotations

import aiortc.rtcrtpreceiver as receiver_module

from media_server import hooks


def test_check_hooks_passes_on_the_pinned_aiortc() -> None:
    hooks.check_hooks()


def test_passthrough_install_is_idempotent_and_reversible() -> None:
    was = hooks.passthrough_installed()
    original = receiver_module.get_decoder  # type: ignore[attr-defined]
    try:
        hooks.uninstall_passthrough()
        plain = receiver_module.get_decoder  # type: ignore[attr-defined]
        hooks.install_passthrough()
        hooks.install_passthrough()
        assert receiver_module.get_decoder is not plain  # type: ignore[attr-defined]
        hooks.uninstall_passthrough()
        assert receiver_module.get_decoder is plain  # type: ignore[attr-defined]
    finally:
        if was:
            hooks.install_passthrough()
        assert receiver_module.get_decoder is original or was  # type: ignore[attr-defined]
