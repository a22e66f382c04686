# Tables and figures of each dataset, built from the per-run result files only.



def grid_args(wildcards):
    """The table axes of the dataset: --losses, --batch-sizes and --epochs."""
    grid = grid_of(wildcards.dataset)
    return (
        f"--losses {' '.join(grid['losses'])} "
        f"--batch-sizes {' '.join(map(str, grid['batch_sizes']))} "
        f"--epochs {' '.join(map(str, grid['epochs']))}"
    )


def loss_names(wildcards):
    return " ".join(grid_of(wildcards.dataset)["losses"])


def batch_and_epoch_args(wildcards):
    """--batch-sizes and --epochs of the dataset's grid."""
    grid = grid_of(wildcards.dataset)
    return (f"--batch-sizes {' '.join(map(str, grid['batch_sizes']))} "
            f"--epochs {' '.join(map(str, grid['epochs']))}")


rule aggregate_linear:
    input:
        lambda w: grid_files(w.dataset, "linear.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_top1.csv", caption="../report/table.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_top1.md",
        png=report(ROOT + "/figures/{dataset}_batch_size.png", caption="../report/batch_size.rst", category="Figures"),
    params:
        grid=grid_args,
    log:
        ROOT + "/logs/aggregate/{dataset}_linear.log",
    shell:
        "{DCL} aggregate --dataset {wildcards.dataset} {params.grid} --csv {output.csv:q} "
        "--md {output.md:q} --png {output.png:q} {input:q} > {log:q} 2>&1"


rule aggregate_knn:
    input:
        lambda w: grid_files(w.dataset, "knn.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_knn_top1.csv", caption="../report/knn_table.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_knn_top1.md",
        png=report(ROOT + "/figures/{dataset}_knn_batch_size.png", caption="../report/batch_size.rst", category="Figures"),
    params:
        grid=grid_args,
    log:
        ROOT + "/logs/aggregate/{dataset}_knn.log",
    shell:
        "{DCL} aggregate --dataset {wildcards.dataset} {params.grid} --ylabel 'kNN top-1 (%)' "
        "--csv {output.csv:q} --md {output.md:q} --png {output.png:q} {input:q} > {log:q} 2>&1"


rule difference:
    input:
        lambda w: grid_files(w.dataset, "linear.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_{method}_minus_{baseline}.csv", caption="../report/difference.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_{method}_minus_{baseline}.md",
    log:
        ROOT + "/logs/aggregate/{dataset}_{method}_minus_{baseline}.log",
    params:
        axes=batch_and_epoch_args,
    shell:
        "{DCL} difference --dataset {wildcards.dataset} --method {wildcards.method} "
        "--baseline {wildcards.baseline} {params.axes} "
        "--csv {output.csv:q} --md {output.md:q} {input:q} > {log:q} 2>&1"


# The same pair on the kNN monitor at every monitored epoch, beside the baseline's q_B:
# does the gap open as q_B falls?
rule difference_by_epoch:
    input:
        lambda w: grid_files(w.dataset, "pretrain.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_{method}_minus_{baseline}_by_epoch.csv", caption="../report/difference_by_epoch.rst", category="Diagnostics"),
        md=ROOT + "/tables/{dataset}_{method}_minus_{baseline}_by_epoch.md",
    log:
        ROOT + "/logs/aggregate/{dataset}_{method}_minus_{baseline}_by_epoch.log",
    params:
        axes=batch_and_epoch_args,
    shell:
        "{DCL} difference-by-epoch --dataset {wildcards.dataset} --method {wildcards.method} "
        "--baseline {wildcards.baseline} {params.axes} --csv {output.csv:q} --md {output.md:q} "
        "{input:q} > {log:q} 2>&1"


rule diagnostics:
    input:
        lambda w: grid_files(w.dataset, "pretrain.json"),
    output:
        npc=report(ROOT + "/figures/{dataset}_npc.png", caption="../report/npc.rst", category="Diagnostics"),
        curves=report(ROOT + "/figures/{dataset}_curves.png", caption="../report/curves.rst", category="Diagnostics"),
    params:
        losses=loss_names,
    log:
        ROOT + "/logs/aggregate/{dataset}_diagnostics.log",
    shell:
        "{DCL} diagnostics --dataset {wildcards.dataset} --losses {params.losses} "
        "--npc-png {output.npc:q} --curves-png {output.curves:q} {input:q} > {log:q} 2>&1"


rule track_summary:
    input:
        ROOT + "/tables/{dataset}_top1.csv",
        ROOT + "/tables/{dataset}_top1.md",
        ROOT + "/tables/{dataset}_knn_top1.csv",
        ROOT + "/figures/{dataset}_batch_size.png",
        ROOT + "/figures/{dataset}_knn_batch_size.png",
        ROOT + "/figures/{dataset}_npc.png",
        ROOT + "/figures/{dataset}_curves.png",
    output:
        ROOT + "/tables/{dataset}_mlflow_summary.json",
    log:
        ROOT + "/logs/aggregate/{dataset}_mlflow_summary.log",
    shell:
        "{DCL} log-summary --dataset {wildcards.dataset} --study {config[study]} "
        "--tracking-uri {TRACKING:q} --artifact-root {ARTIFACTS:q} --out {output:q} "
        "{input:q} > {log:q} 2>&1"


# Every reference number (the paper's, and labelled outside reproductions) beside the
# mean of this study's runs with the same key; keys without runs stay in as missing.
rule paper_vs_reproduced:
    input:
        reference=config["reference"]["file"],
        results=lambda w: [
            path
            for dataset in GRID["datasets"]
            for name in ("linear.json", "knn.json")
            for path in grid_files(dataset, name)
        ],
    output:
        csv=report(ROOT + "/tables/paper_vs_reproduced.csv", caption="../report/paper_vs_reproduced.rst", category="Tables"),
        md=ROOT + "/tables/paper_vs_reproduced.md",
    params:
        tolerance=config["reference"]["tolerance"],
    log:
        ROOT + "/logs/aggregate/paper_vs_reproduced.log",
    shell:
        "{DCL} compare --reference {input.reference:q} --study {config[study]} "
        "--tolerance {params.tolerance} --csv {output.csv:q} --md {output.md:q} "
        "{input.results:q} > {log:q} 2>&1"
