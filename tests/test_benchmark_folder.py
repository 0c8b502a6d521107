"""`sega-jax bench --folder`: ours alone on a saved folder, with no torch (CI's Python 3.12 leg runs it)."""

from __future__ import annotations

from sega_jax.bench import sega as benchmark
from sega_jax.builtin.tiny import save_tiny


def test_benchmark_times_ours_alone_on_a_saved_folder(tmp_path, capsys):
    save_tiny(tmp_path / "tiny")
    assert benchmark.main(["--folder", str(tmp_path / "tiny"), "--steps", "2", "--concepts", "1",
                           "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "model=tiny size=64 steps=2 concepts=1" in out
    assert "sega-jax :" in out and "ms/step" in out
    assert "diffusers:" not in out  # nothing of the torch side ran
