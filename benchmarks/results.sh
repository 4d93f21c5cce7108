#!/usr/bin/env bash
# Every run behind docs/results.md (`make results`), or the sections named:
#   benchmarks/results.sh [ablation] [inference] [segmentation] [settings] [knobs] [figures] [art]
# Rows go to runs/localisation/rows.jsonl and segmentation.jsonl; a finished row is not
# recomputed, an interrupted one resumes, so re-running after a stop continues the grid.
# runs/localisation/table.md is the mean ± std table of every row; the figures section prints the
# tables of docs/results.md sections 5-6 and keeps their rows in docs/data/results_rows.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GRID="$PY benchmarks/localisation_grid.py --seeds 0 1 2"
BASIC="loss.coatt=false,loss.contrastive=false"
OURS_VARIANTS="--variant cam:combine=cam --variant coatt:combine=coatt --variant all:combine=all"
SECTIONS=${*:-ablation inference segmentation settings knobs figures art}
# the art benchmark (configs/demo.yaml: ImageNet EfficientNet-Lite0; tiny from scratch as the control)
ART="$PY benchmarks/localisation_grid.py --seeds 0 1 2 --config configs/demo.yaml --root runs/art"
TINY="backbone=tiny,pretrained=none,output_stride=8,lr=0.015,epochs=10"
ART_OURS="--variant cam:combine=cam --variant coatt:combine=coatt --variant all:combine=all --variant cam_coatt:combine=cam+coatt"

pair() {  # NAME SCENE OVERRIDES: the basic CAM and the full method, trained with OVERRIDES on the SCENE benchmark
    $GRID --scene "$2" --setting "$1_basic:$BASIC${3:+,$3}" --variant cam:combine=cam
    $GRID --scene "$2" --setting "$1_ours:$3" $OURS_VARIANTS
}

for section in $SECTIONS; do
    echo "== $section ($(date -u +%H:%M:%S))"
    case $section in
    ablation)
        $GRID --setting "basic:$BASIC" --variant cam:combine=cam  # its co-attention never trained: no co-att maps
        $GRID --setting coatt_nocon:loss.contrastive=false --setting ours: \
            --setting selfpairs:loss.self_pairs=true --setting pcommon05:p_common=0.5 $OURS_VARIANTS
        $GRID --setting official:recipe=official --setting official_heads:recipe=official,heads=ours $OURS_VARIANTS \
            --variant "reference:aggregate=reference,partners=replace,scales=[1.0]" ;;  # the reference's inference too
    inference)
        $GRID --setting ours: --variant self:combine=self --variant coatt_k1:combine=coatt,k=1 \
            --variant coatt_k5:combine=coatt,k=5 --variant all_k1:combine=all,k=1 --variant all_k5:combine=all,k=5 --variant cam_coatt:combine=cam+coatt \
            --variant "reference:aggregate=reference,partners=replace,scales=[1.0]" ;;
    segmentation)
        $PY benchmarks/segmentation_grid.py --seeds 0 1 2 --run basic/cam:combine=cam --run ours/all:combine=all \
            --run ours/cam_coatt:combine=cam+coatt ;;
    settings)  # METHOD.md sec. 5: 2 = train + single-label images, 3 = train + noisy web images
        pair s2 "" "split=[train,train_single]"
        pair s3 "" "split=[train,train_web]"
        pair s3n06 noise_rate=0.6 "split=[train,train_web]" ;;
    knobs)  # the benchmark's realism knobs (data/README.md): class-following bodies, no context bands
        pair bc1 body_class=1 ""
        pair ctx0 context_p=0 "" ;;
    figures)
        $PY benchmarks/localisation_grid.py --figure figures/results_ablation_maps.png --images 6 \
            --column "basic CAM=basic/cam" --column "+ co-att: all=coatt_nocon/all" --column "ours: own CAM=ours/cam" \
            --column "ours: co-att=ours/coatt" --column "ours: CAM + co-att + self=ours/all" \
            --column "ours: CAM + co-att=ours/cam_coatt" --column "+ self-pairs: all=selfpairs/all" \
            --column "official, our heads: CAM=official_heads/cam" --column "official, our heads: all=official_heads/all"
        $PY benchmarks/localisation_grid.py --figure figures/results_settings.png --images 6 \
            --column "CAM, setting 2=s2_basic/cam" --column "ours all, setting 2=s2_ours/all" \
            --column "CAM, setting 3=s3_basic/cam" --column "ours all, setting 3=s3_ours/all" \
            --column "CAM, 3 at noise 0.6=s3n06_basic/cam" --column "ours all, 3 at noise 0.6=s3n06_ours/all"
        $PY benchmarks/results_report.py ;;  # the tables of sections 5-6, figures/results_*.png
    art)  # docs/results.md, "The art benchmark"
        $ART --setting "basic:$BASIC,epochs=4" --variant cam:combine=cam
        $ART --setting ours:epochs=4 $ART_OURS
        $PY benchmarks/segmentation_grid.py --seeds 0 1 2 --config configs/demo.yaml --root runs/art \
            --run basic/cam:combine=cam --run ours/all:combine=all
        $ART --setting "ours_top:epochs=4,coatt_pool_share=0.25" $ART_OURS  # top-r pooling of s^{m∩n}
        $ART --setting "tiny_basic:$BASIC,$TINY" --variant cam:combine=cam
        $ART --setting "tiny_ours:$TINY" $ART_OURS
        $ART --figure figures/art_maps.png --images 6 --column "basic CAM=basic/cam" --column "ours: own CAM=ours/cam" \
            --column "ours: co-att (k = 3)=ours/coatt" --column "ours: CAM + co-att=ours/cam_coatt" \
            --column "ours: CAM + co-att + self=ours/all" --column "top-r pooling: co-att=ours_top/coatt" ;;
    *) echo "unknown section $section: choose from ablation inference segmentation settings knobs figures art" >&2
       exit 2 ;;
    esac
done
echo "== done ($(date -u +%H:%M:%S))"
