#!/bin/bash
# KDAD TIPC driver: train -> eval -> export -> Paddle Inference, driven by a standard 51-line params file.
#
#   bash test_tipc/test_train_inference_python.sh test_tipc/configs/KDAD/train_infer_python.txt MODE [GPU_ID]
#
# MODE: lite_train_lite_infer | lite_train_whole_infer | whole_infer | whole_train_whole_infer (run
# prepare.sh with the same MODE first). The params file is in the standard TIPC layout, so the standard
# driver and common_func.sh of the Paddle repositories run it unmodified; this driver reads it the
# same way (and refuses a file the standard driver would misread). Project extensions come from a
# separate keyed file that only this driver reads: tipc_ext.txt beside the params file, when its
# "extends:" line names the params file (KDAD_TIPC_EXT=FILE uses FILE, KDAD_TIPC_EXT=none none):
#   cpu_data_parallel:N|...     N-process data-parallel CPU trainings (gloo), each with eval, export
#                               and the inference matrix, like a gpu_list entry
#   skip_unavailable:True       GPU / TensorRT steps write "Run skipped" lines where there is no GPU
#                               or TensorRT (also the default without an extension file)
#   extra_inference_dirs:a|b    more exported models (e.g. heatmap) through the inference matrix
# Writes test_tipc/output/<model_name>/<MODE>/results_python.log (one status line per step) and exits 1
# when any step failed. TIPC_DRY_RUN=1 prints the commands ("DRY RUN: <cmd>") instead of running them.
# See test_tipc/docs/test_train_inference_python.md. Run from the repository root.

source test_tipc/common_func.sh

FILENAME=$1
MODE=$2
if [ -z "${FILENAME}" ] || [ -z "${MODE}" ]; then
    echo "usage: bash test_tipc/test_train_inference_python.sh PARAMS_FILE MODE [GPU_ID]" >&2
    exit 2
fi
if [ ! -f "${FILENAME}" ]; then
    echo "error: params file '${FILENAME}' does not exist (run from the repository root)" >&2
    exit 2
fi
case ${MODE} in
    lite_train_lite_infer|lite_train_whole_infer|whole_infer|whole_train_whole_infer) ;;
    *) echo "error: unknown MODE '${MODE}'" >&2; exit 2 ;;
esac
DRY_RUN=${TIPC_DRY_RUN:-0}

func_read_params "${FILENAME}" 51
func_check_params_spec "${FILENAME}"

# ------------------------------------------------------------------------------- train params
# Parsed as the standard driver does: one plain value per line, per-mode lists only on idx 6 and 8.
model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
gpu_list=$(func_parser_value "${lines[3]}")
train_use_gpu_key=$(func_parser_key "${lines[4]}")
train_use_gpu_value=$(func_parser_value "${lines[4]}")
autocast_list=$(func_parser_value "${lines[5]}")
autocast_key=$(func_parser_key "${lines[5]}")
epoch_key=$(func_parser_key "${lines[6]}")
epoch_num=$(func_parser_params "${lines[6]}" "${MODE}")
save_model_key=$(func_parser_key "${lines[7]}")
train_batch_key=$(func_parser_key "${lines[8]}")
train_batch_value=$(func_parser_params "${lines[8]}" "${MODE}")
pretrain_model_key=$(func_parser_key "${lines[9]}")
pretrain_model_value=$(func_parser_value "${lines[9]}")
train_model_name=$(func_parser_value "${lines[10]}")
train_infer_img_dir=$(func_parser_value "${lines[11]}")
train_param_key1=$(func_parser_key "${lines[12]}")
train_param_value1=$(func_parser_value "${lines[12]}")

trainer_list=$(func_parser_value "${lines[14]}")
norm_trainer=$(func_parser_value "${lines[15]}")
pact_key=$(func_parser_key "${lines[16]}")
pact_trainer=$(func_parser_value "${lines[16]}")
fpgm_key=$(func_parser_key "${lines[17]}")
fpgm_trainer=$(func_parser_value "${lines[17]}")
distill_key=$(func_parser_key "${lines[18]}")
distill_trainer=$(func_parser_value "${lines[18]}")
trainer_key1=$(func_parser_key "${lines[19]}")
trainer_value1=$(func_parser_value "${lines[19]}")
trainer_key2=$(func_parser_key "${lines[20]}")
trainer_value2=$(func_parser_value "${lines[20]}")

# ------------------------------------------------------------------------------- eval params
eval_py=$(func_parser_value "${lines[23]}")
eval_key1=$(func_parser_key "${lines[24]}")
eval_value1=$(func_parser_value "${lines[24]}")

# ------------------------------------------------------------------------------- export params
save_infer_key=$(func_parser_key "${lines[27]}")
export_weight_key=$(func_parser_key "${lines[28]}")
norm_export=$(func_parser_value "${lines[29]}")
pact_export=$(func_parser_value "${lines[30]}")
fpgm_export=$(func_parser_value "${lines[31]}")
distill_export=$(func_parser_value "${lines[32]}")
export_value1=$(func_parser_value "${lines[33]}")
export_value2=$(func_parser_value "${lines[34]}")
inference_dir=$(func_parser_value "${lines[35]}")

# whole_infer only
infer_model_dir_list=$(func_parser_value "${lines[36]}")
infer_export_list=$(func_parser_value "${lines[37]}")
infer_is_quant=$(func_parser_value "${lines[38]}")

# ------------------------------------------------------------------------------- inference params
inference_py=$(func_parser_value "${lines[39]}")
use_gpu_key=$(func_parser_key "${lines[40]}")
use_gpu_list=$(func_parser_value "${lines[40]}")
use_mkldnn_key=$(func_parser_key "${lines[41]}")
use_mkldnn_list=$(func_parser_value "${lines[41]}")
cpu_threads_key=$(func_parser_key "${lines[42]}")
cpu_threads_list=$(func_parser_value "${lines[42]}")
batch_size_key=$(func_parser_key "${lines[43]}")
batch_size_list=$(func_parser_value "${lines[43]}")
use_trt_key=$(func_parser_key "${lines[44]}")
use_trt_list=$(func_parser_value "${lines[44]}")
precision_key=$(func_parser_key "${lines[45]}")
precision_list=$(func_parser_value "${lines[45]}")
infer_model_key=$(func_parser_key "${lines[46]}")
image_dir_key=$(func_parser_key "${lines[47]}")
infer_img_dir=$(func_parser_value "${lines[47]}")
save_log_key=$(func_parser_key "${lines[48]}")
benchmark_key=$(func_parser_key "${lines[49]}")
benchmark_value=$(func_parser_value "${lines[49]}")
infer_key1=$(func_parser_key "${lines[50]}")
infer_value1=$(func_parser_value "${lines[50]}")

# ------------------------------------------------------------------------------- extensions
ext_file=${KDAD_TIPC_EXT:-}
if [ -z "${ext_file}" ]; then
    ext_file="$(dirname "${FILENAME}")/tipc_ext.txt"
    extends="|$(func_ext_value "${ext_file}" extends)|"
    if [[ "${extends}" != *"|$(basename "${FILENAME}")|"* ]]; then
        ext_file=""  # no extension file, or one for another params file of this folder
    fi
elif [ "${ext_file}" = "none" ]; then
    ext_file=""
elif [ ! -f "${ext_file}" ]; then
    echo "error: KDAD_TIPC_EXT='${ext_file}' does not exist" >&2
    exit 2
fi
cpu_dp_list=$(func_ext_value "${ext_file}" cpu_data_parallel)
skip_unavailable=$(func_ext_value "${ext_file}" skip_unavailable)
skip_unavailable=${skip_unavailable:-True}
extra_inference_dirs=$(func_ext_value "${ext_file}" extra_inference_dirs)
[ "${cpu_dp_list}" = "null" ] && cpu_dp_list=""
[ "${extra_inference_dirs}" = "null" ] && extra_inference_dirs=""
if [[ -n "${cpu_dp_list}" && ! "${cpu_dp_list}" =~ ^[0-9]+(\|[0-9]+)*$ ]]; then
    echo "error: ${ext_file}: cpu_data_parallel must be process counts ('2' or '2|4'), got '${cpu_dp_list}'" >&2
    exit 2
fi
if [ -n "${ext_file}" ]; then
    echo "TIPC extensions from ${ext_file}: cpu_data_parallel=${cpu_dp_list:-none}, skip_unavailable=${skip_unavailable}, extra_inference_dirs=${extra_inference_dirs:-none}"
fi

# prepare.sh points the params file's fixed paths (test_tipc/data/<model>/) at one MODE's data.
prepared_mode_file="./test_tipc/data/${model_name}/mode"
prepared_mode=$(cat "${prepared_mode_file}" 2>/dev/null)
if [ "${prepared_mode}" != "${MODE}" ]; then
    msg="test_tipc/data/${model_name} is prepared for '${prepared_mode:-nothing}', not ${MODE}: run bash test_tipc/prepare.sh ${FILENAME} ${MODE} first"
    if [ "${DRY_RUN}" = "1" ]; then
        echo "warning: ${msg}" >&2
    else
        echo "error: ${msg}" >&2
        exit 2
    fi
fi

LOG_PATH="./test_tipc/output/${model_name}/${MODE}"
status_log="${LOG_PATH}/results_python.log"
if [ "${DRY_RUN}" = "1" ]; then
    status_log=/dev/null  # a dry run leaves the output of the last real run alone
else
    mkdir -p "${LOG_PATH}"
    rm -f "${status_log}"
    touch "${status_log}"
fi

# Built once, before the loops (upstream's GPU branch could miss it).
set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")

HAS_GPU=unknown
function has_gpu() {
    if [ "${HAS_GPU}" = "unknown" ]; then
        if tipc_has_gpu "${python}"; then HAS_GPU=yes; else HAS_GPU=no; fi
    fi
    [ "${HAS_GPU}" = "yes" ]
}

function skip_if_unavailable() {
    # $1 what ("gpu" or "tensorrt"); 0 when the step must be skipped (and not run).
    [ "${skip_unavailable}" = "True" ] || return 1
    [ "${DRY_RUN}" = "1" ] && return 1
    if [ "$1" = "gpu" ]; then
        ! has_gpu
    else
        ! tipc_has_tensorrt "${python}"
    fi
}

function run_step() {
    # $1 command (with its redirection), $2 its log file (shown). Sets STEP_STATUS.
    if [ "${DRY_RUN}" = "1" ]; then
        echo "DRY RUN: $1"
        STEP_STATUS=0
        return 0
    fi
    eval "$1"
    STEP_STATUS=$?
    if [ -n "$2" ] && [ -f "$2" ]; then
        if [ "${STEP_STATUS}" -ne 0 ]; then
            echo "----- ${2} (failed) -----"
            tail -n 60 "$2"
        else
            tail -n 4 "$2"
        fi
    fi
}

function record() {
    # $1 command, $2 log file: the status line of the step just run (none in a dry run)
    [ "${DRY_RUN}" = "1" ] && return 0
    status_check "${STEP_STATUS}" "$1" "${status_log}" "${model_name}" "$2"
}

# Exports checkpoint $2 with export command $1 into $3 (log $4) and records the status line.
function func_export() {
    local set_weight set_save cmd
    set_weight=$(func_set_params "${export_weight_key}" "$2")
    set_save=$(func_set_params "${save_infer_key}" "$3")
    cmd=$(echo "${python} $1 ${set_weight} ${set_save} > $4 2>&1 " | tr -s ' ')
    run_step "${cmd}" "$4"
    record "${cmd}" "$4"
}

function func_inference() {
    # $1 python, $2 script, $3 model dir, $4 log dir, $5 input, $6 is_quant, $7 gpu (label)
    local _python=$1 _script=$2 _model_dir=$3 _log_path=$4 _img_dir=$5 _flag_quant=$6 _gpu=${7:-}
    local IFS='|'
    local use_gpu use_mkldnn threads batch_size precision use_trt
    for use_gpu in ${use_gpu_list}; do
        if [ "${use_gpu}" = "False" ] || [ "${use_gpu}" = "cpu" ]; then
            for use_mkldnn in ${use_mkldnn_list}; do
                for threads in ${cpu_threads_list}; do
                    for batch_size in ${batch_size_list}; do
                        for precision in ${precision_list}; do
                            if [ "${use_mkldnn}" = "False" ] && [ "${precision}" = "fp16" ]; then
                                continue  # fp16 on CPU needs oneDNN (bf16)
                            fi
                            if [ "${_flag_quant}" = "True" ] && [ "${precision}" != "int8" ]; then
                                continue
                            fi
                            local _save_log_path="${_log_path}/python_infer_cpu${_gpu:+_gpus_${_gpu}}_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}.log"
                            local set_infer_data set_batchsize set_cpu_threads set_model_dir set_precision set_infer_params1 set_save_log set_use_gpu set_mkldnn
                            set_use_gpu=$(func_set_params "${use_gpu_key}" "${use_gpu}")
                            set_mkldnn=$(func_set_params "${use_mkldnn_key}" "${use_mkldnn}")
                            set_infer_data=$(func_set_params "${image_dir_key}" "${_img_dir}")
                            set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
                            set_cpu_threads=$(func_set_params "${cpu_threads_key}" "${threads}")
                            set_model_dir=$(func_set_params "${infer_model_key}" "${_model_dir}")
                            set_precision=$(func_set_params "${precision_key}" "${precision}")
                            set_save_log=$(func_set_params "${save_log_key}" "${_save_log_path}")
                            set_infer_params1=$(func_set_params "${infer_key1}" "${infer_value1}")
                            local command="${_python} ${_script} ${set_use_gpu} ${set_mkldnn} ${set_cpu_threads} ${set_model_dir} ${set_batchsize} ${set_save_log} ${set_infer_data} ${set_benchmark} ${set_precision} ${set_infer_params1} > ${_save_log_path} 2>&1 "
                            command=$(echo "${command}" | tr -s ' ')
                            run_step "${command}" "${_save_log_path}"
                            record "${command}" "${_save_log_path}"
                        done
                    done
                done
            done
        elif [ "${use_gpu}" = "True" ] || [ "${use_gpu}" = "gpu" ]; then
            for use_trt in ${use_trt_list}; do
                for precision in ${precision_list}; do
                    if [ "${_flag_quant}" = "False" ] && [ "${precision}" = "int8" ]; then
                        continue
                    fi
                    if { [ "${precision}" = "fp16" ] || [ "${precision}" = "int8" ]; } && [ "${use_trt}" = "False" ]; then
                        continue
                    fi
                    if [ "${use_trt}" = "False" ] && [ "${_flag_quant}" = "True" ]; then
                        continue
                    fi
                    for batch_size in ${batch_size_list}; do
                        local _save_log_path="${_log_path}/python_infer_gpu${_gpu:+_gpus_${_gpu}}_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}.log"
                        local set_infer_data set_batchsize set_tensorrt set_precision set_model_dir set_infer_params1 set_save_log set_use_gpu
                        set_use_gpu=$(func_set_params "${use_gpu_key}" "${use_gpu}")
                        set_infer_data=$(func_set_params "${image_dir_key}" "${_img_dir}")
                        set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
                        set_tensorrt=$(func_set_params "${use_trt_key}" "${use_trt}")
                        set_precision=$(func_set_params "${precision_key}" "${precision}")
                        set_model_dir=$(func_set_params "${infer_model_key}" "${_model_dir}")
                        set_save_log=$(func_set_params "${save_log_key}" "${_save_log_path}")
                        set_infer_params1=$(func_set_params "${infer_key1}" "${infer_value1}")
                        local command="${_python} ${_script} ${set_use_gpu} ${set_tensorrt} ${set_precision} ${set_model_dir} ${set_batchsize} ${set_infer_data} ${set_benchmark} ${set_infer_params1} ${set_save_log} > ${_save_log_path} 2>&1 "
                        command=$(echo "${command}" | tr -s ' ')
                        if skip_if_unavailable gpu; then
                            status_skip "no GPU" "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                            continue
                        fi
                        if [ "${use_trt}" = "True" ] && skip_if_unavailable tensorrt; then
                            status_skip "no TensorRT" "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                            continue
                        fi
                        run_step "${command}" "${_save_log_path}"
                        record "${command}" "${_save_log_path}"
                    done
                done
            done
        else
            echo "Does not support hardware other than CPU and GPU currently: use_gpu=${use_gpu}"
        fi
    done
}

function func_inference_all() {
    # The matrix on <export dir>/<inference_dir> (the export dir itself when null), then on every
    # extension extra_inference_dirs entry (logs in <log dir>/infer_<entry>/).
    # $1 python, $2 script, $3 export dir, $4 log dir, $5 input, $6 is_quant, $7 gpu label
    local _model_dir=$3
    if [ "${inference_dir}" != "null" ] && [ "${inference_dir}" != "##" ] && [ -n "${inference_dir}" ]; then
        _model_dir="$3/${inference_dir}"
    fi
    func_inference "$1" "$2" "${_model_dir}" "$4" "$5" "$6" "$7"
    local IFS='|'
    local extra
    for extra in ${extra_inference_dirs}; do
        [ "${DRY_RUN}" = "1" ] || mkdir -p "$4/infer_${extra}"
        func_inference "$1" "$2" "$3/${extra}" "$4/infer_${extra}" "$5" "$6" "$7"
    done
}

if [ "${MODE}" = "whole_infer" ]; then
    GPUID=$3
    if [ ${#GPUID} -le 0 ]; then
        env=" "
    else
        env="export CUDA_VISIBLE_DEVICES=${GPUID}"
    fi
    eval "${env}"
    IFS='|'
    infer_models=(${infer_model_dir_list})
    infer_exports=(${infer_export_list})
    infer_quants=(${infer_is_quant})
    unset IFS
    Count=0
    for infer_model in "${infer_models[@]}"; do
        export_entry=${infer_exports[${Count}]:-null}
        is_quant=${infer_quants[${Count}]:-False}
        infer_log_path=${LOG_PATH}
        if [ ${#infer_models[@]} -gt 1 ]; then
            infer_log_path="${LOG_PATH}/infer_model_${Count}"  # keep each model's inference logs apart
            [ "${DRY_RUN}" = "1" ] || mkdir -p "${infer_log_path}"
        fi
        if [ "${export_entry}" != "null" ]; then
            # export into the log folder (the standard driver exports onto infer_model itself)
            save_infer_dir="${LOG_PATH}/whole_infer_export_${Count}"
            [ "${DRY_RUN}" = "1" ] || rm -rf "${save_infer_dir}"
            func_export "${export_entry}" "${infer_model}" "${save_infer_dir}" \
                "${LOG_PATH}/whole_infer_export_${Count}.log"
        else
            save_infer_dir=${infer_model}  # already an inference model (or export) folder
        fi
        func_inference "${python}" "${inference_py}" "${save_infer_dir}" "${infer_log_path}" "${infer_img_dir}" "${is_quant}" "${GPUID}"
        Count=$((Count + 1))
    done
else
    IFS='|'
    gpus=(${gpu_list})
    train_use_gpus=(${train_use_gpu_value})
    autocasts=(${autocast_list})
    trainers=(${trainer_list})
    cpu_dp=(${cpu_dp_list})
    unset IFS
    entries=("${gpus[@]}")
    for n in "${cpu_dp[@]}"; do
        entries+=("cpu${n}")  # extension entries, after the params file's own
    done
    Count=0
    for gpu in "${entries[@]}"; do
        train_use_gpu=${train_use_gpus[${Count}]:-null}
        Count=$((Count + 1))
        ips=""
        nproc=""
        if [ "${gpu}" = "-1" ]; then
            env=""
            kind=cpu
        elif [[ "${gpu}" =~ ^cpu([0-9]+)$ ]]; then
            env=""
            kind=cpu_dist  # extension: data-parallel training with N CPU processes
            nproc=${BASH_REMATCH[1]}
            train_use_gpu=null
        elif [ ${#gpu} -le 1 ]; then
            env="export CUDA_VISIBLE_DEVICES=${gpu}"
            kind=gpu
        elif [ ${#gpu} -le 15 ]; then
            IFS=","
            array=(${gpu})
            unset IFS
            env="export CUDA_VISIBLE_DEVICES=${array[0]}"
            kind=gpu_dist
        else
            IFS=";"
            array=(${gpu})
            unset IFS
            ips=${array[0]}
            gpu=${array[1]}
            IFS=","
            ip_array=(${ips})
            unset IFS
            env="export CUDA_VISIBLE_DEVICES=${gpu%%,*}"
            kind=gpu_nodes
        fi
        nodes=1
        if [ -n "${ips}" ]; then
            nodes=${#ip_array[@]}
        fi

        for autocast in "${autocasts[@]}"; do
            for trainer in "${trainers[@]}"; do
                flag_quant=False
                if [ "${trainer}" = "${pact_key}" ]; then
                    run_train=${pact_trainer}; run_export=${pact_export}; flag_quant=True
                elif [ "${trainer}" = "${fpgm_key}" ]; then
                    run_train=${fpgm_trainer}; run_export=${fpgm_export}
                elif [ "${trainer}" = "${distill_key}" ]; then
                    run_train=${distill_trainer}; run_export=${distill_export}
                elif [ "${trainer}" = "${trainer_key1}" ]; then
                    run_train=${trainer_value1}; run_export=${export_value1}
                elif [ "${trainer}" = "${trainer_key2}" ]; then
                    run_train=${trainer_value2}; run_export=${export_value2}
                else
                    run_train=${norm_trainer}; run_export=${norm_export}
                fi
                if [ "${run_train}" = "null" ] || [ -z "${run_train}" ]; then
                    continue
                fi

                set_autocast=$(func_set_params "${autocast_key}" "${autocast}")
                set_epoch=$(func_set_params "${epoch_key}" "${epoch_num}")
                set_pretrain=$(func_set_params "${pretrain_model_key}" "${pretrain_model_value}")
                set_batchsize=$(func_set_params "${train_batch_key}" "${train_batch_value}")
                set_train_params1=$(func_set_params "${train_param_key1}" "${train_param_value1}")
                set_use_gpu=$(func_set_params "${train_use_gpu_key}" "${train_use_gpu}")
                run_name="${trainer}_gpus_${gpu}_autocast_${autocast}"
                if [ -n "${ips}" ]; then
                    run_name="${run_name}_nodes_${nodes}"
                fi
                save_log="${LOG_PATH}/${run_name}"
                set_save_model=$(func_set_params "${save_model_key}" "${save_log}")
                train_flags="${set_use_gpu} ${set_save_model} ${set_epoch} ${set_pretrain} ${set_autocast} ${set_batchsize} ${set_train_params1}"
                case ${kind} in
                    cpu|gpu)
                        cmd="${python} ${run_train} ${train_flags}" ;;
                    cpu_dist)
                        cmd="${python} -m paddle.distributed.launch --nproc_per_node ${nproc} --host 127.0.0.1 --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                    gpu_dist)
                        cmd="${python} -m paddle.distributed.launch --devices=${gpu} --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                    gpu_nodes)
                        cmd="${python} -m paddle.distributed.launch --ips=${ips} --devices=${gpu} --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                esac
                train_log_path="${LOG_PATH}/${run_name}_train.log"
                cmd=$(echo "${cmd} > ${train_log_path} 2>&1 " | tr -s ' ')

                if [[ "${kind}" == gpu* ]] && skip_if_unavailable gpu; then
                    status_skip "no GPU" "${cmd}" "${status_log}" "${model_name}" "${train_log_path}"
                    continue
                fi

                [ "${DRY_RUN}" = "1" ] || rm -rf "${save_log}"
                unset CUDA_VISIBLE_DEVICES
                t0=$(date +%s)
                run_step "${cmd}" "${train_log_path}"
                [ "${DRY_RUN}" = "1" ] || echo "training took $(( $(date +%s) - t0 )) s"
                record "${cmd}" "${train_log_path}"

                set_eval_pretrain=$(func_set_params "${pretrain_model_key}" "${save_log}/${train_model_name}")
                # eval
                if [ "${eval_py}" != "null" ] && [ -n "${eval_py}" ]; then
                    eval "${env}"
                    set_eval_params1=$(func_set_params "${eval_key1}" "${eval_value1}")
                    eval_log_path="${LOG_PATH}/${run_name}_eval.log"
                    eval_cmd="${python} ${eval_py} ${set_eval_pretrain} ${set_use_gpu} ${set_eval_params1} > ${eval_log_path} 2>&1 "
                    eval_cmd=$(echo "${eval_cmd}" | tr -s ' ')
                    run_step "${eval_cmd}" "${eval_log_path}"
                    record "${eval_cmd}" "${eval_log_path}"
                fi
                # export and inference
                if [ "${run_export}" != "null" ] && [ -n "${run_export}" ]; then
                    func_export "${run_export}" "${save_log}/${train_model_name}" "${save_log}" \
                        "${LOG_PATH}/${run_name}_nodes_${nodes}_export.log"

                    eval "${env}"
                    func_inference_all "${python}" "${inference_py}" "${save_log}" "${LOG_PATH}" "${train_infer_img_dir}" "${flag_quant}" "${gpu}"
                    eval "unset CUDA_VISIBLE_DEVICES"
                fi
            done
        done
    done
fi

if [ "${DRY_RUN}" = "1" ]; then
    exit 0
fi
tipc_summary "${status_log}"
exit $?
