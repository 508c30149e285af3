"""Incremental detokenisation with stop strings, for streamed and whole completions.

Tokens are bytes (ByteTokenizer), so a character may span several tokens: an incremental UTF-8
decoder holds partial characters back. Text that might be the start of a stop string is held
back too, so a streamed completion never emits part of a stop string it later removes.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    """Feed text deltas; get back the text safe to emit and whether a stop string was hit."""

    stops: list[str] = field(default_factory=list)
    _buf: str = ""
    stopped: bool = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._buf += delta
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buf, self.stopped = self._buf[: min(hits)], "", True
            return out
        hold = self._held_suffix()
        out = self._buf[: len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold :]
        return out

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return "" if self.stopped else out

    def _held_suffix(self) -> int:
        # Longest suffix of the buffer that is a proper prefix of some stop string.
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), best, -1):
                if s.startswith(self._buf[-k:]):
                    best = k
                    break
        return best


@dataclass
class TextStream:
    """Token ids in, text deltas out: UTF-8 decoding across token boundaries, then stop strings."""

    stops: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(list(self.stops))
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def push(self, token_bytes: bytes) -> str:
        out = self._matcher.feed(self._decoder.decode(token_bytes))
        self.text += out
        return out

    def finish(self) -> str:
        out = self._matcher.feed(self._decoder.decode(b"", final=True))
        out += self._matcher.flush()
        self.text += out
        return out
