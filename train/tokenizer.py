"""Train a MiniMind-style byte-level BPE tokenizer on JSON Lines data.

    python -m train.tokenizer --data out/demo_data/pretrain.jsonl --vocab_size 6400 --out out/tokenizer
    python -m train.tokenizer --format minimind3 --data sft_t2t_mini.jsonl --out out/tokenizer3

Reads any of the data formats (the "text" of pretrain records, every message's "content" and "reasoning_content"
of sft/reason/dpo records), streaming: lines are read one at a time and only the BPE word counts are kept in memory.
ByteLevel pre-tokenizer (no prefix space) and decoder. --format picks the added tokens and the chat template:
minimind2 (default): <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2 and MiniMind2's ChatML; minimind3: the 36
added tokens of minimind-3 at its ids (0-20 special, <tool_call> 21 ... </think> 26, <|buffer1..9|> 27-35, these
not special) and its template with thinking and tools. Writes tokenizer.json and tokenizer_config.json, loadable by
minimind.tokenizer and transformers.AutoTokenizer. If the data has too few distinct words, BPE stops before
vocab_size; the size reached is printed.

--split_han puts each Chinese (Han) character in its own pre-token before the ByteLevel step, so no token spans
two characters. The bundled tokenizer is trained with it: the demo's Chinese sentences repeat so often that plain
BPE would turn whole sentences into single tokens, hiding the names and colours inside them from the model. Real
corpora don't need it (MiniMind2's tokenizer has multi-character Chinese tokens). The bundled one was made with

    python -m minimind.demo.data --out out/tokenizer_corpus --pretrain 40000
    python -m train.tokenizer --data out/tokenizer_corpus/pretrain.jsonl out/tokenizer_corpus/sft.jsonl \
        out/tokenizer_corpus/reason.jsonl --vocab_size 6400 --split_han --out minimind/assets/tokenizer

(a larger draw of the demo world than the default demo files, whose 8,000 documents hold too few distinct words
for 6,400 tokens).
"""
import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from minimind.chat_template import FORMATS, get_format
from minimind.data import DataError
from minimind.tokenizer import Tokenizer


def iter_texts(paths):
    """Every text in the files, one record at a time: pretrain "text", or each message's "content" and
    "reasoning_content"."""
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                if isinstance(obj.get("text"), str):
                    yield obj["text"]
                    continue
                found = False
                for key in ("conversations", "chosen", "rejected"):
                    for m in obj.get(key) or []:
                        for field in ("content", "reasoning_content"):
                            if isinstance(m, dict) and isinstance(m.get(field), str):
                                found = True
                                yield m[field]
                if not found:
                    raise DataError(f"{path}:{lineno}: no 'text' and no 'conversations'/'chosen'/'rejected' "
                                    f"messages with 'content'")


def train_tokenizer(paths, vocab_size: int = 6400, min_frequency: int = 2, split_han: bool = False,
                    chat_format: str = "minimind2") -> Tokenizer:
    fmt = get_format(chat_format)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_han:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}"), "isolated"),
                                                    hf.pre_tokenizer])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(fmt.added_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(iter_texts(paths), trainer=trainer)
    if fmt.num_special < len(fmt.added_tokens):  # the trainer makes every added token special; some are not
        spec = json.loads(hf.to_str())
        for t in spec["added_tokens"]:
            t["special"] = t["id"] < fmt.num_special
        hf = HFTokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    return Tokenizer(hf, name="trained", chat_format=fmt.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="JSON Lines file(s), any MiniMind data format")
    ap.add_argument("--format", default="minimind2", choices=sorted(FORMATS),
                    help="added tokens and chat template: MiniMind2's, or minimind-3's (thinking and tools)")
    ap.add_argument("--vocab_size", type=int, default=6400,
                    help="tokens in all, the special tokens and the 256 bytes included (default %(default)s, MiniMind's)")
    ap.add_argument("--min_frequency", type=int, default=2, help="a pair must occur this often to be merged")
    ap.add_argument("--split_han", action="store_true", help="one pre-token per Chinese character (see above)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    least = 256 + len(get_format(args.format).added_tokens)
    if not least <= args.vocab_size <= 65536:
        raise SystemExit(f"--vocab_size must be in [{least}, 65536] (256 bytes + the added tokens of --format "
                         f"{args.format}; uint16 cache), got {args.vocab_size}")
    for p in args.data:
        if not Path(p).is_file():
            raise SystemExit(f"--data: no such file: {p}")
    tok = train_tokenizer(args.data, args.vocab_size, args.min_frequency, args.split_han, args.format)
    tok.save(args.out)
    note = "" if tok.vocab_size == args.vocab_size else " (BPE ran out of pairs to merge before --vocab_size)"
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json ({args.format} chat format): "
          f"vocab {tok.vocab_size}{note}")


if __name__ == "__main__":
    main()
