# Frozen-backbone evaluation: features once, then the linear probe and weighted kNN.


rule extract_features:
    input:
        cache=cache_unless_done("linear.json", "knn.json"),
        weights=RUN + "/backbone.pt",
    output:
        temp(RUN + "/features.npz"),
    params:
        settings=settings_arg,
        run_dir=run_dir,
        cache=cache_path,
    resources:
        launch=launch("evaluate"),
    threads: LOCAL_THREADS
    log:
        RUN + "/features.log",
    shell:
        "{DCL} {resources.launch}extract-features --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --cache {params.cache:q} --threads {threads} > {log:q} 2>&1"


rule linear_eval:
    input:
        # ancient(): the file times of a fresh clone must not rerun a finished
        # evaluation. A retrained run still reruns it through its new features.
        features=RUN + "/features.npz",
        pretrain=ancient(RUN + "/pretrain.json"),
    output:
        RUN + "/linear.json",
    params:
        settings=settings_arg,
        run_dir=run_dir,
    resources:
        launch=launch("evaluate"),
    threads: LOCAL_THREADS
    log:
        RUN + "/linear.log",
    shell:
        "{DCL} {resources.launch}linear-eval --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {JOB_TRACKING:q} "
        "--artifact-root {ARTIFACTS:q} --threads {threads} > {log:q} 2>&1"


rule knn:
    input:
        # ancient(): the file times of a fresh clone must not rerun a finished
        # evaluation. A retrained run still reruns it through its new features.
        features=RUN + "/features.npz",
        pretrain=ancient(RUN + "/pretrain.json"),
    output:
        RUN + "/knn.json",
    params:
        settings=settings_arg,
        run_dir=run_dir,
    resources:
        launch=launch("evaluate"),
    threads: LOCAL_THREADS
    log:
        RUN + "/knn.log",
    shell:
        "{DCL} {resources.launch}knn --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {JOB_TRACKING:q} "
        "--artifact-root {ARTIFACTS:q} --threads {threads} > {log:q} 2>&1"
