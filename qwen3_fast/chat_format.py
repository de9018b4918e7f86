"""The Qwen3 chat format, written in plain Python.

Owns: rendering a conversation (`render_chat`), checking it (`validate_messages`), splitting
generated text into reasoning and answer (`parse_reasoning`), reading tool calls out of an
answer (`parse_tool_calls`), and rendering a checkpoint's own Jinja `chat_template` in a
sandbox (`render_jinja`) for users who want the shipped template verbatim.

The format (one turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`):
- a system turn comes first when given; with tools, the system turn holds the system text
  (if any) followed by a "# Tools" block: one JSON signature per line inside <tools></tools>,
  then how to call a function (`<tool_call>` JSON objects);
- assistant tool calls render as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks, one per call, joined by newlines and placed after the content (newline-separated
  when there is content);
- consecutive `tool` messages form ONE user turn of `<tool_response>\\n...\\n</tool_response>`
  blocks joined by newlines;
- reasoning (`reasoning_content`, or the text before `</think>` inside `content`) is shown as
  `<think>\\n{reasoning}\\n</think>\\n\\n{content}` only on assistant turns after the last real
  user query (a user message that is not a tool-response wrapper) and dropped before it;
- `add_generation_prompt` appends `<|im_start|>assistant\\n`, plus the empty think block
  `<think>\\n\\n</think>\\n\\n` when `enable_thinking=False`; `/think` and `/no_think` in user
  text are plain text and pass through unchanged.

Choices a reader should know (they follow the released Qwen3 checkpoints' behaviour):
- the FINAL message, when it is an assistant turn after the last user query, always gets a
  think block, empty (`<think>\\n\\n</think>\\n\\n`) when it has no reasoning: this is how a
  non-thinking answer looks in Qwen3 training data. Earlier turns after the last query get
  one only when they have reasoning.
- when `reasoning_content` is a string, `content` is used as given (not split at `</think>`).
- a conversation without a real user query is an error (the released template raises too).
- the tool instructions are our own wording (`TOOLS_INSTRUCTION`); the structure matches
  the released template but the sentences do not, so token-exact parity with a real
  checkpoint's tool prompt needs `use_checkpoint_template=True` on the tokenizer.
- JSON is written with `json.dumps(..., ensure_ascii=False)` (HF's `tojson` filter does the
  same), so non-ASCII names and arguments stay readable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
ROLES = ("system", "user", "assistant", "tool")

TOOLS_HEADER = (
    "# Tools\n\n"
    "You can use one or more of the functions below to help with the user's request.\n\n"
    "Their signatures are given inside <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTION = (
    "\n</tools>\n\n"
    "To call a function, write a JSON object with the function name and its arguments "
    "inside <tool_call></tool_call> XML tags, one block per call:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _turn(role: str, body: str) -> str:
    return f"{IM_START}{role}\n{body}{IM_END}\n"


def _is_tool_response_wrapper(content: str) -> bool:
    return content.startswith(TOOL_RESPONSE_START) and content.endswith(TOOL_RESPONSE_END)


def validate_messages(messages: Any) -> None:
    """Check a conversation; raise ValueError naming the index of the first bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; a system message may only come first")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) content must be a str or None, got {type(content).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages[{i}] reasoning_content must be a str or None, got {type(reasoning).__name__}")
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise ValueError(f"messages[{i}] has tool_calls but role {role!r}; only assistant messages call tools")
            if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
                raise ValueError(f"messages[{i}] tool_calls must be a list of dicts")
            for j, call in enumerate(calls):
                _unpack_call(call, f"messages[{i}].tool_calls[{j}]")
    if _last_query_index(messages) < 0:
        raise ValueError("messages contain no user query (a user message that is not only tool responses)")


def _unpack_call(call: Any, where: str) -> tuple[str, str]:
    """(name, arguments-as-JSON-text) from `{"name", "arguments"}` or OpenAI's `{"function": {...}}`."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} needs a string 'name' (or 'function': {{'name': ...}})")
    args = fn.get("arguments", {})
    if not isinstance(args, str):  # a string is taken as already-serialized JSON, like HF
        try:
            args = _dumps(args)
        except TypeError as e:
            raise ValueError(f"{where} arguments are not JSON-serializable: {e}") from None
    return fn["name"], args


def _last_query_index(messages: Sequence[Mapping]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m.get("content")
        if m.get("role") == "user" and isinstance(c, str) and not _is_tool_response_wrapper(c):
            return i
    return -1


def _split_reasoning(message: Mapping) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, before any whitespace trimming for display."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_END in content:
        before, _, _ = content.partition(THINK_END)
        reasoning = before.rstrip("\n").split(THINK_START)[-1].lstrip("\n")
        content = content.split(THINK_END)[-1].lstrip("\n")
        return reasoning, content
    return "", content


def _check_tools(tools: Any) -> list:
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for j, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise ValueError(f"tools[{j}] must be a dict (a JSON schema), got {type(t).__name__}")
    return list(tools)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """Render a conversation in the Qwen3 chat format (see the module docstring for the rules).

    messages: dicts with `role` (system/user/assistant/tool), `content` (str or None), and for
    assistants optional `reasoning_content` and `tool_calls` (`{"name", "arguments"}` or
    `{"type": "function", "function": {"name", "arguments"}}`; string arguments are inserted
    verbatim as JSON text). tools: JSON-schema dicts, rendered with json.dumps in order.
    """
    validate_messages(messages)
    tools = _check_tools(tools)
    out: list[str] = []
    has_system = len(messages) > 0 and messages[0]["role"] == "system"
    system = (messages[0].get("content") or "") if has_system else None
    if tools:
        lines = "".join("\n" + _dumps(t) for t in tools)
        prefix = system + "\n\n" if has_system else ""
        out.append(_turn("system", prefix + TOOLS_HEADER + lines + TOOLS_INSTRUCTION))
    elif has_system:
        out.append(_turn("system", system))

    last_query = _last_query_index(messages)
    n = len(messages)
    for i in range(1 if has_system else 0, n):
        m = messages[i]
        role, content = m["role"], m.get("content") or ""
        if role == "user":
            out.append(_turn("user", content))
        elif role == "assistant":
            reasoning, content = _split_reasoning(m)
            if i > last_query and (i == n - 1 or reasoning):
                body = THINK_START + "\n" + reasoning.strip("\n") + "\n" + THINK_END + "\n\n" + content.lstrip("\n")
            else:
                body = content
            for j, call in enumerate(m.get("tool_calls") or []):
                name, args = _unpack_call(call, f"messages[{i}].tool_calls[{j}]")
                sep = "\n" if (j > 0 or content) else ""
                body += f'{sep}{TOOL_CALL_START}\n{{"name": {_dumps(name)}, "arguments": {args}}}\n{TOOL_CALL_END}'
            out.append(_turn("assistant", body))
        else:  # tool: consecutive results share one user turn
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n{TOOL_RESPONSE_START}\n{content}\n{TOOL_RESPONSE_END}")
            if i == n - 1 or messages[i + 1]["role"] != "tool":
                out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
        if not enable_thinking:
            out.append(EMPTY_THINK)
    return "".join(out)


def parse_reasoning(text: str, thinking_open: bool = False) -> tuple[str | None, str]:
    """Split generated assistant text into `(reasoning_content, content)`.

    `text` is what the model produced after the generation prompt. Rules:
    - with `</think>`: reasoning is the text before the first `</think>` (a leading `<think>`
      and surrounding newlines removed), content is the text after it, leading newlines
      removed. An empty think block gives reasoning `""`.
    - without `</think>`: if the text opens with `<think>` or `thinking_open=True` (the prompt
      already ended inside a think block), the model is still thinking (e.g. it hit the token
      limit): everything is reasoning and content is `""`. Otherwise there is no reasoning:
      `(None, text)`.
    A trailing `<|im_end|>` / `<|endoftext|>` (decoded without skipping specials) is dropped.
    """
    for eos in (IM_END, "<|endoftext|>"):
        if text.endswith(eos):
            text = text[: -len(eos)]
    stripped = text.lstrip()
    opened = stripped.startswith(THINK_START)
    if opened:
        text = stripped[len(THINK_START):]
    if THINK_END in text:
        reasoning, _, content = text.partition(THINK_END)
        return reasoning.strip("\n"), content.lstrip("\n")
    if opened or thinking_open:
        return text.strip("\n"), ""
    return None, text


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)


def parse_tool_calls(content: str, strict: bool = False) -> list[dict]:
    """Tool calls in an assistant answer, as `[{"name": str, "arguments": dict}, ...]` in order.

    Each `<tool_call>...</tool_call>` block must hold a JSON object with a string `name` and
    an object `arguments` (a JSON string there is decoded). Malformed or unterminated blocks
    are skipped, or raise ValueError when `strict=True`.
    """
    calls = []
    for k, match in enumerate(_TOOL_CALL_RE.finditer(content)):
        try:
            obj = json.loads(match.group(1).strip())
            args = obj.get("arguments", {}) if isinstance(obj, dict) else None
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
                raise ValueError("expected {\"name\": str, \"arguments\": object}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if strict:
                raise ValueError(f"tool call {k} is malformed ({e}): {match.group(0)[:200]!r}") from None
            continue
        calls.append({"name": obj["name"], "arguments": args})
    if strict and content.count(TOOL_CALL_START) != content.count(TOOL_CALL_END):
        raise ValueError("unterminated <tool_call> block in content")
    return calls


# ---------------------------------------------------------------- checkpoint (Jinja) templates


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_jinja(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Render a checkpoint's `chat_template` the way HF does: sandboxed (immutable) Jinja with
    trim_blocks/lstrip_blocks, loop controls, `raise_exception` and a `tojson` filter. Extra
    keyword arguments (e.g. `enable_thinking`, `eos_token`) become template variables.
    Messages are passed as given (the template does its own checks)."""
    if not isinstance(template, str) or not template:
        raise ValueError("chat template must be a non-empty string")
    return _compile(template).render(
        messages=list(messages), tools=_check_tools(tools) or None,
        add_generation_prompt=add_generation_prompt, **variables,
    )
