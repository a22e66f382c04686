# Decode each dataset once into a uint8 cache (or index its files, data.source stream)
# shared by every run of the study. The data root is not a rule parameter: moving the
# data, or running without DCL_DATA_ROOT once the cache exists, must not rebuild the
# cache or rerun the grid.

LINKED = linked_datasets()
# Exactly one of the two prepare rules matches a dataset, so no job is ambiguous.
# (A negative look-ahead: not a linked name followed by anything but a name character.)
NOT_LINKED = f"(?!(?:{'|'.join(LINKED)})(?![a-z0-9]))[a-z0-9]+" if LINKED else "[a-z0-9]+"
ONLY_LINKED = "|".join(LINKED) if LINKED else "(?!)"  # (?!) matches nothing


def prepare_params(wildcards):
    """Subset, download and source options of prepare-data for one dataset."""
    settings = dataset_settings(wildcards.dataset)
    words = [f"--source {settings['data']['source']}"]
    for split in ("train", "test"):
        if settings[f"{split}_subset"]:
            words.append(f"--{split}-subset {settings[f'{split}_subset']}")
    if config["allow_download"]:
        words.append("--allow-download")
    return " ".join(words)


rule prepare_data:
    output:
        ROOT + "/cache/{dataset}.npz",
    wildcard_constraints:
        dataset=NOT_LINKED,
    params:
        options=prepare_params,
    resources:
        launch=launch("prepare_data"),
    threads: LOCAL_THREADS
    log:
        ROOT + "/logs/prepare_data/{dataset}.log",
    shell:
        "{DCL} {resources.launch}prepare-data --dataset {wildcards.dataset} --data-root {DATA_ROOT}/{wildcards.dataset} "
        "--out {output:q} {params.options} --threads {threads} > {log:q} 2>&1"


# A class-list subset (ImageNet-100): symbolic links to the parent's class folders.
rule link_classes:
    input:
        classes=lambda w: dataset_settings(w.dataset)["data"]["class_list"],
    output:
        directory(ROOT + "/data/{dataset}"),
    wildcard_constraints:
        dataset=ONLY_LINKED,
    params:
        parent=lambda w: dataset_settings(w.dataset)["data"]["parent"],
    log:
        ROOT + "/logs/link_classes/{dataset}.log",
    shell:
        "{DCL} link-classes --class-list {input.classes:q} --source {DATA_ROOT}/{params.parent} "
        "--out {output:q} > {log:q} 2>&1"


rule prepare_linked_data:
    input:
        ROOT + "/data/{dataset}",
    output:
        ROOT + "/cache/{dataset}.npz",
    wildcard_constraints:
        dataset=ONLY_LINKED,
    params:
        options=prepare_params,
    resources:
        launch=launch("prepare_data"),
    threads: LOCAL_THREADS
    log:
        ROOT + "/logs/prepare_data/{dataset}.log",
    shell:
        "{DCL} {resources.launch}prepare-data --dataset {wildcards.dataset} --data-root {input:q} "
        "--out {output:q} {params.options} --threads {threads} > {log:q} 2>&1"
