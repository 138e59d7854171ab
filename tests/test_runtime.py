"""Launch detection (torchrun, SLURM's srun, neither) and a SLURM-launched 2-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdpipe import runtime, trainstate
from kdpipe.train import read_metrics

from cache_factory import make_fake_cache


@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"),
    ("gpu[07-09,12],cpu1", "gpu07"),  # zero padding kept
    ("gpu[12,07-09]", "gpu12"),  # the first listed, not the smallest
    ("a[3-4]-ib,b2", "a3-ib"),  # a suffix after the range
    ("rack[2-3]n[01-04]", "rack2n01"),  # two ranges
    (" n01 ", "n01"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert runtime.first_host(nodelist) == host


def test_first_host_of_an_empty_list_asks_for_master_addr():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        runtime.first_host(",")


SRUN_STEP = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_ID": "4242"}


def test_an_srun_step_is_rank_procid_of_its_tasks_with_the_first_node_as_master():
    launch = runtime.detect_launch(SRUN_STEP)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 4, 1, "slurm")
    assert launch.init_method == f"tcp://gpu07:{runtime.DEFAULT_PORT + 1 + 4242}"  # a port per job id
    given = runtime.detect_launch({**SRUN_STEP, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert given.init_method == "tcp://10.0.0.5:1234"


def test_a_batch_script_is_one_process_although_it_sees_slurm_ntasks():
    # sbatch's batch step exports SLURM_NTASKS and SLURM_PROCID=0 but no SLURM_STEP_* variables
    batch = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_ID": "4242"}
    assert runtime.detect_launch(batch) == runtime.Launch()
    assert runtime.init_distributed("cpu", env=batch) == runtime.DistInfo()


def test_torchrun_variables_win_over_slurms():
    launch = runtime.detect_launch({**SRUN_STEP, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.launcher, launch.init_method) == (1, 2, "torchrun", "env://")
    assert runtime.detect_launch({"WORLD_SIZE": "1", "RANK": "0"}).launcher == "none"


def test_a_non_positive_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout"):
        runtime.init_distributed("cpu", timeout_min=0, env=SRUN_STEP)


# --------------------------------------------------------------------------- a SLURM-launched run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cache: Path, out: Path, batch: int) -> list[str]:
    # test_vit: LayerNorm only, so per-rank batches normalise like one global batch (BatchNorm would not)
    return [sys.executable, "-m", "kdpipe.cli", "train", "--student", "timm:test_vit", "--cache", str(cache),
            "--out", str(out), "--epochs", "3", "--batch-size", str(batch), "--workers", "0", "--warmup-steps", "1",
            "--lr", "3e-3", "--log-every", "1", "--no-progress", "--device", "cpu", "--losses", "fd=7.8,crd=1,icl=1"]


@pytest.mark.slow
def test_a_two_task_srun_step_trains_like_one_process_on_the_global_batch(tmp_path):
    """Two processes started as srun starts them (SLURM variables, no torchrun) reach the weights of one
    process with their global batch. One step per epoch covers the whole 8-image train split, so
    both runs see the same samples at every step (in another order within the batch, which no loss
    depends on)."""
    cache = make_fake_cache(tmp_path / "cache", n_train=8, n_val=8, dim=16, views=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                     "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    single = subprocess.run(_train(cache, tmp_path / "one", 8), capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    step = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen(_train(cache, tmp_path / "two", 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, **step, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "batch 4 x 2" in outs[0][1] and outs[1][1].count("trained") == 0  # one run of 2 ranks; rank 0 reports
    assert trainstate.read_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")["world_size"] == 2
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["kind"] == "train"]
              for d in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0][-1] < losses[0][0]  # it learned
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    one, two = (load_file(tmp_path / d / "student-last.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        a, b = one[k], two[k]
        if k.endswith("attn.qkv.bias"):  # the key bias: softmax ignores it, so its gradient is float noise
            d = a.shape[0] // 3  # that AdamW scales up to ±lr steps; compare the query and value biases
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


def _wait_worker(rank: int, port: int, out_dir: str) -> None:
    import time

    env = {**SRUN_STEP, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    info = runtime.init_distributed("cpu", timeout_min=0.05, env=env)  # collectives give up after 3 s
    result = {}
    try:
        if rank == 1:
            time.sleep(6)  # still working, twice the timeout
        runtime.wait_for_all(info)
        result["idle_wait"] = "ok"
        if rank == 1:
            time.sleep(6)
        try:
            runtime.barrier(info)
            result["barrier"] = "ok"
        except Exception as err:  # noqa: BLE001 - the timeout's type differs between torch versions
            result["barrier"] = type(err).__name__
    finally:
        Path(out_dir, f"rank{rank}.txt").write_text(repr(result))
        os._exit(0)  # the timed-out group cannot be torn down cleanly


@pytest.mark.slow
def test_a_rank_idle_while_another_works_does_not_time_out(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_wait_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert all(r["idle_wait"] == "ok" for r in results)  # wait_for_all outlasted the 3 s timeout
    assert results[0]["barrier"] != "ok"  # while a plain barrier, with the same wait, timed out


def test_train_and_extract_default_to_runtimes_timeout():
    from kdpipe.extract import ExtractConfig
    from kdpipe.trainconfig import TrainConfig

    assert TrainConfig().dist_timeout == ExtractConfig(teacher="t", data="d", out="o").dist_timeout == runtime.DEFAULT_DIST_TIMEOUT_MIN
