# Exported generators (export.runs): each listed run's final EMA generator as safetensors + a
# JSON config + a README (and, from a diffusers teacher, a diffusers UNet2DModel folder), loaded
# with `sida.load_generator(folder)`. With training seeds, the first seed's generator.
# A light one-process job like the report: it takes the report's resources.


rule export:
    input:
        network=export_network,
    output:
        directory(f"{EXP}/export/{{run}}"),
    log:
        f"{LOGS}/export-{{run}}.log",
    wildcard_constraints:
        run=one_of(config["export"]["runs"]),
    threads: 1
    resources:
        **rule_resources("report"),
    container:
        IMAGE
    shell:
        "python -m stages.export --network {input.network} --out {output} > {log} 2>&1 "
        "|| stage_failed export {log}"
