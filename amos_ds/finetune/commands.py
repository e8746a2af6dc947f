"""`amos-ds finetune`: fine-tune a pretrained (or randomly initialised) AMOS encoder on a GLUE-format task:
sentences or sentence pairs, classification or regression."""

import argparse


def finetune_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from amos_ds.errors import DataError
    from amos_ds.finetune.pretrained import load_source
    from amos_ds.finetune.run import FinetuneConfig, finetune
    from amos_ds.finetune.tasks import load_task

    try:
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                                weight_decay=args.weight_decay, dropout=args.dropout, max_len=args.max_len,
                                seeds=args.seeds, metric=args.metric)
        task = load_task(args.task_dir, args.text_columns, args.label_column, args.regression)
        source = load_source(args.pretrained, args.tokenizer, args.model_config, args.preset)
        kind = "regression" if task.regression else f"labels {task.labels}"
        print(f"fine-tuning {source.description} on {task.name} ({len(task.train)}/{len(task.dev)}/{len(task.test)} "
              f"train/dev/test, {kind}), seeds {config.seeds}", flush=True)
        results = finetune(source, task, config, log=lambda line: print(line, flush=True))
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    except OSError as err:  # a task, checkpoint or output path the message names
        raise DataError(f"{err}; check the path and permissions") from None
    metric, median = results["metric"], results["median"]
    print(f"{task.name}: median over {len(config.seeds)} seed(s): dev {metric} {median['dev'][metric]:.4f}, "
          f"test {metric} {median['test'][metric]:.4f} (trivial baseline: test "
          f"{results['baseline']['test'][metric]:.4f}; all metrics in {output / 'results.json'})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune the discriminator on a GLUE-format task",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, metavar="PATH",
                        help="checkpoint tag folder, run directory, state-dict file (with --model-config), or 'none' "
                             "for random init")
    parser.add_argument("--task-dir", required=True, metavar="DIR", help="folder with train.tsv, dev.tsv, test.tsv "
                        "(a header naming label and sentence, or sentence1 and sentence2)")
    parser.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                        help="the text column, or two for sentence pairs (default: sentence1 sentence2 if the header "
                             "has them, else sentence)")
    parser.add_argument("--label-column", default="label", metavar="COLUMN", help="default: label")
    parser.add_argument("--regression", action="store_true", help="float labels (STS-B): one output, squared error")
    parser.add_argument("--metric", help="dev metric picking each seed's best epoch: accuracy (default), f1, "
                                         "matthews; spearman (default for regression), pearson")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the checkpoint's own)")
    parser.add_argument("--model-config", metavar="FILE", help="ModelConfig JSON, for a state-dict file or 'none'")
    parser.add_argument("--preset", default="small", help="model preset for --pretrained none (default small)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps (paper: 0.06/0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=128, help="tokens per sentence with [CLS] and [SEP]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--output", default="runs/finetune", metavar="DIR", help="where results.json goes")
    parser.set_defaults(func=finetune_command)
