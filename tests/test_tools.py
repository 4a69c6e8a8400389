"""Tool calls: the tools' checks, their rendering for a template without tool support (Hermes
format), the grammar of a required or named call, and the parsing of calls from the model's text,
whole and streamed."""

import json

import pytest

from splitserve.services.gateway.errors import ApiError
from splitserve.services.gateway.schema import ChatMessage, ChatPrompt
from splitserve.services.gateway.tools import (
    CallStream,
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
                          ([WEATHER] * 129, None), ([WEATHER], ["auto"]), ([WEATHER], {"type": "function"}),
                          # a function that is not an object (a 500 before: .get on a string)
                          ([WEATHER], {"type": "function", "function": "get_weather"}),
                          ([WEATHER], {"type": "function", "function": None}),
                          ([WEATHER], {"type": "function", "function": ["get_weather"]})]:
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
    text = model_bf16.tokenizer.decode(served.encode(ChatPrompt(messages, tools)))
    assert "<tools>" in text and "12 C, rain" in text


def _streamed(choice: ToolChoice, pieces: list[str], reason: str = "stop"):
    """(content sent after each piece, tool-call deltas in order, finish_reason) of a streamed choice."""
    stream = CallStream(parse_tools([WEATHER, TIME], None)[0], choice)
    contents, deltas = [], []
    for piece in pieces:
        content, new = stream.feed(piece)
        contents.append(content)
        deltas += new
    content, new, finish = stream.finish(reason)
    return [*contents, content], deltas + new, finish


def test_auto_calls_stream_content_at_once_and_each_call_when_its_block_closes():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n')
    tools = parse_tools([WEATHER, TIME], None)[0]
    whole_content, whole_calls = extract_calls(text, tools, ToolChoice("auto"))
    for pieces in ([text], list(text), [text[i:i + 7] for i in range(0, len(text), 7)]):
        contents, deltas, finish = _streamed(ToolChoice("auto"), pieces)
        assert "".join(contents).strip() == whole_content and finish == "tool_calls"
        assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == [
            (0, "get_weather", {"city": "Oslo"}), (1, "get_time", {})]
        assert all(d["id"].startswith("call_") and d["type"] == "function" for d in deltas)
        assert [(c.name, c.arguments) for c in whole_calls] == [(d["function"]["name"], d["function"]["arguments"])
                                                                 for d in deltas]
    # The content goes out before the call's tag is complete, and a partial tag waits.
    contents, _, _ = _streamed(ToolChoice("auto"), ["Let me check.\n<tool", "_call>{"])
    assert contents[0] == "Let me check.\n" and contents[1] == ""


def test_streamed_text_that_is_not_a_call_is_content():
    # Trailing whitespace, and an answer of whitespace alone, stream as they come back unstreamed.
    for text in ["It is 3 < 4 and <tool> is not a tag.", '<tool_call>{"name": "launch"}</tool_call> no',
                 "<tool_call>{oops</tool_call>", "Hello world\n", " \n"]:
        contents, deltas, finish = _streamed(ToolChoice("auto"), list(text))
        assert "".join(contents) == text and deltas == [] and finish == "stop"
        assert extract_calls(text, parse_tools([WEATHER, TIME], None)[0], ToolChoice("auto")) == (text, ())
    # Cut short inside a call: what was held comes back as content, and the reason stays "length".
    contents, deltas, finish = _streamed(ToolChoice("auto"), list('ok <tool_call>{"name": "get_'), "length")
    assert "".join(contents) == 'ok <tool_call>{"name": "get_' and deltas == [] and finish == "length"


def test_a_named_call_streams_its_arguments_piece_by_piece():
    pieces = ['{"ci', 'ty": "Ro', 'me"}']
    _, deltas, finish = _streamed(ToolChoice("named", "get_weather"), pieces)
    first, *rest = deltas
    assert first["id"].startswith("call_") and first["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert rest == [{"index": 0, "function": {"arguments": p}} for p in pieces[1:]]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Rome"}' and finish == "stop"


def test_a_required_call_array_goes_out_whole_when_the_choice_ends():
    text = '[{"name": "get_time", "arguments": {}}]'
    contents, deltas, finish = _streamed(ToolChoice("required"), list(text))
    assert contents == [""] * (len(text) + 1) and finish == "tool_calls"
    assert [(d["index"], d["function"]) for d in deltas] == [(0, {"name": "get_time", "arguments": "{}"})]
    contents, deltas, finish = _streamed(ToolChoice("required"), list(text[:12]), "length")
    assert "".join(contents) == text[:12] and deltas == [] and finish == "length"
