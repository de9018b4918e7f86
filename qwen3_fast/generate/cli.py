"""``qwen3-fast generate`` and ``qwen3-fast chat``: the engine on the command line.

    qwen3-fast generate --model DIR --prompt "Why is the sky blue?" [--think|--no-think]
        [--kv-cache int8] [--max-new-tokens N] [--thinking-budget N] [--json]
    qwen3-fast chat --model DIR [--no-think]

``generate`` sends the prompt as one user turn in the Qwen3 chat format (``--raw``: as plain
text) and streams the reply; ``--json`` prints one JSON object with the result and timings
instead. ``chat`` is interactive: each line is a user turn, the reply streams, reasoning is
shown dimmed when stdout is a terminal, and a line of ``/think`` or ``/no_think`` switches
thinking mode (inside a longer message they pass through to the model, which reads them as
Qwen3's soft switches); ``/reset`` clears the history, ``/exit`` or end of input quits.

Bad input (missing or invalid model directory, prompt longer than --max-seq-len, impossible
sampling values) ends with a one-line message on stderr and exit status 2, no traceback.
"""
from __future__ import annotations

import json
import sys
import time

DIM, RESET = "\x1b[2m", "\x1b[0m"
THINK_END = "</think>"
DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_subcommands(sub) -> None:
    """Register the generate and chat subcommands on an argparse subparsers object."""
    for name, helptext in (("generate", "generate a reply to one prompt"),
                           ("chat", "interactive chat with streaming")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="checkpoint directory (HF format)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--raw", action="store_true",
                           help="continue the prompt as plain text (no chat template)")
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--think", dest="think", action="store_true", default=True,
                          help="thinking mode (default)")
        mode.add_argument("--no-think", dest="think", action="store_false")
        p.add_argument("--thinking-budget", type=int, default=None)
        p.add_argument("--kv-cache", choices=("bf16", "int8"), default="bf16")
        p.add_argument("--speculative", action="store_true",
                       help="self-speculative decoding (QuantSpec: 4-bit KV draft, 8-bit "
                            "verify); implies --kv-cache int8")
        p.add_argument("--gamma", default="4",
                       help="draft tokens per verification (an int, or 'auto')")
        p.add_argument("--draft-weight-bits", type=int, choices=(4, 16), default=16)
        p.add_argument("--max-new-tokens", type=int, default=None)
        p.add_argument("--max-seq-len", type=int, default=4096)
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--min-p", type=float, default=None)
        p.add_argument("--presence-penalty", type=float, default=None)
        p.add_argument("--repetition-penalty", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--dtype", choices=DTYPES, default="auto")
        p.add_argument("--device", default=None)


def _sampling(args):
    from qwen3_fast.generate.params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, presence_penalty=args.presence_penalty,
                          repetition_penalty=args.repetition_penalty,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)


def _load(args):
    import torch

    from qwen3_fast.generate.engine import LLM

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    spec, kv_cache = None, args.kv_cache
    if args.speculative:
        from qwen3_fast.generate.speculative import QuantSpecConfig

        gamma = args.gamma if args.gamma == "auto" else _int_arg("--gamma", args.gamma)
        spec, kv_cache = QuantSpecConfig(gamma=gamma, draft_weight_bits=args.draft_weight_bits,
                                         max_gamma=max(8, gamma if isinstance(gamma, int) else 8)
                                         ), "int8"
    return LLM(args.model, dtype=dtype, device=args.device, kv_cache=kv_cache,
               max_batch_size=1, max_seq_len=args.max_seq_len, speculative=spec)


def _int_arg(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int or 'auto', got {value!r}") from None


class _Printer:
    """Writes streamed text, dimming the reasoning (up to and including </think>) on a tty."""

    def __init__(self, out, thinking: bool):
        self.out, self.thinking = out, thinking
        self.color = hasattr(out, "isatty") and out.isatty()
        self.text = ""

    def write(self, delta: str) -> None:
        before, self.text = self.text, self.text + delta
        if self.thinking and self.color and THINK_END not in before:
            end = self.text.find(THINK_END)
            cut = len(delta) if end < 0 else end + len(THINK_END) - len(before)
            if delta[:cut]:
                self.out.write(DIM + delta[:cut] + RESET)
            delta = delta[cut:]
        self.out.write(delta)
        self.out.flush()


def _stats(out) -> str:
    tps = out.decode_tokens_per_second
    spec = ""
    if out.speculative:
        s = out.speculative
        spec = (f"; speculative: acceptance {s['acceptance_rate']:.0%}, "
                f"{s['tokens_per_step']:.2f} tokens/step")
    return (f"[{out.completion_tokens} tokens, {out.finish_reason}; prefill "
            f"{out.prefill_seconds:.2f} s, {tps:.1f} tokens/s{spec}]")


def _reply(printer, stream_events):
    final = None
    for ev in stream_events:
        printer.write(ev.text)
        if ev.output is not None:
            final = ev.output
    return final


def run_generate(args, stdout=None) -> int:
    stdout = stdout or sys.stdout
    sampling = _sampling(args)
    llm = _load(args)
    budget = args.thinking_budget
    if args.raw:
        events = llm.generate(args.prompt, sampling, stream=not args.json,
                              enable_thinking=args.think, thinking_budget=budget)
    else:
        events = llm.chat([{"role": "user", "content": args.prompt}], enable_thinking=args.think,
                          thinking_budget=budget, sampling=sampling, stream=not args.json)
    if args.json:
        out = events[0] if isinstance(events, list) else events
        d = out.to_dict()
        d["decode_tokens_per_second"] = out.decode_tokens_per_second
        stdout.write(json.dumps(d, ensure_ascii=False) + "\n")
        return 0
    out = _reply(_Printer(stdout, args.think and not args.raw), events)
    stdout.write("\n")
    sys.stderr.write(_stats(out) + "\n")
    return 0


def run_chat(args, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    sampling = _sampling(args)
    llm = _load(args)
    thinking, history = args.think, []
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    stdout.write(f"qwen3-fast chat ({args.model}); thinking {'on' if thinking else 'off'}. "
                 "/think, /no_think, /reset, /exit\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line in ("/think", "/no_think"):
            thinking = line == "/think"
            stdout.write(f"thinking {'on' if thinking else 'off'}\n")
            continue
        if line == "/reset":
            history = []
            stdout.write("history cleared\n")
            continue
        history.append({"role": "user", "content": line})
        events = llm.chat(history, enable_thinking=thinking, thinking_budget=args.thinking_budget,
                          sampling=sampling, stream=True)
        out = _reply(_Printer(stdout, thinking), events)
        # the history keeps the answer only: Qwen3 drops earlier turns' reasoning anyway
        history.append({"role": "assistant", "content": out.content or ""})
        stdout.write("\n" + _stats(out) + "\n")
    return 0


def main(args) -> int:
    """Run a parsed generate/chat command; user errors become one line on stderr, exit 2."""
    from qwen3_fast.model.checkpoint import CheckpointError

    start = time.perf_counter()
    try:
        if args.command == "generate":
            return run_generate(args)
        return run_chat(args)
    except (FileNotFoundError, CheckpointError, ValueError, TypeError) as e:
        sys.stderr.write(f"qwen3-fast {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted after {time.perf_counter() - start:.1f} s\n")
        return 130
