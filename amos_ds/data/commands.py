"""`amos-ds tokenizer train`, `amos-ds preprocess` and `amos-ds inspect`: the data pipeline's command line."""

import argparse
import os
import sys

from amos_ds.errors import DataError


def tokenizer_train(args: argparse.Namespace) -> int:
    from amos_ds.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.input, args.vocab_size, args.output, lowercase=args.lowercase,
                                max_sentences=args.max_sentences)
    print(f"tokenizer {tokenizer.hash}: {tokenizer.vocab_size} pieces, "
          f"{'uncased' if args.lowercase else 'cased'}, written to {args.output}")
    return 0


def preprocess_command(args: argparse.Namespace) -> int:
    from amos_ds.data.preprocess import preprocess

    manifest = preprocess(args.input, args.tokenizer, args.output, workers=args.workers, shard_mb=args.shard_mb,
                          text_field=args.text_field, progress=not args.quiet)
    print(f"{args.output}: {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens (tokenizer {manifest['tokenizer_hash']})")
    if manifest["replaced_bytes"]:
        print(f"warning: {manifest['replaced_bytes']:,} invalid UTF-8 bytes were replaced by U+FFFD: "
              + ", ".join(f"{path} ({count})" for path, count in manifest["replaced_by_file"].items()),
              file=sys.stderr)
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    import numpy as np

    from amos_ds.data.dataset import MIN_SEQ_LEN, Corpus
    from amos_ds.data.loader import DataConfig, MaskedBatches, open_corpora
    from amos_ds.data.tokenizer import load_tokenizer

    if args.seq_len < MIN_SEQ_LEN:
        raise DataError(f"--seq-len must be at least {MIN_SEQ_LEN}, got {args.seq_len}")
    corpus = Corpus(args.dir)
    print(f"{args.dir}: tokenizer {corpus.tokenizer_hash}, vocabulary {corpus.vocab_size}, "
          f"{corpus.manifest['documents']:,} documents, {corpus.num_tokens:,} tokens, "
          f"{corpus.manifest['text_bytes'] / 1e6:,.1f} MB of text, {len(corpus.manifest['shards'])} shards")
    tokenizer = load_tokenizer(corpus.tokenizer_dir)
    for shard in corpus.shards:
        shard.verify(corpus.vocab_size, tokenizer.special.sep)
        print(f"  {shard.prefix.name}: {shard.num_docs:,} documents, {shard.num_tokens:,} tokens, checksums ok")
    if tokenizer.hash != corpus.tokenizer_hash:
        raise DataError(f"{corpus.tokenizer_dir}: tokenizer {tokenizer.hash} is not the shards' "
                        f"{corpus.tokenizer_hash}; rerun `amos-ds preprocess` into a fresh folder")
    config = DataConfig(seq_len=args.seq_len, seed=args.seed)
    dataset = open_corpora([args.dir], args.seq_len, args.seed)
    index = args.index % len(dataset)
    batch = MaskedBatches(dataset, config)[[index]]
    inputs, labels = batch["input_ids"][0].numpy(), batch["labels"][0].numpy()
    masked = np.nonzero(labels >= 0)[0]
    print(f"{len(dataset):,} samples of at most {args.seq_len} tokens; sample {index} ({len(inputs)} tokens, "
          f"{len(masked)} masked):")
    print("  text:   " + tokenizer.decode(dataset[index]))
    print("  input:  " + " ".join(tokenizer.id_to_piece(t) for t in inputs))
    print("  labels: " + " ".join(f"{p}={tokenizer.id_to_piece(labels[p])}" for p in masked))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_commands.add_parser("train", help="train a BPE tokenizer with amos-ds's special ids")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="text files (plain, .gz, .bz2, .xz, .jsonl, Wikipedia XML), directories or globs")
    train.add_argument("--vocab-size", type=int, required=True, help="e.g. 32768 (base) or 64000 (base++)")
    train.add_argument("--lowercase", action="store_true", help="fold case (an uncased tokenizer)")
    train.add_argument("--max-sentences", type=int, default=5_000_000,
                       help="lines sampled from larger corpora (default: %(default)s)")
    train.add_argument("--output", required=True, metavar="DIR")
    train.set_defaults(func=tokenizer_train)

    prep = subparsers.add_parser("preprocess", help="tokenize raw text into shards for training")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH",
                      help="text files (plain, .gz, .bz2, .xz, .jsonl, Wikipedia XML), directories or globs")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="output of `amos-ds tokenizer train`")
    prep.add_argument("--output", required=True, metavar="DIR", help="shard folder (rerun to resume)")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                      help="tokenizing processes (default: %(default)s)")
    prep.add_argument("--shard-mb", type=float, default=64.0, help="MB of raw text per shard (default: %(default)s)")
    prep.add_argument("--text-field", default="text", help="JSON Lines field holding the text (default: text)")
    prep.add_argument("--quiet", action="store_true", help="no progress line")
    prep.set_defaults(func=preprocess_command)

    insp = subparsers.add_parser("inspect", help="verify a shard folder and show a masked sample")
    insp.add_argument("dir", metavar="DIR")
    insp.add_argument("--seq-len", type=int, default=128)
    insp.add_argument("--index", type=int, default=0, help="which sample to show")
    insp.add_argument("--seed", type=int, default=1234)
    insp.set_defaults(func=inspect_command)
