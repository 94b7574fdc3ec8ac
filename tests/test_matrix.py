"""``make results``: the methods come from the registry (a method without a tuned preset runs
its defaults, with a note), every part runs both protocols, and the commands hold no absolute
paths of this machine (the runs record them, and they are committed)."""

from __future__ import annotations

from atskv.experiments import matrix
from atskv.methods import METHODS


def test_a_method_without_a_tuned_preset_runs_its_defaults(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf" / "method" / "tuned").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "tuned" / "snapkv.yaml").write_text("window: 16\n")
    monkeypatch.setattr(matrix, "ROOT", tmp_path)
    got = matrix.methods("tuned")
    assert got == ["tuned/snapkv" if m == "snapkv" else m for m in METHODS.names() if m != "full"]
    assert "no tuned preset for" in capsys.readouterr().err
    assert matrix.methods("paper") == METHODS.names()


def test_every_part_runs_both_protocols_with_paths_relative_to_the_repository():
    data = matrix.ROOT.parent / "shared" / "data"
    out = matrix.ROOT / "results" / "2099-01-01"
    cmds = matrix.commands(out, ["tuned"], list(matrix.PARTS), data, [])
    assert cmds
    for _, cmd in cmds:
        args = cmd[1:]
        assert "protocol=question_aware,question_agnostic" in args
        assert not [a for a in args if a.startswith("/") or "=/" in a]  # no absolute path
        assert "hydra.sweep.dir=results/2099-01-01/runs" in args
    synthetic = dict(cmds)["synthetic/tuned"]
    assert "budget=0.05,0.1,0.2,0.5" in synthetic and "context_len=512,2048,4096" in synthetic
