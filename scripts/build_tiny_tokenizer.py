"""Build the byte-level BPE tokenizer shipped for the tiny random-init models.

The tiny models (tiny-roberta, tiny-gpt2, tiny-bart) must run with no download, so their
tokenizer is committed as deltalora_repro/assets/tiny-bpe/tokenizer.json. It was trained with this
script on the English text of the offline data sets (GLUE SST-2/RTE/CoLA, E2E references, the XSum
sample). Only the merge table is kept: no data is stored. Re-run to rebuild:

    python scripts/build_tiny_tokenizer.py --data ../shared/data
"""
import argparse
import csv
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<|endoftext|>"]


def corpus(data: Path):
    for name in ["SST-2/train.tsv", "RTE/train.tsv", "CoLA/train.tsv"]:
        with open(data / "glue" / name, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    with open(data / "e2e" / "trainset.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield row["mr"]
            yield row["ref"]
    with open(data / "xsum" / "test_sample.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["document"]
            yield row["summary"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("deltalora_repro/assets/tiny-bpe/tokenizer.json"))
    args = ap.parse_args()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(args.data), trainer=trainer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
