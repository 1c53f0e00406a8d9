"""SlimFit under DDP on CPU (gloo): identical frozen sets and parameters on every
rank, and a clear refusal when DDP cannot see frozen layers."""

import lightning.pytorch as pl
import pytest
import torch

from slimfit.callbacks import SlimFit
from slimfit import UnsupportedSetupError

from conftest import lit_module, token_loader, trainer


class RankDump(pl.Callback):
    """Each rank writes its final parameters and frozen-set history to disk."""

    def __init__(self, out_dir, slimfit):
        self.out_dir = str(out_dir)
        self.slimfit = slimfit

    def on_train_end(self, trainer, pl_module):
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "history": [sorted(s) for s in self.slimfit.freezer.history.frozen_sets()]},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def test_two_ranks_stay_identical(tmp_path, fresh_master_port):
    sf = SlimFit(freeze_rate=0.9, seed=0)
    # Different data per rank (DistributedSampler), different dropout masks:
    # only DDP's gradient sync and the broadcast decision keep them equal.
    tr = trainer(tmp_path, max_steps=10, accelerator="cpu", devices=2,
                 strategy="ddp_spawn_find_unused_parameters_true",
                 callbacks=[sf, RankDump(tmp_path, sf)])
    lit = lit_module(lr=1e-2)
    # the exact weights both ranks start from (spawn pickles this module to each)
    init = {k: v.detach().clone() for k, v in lit.state_dict().items()}
    tr.fit(lit, token_loader(n=80, batch_size=4))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["history"]) == 10
    assert r0["history"] == r1["history"]
    assert all(len(h) == 18 for h in r0["history"])  # floor(0.9 * 21): the new head always trains
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    # and training really happened: every tensor moved away from the exact weights the
    # ranks started from (the initial pass trains each of the 21 units within 7 steps)
    assert r0["params"].keys() == init.keys()
    unmoved = [k for k, v in r0["params"].items() if torch.equal(v, init[k])]
    assert unmoved == []


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    # One process is enough to exercise DDPStrategy's checks without spawning.
    tr = trainer(tmp_path, max_steps=1, devices=1, strategy="ddp", callbacks=[SlimFit(0.5)])
    with pytest.raises(UnsupportedSetupError,
                       match="strategy='ddp_find_unused_parameters_true'"):
        tr.fit(lit_module(), token_loader())


def _stream_under_ddp(rank, out_dir, port):
    import torch.distributed as dist
    from slimfit import WeightStreamer
    from models import hf_bert
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        WeightStreamer(hf_bert()).install()
        msg = "installed"
    except UnsupportedSetupError as e:
        msg = str(e)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(msg)


def test_weight_streaming_is_refused_in_a_process_group(tmp_path):
    """The plain-PyTorch streamer refuses a multi-process run itself (not only
    the callback): each rank would stream its own copy while DDP reads weights."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stream_under_ddp, args=(str(tmp_path), port), nprocs=2)
    for r in (0, 1):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text.startswith(f"weight streaming runs in one process; this one is rank {r} of 2")
