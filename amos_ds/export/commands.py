"""`amos-ds export`: a pretrained encoder as a Hugging Face model folder; `amos-ds convert`: the authors' release
folder as an amos-ds run directory."""

import argparse


def export_command(args: argparse.Namespace) -> int:
    if args.format == "amos-release":
        from amos_ds.errors import ConfigError
        from amos_ds.export.to_release import export_release

        if args.generator:
            raise ConfigError("--generator: the release format holds the discriminator only; use --format hf")
        output = export_release(args.source, args.output, args.tokenizer, args.model_config)
        print(f"wrote {output}: the authors' run_glue.py loads it with --model_type amos --model_name_or_path "
              f"{output}")
        return 0
    from amos_ds.export.hf import export_encoder

    output = export_encoder(args.source, args.output, args.tokenizer, args.model_config, args.generator)
    print(f"wrote {output}: load it with transformers' AutoModel.from_pretrained({str(output)!r}, "
          "trust_remote_code=True) (or AutoModelForSequenceClassification, AutoModelForTokenClassification, "
          "AutoTokenizer)")
    return 0


def convert_command(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from amos_ds.export.convert import convert_release
    from amos_ds.pretrain import release_shared_memory, setup_distributed

    started_group = not dist.is_initialized()
    try:
        if started_group:
            setup_distributed()  # DeepSpeed's engine and the trainer's save need one, of one rank here
        output = convert_release(args.source, args.output, args.seed)
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
            release_shared_memory()
    print(f"wrote {output}: fine-tune it with `amos-ds finetune --pretrained {output}`, continue pretraining with "
          f"`amos_ds/pretrain.py --init-from {output}` on data preprocessed with --tokenizer {output}/tokenizer")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the discriminator as a Hugging Face model folder, or in the "
                                                  "authors' release format",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="run directory (its newest checkpoint), checkpoint folder of any ZeRO stage, or "
                             "state-dict file (with --model-config and --tokenizer)")
    parser.add_argument("output", metavar="OUT", help="new folder for the export")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the run's own)")
    parser.add_argument("--model-config", metavar="FILE", help="ModelConfig JSON, for a state-dict file")
    parser.add_argument("--format", choices=("hf", "amos-release"), default="hf",
                        help="hf: a Hugging Face folder with amos-ds's code (default); amos-release: the authors' "
                             "format (pytorch_model.bin, config.json, sp.model, dict.txt) for their run_glue.py")
    parser.add_argument("--generator", action="store_true",
                        help="also write the generator (to its deepest head, with the MLM head) to OUT/generator, "
                             "for AutoModelForMaskedLM")
    parser.set_defaults(func=export_command)

    parser = subparsers.add_parser("convert", help="the authors' release folder (microsoft/amos) as an amos-ds run "
                                                   "directory",
                                   description="The authors' release folder (pytorch_model.bin, config.json, "
                                               "sp.model, dict.txt) as an amos-ds run directory with one checkpoint.")
    parser.add_argument("source", metavar="DIR", help="the release folder: pytorch_model.bin, config.json, sp.model, "
                                                      "dict.txt")
    parser.add_argument("output", metavar="OUT", help="new run directory")
    parser.add_argument("--seed", type=int, default=1234, help="draws the generator and heads the release lacks")
    parser.set_defaults(func=convert_command)
