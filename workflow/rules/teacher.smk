# The teacher network: trained on `data` (teacher.source: train), a published EDM checkpoint
# imported safely (teacher.source: fetch) or a diffusers UNet2DModel folder with its scheduler
# (teacher.source: diffusers, imported by the fetch job); teacher.source train_text trains the
# text testbed's teacher into a pipeline folder. Downstream rules read PLAN.teacher_pt
# (sida/run/workflow.py).


rule teacher:
    output:
        **{k: directory(v) if k == "pipeline" else v for k, v in PLAN.teacher_outputs.items()},
        samples=report(
            f"{EXP}/teacher/samples.png",
            caption="../report/teacher.rst",
            category="Teacher",
        ),
        metrics=f"{EXP}/teacher/metrics.jsonl",
    log:
        f"{LOGS}/teacher.log",
    params:
        config=CONFIG_RESOLVED,
        out=output_dir,
        launch=launcher("teacher"),
        threads=stage_threads_arg("teacher"),
        settings=rule_settings("teacher"),
    threads: rule_threads("teacher")
    resources:
        **rule_resources("teacher"),
    container:
        IMAGE
    shell:
        "{params.launch} -m -- stages.teacher --config {params.config}{params.threads} --out {params.out} "
        "> {log} 2>&1 || stage_failed teacher {log}"


rule fetch:
    output:
        **FETCH_OUTPUTS,
    log:
        f"{LOGS}/fetch.log",
    params:
        config=CONFIG_RESOLVED,
        out=output_dir,
        launch=launcher("fetch"),
        settings=rule_settings("fetch"),
    threads: rule_threads("fetch")
    resources:
        **rule_resources("fetch"),
    container:
        IMAGE
    shell:
        "{params.launch} -m -- stages.fetch --config {params.config} --out {params.out} "
        "> {log} 2>&1 || stage_failed fetch {log}"
