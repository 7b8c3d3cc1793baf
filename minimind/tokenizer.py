"""The MiniMind2 tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus the project's own ChatML renderer.

Special tokens: <|endoftext|> = 0 (pad), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos). A conversation renders as

    <|im_start|>system\\n{system or "You are a helpful assistant"}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n          (each user turn)
    {content}<|im_end|>\\n                                                  (each assistant turn)

exactly as MiniMind2's Jinja `chat_template` (kept verbatim in CHAT_TEMPLATE, written into tokenizer_config.json so
`transformers.AutoTokenizer` loads a folder we write). `encode_chat` gives the ids of that text and the loss mask:
1 on assistant tokens, from after `<|im_start|>assistant\\n` through `<|im_end|>` and its newline.

`load_tokenizer()` loads the tokenizer bundled in minimind/assets/tokenizer/ (trained by `python -m train.tokenizer`
on the demo data); `load_tokenizer(folder)` loads any folder with a tokenizer.json (the real MiniMind one included).
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
DEFAULT_SYSTEM = "You are a helpful assistant"
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"

# MiniMind2's chat template, verbatim (a data-format fact): the user turn already opens the assistant turn, so
# add_generation_prompt changes nothing.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
)


def tokenizer_config() -> dict:
    """tokenizer_config.json for a MiniMind2-style folder (what transformers.AutoTokenizer needs)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "additional_special_tokens": [],
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 32768,
        "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def render_chat(messages: Sequence[dict]) -> Tuple[str, List[Tuple[int, int]]]:
    """ChatML text of `messages` and the byte spans [start, end) of the assistant targets (content + <|im_end|>\\n)."""
    parts, spans, nbytes = [], [], 0

    def put(s):
        nonlocal nbytes
        parts.append(s)
        nbytes += len(s.encode("utf-8"))

    if messages and messages[0]["role"] == "system":
        put(f"{BOS}system\n{messages[0]['content']}{EOS}\n")
    else:
        put(f"{BOS}system\n{DEFAULT_SYSTEM}{EOS}\n")
    for m in messages:
        if m["role"] == "user":
            put(f"{BOS}user\n{m['content']}{EOS}\n{BOS}assistant\n")
        elif m["role"] == "assistant":
            start = nbytes
            put(f"{m['content']}{EOS}\n")
            spans.append((start, nbytes))
    return "".join(parts), spans


class Tokenizer:
    """A byte-level BPE tokenizer with MiniMind2's special tokens and chat format. Wraps `tokenizers.Tokenizer`."""

    def __init__(self, hf: HFTokenizer, name: str = ""):
        self.hf, self.name = hf, name
        for i, t in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(t) != i:
                raise ValueError(f"tokenizer {name or '(in memory)'}: {t} must have id {i}, "
                                 f"has {hf.token_to_id(t)}")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha1(hf.to_str().encode("utf-8")).hexdigest()
        # Bytes each token stands for: a byte-level token string has one character per byte; added (special)
        # tokens stand for their text. Lets encode_chat find the assistant spans without offsets.
        byte_len = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in hf.get_vocab(with_added_tokens=True).items():
            byte_len[i] = len(tok)
        for i, added in hf.get_added_tokens_decoder().items():
            byte_len[i] = len(added.content.encode("utf-8"))
        self._byte_len = byte_len

    @classmethod
    def from_file(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(HFTokenizer.from_file(str(path)), name=str(path))

    def to_str(self) -> str:
        return self.hf.to_str()

    def __reduce__(self):  # picklable for worker processes
        return _tokenizer_from_str, (self.hf.to_str(), self.name)

    def __len__(self):
        return self.vocab_size

    def token_to_id(self, token: str) -> Optional[int]:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.hf.id_to_token(i)

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`; no special tokens are added (special-token text inside `text` is recognised)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """MiniMind2's ChatML text (see the module docstring). add_generation_prompt is accepted for API
        compatibility; the template opens the assistant turn after every user turn anyway."""
        return render_chat(messages)[0]

    def encode_chat(self, messages: Sequence[dict]) -> Tuple[List[int], List[int]]:
        """(ids, loss_mask) of the rendered conversation; mask 1 on assistant content, <|im_end|> and its newline."""
        ids, mask = self.encode_chat_batch([messages])[0]
        return ids.tolist(), mask.tolist()

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """encode_chat for many conversations; numpy int64 ids and uint8 masks."""
        rendered = [render_chat(c) for c in conversations]
        encodings = self.hf.encode_batch_fast([text for text, _ in rendered], add_special_tokens=False)
        out = []
        for (text, spans), enc in zip(rendered, encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            ends = np.cumsum(self._byte_len[ids])
            starts = ends - self._byte_len[ids]
            if len(ids) and ends[-1] != len(text.encode("utf-8")):
                raise ValueError(f"tokenizer {self.name}: token bytes do not add up to the text (a normalizer?); "
                                 f"encode_chat needs a plain byte-level BPE")
            mask = np.zeros(len(ids), dtype=np.uint8)
            for lo, hi in spans:  # a token belongs to the span in which it starts
                mask[(starts >= lo) & (starts < hi)] = 1
            out.append((ids, mask))
        return out

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers.AutoTokenizer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
                                                      + "\n", encoding="utf-8")


def _tokenizer_from_str(s: str, name: str) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(s), name=name)


def load_tokenizer(path=None) -> Tokenizer:
    """The tokenizer in folder `path` (with tokenizer.json), or the bundled one when path is None."""
    return Tokenizer.from_file(BUNDLED_TOKENIZER if path is None else path)
