# Evaluation of the teacher (name `teacher`) and of every run with `evaluate: true`: one per entry
# of the run's `eval_steps` (`<run>` in one step, `<run>-<k>steps` in k; Plan.eval_entries in
# sida/run/workflow.py), as `seed<K>/<entry>` per training seed when the config lists `seeds`.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=f"{EXP}/evaluate/{{name}}/metrics.json",
        samples=report(
            f"{EXP}/evaluate/{{name}}/samples.png",
            caption="../report/samples.rst",
            category="Samples",
            labels={"model": "{name}"},
        ),
    log:
        f"{LOGS}/evaluate/{{name}}.log",
    params:
        config=CONFIG_RESOLVED,
        kind=evaluate_kind,
        name=evaluate_name_args,
        launch=launcher("evaluate"),
        threads=stage_threads_arg("evaluate"),
        settings=rule_settings("evaluate"),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    container:
        IMAGE
    shell:
        "{params.launch} -m -- stages.evaluate --config {params.config}{params.threads} --network {input.network} "
        "--kind {params.kind} {params.name} --out {output.metrics} "
        "> {log} 2>&1 || stage_failed evaluate:{wildcards.name} {log}"
