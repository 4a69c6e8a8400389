"""Tool calls: the tools' checks, their rendering for a template without tool support (Hermes
format), the grammar of a required or named call, and the parsing of calls from the model's text."""

import json

import pytest

from splitserve.services.gateway.errors import ApiError
from splitserve.services.gateway.schema import ChatMessage
from splitserve.services.gateway.tools import (
    ToolCall,
    ToolChoice,
    call_grammar,
    extract_calls,
    parse_call_history,
    parse_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tools_and_tool_choice_are_checked():
    tools, choice = parse_tools([WEATHER, TIME], None)
    assert [t.name for t in tools] == ["get_weather", "get_time"] and choice == ToolChoice("auto")
    assert parse_tools([], None)[1] == ToolChoice("none")
    assert parse_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})[1] == ToolChoice(
        "named", "get_weather")
    for tools, choice in [([WEATHER], {"type": "function", "function": {"name": "nope"}}), ([], "required"),
                          ([WEATHER, WEATHER], None), ([{"type": "function", "function": {"name": "bad name"}}], None),
                          ([{"type": "retrieval"}], None), ("x", None), ([WEATHER], "sometimes"),
                          ([WEATHER] * 129, None)]:
        with pytest.raises(ApiError):
            parse_tools(tools, choice)
    with pytest.raises(ApiError):
        parse_call_history([{"id": "c", "function": {"name": "f", "arguments": {"not": "a string"}}}])


def test_a_required_call_is_a_json_array_of_calls_and_a_named_one_its_arguments():
    tools, _ = parse_tools([WEATHER, TIME], None)
    required = json.loads(call_grammar(tools, ToolChoice("required")).json_schema)
    assert required["type"] == "array" and required["minItems"] == 1
    assert [c["properties"]["name"] for c in required["items"]["anyOf"]] == [{"const": "get_weather"},
                                                                            {"const": "get_time"}]
    named = json.loads(call_grammar(tools, ToolChoice("named", "get_weather")).json_schema)
    assert named == WEATHER["function"]["parameters"]
    assert call_grammar(tools, ToolChoice("auto")) is None
    required_grammar = call_grammar(tools, ToolChoice("required"))
    required_grammar.llguidance()  # llguidance takes it


def test_a_tool_whose_call_grammar_is_too_large_is_a_400():
    from splitserve.services.gateway.openai_api import parse_chat

    huge = {"type": "function", "function": {"name": "big", "parameters": {
        "type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(4000)}}}}
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [huge], "tool_choice": "required"}
    with pytest.raises(ApiError) as info:
        parse_chat(body)
    assert info.value.param == "tools" and "longer than" in info.value.message
    assert parse_chat({**body, "tool_choice": "auto"}).generation.sampling.grammar is None


def test_calls_are_parsed_from_the_model_s_text():
    tools, _ = parse_tools([WEATHER, TIME], None)
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = extract_calls(text, tools, ToolChoice("auto"))
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]
    assert calls[0].id.startswith("call_")
    # Unknown functions and broken JSON are not calls: the text stays the content.
    for text in ['<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>",
                 "It is sunny."]:
        assert extract_calls(text, tools, ToolChoice("auto")) == (text, ())
    content, calls = extract_calls('[{"name": "get_time", "arguments": {}}]', tools, ToolChoice("required"))
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    content, calls = extract_calls('{"city": "Rome"}', tools, ToolChoice("named", "get_weather"))
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Rome"}')]


def test_a_template_without_tools_gets_them_in_a_hermes_system_message(model_bf16):
    from splitserve.services.gateway.model import ServedModel

    served = ServedModel("m", "m", model_bf16.tokenizer, 8192, 80)
    assert not served.template_renders_tools  # SmolLM2's template
    tools, _ = parse_tools([WEATHER], None)
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    messages = (ChatMessage("user", "Weather in Oslo?"), ChatMessage("assistant", "", (call,)),
                ChatMessage("tool", "12 C, rain", tool_call_id="call_1"))
    rendered, native_tools = served._chat(messages, tools)
    assert native_tools is None and rendered[0]["role"] == "system"
    assert "<tools>" in rendered[0]["content"] and '"get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert rendered[3] == {"role": "tool", "content": "12 C, rain", "tool_call_id": "call_1"}
    text = model_bf16.tokenizer.decode(served._apply_chat_template(rendered, native_tools))
    assert "<tools>" in text and "12 C, rain" in text
