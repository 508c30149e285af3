"""One generated sequence as the OpenAI API reports it: text, logprobs, finish reason, usage.

The model replica streams events (serve.model_server); `Sequence` accumulates one sequence's
events and renders them in either endpoint's shape. Token strings follow OpenAI: a token whose
bytes are not valid UTF-8 on their own (part of a character) is written ``bytes:\\xNN...``;
chat logprobs carry the raw bytes as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def token_str(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


@dataclass
class Sequence:
    """The events of one sequence (one prompt, one choice) folded together."""

    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_text: str = ""
    # (token bytes, logprob or None, [(bytes, logprob)]) per scored token, prompt (echo) first
    scored: list[tuple[bytes, float | None, list[tuple[bytes, float]]]] = field(default_factory=list)
    logprob_sum: float = 0.0
    done: dict | None = None
    error: dict | None = None
    _prompt_pieces: list[bytes] = field(default_factory=list)

    def add(self, ev: dict) -> None:
        kind = ev["type"]
        if kind == "accepted":
            self.prompt_tokens = ev["prompt_tokens"]
            self.prompt_text = ev.get("prompt_text", "")
            self._prompt_pieces = ev.get("prompt_pieces", [])
        elif kind == "prompt_logprobs":
            pieces = self._prompt_pieces
            self.scored.append((pieces[0], None, []))  # the first prompt token has no context
            for b, (lp, top) in zip(pieces[1:], ev["logprobs"]):
                self.scored.append((b, lp, [(tb, v) for _, v, tb in top]))
        elif kind == "token":
            self.text.append(ev["text"])
            if "logprob" in ev:
                self.scored.append((ev["bytes"], ev["logprob"], [(tb, v) for _, v, tb in ev["top"]]))
                self.logprob_sum += ev["logprob"]
        elif kind == "done":
            self.done = ev
        elif kind == "error":
            self.error = ev

    @property
    def finish_reason(self) -> str | None:
        return self.done["finish_reason"] if self.done else None

    @property
    def completion_tokens(self) -> int:
        return self.done["usage"]["completion_tokens"] if self.done else 0

    @property
    def kv_cache_bytes(self) -> int:
        return self.done["usage"]["kv_cache_bytes"] if self.done else 0

    def completion_logprobs(self, start: int = 0, offset: int = 0) -> CompletionLogprobs:
        """Scored tokens from index start; text offsets count from offset (characters)."""
        tokens, lps, tops, offs = [], [], [], []
        for b, lp, top in self.scored[start:]:
            s = token_str(b)
            tokens.append(s)
            lps.append(lp)
            tops.append(None if lp is None else {token_str(tb): v for tb, v in top})
            offs.append(offset)
            offset += len(s)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offs)

    def chat_logprobs(self, start: int = 0) -> ChatLogprobs:
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    token=token_str(b),
                    logprob=lp,
                    bytes=list(b),
                    top_logprobs=[TopLogprob(token=token_str(tb), logprob=v, bytes=list(tb)) for tb, v in top],
                )
                for b, lp, top in self.scored[start:]
            ]
        )
