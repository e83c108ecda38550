"""`curriculum.smoke`: its commands and its verdict on what the runs wrote (no process is started)."""
import json
from pathlib import Path

import pytest

import curriculum.smoke as smoke

SWITCHES = [[0, 0, "pretrain"], [2, 1, "finetune"]]


def _fake_runner(monkeypatch, out: Path, eval_images=6, rank_images=(6, 6), rank_switches=(SWITCHES, SWITCHES)):
    """Replace smoke.run: record every command and write the files the real commands would."""
    commands = []

    def run(cmd):
        commands.append(list(cmd))
        if "data_prep.synthetic" in cmd:
            folder = Path(cmd[cmd.index("--out") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "index.json").write_text("{}")
        elif "train" in cmd:
            summary = out / "run" / "summary"
            summary.mkdir(parents=True, exist_ok=True)
            for rank, (images, switches) in enumerate(zip(rank_images, rank_switches)):
                (summary / f"rank{rank}.json").write_text(json.dumps({"switches": switches, "val": {"images": images}}))
        elif "eval" in cmd:
            report = Path(cmd[cmd.index("--out") + 1])
            report.write_text(json.dumps({"metrics": {"images": eval_images}}))

    monkeypatch.setattr(smoke, "run", run)
    return commands


def test_smoke_passes_when_eval_and_both_ranks_agree(tmp_path, monkeypatch, capsys):
    commands = _fake_runner(monkeypatch, tmp_path)
    assert smoke.main(["--out", str(tmp_path)]) == 0
    assert "smoke passed" in capsys.readouterr().out
    assert [c[2] for c in commands] == ["data_prep.synthetic", "data_prep.synthetic", "curriculum.cli", "curriculum.cli"]
    train = commands[2]
    assert train[3] == "train"
    assert "trainer.devices=2" in train and "trainer.strategy=ddp" in train
    assert f"run.out_dir={tmp_path}/run" in train
    assert commands[3][3] == "eval" and f"{tmp_path}/run/checkpoints/last.ckpt" in commands[3]
    # the data already there is not made again
    commands.clear()
    assert smoke.main(["--out", str(tmp_path)]) == 0
    assert [c[3] for c in commands] == ["train", "eval"]


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_images": 5}, "evaluation counted 5 images, expected 6"),
    ({"eval_images": 7}, "evaluation counted 7 images, expected 6"),
    ({"rank_images": (6, 3)}, "smoke: ranks disagree"),
    ({"rank_switches": (SWITCHES, SWITCHES[:1] + [[3, 1, "finetune"]])}, "smoke: ranks disagree"),
    ({"rank_switches": (SWITCHES[:1], SWITCHES[:1])}, "smoke: ranks disagree"),  # the same, but one switch only
])
def test_smoke_fails_when_the_runs_disagree(tmp_path, monkeypatch, capsys, kwargs, message):
    _fake_runner(monkeypatch, tmp_path, **kwargs)
    assert smoke.main(["--out", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err
