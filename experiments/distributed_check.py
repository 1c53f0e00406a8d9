"""SlimFit under DDP and FSDP2 (Lightning's ``ModelParallelStrategy``), checked
from outside on CPU ranks (gloo): the same runs under both engines, per-rank
memory and collective bytes, and a killed rank restarted from its checkpoint.

Why a launched script and not an in-process test: FSDP2 and DDP need one
process per rank, and ``torchrun`` is how users launch (and restart) them.
Every subcommand runs the same Lightning script on every rank; rank 0 writes
``<out>/<subcommand>.json`` and prints a table::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m slimfit.experiments.distributed_check compare --out runs/dist
    ... distributed_check measure --out runs/dist          # ledger + bytes, full / r=0.5 / 0.9
    python -m slimfit.experiments.distributed_check faults --out runs/dist   # launches torchrun itself

``compare``: DDP and FSDP2 from the same weights on the same data (r=0.9, with
and without compression, and full fine-tuning under FSDP2): final weights,
frozen sets per step and reduce-scatter bytes. ``measure``: per rank, the
ledger of one step (weights, gradients, optimizer state, saved activations)
and the bytes handed to gradient collectives per step, for full fine-tuning
and r = 0.5 / 0.9 under both engines. ``faults``: an uninterrupted FSDP2 and
DDP run against one whose rank 1 is SIGKILLed mid-run and restarted by
a new ``torchrun`` from its last checkpoint, and the 2-rank
checkpoint resumed on one rank (the freezing schedule continues).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from slimfit import CompressionConfig, SessionConfig, SlimFitConfig
from slimfit.callbacks import MemoryMonitor, SlimFit
from slimfit.experiments.zoo import hf_bert
from slimfit.memory import CollectiveBytes
from slimfit.storage import local

SEQ, VOCAB = 16, 128


class Classifier(pl.LightningModule):
    """A BERT classifier; under ``ModelParallelStrategy`` every encoder layer and
    then the whole model are sharded with ``fully_shard`` in ``configure_model``."""

    def __init__(self, layers: int, hidden: int, dropout: float, lr: float = 1e-2):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank and under every engine
        self.model = hf_bert(layers, hidden=hidden, heads=2, vocab=VOCAB, dropout=dropout)
        self.lr = lr

    def configure_model(self):
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, _idx):
        x, y = batch
        return self.model(input_ids=x, labels=y).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def loader(n: int, batch: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g),
                                        torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


class Probe(pl.Callback):
    """Per optimizer step: the bytes handed to gradient collectives and whether a
    frozen tensor (this rank's shard) moved; at the end every rank gathers the
    full weights (a collective under FSDP2)."""

    def __init__(self, counter: CollectiveBytes):
        self.counter, self.per_step, self._ctx = counter, [], None
        self.moved_frozen: list[str] = []  # (step, name) of frozen tensors that changed
        self._frozen: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        if isinstance(trainer.strategy, DDPStrategy):  # Lightning registers comm hooks on CUDA only
            trainer.strategy.model.register_comm_hook(None, self.counter.ddp_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.reset()
        self._ctx = self.counter.counting()
        self._ctx.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._frozen = {n: local(p).detach().clone() for n, p in pl_module.named_parameters()
                        if not p.requires_grad}
        # the whole (unsharded) bytes of what has a gradient this step
        self.counter.bytes["trained"] = sum(p.numel() * p.element_size()
                                            for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._ctx.__exit__(None, None, None)
        self.per_step.append(dict(self.counter.bytes))
        params = dict(pl_module.named_parameters())
        self.moved_frozen += [f"{trainer.global_step - 1}:{n}" for n, old in self._frozen.items()
                              if not torch.equal(local(params[n]).detach(), old)]

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                        for k, v in pl_module.model.state_dict().items()}


class KillAt(pl.Callback):
    """Rank ``rank`` SIGKILLs itself when optimizer step ``step`` starts (after
    the checkpoint of the epoch before)."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(engine: str, *, rate: float | None, compress: bool = False, steps: int = 12,
        layers: int = 2, hidden: int = 32, dropout: float = 0.1, batch: int = 4,
        policy: str = "slimfit", host_state: bool = False, measure_at: int | None = None, ckpt: pathlib.Path | None = None,
        resume: pathlib.Path | None = None, kill_at: int | None = None,
        devices: int | None = None) -> dict:
    """One Lightning run; returns what rank 0 saw (weights, histories, bytes, ledger)."""
    counter = CollectiveBytes()
    devices = devices or int(os.environ.get("WORLD_SIZE", "1"))
    strategy = (ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
                if engine == "fsdp2" else
                DDPStrategy(find_unused_parameters=True, ddp_comm_hook=counter.ddp_hook))
    probe = Probe(counter)
    callbacks: list[Any] = [probe]
    sf = None
    if rate is not None:
        sf = SlimFit(config=SlimFitConfig(freeze_rate=rate, seed=0, policy=policy),
                     compression=CompressionConfig() if compress else None,
                     offload_optimizer_state=host_state)
        callbacks.append(sf)
    if measure_at is not None:
        callbacks.append(MemoryMonitor(every_n_steps=measure_at))
    if ckpt is not None:
        # saved after the last batch of each 4-step epoch: a checkpoint written in
        # on_train_epoch_end is resumed by Lightning as an unfinished epoch, and a
        # dataloader without state then replays it wrongly (off by 0.08 here)
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt, filename="{step}",
                                                      save_top_k=-1, every_n_train_steps=4))
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                         callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=ckpt is not None,
                         num_sanity_val_steps=0, default_root_dir=str(ckpt or "/tmp"))
    lit = Classifier(layers, hidden, dropout)
    trainer.fit(lit, loader(n=8 * batch, batch=batch), ckpt_path=resume)
    out = {"engine": engine, "rate": rate, "compress": compress, "steps": trainer.global_step,
           "weights": probe.weights, "bytes": probe.per_step, "resumed_from": resume}
    if sf is not None:
        f = sf.freezer
        out["history"] = [sorted(s) for s in f.history.frozen_sets()]
        out["units"] = len(f.units)
        out["num_frozen"] = f.num_frozen
        out["scheduler"] = f.scheduler.state_dict()
        # bytes of what trains every step besides the units (biases, new heads)
        cand = {id(p) for u in f.units for p in u.params}
        out["always_trained_bytes"] = sum(p.numel() * p.element_size()
                                          for p in lit.parameters() if id(p) not in cand)
    out["moved_frozen"] = probe.moved_frozen
    mon = next((c for c in callbacks if isinstance(c, MemoryMonitor)), None)
    if mon is not None and mon.history:
        r = mon.history[-1][1]
        out["ledger"] = {"parameters": r.parameters, "gradients": r.gradients,
                         "optimizer_state": r.optimizer_state, "activations": r.activations,
                         "optimizer_state_on_host": r.offloaded_optimizer_state}
    return out


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def compare(out: pathlib.Path, layers: int = 4, hidden: int = 64) -> dict:
    """At 4 layers of width 64 the units hold most weights, as in real models (at
    2 x 32 the embedding alone is a fifth of the bytes and always trains)."""
    size = dict(layers=layers, hidden=hidden)
    runs = {f"{e}{'+compress' if c else ''}": fit(e, rate=0.9, compress=c, **size)
            for c in (False, True) for e in ("ddp", "fsdp2")}
    full, ddp_full = fit("fsdp2", rate=None, **size), fit("ddp", rate=None, **size)
    res = {}
    for c in ("", "+compress"):
        d, f = runs["ddp" + c], runs["fsdp2" + c]
        res["r0.9" + c] = {
            "max_abs_diff": _max_diff(d["weights"], f["weights"]),
            "same_history": d["history"] == f["history"], "steps": f["steps"],
            "frozen_per_step": sorted({len(h) for h in f["history"]}),
            "expected_frozen": int(0.9 * f["units"]),
            "moved_frozen": d["moved_frozen"][:3] + f["moved_frozen"][:3],
            "always_trained_bytes": f["always_trained_bytes"],
            "reduce_scatter_bytes": [b["reduce_scatter"] for b in f["bytes"]],
            "ddp_all_reduce_bytes": [b["all_reduce"] for b in d["bytes"]]}
    res["full"] = {"reduce_scatter_bytes": [b["reduce_scatter"] for b in full["bytes"]],
                   "ddp_all_reduce_bytes": [b["all_reduce"] for b in ddp_full["bytes"]]}
    return res


def measure(out: pathlib.Path, layers: int = 4, hidden: int = 64, steps: int = 40) -> dict:
    """Per-rank ledger at the last step (after the initial pass: every unit has
    optimizer state) and collective bytes per step, averaged over the steps."""
    res = {}
    arms = [(e, r, False) for e in ("ddp", "fsdp2") for r in (None, 0.5, 0.9)]
    for engine, rate, host in arms + [("fsdp2", 0.9, True)]:
        r = fit(engine, rate=rate, compress=rate is not None, steps=steps, layers=layers,
                hidden=hidden, measure_at=steps - 1, host_state=host)
        late = r["bytes"][len(r["bytes"]) // 2:]  # past the initial pass
        name = f"{engine} {'full' if rate is None else f'r={rate}'}{' host state' if host else ''}"
        res[name] = {**r["ledger"],
                     **{f"{k}_per_step": sum(b[k] for b in late) / len(late) for k in late[0]}}
    return res


def faults(out: pathlib.Path) -> dict:
    """Uninterrupted vs killed-and-relaunched, DDP and FSDP2; then the FSDP2 2-rank
    checkpoint resumed on 1 rank.

    The killed job is relaunched as a new ``torchrun`` from its last checkpoint,
    as a scheduler requeues it (SLURM ``--requeue``). ``torchrun --max-restarts``
    is not used: with Lightning's env:// process group, the restarted ranks read
    the dead attempt's gloo addresses from the agent's store and fail to connect
    (seen here with torch 2.14 / Lightning 2.6)."""
    res = {}
    for engine in ("ddp", "fsdp2"):
        _torchrun(2, ["train", "--engine", engine, "--out", str(out / f"{engine}-plain")])
        killed = out / f"{engine}-killed"
        rc = _torchrun(2, ["train", "--engine", engine, "--out", str(killed), "--kill-at", "6"],
                       check=False)
        if rc == 0:
            raise RuntimeError(f"the {engine} run meant to lose rank 1 at step 6 finished")
        _torchrun(2, ["train", "--engine", engine, "--out", str(killed), "--resume-latest"])
        a, b = (torch.load(out / f"{engine}-{n}" / "result.pt", weights_only=False)
                for n in ("plain", "killed"))
        res[engine] = {"max_abs_diff": _max_diff(a["weights"], b["weights"]),
                       "same_history": a["history"] == b["history"], "killed_rc": rc,
                       "resumed_from": b["resumed_from"], "steps": b["steps"]}
    # the 2-rank run's checkpoint after its first epoch (4 steps), resumed on one rank
    d = out / "fsdp2-plain"
    _torchrun(1, ["train", "--engine", "fsdp2", "--out", str(out / "fsdp2-1rank"),
                  "--resume", str(d / "ckpt" / "step=4.ckpt")])
    a = torch.load(d / "result.pt", weights_only=False)
    b = torch.load(out / "fsdp2-1rank" / "result.pt", weights_only=False)
    res["resize"] = {"resumed_from": b["resumed_from"], "steps": b["steps"],
                     "same_history_before": a["history"][:4] == b["history"][:4],
                     "same_decision_at_resume": a["history"][4] == b["history"][4]}
    return res


def _torchrun(n: int, args: list[str], check: bool = True) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "slimfit.experiments.distributed_check", *args]
    return subprocess.run(cmd, check=check, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def train(args) -> None:
    """One run for ``faults``: 3 epochs of 4 steps on 2 ranks (8 samples per rank,
    batch 4), no dropout, a checkpoint per epoch; ``--resume`` names a checkpoint,
    ``--resume-latest`` takes the last complete one under ``<out>/ckpt``."""
    out = pathlib.Path(args.out)
    ckpt = out / "ckpt"
    resume = args.resume
    if args.resume_latest:
        done = sorted(ckpt.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        if not done:
            raise FileNotFoundError(f"--resume-latest: no checkpoint under {ckpt}")
        resume = str(done[-1])
    r = fit(args.engine, rate=None if args.rate < 0 else args.rate, steps=12, dropout=0.0, ckpt=ckpt, resume=resume,
            kill_at=args.kill_at)
    if rank() == 0:
        torch.save(r, out / "result.pt")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["compare", "measure", "faults", "train"])
    ap.add_argument("--out", default="runs/distributed")
    ap.add_argument("--engine", choices=["ddp", "fsdp2"], default="fsdp2")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--rate", type=float, default=0.9, help="freeze rate (train; < 0: no SlimFit)")
    ap.add_argument("--resume", default=None, help="a checkpoint to resume from (train)")
    ap.add_argument("--resume-latest", action="store_true", help="resume from <out>/ckpt's last (train)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "train":
        return train(args)
    res = {"compare": compare, "measure": measure, "faults": faults}[args.command](out)
    if rank() == 0:
        (out / f"{args.command}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
