"""The SYMI executor: trains a small MoE GPT with torch.distributed (gloo on CPU, NCCL on GPUs).

  config.py         TrainConfig, a job's options and their checks (free of torch: the CLI reads its defaults)
  launch.py         launch: spawns the local ranks or joins a torchrun job
  supervise.py      the launcher's limits and watch over its ranks (stopped, interrupted, failed): JobFailed
  loop.py           train: the training loop of one rank, read top to bottom
  data.py           the tokens (memory-mapped), each step's batch, the validation batches, the learning-rate schedule
  prepare.py        `symi data prepare`: the BPE tokenizer and token files
  evaluate.py       the validation loss
  model.py          the single-device GPT and its reference MoE layer
  moe.py, comm.py   the expert-parallel MoE layer and its communication (bytes counted by kind)
  dense.py          the dense parameters: bucketed gradient all-reduce during the backward, AdamW (float32
                    masters under bfloat16)
  optim.py          the expert optimizers' base and SYMI's sharded layout; optim_group.py DeepSpeed's group
                    layout (static, fastermoe); optim_replica.py FlexMoE's
  outputs.py        metrics rows, placement records, the run directory; export.py its checkpoint.pt, streamed
  checkpointing.py  the loop's checkpoints (Checkpointer) over checkpoint.py, snapshots.py and writer.py

Everything but config.py, prepare.py and supervise.py imports torch; the simulator (symi_sim) and the CLI never
import it at module level.
"""
