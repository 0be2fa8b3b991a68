"""DistributedDataParallel over fastrnn layers: 2 processes, gloo, loopback only.

Two worker processes (this file run as a script) train Embedding -> fastrnn.LSTM (2 layers,
bidirectional) -> fastrnn.GRU (on a PackedSequence of the LSTM output) -> Linear under DDP in
float64, each on its half of every batch. The parent checks that
  - the gradients of the first step equal a single-process step on the full batch, with fastrnn
    and with the same model converted back to torch.nn layers;
  - after several optimizer steps the parameters of both ranks are bitwise identical, and equal
    single-process training on the full batches.
Rendezvous is a file:// store in tmp_path; gloo is pinned to the loopback interface. The workers
are killed, and the test fails, if they do not finish within the timeout.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from conftest import assert_close

VOCAB, EMB, H1, H2, CLASSES = 30, 8, 12, 10, 5
B, T = 8, 9  # the global batch; each of the 2 ranks takes 4 rows
WORLD = 2
STEPS = 4
TIMEOUT_S = 180


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.lstm = fastrnn.LSTM(EMB, H1, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = fastrnn.GRU(2 * H1, H2, batch_first=True)
        self.head = nn.Linear(H2, CLASSES)

    def forward(self, tokens, lengths):
        y, _ = self.lstm(self.emb(tokens))
        packed = pack_padded_sequence(y, lengths, batch_first=True, enforce_sorted=False)
        z, _ = self.gru(packed)
        z, _ = pad_packed_sequence(z, batch_first=True, total_length=tokens.shape[1])
        return self.head(z)


def make_model():
    torch.manual_seed(0)
    return Net().double()


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    targets = torch.randint(0, CLASSES, (B, T), generator=g)
    return tokens, lengths, targets


def loss_fn(model, tokens, lengths, targets):
    """Mean over sequences of each sequence's mean token loss: the mean of the two ranks' losses
    is the full-batch loss, as DDP's gradient averaging assumes."""
    logits = model(tokens, lengths)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return ((ce * mask).sum(1) / lengths).mean()


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def train(model, steps, shard=None, wrap=None):
    """Returns (gradients after step 0, parameters after `steps` steps) as name -> tensor."""
    net = wrap(model) if wrap else model
    opt = make_optimizer(net.parameters())
    grads0 = None
    for step in range(steps):
        tokens, lengths, targets = batch(step)
        if shard is not None:
            tokens, lengths, targets = tokens[shard], lengths[shard], targets[shard]
        opt.zero_grad()
        loss_fn(net, tokens, lengths, targets).backward()
        if step == 0:
            grads0 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    return grads0, {n: p.detach().clone() for n, p in model.named_parameters()}


def worker(rank, init_file, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        per = B // WORLD
        grads0, params = train(make_model(), STEPS, shard=slice(rank * per, (rank + 1) * per), wrap=DDP)
        torch.save({"grads0": grads0, "params": params, "rank": rank}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONWARNINGS": "ignore"}
    init_file = tmp_path / "rendezvous"
    procs = []
    for rank in range(WORLD):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(rank), str(init_file),
               str(tmp_path / f"rank{rank}.pt")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=os.path.dirname(os.path.abspath(__file__))))
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s (killed)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return _run_workers(tmp_path_factory.mktemp("ddp"))


def _close(a, b, what):
    # float64 throughout (conftest's float64 tolerance, far inside the 1e-5 asked for): DDP's
    # averaged gradients differ from the full-batch ones by rounding only
    assert a.dtype == torch.float64
    assert_close(a, b, msg=what)


def test_first_step_gradients_equal_single_process(ddp_results):
    ref_grads, _ = train(make_model(), 1)
    assert set(ddp_results[0]["grads0"]) == set(ref_grads)
    assert any("lstm" in n for n in ref_grads) and any("gru" in n for n in ref_grads)
    for r, res in enumerate(ddp_results):
        for n, g in ref_grads.items():
            assert g.abs().sum() > 0, f"{n}: zero gradient, the check would be vacuous"
            _close(res["grads0"][n], g, f"rank {r} gradient of {n}")


def test_first_step_gradients_equal_torch_nn(ddp_results):
    """The same, against the model with its fastrnn layers converted back to torch.nn."""
    ref_grads, _ = train(fastrnn.to_torch(copy.deepcopy(make_model())), 1)
    for n, g in ref_grads.items():
        _close(ddp_results[0]["grads0"][n], g, f"gradient of {n} vs torch.nn")


def test_parameters_stay_in_sync(ddp_results):
    _, ref_params = train(make_model(), STEPS)
    start = dict(make_model().named_parameters())
    p0, p1 = ddp_results[0]["params"], ddp_results[1]["params"]
    for n in ref_params:
        assert torch.equal(p0[n], p1[n]), f"{n}: ranks diverged"
        assert not torch.equal(p0[n], start[n].detach()), f"{n}: never updated"
        _close(p0[n], ref_params[n], f"parameter {n} after {STEPS} steps vs single process")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
