"""Tokenizers: one interface over sentencepiece `tokenizer.model` and HF `tokenizer.json`.

`load_tokenizer(path)` takes a tokenizer.model, a tokenizer.json, or a directory holding
either (a gqalab checkpoint, an HF model dir, a prepared-data dir); with both present,
tokenizer.json wins, as it does for transformers' AutoTokenizer, so ids and text agree
with what transformers gives for the same directory. A GPT-2 dir that ships only
vocab.json + merges.txt (the slow tokenizer's files) gets the tokenizer.json backend, built
from them as transformers' GPT2Tokenizer builds it. Both backends:
  encode(text) -> ids, no special tokens   decode(ids) -> text, special tokens dropped
  encode_batch, vocab_size, bos_id / eos_id / pad_id (None when absent), add_bos,
  sha256() of the defining file's bytes.

Special ids come from the checkpoint's own files, first found wins:
  1. tokenizer_config.json    bos_token / eos_token / pad_token (text, looked up in the vocab)
  2. special_tokens_map.json  the same keys
  3. generation_config.json  bos_token_id / eos_token_id / pad_token_id (a list: its first)
  4. config.json              the same keys
  5. the tokenizer model      sentencepiece's own bos/eos/pad ids; tokenizer.json: none;
                              vocab.json + merges.txt: <|endoftext|> is bos and eos (GPT-2's)
add_bos (documents and prompts start with BOS): tokenizer_config.json's add_bos_token,
else whether tokenizer.json's post-processor puts BOS first (a template, alone or in a
Sequence; Roberta/Bert's cls), else False.
The files of TOKENIZER_FILES travel with every checkpoint, import and export.

Training gqalab's own BPE: data/bpe.py; streaming decode (IncrementalDecoder): data/streaming.py.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm

from data.config import DataError

SPM_FILE, JSON_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file; wins over the config's
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # GPT-2's byte-level BPE, as a pair
# Copied wholesale wherever a tokenizer travels (checkpoints, import, export, prepared data).
TOKENIZER_CONFIGS = (CONFIG_FILE, "special_tokens_map.json", "generation_config.json",
                     CHAT_TEMPLATE_FILE)
TOKENIZER_FILES = (SPM_FILE, JSON_FILE, VOCAB_FILE, MERGES_FILE, *TOKENIZER_CONFIGS)
MODEL_FILES = (JSON_FILE, SPM_FILE, VOCAB_FILE, MERGES_FILE)  # load_tokenizer's preference
# Where special ids are looked up, in order of authority: (file, is_token_text).
SPECIAL_SOURCES = ((CONFIG_FILE, True), ("special_tokens_map.json", True),
                   ("generation_config.json", False), ("config.json", False))
SPECIALS = ("bos", "eos", "pad")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = SPECIAL_IDS = 0, 1, 2, 3  # gqalab's own BPE (data/bpe.py)

class Tokenizer:
    """The common interface. Subclasses hold the model's bytes, so a tokenizer pickles
    (to datasets' worker processes) and fingerprints by content."""

    file_name: str  # SPM_FILE, JSON_FILE or VOCAB_FILE
    hf_class: str  # the transformers class that reads the same files

    def __init__(self, data: bytes, path: Optional[Path] = None, specials: Optional[dict] = None,
                 add_bos: bool = False):
        self.data = data
        self.path = Path(path) if path is not None else None
        self.add_bos = add_bos
        specials = specials or {}
        self.bos_id, self.eos_id, self.pad_id = (specials.get(k) for k in SPECIALS)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        return load_tokenizer(path)

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_id(self, text: str) -> Optional[int]:
        """The id of a token's text, or None when not in the vocabulary."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        raise NotImplementedError

    def special_tokens(self) -> dict:
        """{text: id} of the special tokens (tokenizer.json's added tokens, sentencepiece's
        control pieces): the ones whose text in a chat template means one id."""
        raise NotImplementedError

    def is_byte(self, token_id: int) -> bool:
        """A byte-fallback piece (<0xHH>): its text depends on the bytes that follow it."""
        return re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", self.token_text(token_id) or "") is not None

    @property
    def unk_id(self) -> Optional[int]:
        """The id unknown text becomes, or None (byte-level BPE has no unknown text)."""
        return None

    @property
    def adds_dummy_prefix(self) -> bool:
        """Whether encode puts a space before the text (Llama's sentencepiece) and decode
        drops it again."""
        return False

    def model_specials(self) -> dict:
        """{bos/eos/pad: id} the model file itself defines (the last source of special_ids)."""
        return {}

    def post_processor_first_id(self) -> Optional[int]:
        """The id the model file's post-processor puts before the text, or None."""
        return None

    def model_files(self) -> dict:
        """{file name: bytes} of the files that define the tokenizer."""
        return {self.file_name: self.data}

    def sha256(self) -> str:
        return hashlib.sha256(b"".join(self.model_files().values())).hexdigest()

    def identity(self) -> dict:
        """Everything that decides the ids a document becomes (for cache keys)."""
        return dict(file=self.file_name, sha256=self.sha256(), add_bos=self.add_bos,
                    **{f"{k}_id": getattr(self, f"{k}_id") for k in SPECIALS})

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)


class SentencePieceTokenizer(Tokenizer):
    file_name, hf_class = SPM_FILE, "LlamaTokenizer"

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        if getattr(self, "_sp", None) is None:
            self._sp = spm.SentencePieceProcessor(model_proto=self.data)
        return self._sp

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """As transformers decodes it (skip_special_tokens=True): <unk> is dropped like the
        control tokens, and a run of byte pieces that is not valid UTF-8 becomes one U+FFFD
        per byte (sentencepiece alone would keep the valid bytes inside it)."""
        ids = [int(i) for i in ids]
        if self._odd_ids.isdisjoint(ids):  # no specials, no byte pieces: sentencepiece's own
            return self.sp.decode(ids)
        ids = [i for i in ids if not (self.sp.is_unknown(i) or self.sp.is_control(i))]
        text = self.sp.decode(self._hf_byte_runs(ids))
        space = ids and ids[0] == self.sp.piece_to_id("<0x20>") and text.startswith(" ")
        if space and self.adds_dummy_prefix:
            return text[1:]  # transformers strips the leading space whatever spelled it
        return text

    @property
    def adds_dummy_prefix(self) -> bool:
        """Llama's add_dummy_prefix: encode puts a space before the text, decode drops it."""
        return self.sp.encode("x", out_type=str)[0].startswith("\u2581")

    @property
    def _odd_ids(self) -> frozenset:
        if getattr(self, "_odd", None) is None:
            sp = self.sp
            self._odd = frozenset(i for i in range(self.vocab_size)
                                  if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i))
        return self._odd

    def _hf_byte_runs(self, ids: List[int]) -> List[int]:
        out, run = [], []
        for i in ids + [-1]:
            if i >= 0 and self.sp.is_byte(i):
                run.append(i)
                continue
            if run:
                data = bytes(int(self.sp.id_to_piece(b)[3:5], 16) for b in run)
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:  # a lone continuation byte decodes as one U+FFFD
                    run = [self.sp.piece_to_id("<0x80>")] * len(run)
                out += run
                run = []
            if i >= 0:
                out.append(i)
        return out

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_id(self, text: str) -> Optional[int]:
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def special_tokens(self) -> dict:
        sp = self.sp
        return {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}

    def is_byte(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self.sp.is_byte(token_id)

    def model_specials(self) -> dict:
        ids = dict(bos=self.sp.bos_id(), eos=self.sp.eos_id(), pad=self.sp.pad_id())
        return {k: v for k, v in ids.items() if v >= 0}

    @property
    def unk_id(self) -> Optional[int]:
        return self.sp.unk_id() if self.sp.unk_id() >= 0 else None

    def model_proto(self) -> bytes:
        return self.data


class JsonTokenizer(Tokenizer):
    """An HF fast tokenizer's tokenizer.json, through the `tokenizers` library."""

    file_name, hf_class = JSON_FILE, "PreTrainedTokenizerFast"

    @property
    def tk(self):
        if getattr(self, "_tk", None) is None:
            self._tk = self.build()
        return self._tk

    def build(self):
        from tokenizers import Tokenizer as HFTokenizer
        return HFTokenizer.from_str(self.data.decode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:  # ids may be sparse: the size an embedding needs
        return max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    def token_id(self, text: str) -> Optional[int]:
        return self.tk.token_to_id(text)

    def token_text(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)

    def special_tokens(self) -> dict:
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}

    def post_processor_first_id(self) -> Optional[int]:
        return first_added_id(json.loads(self.data).get("post_processor") or {})


def first_added_id(processor: dict) -> Optional[int]:
    """The id a tokenizer.json post-processor puts before the text (None: nothing).
    In a Sequence the first processor that prepends decides (tokenizers 0.23 adds no
    second prefix); Llama-3's tokenizer.json nests its "<|begin_of_text|> $A" template in one."""
    kind = processor.get("type")
    if kind == "Sequence":
        ids = [first_added_id(p) for p in processor.get("processors") or []]
        return next((i for i in ids if i is not None), None)
    if kind == "TemplateProcessing":
        first = ((processor.get("single") or [{}])[0] or {}).get("SpecialToken")
        special = (processor.get("special_tokens") or {}).get((first or {}).get("id"), {})
        return (special.get("ids") or [None])[0]
    if kind in ("RobertaProcessing", "BertProcessing"):  # cls: [text, id], always first
        return (processor.get("cls") or [None, None])[1]
    return None


class Gpt2FilesTokenizer(JsonTokenizer):
    """GPT-2's vocab.json (data) + merges.txt (merges), built as transformers' GPT2Tokenizer
    builds them: byte-level BPE without a prefix space, <|endoftext|> a special token (so
    decode drops it) and both BOS and EOS."""

    file_name, hf_class = VOCAB_FILE, "GPT2Tokenizer"
    END_OF_TEXT = "<|endoftext|>"

    def __init__(self, data: bytes, path: Optional[Path] = None, merges: bytes = b""):
        super().__init__(data, path)
        self.merges = merges

    def model_files(self) -> dict:
        return {VOCAB_FILE: self.data, MERGES_FILE: self.merges}

    def build(self):
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, \
            pre_tokenizers
        vocab = json.loads(self.data.decode("utf-8"))
        lines = self.merges.decode("utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines
                  if line and not line.startswith("#version")]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{MERGES_FILE} line {' '.join(bad)!r} is not 'a b'")
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                    continuing_subword_prefix="", end_of_word_suffix="",
                                    fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(self.END_OF_TEXT, special=True)])
        return tk

    def model_specials(self) -> dict:
        eot = self.token_id(self.END_OF_TEXT)
        return dict(bos=eot, eos=eot)

    def post_processor_first_id(self) -> Optional[int]:
        return None  # the slow GPT2Tokenizer adds nothing before the text


# ---------------------------------------------------------------- loading

def tokenizer_files(path) -> dict:
    """{name: path} of the TOKENIZER_FILES a directory holds (none without a model file:
    tokenizer.model, tokenizer.json, or the pair vocab.json + merges.txt)."""
    path = Path(path)
    found = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    pair = {VOCAB_FILE, MERGES_FILE} <= found.keys()
    return found if SPM_FILE in found or JSON_FILE in found or pair else {}


def spare_model_files(tok: Tokenizer) -> tuple:
    """The other model files of tok's dir that load_tokenizer ranks below tok's own (a
    Llama dir's tokenizer.model beside its tokenizer.json): they travel too, and the dir
    they land in still loads as tok."""
    return MODEL_FILES[MODEL_FILES.index(tok.file_name) + 1:]


def copy_tokenizer(tok: Tokenizer, out_dir) -> None:
    """Write tok's model file, the spare ones and the configs beside it into out_dir. Ids
    that came from elsewhere (an HF config.json, which does not travel) go into
    generation_config.json."""
    out_dir = Path(out_dir)
    for name, data in tok.model_files().items():
        (out_dir / name).write_bytes(data)
    for name in (*spare_model_files(tok), *TOKENIZER_CONFIGS):
        if tok.path is not None and (tok.path.parent / name).is_file():
            shutil.copyfile(tok.path.parent / name, out_dir / name)
    if not (out_dir / "generation_config.json").is_file():
        ids = {f"{k}_token_id": getattr(tok, f"{k}_id") for k in SPECIALS}
        (out_dir / "generation_config.json").write_text(
            json.dumps({k: v for k, v in ids.items() if v is not None}, indent=2) + "\n")


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer.model, a tokenizer.json, or a directory holding one (see module doc)."""
    path = Path(path)
    if path.is_dir():
        files = tokenizer_files(path)
        if not files:
            raise DataError(f"{path} holds no {SPM_FILE}, {JSON_FILE} or {VOCAB_FILE} + "
                            f"{MERGES_FILE}: pass a tokenizer file, or a checkpoint/HF dir that "
                            f"ships one")
        path = files.get(JSON_FILE, files.get(SPM_FILE, files.get(VOCAB_FILE)))
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found: pass a {SPM_FILE}, a {JSON_FILE}, a "
                        f"{VOCAB_FILE} with {MERGES_FILE} beside it, or a directory holding one")
    tok = read_model(path)
    try:
        tok.vocab_size  # parses the model now, so a bad file fails here, with its name
    except Exception as e:  # sentencepiece: RuntimeError/OSError; tokenizers: Exception
        raise DataError(f"{path} is not a readable {' + '.join(tok.model_files())}: {e}") \
            from None
    tok.bos_id, tok.eos_id, tok.pad_id = (special_ids(tok, path.parent).get(k) for k in SPECIALS)
    tok.add_bos = adds_bos(tok, path.parent)
    return tok


def read_model(path: Path) -> Tokenizer:
    """The tokenizer of one model file, specials not yet looked up."""
    if path.name == VOCAB_FILE:
        merges = path.with_name(MERGES_FILE)
        if not merges.is_file():
            raise DataError(f"{path} has no {MERGES_FILE} beside it: GPT-2's tokenizer is the "
                            f"pair; pass its directory with both, or its {JSON_FILE}")
        return Gpt2FilesTokenizer(path.read_bytes(), path, merges.read_bytes())
    cls = JsonTokenizer if path.suffix == ".json" else SentencePieceTokenizer
    return cls(path.read_bytes(), path)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def special_ids(tok: Tokenizer, folder: Path) -> dict:
    """bos/eos/pad ids by the order of authority in the module docstring."""
    ids = {}
    for name, is_text in SPECIAL_SOURCES:
        d = read_json(folder / name)
        for k in SPECIALS:
            if k in ids:
                continue
            value = d.get(f"{k}_token" if is_text else f"{k}_token_id")
            if is_text and isinstance(value, dict):  # an AddedToken: {"content": ...}
                value = value.get("content")
            if isinstance(value, list):  # several EOS ids (generation_config): the first
                value = value[0] if value else None
            value = tok.token_id(value) if is_text and isinstance(value, str) else value
            if isinstance(value, int) and 0 <= value < tok.vocab_size:
                ids[k] = value
    return {**tok.model_specials(), **ids}


def adds_bos(tok: Tokenizer, folder: Path) -> bool:
    config = read_json(folder / CONFIG_FILE)
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"] and tok.bos_id is not None
    return tok.bos_id is not None and tok.post_processor_first_id() == tok.bos_id
