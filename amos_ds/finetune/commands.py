"""`amos-ds finetune`: fine-tune a pretrained (or randomly initialised) AMOS encoder on a GLUE-format task:
sentences or sentence pairs, classification or regression. `amos-ds probe`: a linear probe on the frozen features
of every generator and discriminator layer."""

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


def probe_command(args: argparse.Namespace) -> int:
    import torch

    from amos_ds.finetune.pretrained import load_source
    from amos_ds.finetune.probe import all_layer_states, load_probe_task, probe_layers
    from amos_ds.model import AMOSModel, Encoder

    source = load_source(args.pretrained, args.tokenizer, args.model_config, args.preset, with_generator=True)
    task = load_probe_task(args.task, source.tokenizer, min(args.max_len, source.config.max_positions),
                           args.max_train_examples, flag="--task")
    torch.manual_seed(args.seed)  # the random init of --pretrained none
    state = source.state if source.state is not None else AMOSModel(source.config).state_dict()
    print(f"linear probes of {source.description} on {task.name} ({len(task.train)}/{len(task.dev)} train/dev "
          f"examples, mean-pooled frozen states of each layer)\n")
    print("| network | layer | dev accuracy | majority class |")
    print("| --- | --- | --- | --- |")
    for network, prefix in (("generator", "generators.0."), ("discriminator", "discriminator.")):
        weights = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
        if not weights:  # a state-dict file without the generator
            continue
        depth = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("layers."))
        encoder = Encoder(source.config, depth, 0.0, 0.0)
        encoder.load_state_dict(weights)
        accuracies = probe_layers(all_layer_states(encoder.eval(), state["token_embedding"]), task,
                                  torch.device("cpu"))
        for layer, accuracy in enumerate(accuracies, start=1):
            print(f"| {network} | {layer} | {accuracy:.4f} | {task.majority:.4f} |")
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

    probe = subparsers.add_parser("probe", help="linear probes on the frozen features of every layer",
                                  description="A ridge linear classifier on each generator and discriminator layer's "
                                              "mean-pooled frozen states, fitted on train.tsv, scored on dev.tsv.")
    probe.add_argument("pretrained", metavar="RUN_DIR|CHECKPOINT",
                       help="run directory, checkpoint tag folder, state-dict file (with --model-config), or 'none'")
    probe.add_argument("--task", required=True, metavar="DIR", help="GLUE-format classification task folder")
    probe.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the checkpoint's own)")
    probe.add_argument("--model-config", metavar="FILE", help="ModelConfig JSON, for a state-dict file or 'none'")
    probe.add_argument("--preset", default="small", help="model preset for 'none' (default small)")
    probe.add_argument("--max-len", type=int, default=128, help="tokens per example with [CLS] and [SEP]")
    probe.add_argument("--max-train-examples", type=int, help="fit on N examples spread over train.tsv (default: all)")
    probe.add_argument("--seed", type=int, default=1, help="random init of 'none'")
    probe.set_defaults(func=probe_command)
