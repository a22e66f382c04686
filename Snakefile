# Decoupled Contrastive Learning: pretrain -> features -> linear probe and kNN -> tables.
#
#   snakemake all                                   # the paper grid (config/config.yaml)
#   snakemake --configfile config/cpu.yaml all      # the CPU-scale grid under results/cpu/
#   snakemake results/tables/cifar10_top1.csv       # one table and its runs
#
# Cores and rerun triggers come from profiles/default; cluster submission from slurm/.

if not workflow.overwrite_configfiles:
    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
# only_finished=true draws tables and figures from the result files that exist. Without
# the rules that make them, nothing can be retrained, even where a rerun trigger fires.
if not config["only_finished"]:

    include: "workflow/rules/data.smk"
    include: "workflow/rules/pretrain.smk"
    include: "workflow/rules/evaluate.smk"


include: "workflow/rules/report.smk"
include: "workflow/rules/track.smk"


rule all:
    input:
        all_targets(),
    default_target: True


check_targets()
