"""bench.goals: issue 33's verdict from a bench.compare run's rows."""

from bench.goals import verdict, verdict_lines


def row(procs, speedup, memory=None):
    r = {"procs": procs, "speedup_vs_authors": speedup}
    if memory is not None:
        r["peak_memory_vs_authors"] = memory
    return r


def test_the_fastest_fp32_variant_of_each_layout_is_judged():
    rows = {"authors": row(1, 1.0, 1.0), "ours-fp32": row(1, 1.05, 0.71), "ours-fp32-cl": row(1, 1.12, 0.67),
            "ours-bf16": row(1, 1.9, 0.4),  # not the authors' precision: never the one judged
            "ours-fp32-p2": row(2, 1.27, 0.36), "ours-fp32-cl-p2": row(2, 1.29, 0.39)}
    one, two = verdict(rows)
    assert (one["variant"], one["speedup"], one["memory"], one["met"]) == ("ours-fp32-cl", 1.12, 0.67, True)
    assert (two["variant"], two["speedup"], two["met"]) == ("ours-fp32-cl-p2", 1.29, False)
    lines = verdict_lines([one, two])
    assert lines[0].endswith(": met") and lines[1].endswith(": NOT met")
    assert "ours-fp32-cl-p2 1.29x, memory 0.39x" in lines[1]


def test_memory_above_the_goal_fails_a_fast_variant_and_a_missing_layout_is_said():
    rows = {"authors": row(1, 1.0, 1.0), "ours-fp32-compile": row(1, 1.3, 0.85), "ours-bf16-p2": row(2, 2.0, 0.3)}
    one, two = verdict(rows)
    assert one["variant"] == "ours-fp32-compile" and one["met"] is False
    assert two["variant"] is None and two["met"] is None
    assert "no fp32 variant with 2 process(es)" in verdict_lines([one, two])[1]


def test_without_a_memory_pass_the_speed_alone_is_judged():
    one, _ = verdict({"authors": row(1, 1.0), "ours-fp32": row(1, 1.01)})
    assert one["met"] is True and one["memory"] is None
    assert "no memory pass" in verdict_lines([one])[0]


def test_a_slower_variant_within_the_memory_goal_is_the_one_that_meets_it():
    rows = {"authors": row(1, 1.0, 1.0), "ours-fp32": row(1, 1.3, 0.9), "ours-fp32-cl": row(1, 1.1, 0.7)}
    one, _ = verdict(rows)
    assert (one["variant"], one["met"]) == ("ours-fp32-cl", True)
