# With tracking_store: per_run, every pretrain and evaluation job logs to its own
# <run>/mlflow/<step>.db; this rule copies the finished runs of a dataset into the main
# store (tracking_uri). It runs on the submitting node, the one place that writes there.
# Importing again skips runs already imported. With only_finished, the finished runs.


def run_dirs(dataset):
    return [str(Path(path).parent) for path in grid_files(dataset, "pretrain.json")]


rule import_runs:
    input:
        lambda w: grid_files(w.dataset, "pretrain.json"),
        lambda w: grid_files(w.dataset, "linear.json"),
        lambda w: grid_files(w.dataset, "knn.json"),
    output:
        ROOT + "/tables/{dataset}_mlflow_import.json",
    params:
        runs=lambda w: run_dirs(w.dataset),
    log:
        ROOT + "/logs/aggregate/{dataset}_mlflow_import.log",
    shell:
        "{DCL} import-runs --tracking-uri {TRACKING:q} --artifact-root {ARTIFACTS:q} "
        "--out {output:q} {params.runs:q} > {log:q} 2>&1"
