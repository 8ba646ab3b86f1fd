"""Fine-tune with AdamSPD under the Hugging Face Trainer and DeepSpeed ZeRO-2, SPD statistics in
the logs.

DeepSpeed flattens each param group into one partition per rank; one call,
``spdecay.integrations.deepspeed.attach_to_trainer(trainer)``, tells AdamSPD which layers those
partitions hold, so SPD still decides per original tensor (see the docs' DeepSpeed section). The
model, data and grouping are those of ``examples/hf_trainer.py``: without ``--model`` a tiny
random BERT built from a config (nothing is downloaded), ``--model DIR`` a local pre-trained
folder.

Runs on CPU (gloo) with processes it starts itself, then compares the trained weights with the
same Trainer run on one process without DeepSpeed on the same global batches; or under a launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (``torchrun``, ``deepspeed``)::

    PYTHONPATH=src:examples python examples/hf_trainer_deepspeed.py --nproc 2 --steps 10
    PYTHONPATH=src:examples torchrun --nproc_per_node 2 examples/hf_trainer_deepspeed.py
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # examples/hf_trainer.py

# ZeRO stage 2; "auto" values are filled in by the Trainer from TrainingArguments. No "optimizer"
# section: the Trainer builds AdamSPD (optimizer_cls_and_kwargs) and hands it to DeepSpeed (it
# sets "zero_allow_untested_optimizer" itself).
DS_CONFIG: dict[str, Any] = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


PER_PROCESS = 8


def train(model_path: str | None, steps: int, out_dir: str, lr: float = 1e-3, *, world: int,
          deepspeed: bool = True, data_world: int = 1) -> Any:
    """``world`` processes' worth of data (8 samples each); without DeepSpeed one process with
    the global batch of ``data_world`` processes."""
    from hf_trainer import load_model, random_dataset
    from transformers import Trainer, TrainingArguments

    from spdecay.integrations.deepspeed import attach_to_trainer
    from spdecay.integrations.hf import AdamSPDFactory, add_spd_stats

    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, logging_steps=5, lr_scheduler_type="constant",
        per_device_train_batch_size=PER_PROCESS if deepspeed else PER_PROCESS * data_world,
        max_grad_norm=0.0, report_to=[], save_strategy="no", disable_tqdm=True,
        **({"deepspeed": DS_CONFIG} if deepspeed else {"use_cpu": True}),
    )
    trainer = Trainer(
        model=load_model(model_path), args=args, train_dataset=random_dataset(PER_PROCESS * world),
        optimizer_cls_and_kwargs=(AdamSPDFactory, {"lr": lr, "weight_decay": 1.0}),
    )
    add_spd_stats(trainer)
    if deepspeed:
        attach_to_trainer(trainer)  # the one DeepSpeed-specific line
    trainer.train()
    return trainer


def weights(model: Any) -> dict[str, Any]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, opts: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _run(opts)


def _run(opts: argparse.Namespace) -> None:
    import deepspeed
    import torch

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    with tempfile.TemporaryDirectory() as out:
        trainer = train(opts.model, opts.steps, out, opts.lr, world=world)
    if int(os.environ.get("RANK", "0")) == 0:
        if opts.save:
            torch.save({"weights": weights(trainer.model), "data_world": trainer.args.world_size},
                       opts.save)
        engine = trainer.model_wrapped
        print(f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()}, "
              f"{type(engine.optimizer).__name__} around {type(engine.optimizer.optimizer).__name__}")
        for row in trainer.state.log_history:
            if "spd/mean_ratio" in row:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", help="local folder of a pre-trained model (default: tiny random BERT)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--nproc", type=int, default=2, help="processes to start (without a launcher)")
    parser.add_argument("--save", help=argparse.SUPPRESS)  # rank 0's trained weights (torch.save)
    opts = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # started by torchrun / deepspeed
        _run(opts)
        return
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        opts.save = str(Path(out) / "zero2.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(opts.nproc, port, opts), nprocs=opts.nproc)
        saved = torch.load(opts.save)
        # On a machine without GPUs accelerate (1.15) does not shard the data across DeepSpeed's
        # processes: each rank sees the same batches (args.world_size is 1). The reference
        # reproduces what the Trainer did: global batch = per-process batch x data world.
        data_world = saved["data_world"]
        one = weights(train(opts.model, opts.steps, out, opts.lr, world=opts.nproc,
                            deepspeed=False, data_world=data_world).model)
    zero2 = saved["weights"]
    diff = max((zero2[n] - one[n]).abs().max().item() for n in one)
    print(f"{opts.nproc} processes, ZeRO-2 (data sharded over {data_world}), {len(one)} tensors: "
          f"max |difference| to one process without DeepSpeed: {diff:.2e}")


if __name__ == "__main__":
    main()
