"""`amos-ds launch` and `amos-ds plot`: the trainer's command line (training itself is amos_ds/pretrain.py)."""

import argparse


def _launch(args: argparse.Namespace) -> int:
    if args.scheduler == "slurm":
        from amos_ds.train.slurm import run_slurm_launch

        return run_slurm_launch(args)
    from amos_ds.train.launch import run_launch

    return run_launch(args)


def _plot(args: argparse.Namespace) -> int:
    from amos_ds.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from amos_ds.train import launch as hostfile_launch
    from amos_ds.train import slurm

    launch = subparsers.add_parser("launch", help="check a run's plan, then start deepspeed or submit a Slurm job",
                                   description="Validate the hostfile, print the plan (--dry-run stops there), "
                                               "write .deepspeed_env and exec `deepspeed ... amos_ds/pretrain.py`; "
                                               "with --scheduler slurm, write RUN_DIR/slurm/job.sbatch and sbatch "
                                               "it instead.")
    hostfile_launch.add_arguments(launch)
    slurm.add_arguments(launch)
    launch.set_defaults(func=_launch)
    plot = subparsers.add_parser("plot", help="draw a run's losses, mixture weights, accuracy and throughput")
    plot.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    plot.set_defaults(func=_plot)
