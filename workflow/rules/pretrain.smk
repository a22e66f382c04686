# One SimCLR pretraining run per grid cell; resumes from its newest checkpoint.


rule pretrain:
    input:
        cache=cache_unless_done("pretrain.json"),
    output:
        result=RUN + "/pretrain.json",
        weights=RUN + "/backbone.pt",
    params:
        settings=settings_arg,
        run_dir=run_dir,
        cache=cache_path,
    resources:
        launch=launch("pretrain"),
    threads: LOCAL_THREADS
    log:
        RUN + "/pretrain.log",
    shell:
        "{DCL} {resources.launch}pretrain --settings {params.settings} --dataset {wildcards.dataset} "
        "--loss {wildcards.loss} --batch-size {wildcards.batch} --epochs {wildcards.epochs} "
        "--seed {wildcards.seed} --cache {params.cache:q} --run-dir {params.run_dir:q} "
        "--study {config[study]} --tracking-uri {JOB_TRACKING:q} --artifact-root {ARTIFACTS:q} "
        "--threads {threads} > {log:q} 2>&1"
