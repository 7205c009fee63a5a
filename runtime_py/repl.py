"""`kiln chat`: an interactive, multi-turn terminal chat on one Session.

Each turn renders the whole conversation with the model's chat template, and generate() prefills only what the
session's KV cache does not already hold (runtime_py/kvcache.py): the earlier turns stay cached, so a turn costs its
own message, not the conversation so far. The reply streams as it is generated.

    /reset      forget the conversation (and its cache)
    /exit       leave (so do Ctrl-D and /quit)
    Ctrl-C      while a reply streams: stop it (what was said so far stays in the conversation); a second Ctrl-C
                abandons it at once. At the prompt: a fresh line; the program keeps running.
"""
from __future__ import annotations

import signal
import sys

from compiler.errors import ContextOverflowError

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply"


class _Interrupt:
    """SIGINT while a reply streams: the first sets `stop` (generate() ends after the current token), the second
    raises KeyboardInterrupt."""

    def __init__(self):
        self.stop = False

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)
        return False


def _read(prompt: str) -> str | None:
    """One line of user input; None at end of input. Ctrl-C at the prompt gives an empty line."""
    try:
        return input(prompt)
    except EOFError:
        return None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return ""


def chat_loop(session, tok, manifest, params, *, system: str | None = None, template: str | None = None,
              parse_special: bool = False, out=sys.stdout, err=sys.stderr):
    from .chat import chat_prompt_ids
    from .generate import Done, generate
    try:
        import readline  # noqa: F401 — line editing and history for input(), where the platform has it
    except ImportError:   # pragma: no cover
        pass
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"kiln chat · {manifest['model']['name']} · context {session.ctx} tokens · {HELP}", file=err)
    while True:
        line = _read("> " if sys.stdin.isatty() else "")
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(start)
            session.reset()
            print("[conversation forgotten]", file=err)
            continue
        if line.strip().startswith("/"):
            print(f"[unknown command {line.strip().split()[0]!r}; {HELP}]", file=err)
            continue
        turn = messages + [{"role": "user", "content": line}]
        ids = chat_prompt_ids(tok, manifest, turn, template=template, parse_special=parse_special)
        if len(ids) >= session.ctx:
            print(f"[the conversation is {len(ids)} tokens, the context holds {session.ctx}: /reset to start "
                  f"again, or run with a larger --ctx]", file=err)
            continue
        done, text = None, []
        with _Interrupt() as intr:
            try:
                for ev in generate(session, tok, ids, params, eog_ids=tok.eog_ids, should_stop=lambda: intr.stop):
                    if isinstance(ev, Done):
                        done = ev
                    else:
                        text.append(ev.text)
                        out.write(ev.text)
                        out.flush()
            except KeyboardInterrupt:
                pass
            except ContextOverflowError as e:
                print(f"[{e}]", file=err)
        out.write("\n")
        out.flush()
        messages = turn + [{"role": "assistant", "content": "".join(text)}]
        if done is None:
            print("[reply abandoned]", file=err)
            continue
        t = done.timings
        stopped = " · stopped" if intr.stop else ""
        print(f"[{t['prompt_tokens']} prompt tokens, {t['cached_tokens']} cached · {t['generated_tokens']} "
              f"generated · first token {t['ttft_s']:.2f}s · {t['decode_tok_s'] or 0:.1f} tok/s{stopped}]", file=err)
