"""Shared test setup: offline, deterministic, quiet hubs and loggers."""

import os

# Set before anything imports transformers / wandb: no hub lookups (a failed one
# spends ~45 s in DNS retries) and no W&B network traffic.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """A Lightning DDP test run in this process leaves its rank variables in the
    environment (LOCAL_RANK, WORLD_SIZE ...) and may leave its default process
    group initialized; a later Hugging Face Trainer would then start a 1-rank
    DDP of its own. Both are undone after every test."""
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def assert_same_weights_and_state(m0, o0, m1, o1):
    """Two runs trained the same: every weight and every optimizer state tensor
    bit-identical (offloaded runs against on-device ones)."""
    for (n, a), b in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(a, b), n
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        s0, s1 = o0.state.get(p0, {}), o1.state.get(p1, {})
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(torch.as_tensor(s0[k]), torch.as_tensor(s1[k])), k


def token_loader(n: int = 32, batch_size: int = 4, seq: int = 16, vocab: int = 128, seed: int = 0):
    """Random token classification data (fixed seed) for callback tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


class LitClassifier(pl.LightningModule):
    """A minimal LightningModule around a HF classifier (module level: picklable
    for ddp_spawn)."""

    def __init__(self, model=None, optimizer: str = "adamw", lr: float = 1e-3):
        super().__init__()
        self.model = model if model is not None else models.hf_bert()
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch, _idx):
        x, y = batch
        return self.model(input_ids=x, labels=y).loss

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


def lit_module(model=None, optimizer: str = "adamw", lr: float = 1e-3):
    return LitClassifier(model, optimizer, lr)


def no_dropout_lit(seed: int = 0, layers: int = 2):
    """A tiny BERT without dropout (two runs comparable bit for bit), lr 1e-2."""
    torch.manual_seed(seed)
    return lit_module(models.hf_bert(layers, dropout=0.0), lr=1e-2)


def make_optimizer(name: str, params, lr: float = 1e-3):
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.1)
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.1, min_8bit_size=256)
    raise ValueError(name)


def trainer(tmp_path, **kw):
    base = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kw)
    return pl.Trainer(**base)


@pytest.fixture
def fresh_master_port(monkeypatch):
    """A free port for this test's ddp_spawn: Lightning keeps MASTER_PORT in the
    environment of the pytest process, and a second DDP run in the same process
    would try to listen on the first one's port (EADDRINUSE)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))
    return port
