# The experiment report: the results table (teacher and students), training curves and sample
# grids. The stage writes report.md, report.html, results.json and its plots into one folder,
# which is the rule's output (its plots depend on what the runs logged).


rule report:
    input:
        evaluations=EVALUATIONS,
        metrics=TRAINING_METRICS,
        grids=EVALUATION_GRIDS,
    output:
        report(
            directory(REPORT_DIR),
            patterns=["{name}.html", "{name}_vs_{axis}.png"],
            caption="../report/results.rst",
            category="Results",
        ),
    log:
        f"{LOGS}/report.log",
    params:
        config=CONFIG_RESOLVED,
        md=lambda wildcards, output: os.path.join(output[0], "report.md"),
    threads: 1
    resources:
        **rule_resources("report"),
    container:
        IMAGE
    shell:
        "python -m stages.report --config {params.config} --out {params.md} "
        "--evaluations {input.evaluations} --metrics-jsonl {input.metrics} "
        "--grids {input.grids} > {log} 2>&1 || stage_failed report {log}"
