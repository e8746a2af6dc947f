"""The trainer's parts, one concept per module; amos_ds/pretrain.py puts them together.

train_config  the run's settings (TrainConfig) and pretrain.py's flags
ds_config     the DeepSpeed config file, and what a launch derives from it (batch split, schedule end, precision)
checkpoint    complete-or-absent checkpoints, keep-last-K, resume at any world size (universal checkpoints),
              verified_checkpoint (what every reader calls), the settings a resume must keep
run_lock      one job per run directory: RUN_DIR/run.lock, renewed while the job runs, taken over when stale
extension_lock  stale locks of killed JIT builds of DeepSpeed ops, removed at start
signals       SIGTERM/SIGUSR1: save, then exit 0
metrics       metrics.jsonl, TensorBoard through DeepSpeed's monitor, the console line
flops         the FLOP count of one AMOS step, and MFU
hostfile      DeepSpeed hostfile checks
launch        `amos-ds launch`: the plan, .deepspeed_env, then `deepspeed`
plot          `amos-ds plot`: the paper's Figure 3 and the losses and throughput of a run
commands      registers `launch` and `plot` with the `amos-ds` command
"""
