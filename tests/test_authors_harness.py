"""bench.authors_sida without the authors' checkout: its bad-input errors are one line each (the
comparison itself needs their code, which is never in this repository: docs/authors-code.md)."""

from __future__ import annotations

import subprocess

import pytest

from bench.authors_sida import check_checkout, main


def test_missing_or_wrong_checkout_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path / "nowhere")
    assert str(exc.value).startswith("error: --authors-repo") and "does not exist" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path)  # a folder, but not their repository
    assert "sida_training/sida_training_loop.py" in str(exc.value) and "\n" not in str(exc.value)
    # their layout on another branch
    (tmp_path / "sida_training").mkdir()
    (tmp_path / "sida_training" / "sida_training_loop.py").write_text("")
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path)
    assert "not the authors' `sida` branch" in str(exc.value)


def test_missing_teacher_is_one_line(tmp_path):
    repo = tmp_path / "SiD"
    (repo / "sida_training").mkdir(parents=True)
    (repo / "sida_training" / "sida_training_loop.py").write_text("")
    subprocess.run(["git", "init", "-q", "-b", "sida", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    with pytest.raises(SystemExit) as exc:
        main(["--authors-repo", str(repo), "--teacher", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")])
    assert "--teacher" in str(exc.value) and "does not exist" in str(exc.value)
