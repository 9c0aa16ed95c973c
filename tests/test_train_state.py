"""A training checkpoint resumes anywhere (pipelines/train.py: `training_state`, `restore_state`): written on a CPU
without mixed precision, it resumes with a grad scaler enabled; every rank's random states are saved (gathered over
a real two-process gloo group) and each rank takes its own back, so two ranks draw different samples after a
resume; an optimizer state with a group per tensor (runs before the groups were merged) loads into the merged
groups; a fractional GPU per worker with several workers (NCCL) is refused in one line. The GPU test resumes a CPU
checkpoint on CUDA."""
import os

import pytest
import torch
from torch import nn

from fcclip_pipelines.train import (
    SolverConfig,
    TrainConfig,
    _Worker,
    gather_rng_states,
    load_optimizer_state,
    param_groups,
    restore_rng,
    restore_state,
    training_state,
)

CFG = TrainConfig(name="t", model="fcclip-tiny", solver=SolverConfig(lr=1e-3, weight_decay=0.05))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _worker(net, device="cpu", rank=0, scaler_enabled=False) -> _Worker:
    optimizer = torch.optim.AdamW(param_groups(net, CFG.solver), lr=CFG.solver.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=scaler_enabled)
    return _Worker(cfg=CFG, rank=rank, world=2, device=torch.device(device), model=net, vocabulary=None, text=None,
                   criterion=None, optimizer=optimizer, scheduler=scheduler, scaler=scaler, use_amp=scaler_enabled)


def _train(w: _Worker, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 6, device=w.device)
        loss = w.model(x).square().mean()
        w.optimizer.zero_grad()
        w.scaler.scale(loss).backward()
        w.scaler.step(w.optimizer)
        w.scaler.update()
        w.scheduler.step()


def _saved(w: _Worker, tmp_path, iteration=3) -> dict:
    """`training_state` through a file, read as `_restore` reads it."""
    torch.save(training_state(w, iteration, gather_rng_states(w.device), {}), tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)


def test_optimizer_groups_are_merged_by_lr_and_weight_decay():
    net = _net()
    groups = param_groups(net, CFG.solver)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(1e-3, 0.05, 4), (1e-3, 0.0, 2)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in net.parameters()}


def test_cpu_checkpoint_without_scaler_state_resumes_with_a_scaler_enabled(tmp_path):
    trained = _worker(_net())
    _train(trained, 3)
    state = _saved(trained, tmp_path)
    assert state["scaler"] == {}  # mixed precision off: nothing to save
    with pytest.raises(RuntimeError, match="empty"):  # what a resume with an enabled scaler did with it
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(state["scaler"])

    # an enabled scaler (the CPU's stands in for the CUDA one: same class, same state dict)
    resumed = _worker(_net(), scaler_enabled=True)
    assert restore_state(resumed, state) == 3
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 2.0**16  # as it starts
    assert resumed.scheduler.last_epoch == 3
    for p, q in zip(trained.model.parameters(), resumed.model.parameters()):
        a, b = trained.optimizer.state[p], resumed.optimizer.state[q]
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    _train(resumed, 1)  # and it trains on


def test_optimizer_state_with_a_group_per_tensor_loads_into_merged_groups():
    net = _net()
    old = torch.optim.AdamW([{"params": [p], "weight_decay": wd, "lr": 1e-3}
                             for p, wd in zip(net.parameters(), (0.05, 0.05, 0.0, 0.0, 0.05, 0.05))], lr=1e-3)
    net(torch.randn(4, 6)).square().mean().backward()
    old.step()
    w = _worker(net)
    load_optimizer_state(w.optimizer, old.state_dict(), net, CFG.solver)
    assert len(w.optimizer.param_groups) == 2
    for p in net.parameters():
        torch.testing.assert_close(w.optimizer.state[p]["exp_avg"], old.state[p]["exp_avg"], rtol=0, atol=0)
        assert float(w.optimizer.state[p]["step"]) == 1


def _rank(rank: int, world: int, folder: str) -> None:
    """One rank of a two-process gloo group: seeded as a fresh run seeds it, it draws, a checkpoint gathers every
    rank's states, it draws its next points (what it would draw had it gone on); then the states are scrambled and
    restored from the file, and it draws again."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["FCCLIP_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(CFG.seed + rank)
    torch.rand(10)
    states = gather_rng_states(torch.device("cpu"))
    if rank == 0:
        torch.save({"rng": states}, os.path.join(folder, "state.pt"))
    expected = torch.rand(5)
    dist.barrier()
    torch.manual_seed(12345)  # a restarted worker starts from whatever state
    saved = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    restore_rng(saved["rng"], rank, torch.device("cpu"), fallback_seed=999)
    torch.save({"expected": expected, "after_resume": torch.rand(5)}, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_rank_draws_its_own_samples_after_a_resume(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["FCCLIP_TEST_PORT"] = str(sock.getsockname()[1])
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["after_resume"], r["expected"], rtol=0, atol=0)  # its own stream, continued
    assert not torch.equal(ranks[0]["after_resume"], ranks[1]["after_resume"])
    # a rank the checkpoint has no states for (more workers now) is seeded apart from the others
    restore_rng(torch.load(tmp_path / "state.pt", weights_only=True)["rng"], 2, torch.device("cpu"), fallback_seed=7)
    third = torch.rand(5)
    assert not any(torch.equal(third, r["after_resume"]) for r in ranks)


def test_fractional_gpus_per_worker_with_nccl_are_refused_in_one_line(tmp_path, capsys):
    from fcclip_pipelines.cli import main

    args = ["train", "--config", "fcclip-tiny-synthetic", "--data", str(tmp_path / "none"), "--storage",
            str(tmp_path / "runs")]
    assert main([*args, "--num-workers", "2", "--gpus-per-worker", "0.5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--gpus-per-worker 0.5 with 2 workers" in err and "Duplicate GPU detected" in err
    assert not (tmp_path / "runs").exists()  # refused before anything started


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoint_resumes_on_a_gpu_and_back(tmp_path):
    trained = _worker(_net())
    _train(trained, 2)
    state = _saved(trained, tmp_path)
    gpu = _worker(_net().cuda(), device="cuda", rank=1, scaler_enabled=True)
    assert restore_state(gpu, state) == 3
    p = next(gpu.model.parameters())
    assert gpu.optimizer.state[p]["exp_avg"].device.type == "cuda"
    # ranks 0 and 1 had no CUDA state in a CPU checkpoint: each is seeded apart
    draws = []
    for rank in (0, 1):
        gpu.rank = rank
        restore_state(gpu, state)
        draws.append(torch.rand(5, device="cuda").cpu())
    assert not torch.equal(draws[0], draws[1])
    _train(gpu, 2)
    back = _worker(_net(), scaler_enabled=False)
    assert restore_state(back, _saved(gpu, tmp_path, iteration=5)) == 5
    assert next(iter(back.optimizer.state.values()))["exp_avg"].device.type == "cpu"
