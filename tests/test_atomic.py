"""The one atomic writer: a failed write leaves neither the target nor a temporary."""
import pytest

from eglp_dist.atomic import atomic_path, torch_save_atomic, write_text_atomic


def test_success_replaces_and_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "sub" / "x.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_failure_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError, match="pickle"):
        torch_save_atomic(lambda: None, tmp_path / "w.pt")  # a local lambda does not pickle
    assert list(tmp_path.iterdir()) == []
