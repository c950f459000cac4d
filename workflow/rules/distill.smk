# One rule per distillation run in `distill.runs` (warmup, sid, sida, sid2a, ...), all made from
# this single template and named after the run, so `--forcerun sida` or `--until sid` address a
# run directly. A run's inputs come from its `init` and `init_generator` (distill_inputs in
# sida/run/workflow.py): the DAG follows the config, and a new run needs no new rule. With training
# `seeds` the paths carry a `{seed}` wildcard (run_dir): one job per run and seed, and
# `--forcerun results/E/seed1/sida/network.pt` reruns that seed's run and what depends on it only.

for _run in RUNS:

    rule:
        name:
            _run
        input:
            **distill_inputs(_run),
        output:
            network=f"{run_dir(_run)}/network.pt",
            state=f"{run_dir(_run)}/state.pt",
            samples=report(
                f"{run_dir(_run)}/samples.png",
                caption="../report/distill.rst",
                category="Distillation runs",
                labels={
                    "run": _run,
                    **({} if SEEDS is None else {"seed": "{seed}"}),
                    "figure": "samples at the end of training",
                },
            ),
            metrics=f"{run_dir(_run)}/metrics.jsonl",
        log:
            run_log(_run),
        params:
            config=CONFIG_RESOLVED,
            run=_run,
            label=job_label(_run),
            out=output_dir,
            init=distill_init_args,
            launch=launcher("distill"),
            threads=stage_threads_arg("distill"),
            settings=distill_settings(_run),
        threads: rule_threads("distill")
        priority: run_priority(_run)
        resources:
            **rule_resources("distill"),
        container:
            IMAGE
        shell:
            "{params.launch} -m -- stages.distill --config {params.config}{params.threads} --run {params.run} "
            "--teacher {input.teacher} --out {params.out}{params.init} "
            "> {log} 2>&1 || stage_failed {params.label} {log}"
