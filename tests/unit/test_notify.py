"""Chat payload shapes and delivery rules over httpx.MockTransport."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from core.errors import InvalidInput, NotifyError
from tasks.notify import (
    dingtalk_payload,
    feishu_payload,
    redact,
    send_chat,
    slack_mrkdwn,
    slack_payload,
)

HOOKS = {
    "feishu": "https://open.feishu.cn/open-apis/bot/v2/hook/FEISHU-TOKEN",
    "dingtalk": "https://oapi.dingtalk.com/robot/send?access_token=DING-TOKEN",
    "slack": "https://hooks.slack.com/services/T0/B0/SLACK-TOKEN",
}


class Sink:
    def __init__(self, answers: dict[str, httpx.Response] | None = None) -> None:
        self.answers = answers or {}
        self.posts: dict[str, dict] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        platform = next(p for p, u in HOOKS.items() if httpx.URL(u).host == host)
        self.posts[platform] = json.loads(request.content)
        if platform in self.answers:
            return self.answers[platform]
        if platform == "feishu":
            return httpx.Response(200, json={"code": 0, "msg": "success"})
        if platform == "dingtalk":
            return httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})
        return httpx.Response(200, text="ok")


def send(sink: Sink, **kwargs):
    return send_chat.fn(
        "api-gateway awaits approval",
        "**image** `api-gateway:20261127-abc1234`\n[diff](http://git/diff)",
        webhooks=kwargs.pop("webhooks", HOOKS),
        transport=httpx.MockTransport(sink),
        **kwargs,
    )


def test_each_platform_gets_its_own_shape():
    sink = Sink()
    reached = send(sink, link="http://ui/runs/flow-run/1")
    assert reached == ["feishu", "dingtalk", "slack"]
    feishu = sink.posts["feishu"]
    assert feishu["msg_type"] == "interactive"
    assert feishu["card"]["header"]["title"]["content"] == "api-gateway awaits approval"
    assert feishu["card"]["elements"][1]["actions"][0]["url"] == "http://ui/runs/flow-run/1"
    ding = sink.posts["dingtalk"]
    assert ding["msgtype"] == "markdown"
    assert ding["markdown"]["title"] == "api-gateway awaits approval"
    assert ding["markdown"]["text"].endswith("[Open in Prefect](http://ui/runs/flow-run/1)")
    slack = sink.posts["slack"]
    assert slack["text"].startswith("api-gateway awaits approval")
    assert [b["type"] for b in slack["blocks"]] == ["header", "section", "actions"]
    assert "<http://git/diff|diff>" in slack["blocks"][1]["text"]["text"]


def test_only_requested_channels():
    sink = Sink()
    assert send(sink, channels=["dingtalk"]) == ["dingtalk"]
    assert list(sink.posts) == ["dingtalk"]


def test_a_refusing_platform_is_a_warning_without_the_token(caplog):
    sink = Sink(
        {
            "feishu": httpx.Response(200, json={"code": 19021, "msg": "sign match fail"}),
            "slack": httpx.Response(404, text="no_team"),
        }
    )
    with caplog.at_level(logging.WARNING):
        reached = send(sink)
    assert reached == ["dingtalk"]
    assert "code 19021" in caplog.text and "HTTP 404" in caplog.text
    for token in ("FEISHU-TOKEN", "DING-TOKEN", "SLACK-TOKEN"):
        assert token not in caplog.text


def test_required_raises_without_the_token():
    sink = Sink({"dingtalk": httpx.Response(200, json={"errcode": 310000, "errmsg": "keywords"})})
    with pytest.raises(NotifyError) as info:
        send(sink, required=True)
    assert "errcode 310000" in str(info.value)
    assert "DING-TOKEN" not in str(info.value)


def test_unreachable_webhook_is_a_warning():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert (
        send_chat.fn(
            "t", "x", webhooks={"slack": HOOKS["slack"]}, transport=httpx.MockTransport(refuse)
        )
        == []
    )


def test_a_requested_channel_without_webhook_is_reported():
    sink = Sink()
    with pytest.raises(NotifyError, match="feishu: no webhook configured"):
        send(sink, channels=["feishu"], webhooks={"slack": HOOKS["slack"]}, required=True)


def test_unknown_channel_is_bad_input():
    with pytest.raises(InvalidInput, match="unknown chat channels"):
        send(Sink(), channels=["teams"])


def test_redact_keeps_only_scheme_and_host():
    assert redact(HOOKS["dingtalk"]) == "https://oapi.dingtalk.com/…"
    assert redact("not a url") == "<webhook>"


def test_payload_builders_without_link():
    assert "action" not in json.dumps(feishu_payload("t", "x", None))
    assert dingtalk_payload("t", "x", None)["markdown"]["text"] == "### t\n\nx"
    assert slack_payload("t", "x", None)["text"] == "t"
    assert slack_mrkdwn("**a** [b](http://c)") == "*a* <http://c|b>"
