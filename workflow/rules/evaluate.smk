# Frozen-backbone evaluation: features once, then the linear probe and weighted kNN.


rule extract_features:
    input:
        cache=ROOT + "/cache/{dataset}.npz",
        weights=RUN + "/backbone.pt",
    output:
        temp(RUN + "/features.npz"),
    params:
        settings=settings_arg,
        run_dir=run_dir,
    resources:
        launch=launch("evaluate"),
    threads: LOCAL_THREADS
    log:
        RUN + "/features.log",
    shell:
        "{DCL} {resources.launch}extract-features --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --cache {input.cache:q} --threads {threads} > {log:q} 2>&1"


rule linear_eval:
    input:
        features=RUN + "/features.npz",
        pretrain=RUN + "/pretrain.json",
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
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {TRACKING:q} "
        "--artifact-root {ARTIFACTS:q} --threads {threads} > {log:q} 2>&1"


rule knn:
    input:
        features=RUN + "/features.npz",
        pretrain=RUN + "/pretrain.json",
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
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {TRACKING:q} "
        "--artifact-root {ARTIFACTS:q} --threads {threads} > {log:q} 2>&1"
