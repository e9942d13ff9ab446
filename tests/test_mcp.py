"""The MCP tool (issue 12 #7): COVID_CLS_MCP=1 serves /predict as a tool through Gradio's MCP server.

The server needs Gradio's ``mcp`` extra (``pip install "gradio[mcp]"``), installed only by those who want the
feature: the schema test skips without it. The tool's description — the research-only disclaimer and the
abstention flag in the result — and the start-up without the extra are checked either way. Local only.
"""

from __future__ import annotations

import importlib.util

import pytest

from helpers import launched_app

HAS_MCP = importlib.util.find_spec("mcp") is not None


def settings_for(root):
    from covid_cls.ui import Settings

    return Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=False,
                    roots_env="", mcp=True)


def test_predict_endpoint_describes_itself_for_assistants(tmp_path):
    from covid_cls.predictor import UNCERTAIN
    from covid_cls.ui import build_app

    demo = build_app(settings_for(tmp_path))
    [fn] = [f for f in demo.fns.values() if f.api_name == "predict"]
    assert fn.fn.__name__ == "predict"   # the MCP tool's name (a bare partial would be listed as "partial")
    text = fn.api_description
    assert "NOT A DIAGNOSIS" in text and UNCERTAIN in text and "abstention" in text
    assert "confidence intervals" in text and "trained from scratch" in text


def test_settings_read_covid_cls_mcp(monkeypatch):
    from covid_cls.ui import Settings

    monkeypatch.setenv("COVID_CLS_MCP", "1")
    assert Settings.from_env().mcp is True
    monkeypatch.setenv("COVID_CLS_MCP", "0")
    assert Settings.from_env().mcp is False


@pytest.mark.skipif(HAS_MCP, reason="the mcp package is installed here")
def test_without_the_mcp_extra_the_app_says_how_to_get_it(capsys):
    from covid_cls.ui.app import mcp_available

    assert mcp_available() is False
    assert 'pip install "gradio[mcp]"' in capsys.readouterr().err


@pytest.mark.http
@pytest.mark.skipif(not HAS_MCP, reason='needs Gradio\'s MCP extra: pip install "gradio[mcp]" (not installed here)')
def test_mcp_schema_lists_the_predict_tool(tmp_path, monkeypatch):
    import httpx

    monkeypatch.setenv("COVID_CLS_MCP", "1")
    with launched_app(settings_for(tmp_path), app_launch=True) as app:
        r = httpx.get(f"{app.url}/gradio_api/mcp/schema", timeout=30)
        r.raise_for_status()
        tools = {t["name"]: t for t in r.json()}
    assert "predict" in tools, sorted(tools)
    tool = tools["predict"]
    assert tool["meta"]["endpoint_name"] == "predict"
    assert "NOT A DIAGNOSIS" in tool["description"] and "uncertain" in tool["description"]
    assert {"path", "arch", "level", "checkpoint"} <= set(tool["inputSchema"]["properties"])
