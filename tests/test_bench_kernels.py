"""bench.kernels: the layout comparison's table has every kernel and layout (no timing asserted)."""

import json

from bench import kernels


def test_kernel_times_cover_both_layouts_and_kernels():
    t = kernels.kernel_times((2, 8, 4, 8), repeats=1)
    assert set(t) == {"conv_nchw", "conv_cl", "group_norm_nchw", "group_norm_cl"}
    assert all(v >= 0 for v in t.values())


def test_main_prints_one_json_line(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "SHAPES", [(2, 8, 4, 8)])
    kernels.main(["--repeats", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["shape"] for r in last["rows"]] == [[2, 8, 4, 8]] and last["threads"] == 1
