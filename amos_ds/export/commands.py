"""`amos-ds export`: a pretrained encoder as a Hugging Face model folder."""

import argparse


def export_command(args: argparse.Namespace) -> int:
    from amos_ds.export.hf import export_encoder

    output = export_encoder(args.source, args.output, args.tokenizer, args.model_config, args.generator)
    print(f"wrote {output}: load it with transformers' AutoModel.from_pretrained({str(output)!r}, "
          "trust_remote_code=True) (or AutoModelForSequenceClassification, AutoModelForTokenClassification, "
          "AutoTokenizer)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the discriminator as a Hugging Face model folder",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="run directory (its newest checkpoint), checkpoint folder of any ZeRO stage, or "
                             "state-dict file (with --model-config and --tokenizer)")
    parser.add_argument("output", metavar="OUT", help="new folder for the export")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the run's own)")
    parser.add_argument("--model-config", metavar="FILE", help="ModelConfig JSON, for a state-dict file")
    parser.add_argument("--generator", action="store_true",
                        help="also write the generator (to its deepest head, with the MLM head) to OUT/generator, "
                             "for AutoModelForMaskedLM")
    parser.set_defaults(func=export_command)
