"""Exact streaming decode: text of a growing list of token ids as soon as it is final."""

from typing import List, Sequence

from data.tokenizer import Tokenizer


class IncrementalDecoder:
    """Turns a stream of token ids into text as soon as the text is final.

    Decoding token by token loses spaces (sentencepiece's dummy prefix, a decoder's strip
    of the first space) and splits multi-byte characters spelled as several byte tokens.
    So decode the prompt's last tokens + all new ids, return only what follows
    decode(those prompt tokens), and hold it back while it ends in U+FFFD (an unfinished
    UTF-8 sequence) or in a byte piece (a run of them that turns out not to be UTF-8
    decodes as one U+FFFD per byte, transformers' rule, so its text is known at its end).
    Decoders only treat the first token specially, so the text after a few seed tokens is
    the same as after all of them: seeding with the prompt's tail, and restarting from the
    tail once text is final, keeps every step's decode short.
    All pushes + flush() == decode(prompt + new) - decode(prompt).
    """

    SEED_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._restart([int(i) for i in prompt_ids])

    def _restart(self, ids: List[int]) -> None:
        self.ids = ids[-self.SEED_TOKENS:]
        # an unfinished character at the prompt's end is completed by the new ids
        self.emitted = len(self.tokenizer.decode(self.ids).rstrip("\ufffd")) if self.ids else 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.tokenizer.is_byte(self.ids[-1]):  # a byte run is final only once it ends
            return ""
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = self._take_new(text)
        if len(self.ids) > 4 * self.SEED_TOKENS:
            self._restart(self.ids)
        return new

    def flush(self) -> str:
        return self._take_new(self.tokenizer.decode(self.ids))

    def _take_new(self, text: str) -> str:
        new = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return new
