"""`amos-ds finetune`: fine-tune a pretrained (or randomly initialised) AMOS encoder on a GLUE-format task:
sentences or sentence pairs, classification or regression. Learning rates and batch sizes are searched on dev as in
the paper (Table 6): every setting with every seed; the best median dev score picks the setting reported.
`amos-ds probe`: a linear probe on the frozen features of every generator and discriminator layer."""

import argparse
import sys

from amos_ds.finetune.grid import BASE_WIDTH, PAPER_GRID, SMALL_MODEL_GRID, Grid


def grid_flags(grid: Grid) -> str:
    return (f"--lr {' '.join(f'{lr:g}' for lr in grid.lr)} --batch-size {' '.join(map(str, grid.batch_size))} "
            f"--epochs {grid.epochs}")


def settings_table(results: dict) -> str:
    """Each setting's median dev and test scores, the best one marked: the search at a glance."""
    metric, best = results["metric"], results["best"]
    dev, test = f"median dev {metric}", f"median test {metric}"
    lines = [f"{'lr':>8} {'batch':>5}  {dev:>20} {test:>20}  dev {metric} per seed"]
    for setting in results["settings"]:
        chosen = (setting["lr"], setting["batch_size"]) == (best["lr"], best["batch_size"])
        per_seed = " ".join(f"{run['dev'][metric]:.4f}" for run in setting["runs"])
        lines.append(f"{setting['lr']:>8g} {setting['batch_size']:>5}  {setting['median']['dev'][metric]:>20.4f} "
                     f"{setting['median']['test'][metric]:>20.4f}  {per_seed}" + ("  <- best" if chosen else ""))
    return "\n".join(lines)


def finetune_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from amos_ds.atomic import write_atomically
    from amos_ds.errors import DataError
    from amos_ds.finetune.pretrained import load_source
    from amos_ds.finetune.run import FinetuneConfig, finetune, not_learned_warning
    from amos_ds.finetune.tasks import load_task

    try:
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                                weight_decay=args.weight_decay, dropout=args.dropout, max_len=args.max_len,
                                seeds=args.seeds, metric=args.metric)
        task = load_task(args.task_dir, args.text_columns, args.label_column, args.regression)
        source = load_source(args.pretrained, args.tokenizer, args.model_config, args.preset)
        kind = "regression" if task.regression else f"labels {task.labels}"
        grid = config.with_defaults(source.config)
        print(f"fine-tuning {source.description} on {task.name} ({len(task.train)}/{len(task.dev)}/{len(task.test)} "
              f"train/dev/test, {kind}): lr {' '.join(f'{lr:g}' for lr in grid.lr)} x batch "
              f"{' '.join(map(str, grid.batch_size))}, {grid.epochs} epochs, seeds {config.seeds}", flush=True)
        results = finetune(source, task, config, log=lambda line: print(line, flush=True))
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(output / "results.json", json.dumps(results, indent=2) + "\n")
    except OSError as err:  # a task, checkpoint or output path the message names
        raise DataError(f"{err}; check the path and permissions") from None
    metric, median, best = results["metric"], results["median"], results["best"]
    print(settings_table(results))
    print(f"{task.name}: best setting lr {best['lr']:g}, batch {best['batch_size']}; median over "
          f"{len(config.seeds)} seed(s): dev {metric} {median['dev'][metric]:.4f}, test {metric} "
          f"{median['test'][metric]:.4f} (trivial baseline: test {results['baseline']['test'][metric]:.4f}; all "
          f"runs in {output / 'results.json'})")
    warning = not_learned_warning(results)
    if warning:
        print(warning, file=sys.stderr)
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
                                   description=__doc__.replace("\n", " "),
                                   epilog=f"Default grid, by the encoder's hidden size: {BASE_WIDTH} and up (base, "
                                          f"base++), the paper's Table 6: {grid_flags(PAPER_GRID)}; below (tiny, "
                                          f"small), where those rates barely move the weights: "
                                          f"{grid_flags(SMALL_MODEL_GRID)}. results.json holds every run of every "
                                          "setting, each setting's medians, the best setting and its medians.")
    parser.add_argument("--pretrained", required=True, metavar="PATH",
                        help="checkpoint tag folder, run directory, state-dict file (with --model-config), the "
                             "authors' release folder (microsoft/amos: pytorch_model.bin, config.json, sp.model, "
                             "dict.txt), or 'none' for random init")
    parser.add_argument("--task-dir", required=True, metavar="DIR", help="folder with train.tsv, dev.tsv, test.tsv "
                        "(a header naming label and sentence, or sentence1 and sentence2)")
    parser.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                        help="the text column, or two for sentence pairs (default: sentence1 sentence2 if the header "
                             "has them, else sentence)")
    parser.add_argument("--label-column", default="label", metavar="COLUMN", help="default: label")
    parser.add_argument("--regression", action="store_true", help="float labels (STS-B): one output, squared error")
    parser.add_argument("--metric", help="dev metric picking each seed's best epoch and the best setting: accuracy "
                                         "(default), f1, matthews; spearman (default for regression), pearson")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the checkpoint's own)")
    parser.add_argument("--model-config", metavar="FILE", help="ModelConfig JSON, for a state-dict file or 'none'")
    parser.add_argument("--preset", default="small", help="model preset for --pretrained none (default small)")
    parser.add_argument("--epochs", type=int, help="default: the default grid's (below)")
    parser.add_argument("--lr", type=float, nargs="+", metavar="LR",
                        help="peak learning rate(s) searched (default: by the encoder's width, below)")
    parser.add_argument("--batch-size", type=int, nargs="+", metavar="N",
                        help="batch size(s) searched (default: the default grid's)")
    parser.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps (paper: 0.06/0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=128, help="tokens per sentence with [CLS] and [SEP]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="each setting is trained with each (default: five, as the paper)")
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
