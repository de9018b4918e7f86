"""Qwen3 chat format: rendering rules, validation, reasoning/tool-call parsing, and parity
with a Jinja template written here from the same rules (our sandbox and transformers').

Expected strings are written by hand from the format rules in qwen3_fast/chat_format.py."""

import json

import pytest

from qwen3_fast.chat_format import parse_reasoning, parse_tool_calls, render_chat, render_jinja

S, E = "<|im_start|>", "<|im_end|>"
GEN = S + "assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time",
         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def tools_system(prefix=""):
    return (
        S + "system\n" + prefix + "# Tools\n\n"
        "You can use one or more of the functions below to help with the user's request.\n\n"
        "Their signatures are given inside <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(CLOCK, ensure_ascii=False) + "\n</tools>\n\n"
        "To call a function, write a JSON object with the function name and its arguments inside "
        "<tool_call></tool_call> XML tags, one block per call:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' + E + "\n"
    )


def u(text):
    return {"role": "user", "content": text}


def test_single_turn_with_generation_prompt():
    assert render_chat([u("Hi")], add_generation_prompt=True) == S + "user\nHi" + E + "\n" + GEN
    assert render_chat([u("Hi")]) == S + "user\nHi" + E + "\n"


def test_system_turn_first():
    msgs = [{"role": "system", "content": "Be brief."}, u("Hi")]
    assert render_chat(msgs) == S + "system\nBe brief." + E + "\n" + S + "user\nHi" + E + "\n"


def test_thinking_on_and_off_in_generation_prompt():
    base = S + "user\nHi" + E + "\n"
    assert render_chat([u("Hi")], add_generation_prompt=True, enable_thinking=True) == base + GEN
    assert render_chat([u("Hi")], add_generation_prompt=True, enable_thinking=False) == base + GEN + EMPTY_THINK
    # enable_thinking has no effect without a generation prompt
    assert render_chat([u("Hi")], enable_thinking=False) == base


def test_multi_turn_reasoning_dropped_before_last_query_kept_after():
    msgs = [
        u("What is 2+2?"),
        {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."},
        u("And 3+3?"),
        {"role": "assistant", "content": "<think>\n3+3 is 6.\n</think>\n\n6"},
    ]
    assert render_chat(msgs) == (
        S + "user\nWhat is 2+2?" + E + "\n" + S + "assistant\n4" + E + "\n"
        + S + "user\nAnd 3+3?" + E + "\n" + S + "assistant\n<think>\n3+3 is 6.\n</think>\n\n6" + E + "\n"
    )
    # history only, then a new prompt: the earlier reasoning is gone
    assert render_chat(msgs[:3], add_generation_prompt=True) == (
        S + "user\nWhat is 2+2?" + E + "\n" + S + "assistant\n4" + E + "\n" + S + "user\nAnd 3+3?" + E + "\n" + GEN
    )


def test_final_answer_without_reasoning_gets_empty_think_block():
    # The released format: the last assistant turn after the query always carries a think block.
    assert render_chat([u("Hi"), {"role": "assistant", "content": "Hello!"}]) == (
        S + "user\nHi" + E + "\n" + S + "assistant\n" + EMPTY_THINK + "Hello!" + E + "\n"
    )


def test_reasoning_inside_content_is_stripped():
    before = {"role": "assistant", "content": "thinking hard\n</think>\n\nParis"}  # no leading <think>
    msgs = [u("Capital?"), before, u("Sure?")]
    assert render_chat(msgs) == (
        S + "user\nCapital?" + E + "\n" + S + "assistant\nParis" + E + "\n" + S + "user\nSure?" + E + "\n"
    )
    assert render_chat(msgs[:2]) == (
        S + "user\nCapital?" + E + "\n" + S + "assistant\n<think>\nthinking hard\n</think>\n\nParis" + E + "\n"
    )
    # reasoning_content wins; content is then used verbatim
    m = {"role": "assistant", "content": "Paris", "reasoning_content": "\nfrance\n"}
    assert render_chat([u("Capital?"), m]).endswith("assistant\n<think>\nfrance\n</think>\n\nParis" + E + "\n")


def test_tools_parallel_calls_and_grouped_responses():
    msgs = [
        {"role": "system", "content": "You are helpful."},
        u("Weather and time in Paris?"),
        {"role": "assistant", "content": "", "reasoning_content": "Need two tools.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
        ]},
        {"role": "tool", "content": "21C, sunny"},
        {"role": "tool", "content": "14:00"},
        {"role": "assistant", "content": "It is 21C and 14:00.", "reasoning_content": "Combine."},
    ]
    assert render_chat(msgs, tools=[WEATHER, CLOCK]) == (
        tools_system("You are helpful.\n\n")
        + S + "user\nWeather and time in Paris?" + E + "\n"
        + S + "assistant\n<think>\nNeed two tools.\n</think>\n\n"
        + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        + '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>' + E + "\n"
        + S + "user\n<tool_response>\n21C, sunny\n</tool_response>\n<tool_response>\n14:00\n</tool_response>" + E + "\n"
        + S + "assistant\n<think>\nCombine.\n</think>\n\nIt is 21C and 14:00." + E + "\n"
    )


def test_tools_without_system_and_call_after_content():
    msgs = [u("Weather?"), {"role": "assistant", "content": "Let me check.",
                            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}]},
            {"role": "tool", "content": "5C"}]
    assert render_chat(msgs, tools=[WEATHER, CLOCK], add_generation_prompt=True) == (
        tools_system() + S + "user\nWeather?" + E + "\n"
        + S + 'assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
        + "</tool_call>" + E + "\n" + S + "user\n<tool_response>\n5C\n</tool_response>" + E + "\n" + GEN
    )


def test_user_wrapped_tool_response_is_not_a_query():
    msgs = [u("Q"), {"role": "assistant", "content": "", "reasoning_content": "R1",
                     "tool_calls": [{"name": "f", "arguments": {}}]},
            u("<tool_response>\nok\n</tool_response>"), {"role": "assistant", "content": "A", "reasoning_content": "R2"}]
    out = render_chat(msgs)
    assert "<think>\nR1\n</think>\n\n<tool_call>" in out and "<think>\nR2\n</think>\n\nA" in out


def test_no_think_and_think_pass_through():
    msgs = [u("Hi /think"), {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"}, u("Bye /no_think")]
    assert render_chat(msgs, add_generation_prompt=True) == (
        S + "user\nHi /think" + E + "\n" + S + "assistant\nHello" + E + "\n"
        + S + "user\nBye /no_think" + E + "\n" + GEN
    )


@pytest.mark.parametrize("msgs, match", [
    ("hello", "list of dicts"),
    ([u("a"), "b"], r"messages\[1\]"),
    ([u("a"), {"role": "bot", "content": "x"}], r"messages\[1\] has role 'bot'"),
    ([u("a"), {"role": "assistant", "content": 3}], r"messages\[1\] \(assistant\) content"),
    ([u("a"), {"role": "assistant", "content": "x"}, {"role": "system", "content": "s"}], r"messages\[2\] is a system"),
    ([{"role": "user", "content": "a", "tool_calls": [{"name": "f"}]}], r"messages\[0\] has tool_calls"),
    ([u("a"), {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], r"messages\[1\]\.tool_calls\[0\]"),
    ([u("a"), {"role": "assistant", "content": "x", "reasoning_content": 1}], r"messages\[1\] reasoning_content"),
    ([{"role": "system", "content": "s"}], "no user query"),
    ([], "no user query"),
])
def test_bad_messages_raise_named_errors(msgs, match):
    with pytest.raises(ValueError, match=match):
        render_chat(msgs)


def test_bad_tools_raise():
    with pytest.raises(ValueError, match="tools"):
        render_chat([u("a")], tools={"name": "f"})
    with pytest.raises(ValueError, match=r"tools\[1\]"):
        render_chat([u("a")], tools=[WEATHER, "f"])


@pytest.mark.parametrize("text, kw, expected", [
    ("<think>\nR\n</think>\n\nA", {}, ("R", "A")),
    ("R\n</think>\n\nA", {}, ("R", "A")),                     # prompt opened the block
    ("<think>\n\n</think>\n\nA", {}, ("", "A")),              # non-thinking answer
    ("<think>\nstill going", {}, ("still going", "")),        # cut off while thinking
    ("still going", {"thinking_open": True}, ("still going", "")),
    ("Just an answer.", {}, (None, "Just an answer.")),
    ("<think>\nR\n</think>\n\nA<|im_end|>", {}, ("R", "A")),
    ("<think>\nx</think>y</think>z", {}, ("x", "y</think>z")),  # split at the first </think>
])
def test_parse_reasoning(text, kw, expected):
    assert parse_reasoning(text, **kw) == expected


def test_parse_reasoning_inverts_rendering():
    rendered = render_chat([u("q"), {"role": "assistant", "content": "ans", "reasoning_content": "why"}])
    reply = rendered.split(S + "assistant\n", 1)[1].removesuffix("\n")  # generation stops at <|im_end|>
    assert parse_reasoning(reply) == ("why", "ans")


def test_parse_tool_calls():
    content = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}\n</tool_call>\n'
               "<tool_call>\nnot json\n</tool_call>")
    assert parse_tool_calls(content) == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                         {"name": "get_time", "arguments": {"tz": "UTC"}}]
    with pytest.raises(ValueError, match="tool call 2"):
        parse_tool_calls(content, strict=True)
    with pytest.raises(ValueError, match="unterminated"):
        parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}', strict=True)
    assert parse_tool_calls("no calls") == []
    # what we render, we parse back
    msg = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": [1, 2]}}]}
    assert parse_tool_calls(render_chat([u("q"), msg])) == [{"name": "f", "arguments": {"x": [1, 2]}}]


# ------------------------------------------------------------------ Jinja parity
# Written for this test from the rules above; it is not the template shipped with Qwen3.
PARITY_TEMPLATE = r"""
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' and m.content is string and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou can use one or more of the functions below to help with the user's request.\n\nTheir signatures are given inside <tools></tools> XML tags:\n<tools>" }}
    {%- for t in tools %}{{- '\n' + (t | tojson) }}{%- endfor %}
    {{- '\n</tools>\n\nTo call a function, write a JSON object with the function name and its arguments inside <tool_call></tool_call> XML tags, one block per call:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
    {%- set c = m.content if m.content is string else '' %}
    {%- if m.role == 'user' %}
        {{- '<|im_start|>user\n' + c + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set r = '' %}
        {%- if m.reasoning_content is string %}
            {%- set r = m.reasoning_content %}
        {%- elif '</think>' in c %}
            {%- set r = c.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set c = c.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query and (loop.last or r) %}
            {{- '<think>\n' + r.strip('\n') + '\n</think>\n\n' + c.lstrip('\n') }}
        {%- else %}
            {{- c }}
        {%- endif %}
        {%- for call in m.tool_calls or [] %}
            {%- set f = call.function if call.function is defined else call %}
            {%- if not loop.first or c %}{{- '\n' }}{%- endif %}
            {{- '<tool_call>\n{"name": ' + (f.name | tojson) + ', "arguments": ' }}
            {%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + c + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

PARITY_CASES = [
    ([u("Hi")], None),
    ([{"role": "system", "content": "Be brief."}, u("Hi /no_think")], None),
    ([u("What is 2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."},
      u("And 3+3?"), {"role": "assistant", "content": "<think>\n3+3 is 6.\n</think>\n\n6"}], None),
    ([u("Capital?"), {"role": "assistant", "content": "thinking\n</think>\n\nParis"}, u("Sure? /think")], None),
    ([{"role": "system", "content": "You are helpful."}, u("Weather and time?"),
      {"role": "assistant", "content": "", "reasoning_content": "two tools", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
          {"name": "get_time", "arguments": '{"tz": "UTC"}'}]},
      {"role": "tool", "content": "5C"}, {"role": "tool", "content": "14:00"},
      {"role": "assistant", "content": "5C at 14:00."}], [WEATHER, CLOCK]),
    ([u("Q"), {"role": "assistant", "content": "Let me look.", "tool_calls": [{"name": "f", "arguments": {}}]},
      u("<tool_response>\nok\n</tool_response>")], [CLOCK]),
]


@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
@pytest.mark.parametrize("gen, think", [(False, True), (True, True), (True, False)])
def test_python_renderer_matches_our_jinja_sandbox(case, gen, think):
    msgs, tools = PARITY_CASES[case]
    ours = render_chat(msgs, tools, add_generation_prompt=gen, enable_thinking=think)
    assert render_jinja(PARITY_TEMPLATE, msgs, tools, add_generation_prompt=gen, enable_thinking=think) == ours


def test_python_renderer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwen3_fast.tokenizer_train import build_test_tokenizer

    build_test_tokenizer(save_dir=tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for msgs, tools in PARITY_CASES:
        for gen, think in [(False, True), (True, True), (True, False)]:
            theirs = hf.apply_chat_template(msgs, tools=tools, chat_template=PARITY_TEMPLATE, tokenize=False,
                                            add_generation_prompt=gen, enable_thinking=think)
            assert theirs == render_chat(msgs, tools, add_generation_prompt=gen, enable_thinking=think)


def test_jinja_sandbox_helpers():
    from jinja2.exceptions import SecurityError, TemplateError

    with pytest.raises(TemplateError, match="nope"):
        render_jinja("{{ raise_exception('nope') }}", [u("a")])
    with pytest.raises(SecurityError):
        render_jinja("{{ messages.append(1) }}", [u("a")])
    assert render_jinja("{{ messages[0] | tojson }}", [u("é")]) == '{"role": "user", "content": "é"}'
    with pytest.raises(ValueError, match="non-empty"):
        render_jinja("", [u("a")])
