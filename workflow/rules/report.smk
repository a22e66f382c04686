# Tables and figures of each dataset, built from the per-run result files only.

LOSS_NAMES = " ".join(GRID["losses"])
BATCH_NAMES = " ".join(map(str, GRID["batch_sizes"]))
EPOCH_NAMES = " ".join(map(str, GRID["epochs"]))
GRID_ARGS = (
    f"--losses {LOSS_NAMES} "
    f"--batch-sizes {' '.join(map(str, GRID['batch_sizes']))} "
    f"--epochs {' '.join(map(str, GRID['epochs']))}"
)


rule aggregate_linear:
    input:
        lambda w: grid_files(w.dataset, "linear.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_top1.csv", caption="../report/table.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_top1.md",
        png=report(ROOT + "/figures/{dataset}_batch_size.png", caption="../report/batch_size.rst", category="Figures"),
    log:
        ROOT + "/logs/aggregate/{dataset}_linear.log",
    shell:
        "{DCL} aggregate --dataset {wildcards.dataset} {GRID_ARGS} --csv {output.csv:q} "
        "--md {output.md:q} --png {output.png:q} {input:q} > {log:q} 2>&1"


rule aggregate_knn:
    input:
        lambda w: grid_files(w.dataset, "knn.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_knn_top1.csv", caption="../report/knn_table.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_knn_top1.md",
        png=report(ROOT + "/figures/{dataset}_knn_batch_size.png", caption="../report/batch_size.rst", category="Figures"),
    log:
        ROOT + "/logs/aggregate/{dataset}_knn.log",
    shell:
        "{DCL} aggregate --dataset {wildcards.dataset} {GRID_ARGS} --ylabel 'kNN top-1 (%)' "
        "--csv {output.csv:q} --md {output.md:q} --png {output.png:q} {input:q} > {log:q} 2>&1"


rule difference:
    input:
        lambda w: grid_files(w.dataset, "linear.json"),
    output:
        csv=report(ROOT + "/tables/{dataset}_{method}_minus_{baseline}.csv", caption="../report/difference.rst", category="Tables"),
        md=ROOT + "/tables/{dataset}_{method}_minus_{baseline}.md",
    log:
        ROOT + "/logs/aggregate/{dataset}_{method}_minus_{baseline}.log",
    shell:
        "{DCL} difference --dataset {wildcards.dataset} --method {wildcards.method} "
        "--baseline {wildcards.baseline} --batch-sizes {BATCH_NAMES} --epochs {EPOCH_NAMES} "
        "--csv {output.csv:q} --md {output.md:q} {input:q} > {log:q} 2>&1"


rule diagnostics:
    input:
        lambda w: grid_files(w.dataset, "pretrain.json"),
    output:
        npc=report(ROOT + "/figures/{dataset}_npc.png", caption="../report/npc.rst", category="Diagnostics"),
        curves=report(ROOT + "/figures/{dataset}_curves.png", caption="../report/curves.rst", category="Diagnostics"),
    log:
        ROOT + "/logs/aggregate/{dataset}_diagnostics.log",
    shell:
        "{DCL} diagnostics --dataset {wildcards.dataset} --losses {LOSS_NAMES} "
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
