"""Chat notifications: Feishu, DingTalk and Slack-style incoming webhooks.

The webhook URLs live in a Prefect Secret block (``settings.chat_webhooks_block``) holding
a JSON object ``{"feishu": url, "dingtalk": url, "slack": url}``: the URLs carry the bots'
tokens, so they are secrets (Prefect 3.9 has no plain JSON block either).

Why httpx and not apprise: apprise's feishu://, dingtalk:// and slack:// plugins post to
their vendors' fixed hosts (open.feishu.cn, oapi.dingtalk.com, hooks.slack.com), and its
json:// plugin posts apprise's own flat schema. Neither can send Feishu's card, DingTalk's
markdown or Slack's blocks to an arbitrary webhook URL (a proxy, a self-hosted gateway, the
sandbox's chat sink), so each shape is built here and posted with httpx.

A failed notification is a warning, never a failed release (unless ``required``), and the
webhook URL (its token) is never logged or put in an exception: only its host is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from prefect import task
from prefect.blocks.system import Secret

from core.errors import InvalidInput, NotifyError
from core.settings import get_settings
from tasks.logs import run_logger

Platform = Literal["feishu", "dingtalk", "slack"]
PLATFORMS: tuple[Platform, ...] = ("feishu", "dingtalk", "slack")
LINK_TEXT = "Open in Prefect"


def redact(url: str) -> str:
    """What of a webhook URL may be shown: its scheme and host, never the path's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…" if parts.netloc else "<webhook>"


# --- payloads, in each platform's own JSON shape -------------------------------------------


def feishu_payload(title: str, text: str, link: str | None) -> dict[str, Any]:
    """An interactive card: a header, the markdown body and a button to the run."""
    elements: list[dict[str, Any]] = [{"tag": "markdown", "content": text}]
    if link:
        elements.append(
            {
                "tag": "action",
                "actions": [
                    {
                        "tag": "button",
                        "text": {"tag": "plain_text", "content": LINK_TEXT},
                        "type": "primary",
                        "url": link,
                    }
                ],
            }
        )
    return {
        "msg_type": "interactive",
        "card": {
            "config": {"wide_screen_mode": True},
            "header": {"title": {"tag": "plain_text", "content": title}, "template": "blue"},
            "elements": elements,
        },
    }


def dingtalk_payload(title: str, text: str, link: str | None) -> dict[str, Any]:
    body = f"### {title}\n\n{text}"
    if link:
        body += f"\n\n[{LINK_TEXT}]({link})"
    return {"msgtype": "markdown", "markdown": {"title": title, "text": body}}


_MD_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")


def slack_mrkdwn(text: str) -> str:
    """Markdown to Slack's mrkdwn: links ``<url|text>``, bold ``*x*``."""
    text = _MD_LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", text)
    return _MD_BOLD.sub(lambda m: f"*{m.group(1)}*", text)


def slack_payload(title: str, text: str, link: str | None) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": slack_mrkdwn(text)[:3000]}},
    ]
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": LINK_TEXT},
                        "url": link,
                    }
                ],
            }
        )
    fallback = f"{title}: {link}" if link else title
    return {"text": fallback, "blocks": blocks}


PAYLOADS: dict[Platform, Callable[[str, str, str | None], dict[str, Any]]] = {
    "feishu": feishu_payload,
    "dingtalk": dingtalk_payload,
    "slack": slack_payload,
}


# --- the client ----------------------------------------------------------------------------


def _platform_error(platform: Platform, response: httpx.Response) -> str | None:
    """The error a platform reports in a 200 answer (Feishu and DingTalk do), if any."""
    if platform == "slack":
        return None  # Slack answers "ok", errors come as 4xx
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if platform == "feishu":
        code = body.get("code", body.get("StatusCode", 0))
        return None if code in (0, None) else f"code {code}: {body.get('msg', '')}"
    code = body.get("errcode", 0)
    return None if code in (0, None) else f"errcode {code}: {body.get('errmsg', '')}"


class ChatClient:
    """Posts a payload to a webhook and checks the platform's answer."""

    def __init__(
        self, *, transport: httpx.BaseTransport | None = None, timeout: float = 10.0
    ) -> None:
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def post(self, platform: Platform, url: str, payload: dict[str, Any]) -> None:
        where = f"{platform} webhook at {redact(url)}"
        try:
            response = self._http.post(url, json=payload)
        except httpx.TransportError as exc:
            # The exception text of a transport error has no URL; the chained one is kept.
            raise NotifyError(f"{where} unreachable ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise NotifyError(
                f"{where} answered HTTP {response.status_code}: {response.text[:200]}"
            )
        problem = _platform_error(platform, response)
        if problem:
            raise NotifyError(f"{where} refused the message ({problem})")


def load_webhooks(block_name: str | None = None) -> dict[str, str]:
    name = block_name or get_settings().chat_webhooks_block
    try:
        block: Secret[Any] = Secret.load(name, _sync=True)  # type: ignore[call-arg,assignment]
        value = block.get()
    except ValueError as exc:
        raise NotifyError(
            f"no Secret block {name!r} with the chat webhooks; create it with "
            '{"feishu": url, "dingtalk": url, "slack": url} or set '
            "ROBOTICS_CD_CHAT_WEBHOOKS_BLOCK"
        ) from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise NotifyError(f"Secret block {name!r} must hold a JSON object of platform -> URL")
    unknown = sorted(set(value) - set(PLATFORMS))
    if unknown:
        raise NotifyError(
            f"Secret block {name!r} names unknown platforms {unknown}; use {list(PLATFORMS)}"
        )
    return dict(value)


def _check_channels(channels: Sequence[str] | None) -> list[Platform] | None:
    if channels is None:
        return None
    unknown = [c for c in channels if c not in PLATFORMS]
    if unknown:
        raise InvalidInput(f"unknown chat channels {unknown}; use some of {list(PLATFORMS)}")
    return [c for c in PLATFORMS if c in channels]


@task(name="send-chat")
def send_chat(
    title: str,
    text_markdown: str,
    *,
    channels: Sequence[str] | None = None,
    link: str | None = None,
    required: bool = False,
    webhooks: dict[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> list[str]:
    """Post one message to each configured channel (or only ``channels``); return the
    channels it reached. Failures are warnings unless ``required``."""
    wanted = _check_channels(channels)
    if not title.strip():
        raise InvalidInput("a chat notification needs a title")
    log = run_logger("robotics_cd.notify")
    try:
        hooks = webhooks if webhooks is not None else load_webhooks()
    except NotifyError as exc:
        if required:
            raise
        log.warning("chat notification %r not sent: %s", title, exc)
        return []
    targets = [p for p in (wanted or PLATFORMS) if p in hooks]
    missing = [p for p in (wanted or []) if p not in hooks]
    reached: list[str] = []
    failures: list[str] = [f"{p}: no webhook configured" for p in missing]
    with ChatClient(transport=transport) as chat:
        for platform in targets:
            try:
                chat.post(platform, hooks[platform], PAYLOADS[platform](title, text_markdown, link))
            except NotifyError as exc:
                failures.append(str(exc))
                continue
            reached.append(platform)
    if failures:
        message = f"chat notification {title!r} not delivered everywhere: " + "; ".join(failures)
        if required:
            raise NotifyError(message)
        log.warning(message)
    if reached:
        log.info("chat notification %r sent to %s", title, ", ".join(reached))
    return reached
