"""`gradauth bench scale`: its trials are the tiny ones of issue 14, N of them (the run itself needs Ray: not here)."""
import pytest

from gradauth.bench import _proc_io, _tree, scale_config
from gradauth.errors import GradauthError
from gradauth.trial import grid


def test_scale_config_has_n_tiny_trials():
    cfg = scale_config(1000)
    specs = grid(cfg)
    assert len(specs) == 1000 and len({s.trial_id for s in specs}) == 1000
    assert cfg.model.width == 1.0  # the quickstart's 2.0 at half width
    assert {(s.epochs, s.data_fraction) for s in specs} == {(1, 0.05)}
    assert max(s.lock_value for s in specs) < 0.42  # below the rates that empty a layer of this model
    with pytest.raises(GradauthError, match="multiple of 10"):
        scale_config(105)


def test_io_counters_and_tree_size_see_a_write(tmp_path):
    before = _proc_io()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 123_456)
    assert _proc_io()["wchar"] - before["wchar"] >= 123_456
    assert _tree(tmp_path) == (123_456, 1)
