# Decode each dataset once into a uint8 cache shared by every run of the study.
# The data root is not a rule parameter: moving the data, or running without
# DCL_DATA_ROOT once the cache exists, must not rebuild the cache or rerun the grid.


rule prepare_data:
    output:
        ROOT + "/cache/{dataset}.npz",
    params:
        subsets=lambda w: (
            f"--train-subset {dataset_settings(w.dataset)['train_subset']} "
            if dataset_settings(w.dataset)["train_subset"] else ""
        ) + (
            f"--test-subset {dataset_settings(w.dataset)['test_subset']} "
            if dataset_settings(w.dataset)["test_subset"] else ""
        ),
        download="--allow-download" if config["allow_download"] else "",
    threads: LOCAL_THREADS
    log:
        ROOT + "/logs/prepare_data/{dataset}.log",
    shell:
        "{DCL} {LAUNCH_PREPARE}prepare-data --dataset {wildcards.dataset} --data-root {DATA_ROOT}/{wildcards.dataset} "
        "--out {output:q} {params.subsets}{params.download} --threads {threads} > {log:q} 2>&1"
