"""Multi-process runs on the CPU (gloo): 2-process DDP via Lightning, and 2 nodes via torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from curriculum.config import RECIPES_DIR

TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(tiny_shards, out, *extra):
    train_dir, val_dir, _, _ = tiny_shards
    return ["train", str(RECIPES_DIR / "smoke.yaml"), f"data.train_shards={train_dir}/*.tar",
            f"data.val_shards={val_dir}/*.tar", f"run.out_dir={out}", "stages.0.steps=3", "stages.1.steps=3",
            "trainer.strategy=ddp", *extra]


def _summaries(out) -> list[dict]:
    files = sorted((Path(out) / "summary").glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def test_two_process_ddp_runs_both_stages(tiny_shards, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "curriculum.cli", *_train_args(tiny_shards, out, "trainer.devices=2")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = _summaries(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # both ranks trained the same number of batches and switched policy at the same step
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == 6
    assert ranks[0]["switches"] == ranks[1]["switches"] == [[0, "pretrain"], [3, "finetune"]]
    # validation: 6 images over 2 ranks, each counted once, the same reduced result on both ranks
    assert ranks[0]["val"]["images"] == ranks[1]["val"]["images"] == 6
    assert ranks[0]["val"]["near/abs_rel"] == ranks[1]["val"]["near/abs_rel"]
    # metrics are reduced by the module itself: no hint per metric to sync them, no deprecated gather
    for noise in ("sync_dist=True", "all_gather is deprecated"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_two_nodes_with_torchrun(tiny_shards, tmp_path):
    out = tmp_path / "nodes"
    port = _free_port()
    args = _train_args(tiny_shards, out, "trainer.num_nodes=2", "trainer.devices=1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "curriculum.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for node in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    ranks = _summaries(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == 6 for r in ranks)
    assert ranks[0]["val"]["images"] == 6


def test_nan_predicted_on_one_rank_stops_both_without_a_checkpoint(tiny_shards, tmp_path):
    """Rank 1's network predicts NaN from its second step: every step is skipped on both ranks
    (the skip is agreed) and both stop after the same streak, agreeing that the weights are not
    good. A rank-local verdict had one rank leave while the other waited in the checkpoint's gather."""
    runner = tmp_path / "nan_on_rank1.py"
    runner.write_text(
        "import os, sys\n"
        "from curriculum.model import DepthModel, DepthPrediction\n"
        "original, calls = DepthModel.forward, {'n': 0}\n"
        "def forward(self, x):\n"
        "    out = original(self, x)\n"
        "    if self.training:\n"
        "        calls['n'] += 1\n"
        "        if os.environ.get('LOCAL_RANK', '0') == '1' and calls['n'] >= 2:\n"
        "            return DepthPrediction(out.depth * float('nan'), out.uncertainty)\n"
        "    return out\n"
        "DepthModel.forward = forward\n"
        "from curriculum.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "nan"
    proc = subprocess.run([sys.executable, str(runner), *_train_args(tiny_shards, out, "trainer.devices=2",
                                                                     "trainer.max_nonfinite_steps=2")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("the weights predict non-finite depth, so no checkpoint was saved" in e
                                    for e in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (out / "checkpoints" / "nonfinite-stop.ckpt").exists()
