"""The tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus the chat format its folder speaks.

Special tokens: <|endoftext|> = 0 (pad), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos) in both MiniMind generations;
minimind-3's tokenizer has 36 added tokens (<tool_call> 21 ... </think> 26, see minimind.chat_template). The chat
format ("minimind2": MiniMind2's ChatML; "minimind3": minimind-3's template with thinking and tools) is read off the
folder: the chat_template in its tokenizer_config.json, else its tokens. `apply_chat_template` renders exactly what
that Jinja template renders; `encode_chat` gives the ids of that text and the loss mask: 1 on every assistant turn,
from after `<|im_start|>assistant\\n` through `<|im_end|>` and its newline. `save` writes a folder transformers loads
with the same template.

`load_tokenizer()` loads the tokenizer bundled in minimind/assets/tokenizer/ (MiniMind2 format, trained by
`python -m train.tokenizer` on the demo data); `load_tokenizer(folder)` loads any folder with a tokenizer.json (the
real MiniMind2 and minimind-3 ones included).
"""
import hashlib
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from minimind.chat_template import BOS, EOS, PAD, ChatFormat, detect_format, get_format, render

BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
CONFIG_FILE = "tokenizer_config.json"


def tokenizer_config(fmt: ChatFormat, added_tokens) -> dict:
    """tokenizer_config.json for a folder of format `fmt` (what transformers.AutoTokenizer needs). added_tokens:
    (id, content, special) of every added token."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": special} for i, t, special in added_tokens}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD,
        "clean_up_tokenization_spaces": False, "legacy": True, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast", **fmt.config_extra,
        "chat_template": fmt.template,
    }


class Tokenizer:
    """A byte-level BPE tokenizer (wraps `tokenizers.Tokenizer`) and the chat format it speaks (minimind2 or
    minimind3, see minimind.chat_template). <|endoftext|> = 0 (pad), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos)."""

    def __init__(self, hf: HFTokenizer, name: str = "", chat_format: str = "minimind2"):
        self.hf, self.name, self.format = hf, name, get_format(chat_format)
        where = name or "(in memory)"
        for i, t in enumerate(self.format.added_tokens[:3]):
            if hf.token_to_id(t) != i:
                raise ValueError(f"tokenizer {where}: {t} must have id {i}, has {hf.token_to_id(t)}")
        added = {a.content for a in hf.get_added_tokens_decoder().values()}
        missing = [t for t in self.format.template_tokens if t not in added]
        if missing:
            raise ValueError(f"tokenizer {where}: the {self.chat_format} chat format writes {missing}, which this "
                             f"tokenizer lacks as added tokens")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        # which ids AND which chat format: a cache or a model card of one format never matches the other. MiniMind2's
        # format hashes tokenizer.json alone, as before formats existed, so older caches and cards stay valid.
        fp = hf.to_str() if self.chat_format == "minimind2" else f"{hf.to_str()}\nchat_format={self.chat_format}"
        self.fingerprint = hashlib.sha1(fp.encode("utf-8")).hexdigest()
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
        """A folder (or its tokenizer.json): the chat format is the one its tokenizer_config.json's chat_template
        is, or, without one, told by the tokens (minimind.chat_template.detect_format)."""
        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        hf = HFTokenizer.from_file(str(path))
        config_path = path.parent / CONFIG_FILE
        template = None
        if config_path.is_file():
            try:
                template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{config_path}: not a JSON object ({e})") from None
        fmt = detect_format(template, hf.get_vocab(with_added_tokens=True), str(config_path))
        return cls(hf, name=str(path), chat_format=fmt.name)

    @property
    def chat_format(self) -> str:
        """"minimind2" (MiniMind2's ChatML) or "minimind3" (minimind-3's template with thinking and tools)."""
        return self.format.name

    @property
    def supports_thinking(self) -> bool:
        """Whether the template switches thinking on and off (enable_thinking)."""
        return self.format.supports_thinking

    @property
    def supports_tools(self) -> bool:
        return self.format.supports_tools

    def to_str(self) -> str:
        return self.hf.to_str()

    def __reduce__(self):  # picklable for worker processes
        return _tokenizer_from_str, (self.hf.to_str(), self.name, self.chat_format)

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

    def apply_chat_template(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                            add_generation_prompt: bool = False, enable_thinking: Optional[bool] = None,
                            open_thinking: Optional[bool] = None) -> str:
        """The text of `messages` in this tokenizer's chat format: exactly what transformers renders from the
        folder's chat_template. tools: function schemas (minimind3 only). add_generation_prompt: open the
        assistant turn (MiniMind2's template always does). enable_thinking (the template's own name for it:
        open_thinking; either may be given): the generation prompt opens a <think> block instead of an empty one;
        ignored by formats that cannot switch thinking (supports_thinking)."""
        if enable_thinking is not None and open_thinking is not None and enable_thinking != open_thinking:
            raise ValueError(f"enable_thinking={enable_thinking} contradicts open_thinking={open_thinking}")
        thinking = bool(enable_thinking if enable_thinking is not None else open_thinking)
        return render(self.format, messages, tools, add_generation_prompt, thinking)[0]

    def encode_chat(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None
                    ) -> Tuple[List[int], List[int]]:
        """(ids, loss_mask) of the rendered conversation; mask 1 on each assistant turn from after
        `<|im_start|>assistant\\n` through `<|im_end|>` and its newline."""
        ids, mask = self.encode_chat_batch([messages], None if tools is None else [tools])[0]
        return ids.tolist(), mask.tolist()

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict]],
                          tools: Optional[Sequence[Optional[Sequence[dict]]]] = None
                          ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """encode_chat for many conversations (tools: one list or None per conversation); numpy int64 ids and
        uint8 masks."""
        tools = [None] * len(conversations) if tools is None else tools
        rendered = [render(self.format, c, t) for c, t in zip(conversations, tools)]
        return self.encode_rendered(rendered)

    def encode_rendered(self, rendered: Sequence[Tuple[str, List[Tuple[int, int]]]]
                        ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(ids, mask) of rendered (text, byte spans) pairs: a token is in the mask when it starts inside a span."""
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

    def token_starts(self, ids: np.ndarray) -> np.ndarray:
        """Byte offset in the decoded text where each token starts."""
        lens = self._byte_len[ids]
        return np.cumsum(lens) - lens

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json with this format's chat template (loadable by
        transformers.AutoTokenizer, which then renders what we do)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        added = [(i, a.content, a.special) for i, a in sorted(self.hf.get_added_tokens_decoder().items())]
        config = tokenizer_config(self.format, added)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_from_str(s: str, name: str, chat_format: str = "minimind2") -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(s), name=name, chat_format=chat_format)


def load_tokenizer(path=None) -> Tokenizer:
    """The tokenizer in folder `path` (with tokenizer.json), or the bundled one when path is None."""
    return Tokenizer.from_file(BUNDLED_TOKENIZER if path is None else path)
