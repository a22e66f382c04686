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
    threads: LOCAL_THREADS
    log:
        RUN + "/features.log",
    shell:
        "{DCL} {LAUNCH_EVALUATE}extract-features --settings {params.settings} --dataset {wildcards.dataset} "
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
    threads: LOCAL_THREADS
    log:
        RUN + "/linear.log",
    shell:
        "{DCL} {LAUNCH_EVALUATE}linear-eval --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {JOB_TRACKING:q} "
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
    threads: LOCAL_THREADS
    log:
        RUN + "/knn.log",
    shell:
        "{DCL} {LAUNCH_EVALUATE}knn --settings {params.settings} --dataset {wildcards.dataset} "
        "--run-dir {params.run_dir:q} --study {config[study]} --tracking-uri {JOB_TRACKING:q} "
        "--artifact-root {ARTIFACTS:q} --threads {threads} > {log:q} 2>&1"
